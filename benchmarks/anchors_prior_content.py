"""The anchors' prior alone on Amazon Scientific: co-occurrence times the history's content density.

No LM, no SIDs: the item-level ranking of the product's own prior
(:class:`training.anchors.prior.CooccurrencePrior`, ``p(i | h)``) for every setting of its
content factor on a grid (``prior.content_weight`` ``B`` x ``prior.content_temperature`` ``tau``),
with the user's own items left out of every list (``generation.exclude_history``), against
co-occurrence tuned as in ``anchors_quality.py`` (window, direction and decay chosen on the
validation targets), with its own items left out too. It is how the content factor's settings
were chosen: on the **validation** targets (each user's history without its last item predicts
that item; the prior is counted on those shortened histories), the test figures printed beside
them for the record, never used for the choice.

Content embeddings: the all-MiniLM-L6-v2 vectors of the items' text (the SID stage's encoder,
``--encoder`` for another local copy), as ``content_embedding`` carries them.

    .venv/bin/python benchmarks/anchors_prior_content.py [--out F.json]

Prints a table and writes ``benchmarks/results/anchors_prior_content.json`` (about 3 minutes on
the 2-core dev box, half of it encoding the 4,385 items).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from anchors_quality import (
    DATA,
    cooc_baseline,
    cooc_lists,
    load,
    metrics,
    paired_comparison,
    prior_top_k,
)

from training.anchors.prior import CooccurrencePrior, PriorConfig
from training.sids.encoder import EncoderConfig, TextEncoder

WEIGHTS = (0.0, 0.1, 0.2, 0.4, 0.8, 1.6)
TEMPERATURES = (0.05, 0.1, 0.2)


def prior_lists(
    histories: list[list[int]],
    item_ids: np.ndarray,
    embeddings: np.ndarray,
    cfg: PriorConfig,
    k: int = 10,
) -> list[list[int]]:
    """Top-``k`` items of the product's prior fitted on ``histories``, own items left out."""
    rows = [np.asarray(h, dtype=np.int64) for h in histories]
    prior = CooccurrencePrior.fit(rows, item_ids, cfg, embeddings)
    return prior_top_k(prior, rows, cfg, exclude_history=True, k=k)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--encoder", type=Path, default=None, help="local encoder directory")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--out", type=Path, default=Path("benchmarks/results/anchors_prior_content.json")
    )
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    data = load(args.data, None, 0)
    test, index = data["test"], data["index"]
    n_items = len(index)
    texts = data["items"].column("text").to_pylist()
    encoder = TextEncoder(
        EncoderConfig(model_path=None if args.encoder is None else str(args.encoder))
    )
    embeddings = encoder.encode(texts)  # row i = index i (load() orders items by index)
    item_ids = np.array([index[i] for i in range(n_items)])
    splits = {
        "validation": (
            [h[:-1] for _, h, _ in test if len(h) >= 2],
            [h[-1] for _, h, _ in test if len(h) >= 2],
        ),
        "test": ([h for _, h, _ in test], [t for _, _, t in test]),
    }
    tuned = cooc_baseline(test, n_items, 10, exclude_history=True)
    results: dict[str, Any] = {"cooccurrence_unseen_tuning": tuned, "grid": []}
    baselines: dict[str, list[list[int]]] = {}
    for name, (hists, targets) in splits.items():
        baselines[name] = cooc_lists(hists, n_items, tuned, 10, exclude_history=True)
        results[f"cooccurrence_unseen_{name}"] = metrics(baselines[name], targets)
    for tau in TEMPERATURES:
        for weight in WEIGHTS:
            if weight == 0.0 and tau != TEMPERATURES[0]:
                continue  # no content factor: the temperature is unused
            cfg = PriorConfig(content_weight=weight, content_temperature=tau)
            row: dict[str, Any] = {"content_weight": weight, "content_temperature": tau}
            for name, (hists, targets) in splits.items():
                recs = prior_lists(hists, item_ids, embeddings, cfg)
                row[name] = {
                    **metrics(recs, targets),
                    "vs_cooccurrence_unseen": paired_comparison(recs, baselines[name], targets),
                }
            results["grid"].append(row)
            print(
                f"B {weight:<4} tau {tau:<5} validation HR@10 {row['validation']['hr@10']:.4f} "
                f"NDCG@10 {row['validation']['ndcg@10']:.4f} | test HR@10 "
                f"{row['test']['hr@10']:.4f} NDCG@10 {row['test']['ndcg@10']:.4f}",
                flush=True,
            )
    best = max(results["grid"], key=lambda r: (r["validation"]["ndcg@10"], -r["content_weight"]))
    results["chosen_on_validation"] = {
        "content_weight": best["content_weight"],
        "content_temperature": best["content_temperature"],
    }
    report = {
        "benchmark": "anchors_prior_content",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": torch.get_num_threads(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "data": {"users": len(test), "items": n_items},
        "results": results,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")

    print(f"\nAmazon Scientific, {len(test)} users: the prior alone, own items left out")
    head = f"{'B':>5}{'tau':>6}{'val HR@10':>11}{'val NDCG@10':>13}{'test HR@10':>12}"
    print(head + f"{'test NDCG@10':>14}{'test HR@10 - cooc [95% CI]':>34}")
    v, t = results["cooccurrence_unseen_validation"], results["cooccurrence_unseen_test"]
    print(
        f"{'cooc':>11}{v['hr@10']:>11.4f}{v['ndcg@10']:>13.4f}{t['hr@10']:>12.4f}{t['ndcg@10']:>14.4f}"
    )
    for r in results["grid"]:
        c = r["test"]["vs_cooccurrence_unseen"]
        print(
            f"{r['content_weight']:>5}{r['content_temperature']:>6}"
            f"{r['validation']['hr@10']:>11.4f}{r['validation']['ndcg@10']:>13.4f}"
            f"{r['test']['hr@10']:>12.4f}{r['test']['ndcg@10']:>14.4f}"
            f"{c['hr@10_diff']:>+12.4f} {c['hr@10_diff_ci95']}"
        )
    print(f"\nchosen on the validation targets (NDCG@10): {results['chosen_on_validation']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
