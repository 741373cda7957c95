"""Item-level fusion of anchor lists from runs of ``anchors_quality.py`` on different SIDs.

``anchors_quality.py --ensemble-models`` combines LMs that share one SID tokenization inside the
beam search. LMs trained on *different* SIDs (another ``--seed``) cannot share a beam: their
tokens mean different things. Their anchors still name catalog items, so their ranked lists can be
fused per user. This diagnostic asks how much of the gap to co-occurrence is the variance of one
tokenization: it reads each run's ``WORK_DIR/anchors/user_interest_anchors.parquet`` (20 anchors
per user, best first, with log-probabilities) and scores, on the same test targets:

* each run alone (its top 10),
* every prefix of the run list fused by reciprocal rank (``rrf``, c = 60, Cormack et al. 2009),
* the same prefixes fused by probability (``prob``: each run's anchor probabilities normalized
  within the user's list, summed over runs).

The runs must have been made on the same users (same ``--max-users``, the full set by default).
Prints a table and writes ``--out`` (JSON).

    .venv/bin/python benchmarks/anchors_fusion.py RUN_DIR [RUN_DIR ...] --out FILE
"""

from __future__ import annotations

import argparse
import json
import platform
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from anchors_quality import DATA, fused_ranking, load, metrics

ANCHORS = Path("anchors") / "user_interest_anchors.parquet"
K = 10


def run_lists(
    run_dir: Path, test: list[tuple[str, list[int], int]], asin_index: dict[str, int]
) -> tuple[list[list[int]], list[list[float]]]:
    """One run's anchors per test user (catalog indices, best first) and their log-probs.

    ``run_dir`` is the ``--work-dir`` of a single-model run, or one decode's folder of an
    ``--ensemble-models`` run (``WORK_DIR/anchors/ensembleK_RULE``).
    """
    path = run_dir / ANCHORS
    if not path.exists() and (run_dir / ANCHORS.name).exists():
        path = run_dir / ANCHORS.name
    if not path.exists():
        raise SystemExit(
            f"{path} not found: pass the --work-dir of a finished anchors_quality run, or for an "
            "--ensemble-models run the folder of one decode, WORK_DIR/anchors/ensembleK_RULE"
        )
    table = pq.read_table(path, columns=["user_id", "anchor_item_ids", "anchor_log_probs"])
    rows = {r["user_id"]: (r["anchor_item_ids"], r["anchor_log_probs"]) for r in table.to_pylist()}
    missing = sum(f"u{u}" not in rows for u, _, _ in test)
    if missing:
        raise SystemExit(f"{path}: {missing} test users have no anchors (other --max-users?)")
    items = [[asin_index[a] for a in rows[f"u{u}"][0]] for u, _, _ in test]
    log_probs = [list(rows[f"u{u}"][1]) for u, _, _ in test]
    return items, log_probs


def prob_fusion(runs: list[tuple[list[list[int]], list[list[float]]]], k: int) -> list[list[int]]:
    """Per user: the items with the largest sum over runs of their within-list probability."""
    out = []
    for u in range(len(runs[0][0])):
        score: dict[int, float] = {}
        for items, log_probs in runs:
            lp = np.asarray(log_probs[u], dtype=np.float64)
            p = np.exp(lp - lp.max())
            p /= p.sum()
            for item, w in zip(items[u], p, strict=True):
                score[item] = score.get(item, 0.0) + float(w)
        out.append(sorted(score, key=lambda i: -score[i])[:k])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("runs", type=Path, nargs="+", help="--work-dir of anchors_quality runs")
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--max-users", type=int, default=None, help="as the runs were made")
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="the runs' subsample seed (their --subsample-seed, else their --seed; --max-users)",
    )
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/anchors_fusion.json"))
    args = p.parse_args()

    data = load(args.data, args.max_users, args.seed)
    test, index = data["test"], data["index"]
    targets = [t for _, _, t in test]
    asin_index = {a: i for i, a in index.items()}
    runs = [run_lists(r, test, asin_index) for r in args.runs]

    results: dict[str, Any] = {}
    for r, (items, _) in zip(args.runs, runs, strict=True):
        results[f"alone: {r}"] = metrics([x[:K] for x in items], targets)
    for n in range(2, len(runs) + 1):
        results[f"rrf, first {n}"] = metrics(fused_ranking([x for x, _ in runs[:n]], K), targets)
        results[f"prob, first {n}"] = metrics(prob_fusion(runs[:n], K), targets)

    print(f"Amazon Scientific, {len(test)} users, item-level fusion of {len(runs)} runs")
    print(f"{'lists':<48}{'HR@5':>9}{'NDCG@5':>9}{'HR@10':>9}{'NDCG@10':>9}")
    for name, m in results.items():
        print(
            f"{name:<48}{m['hr@5']:>9.4f}{m['ndcg@5']:>9.4f}{m['hr@10']:>9.4f}{m['ndcg@10']:>9.4f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "benchmark": "anchors_fusion",
                "date": datetime.now(UTC).isoformat(timespec="seconds"),
                "machine": platform.platform(),
                "runs": [str(r) for r in args.runs],
                "users": len(test),
                "results": results,
            },
            indent=2,
        )
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
