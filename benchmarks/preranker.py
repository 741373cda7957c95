"""Pre-ranker quality on the MovieLens-100k funnel simulator: every objective, 3 seeds.

Protocol (one run directory, every stage through the `gpl` CLI, as a user would run it):

1. ``gpl data import movielens`` (every rating is an engagement), ``gpl data simulate`` with a
   funnel of 200 retrieved -> 100 pre-ranked -> 30 ranked -> 10 exposed per request
   (``FUNNEL`` below; 4 requests per user) and the truth table of real future engagements.
2. The cutoff is the 0.8 quantile of request times. SIDs (MiniLM + RQ-VAE; with
   ``--collaborative-weight`` a collaborative block built before the cutoff), then the anchor LM
   trained only on engagements **before the cutoff** (``--until``), anchors generated per user
   and request (the default cutoffs) from history before it, pseudo-labels, Feast features.
3. ``gpl evaluate --seeds 3``: every objective (exposed-only, unexposed-as-negative,
   distillation, GPL, HAP, GPL + HAP) trains light and expressive models on requests before
   the cutoff and is evaluated on the requests after it against the truth table; routing
   sweeps the expressive model's share M.

Prints the headline table, checks the issue's targets and writes
``benchmarks/results/preranker.json`` (the report itself is in ``RUN/evaluation/``).

    .venv/bin/python benchmarks/preranker.py [--run-dir runs/bench_preranker] [--seeds 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import yaml

from training.preranker.job import time_quantile

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "datasets" / "ml-100k"
FUNNEL = {"retrieval_size": 200, "prerank_size": 100, "rank_size": 30, "requests_per_user": 4}
PRERANKER = {"training": {"epochs": 8, "batch_requests": 8}}
ANCHORS = {
    # MLP 768: the product default when the figures in BENCHMARKS.md were measured
    # (384 since 2026-12-04); pinned so that they reproduce.
    "model": {
        "compact": {
            "hidden_size": 128,
            "num_layers": 2,
            "num_heads": 4,
            "intermediate_size": 768,
        }
    },
    "sequences": {"max_history": 30},
    "training": {"loss_on": "all", "eval_users": 200, "epochs": 10, "patience": 2},
    "generation": {"beam_width": 10},
}


def gpl(*args: str) -> None:
    began = time.perf_counter()
    print(f"$ gpl {' '.join(args)}", flush=True)
    subprocess.run([str(ROOT / ".venv" / "bin" / "gpl"), *args], check=True, cwd=ROOT)
    print(f"  ({time.perf_counter() - began:.1f}s)", flush=True)


def cutoff_of(run: Path, q: float) -> str:
    requests = pq.read_table(run / "funnel" / "requests.parquet", columns=["event_timestamp"])
    return time_quantile(requests, q).strftime("%Y-%m-%dT%H:%M:%S")


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--run-dir", type=Path, default=ROOT / "runs" / "bench_preranker")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--objectives", default=None, help="comma-separated (default: all)")
    p.add_argument("--reuse", action="store_true", help="reuse the run directory's stages")
    p.add_argument(
        "--light-hidden",
        type=int,
        default=None,
        help="hidden width of the light towers (default: the model default), for experiments "
        "with the cascade's FLOPs",
    )
    p.add_argument(
        "--funnel-seed",
        type=int,
        default=None,
        help="seed of the funnel simulator (default: the simulator's default, 0); another seed "
        "draws other request points and candidate sets, a second split of the same data",
    )
    p.add_argument(
        "--collaborative-weight",
        type=float,
        default=0.0,
        help="fuse a collaborative block (co-engagement before the cutoff) into the item space "
        "with this weight (`gpl sids train --collaborative-weight`); 0: content only",
    )
    p.add_argument(
        "--relevance",
        choices=["anchor_cosine", "lm_likelihood"],
        default="anchor_cosine",
        help="the pseudo-labels' relevance (`gpl pseudo-labels --relevance`); lm_likelihood also "
        "trains the anchor LM with `gpl anchors train --for-likelihood`",
    )
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "preranker.json")
    args = p.parse_args()
    run = args.run_dir
    began = time.perf_counter()
    if not args.reuse:
        shutil.rmtree(run, ignore_errors=True)
    configs = run / "configs"
    configs.mkdir(parents=True, exist_ok=True)
    funnel: dict[str, Any] = dict(FUNNEL)
    if args.funnel_seed is not None:
        funnel["seed"] = args.funnel_seed
    preranker: dict[str, Any] = dict(PRERANKER)
    if args.light_hidden is not None:
        preranker["model"] = {"light_hidden": args.light_hidden}
    for name, cfg in (("funnel", funnel), ("preranker", preranker), ("anchors", ANCHORS)):
        (configs / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    r = ["--run-dir", str(run)]
    if not args.reuse:
        gpl("data", "import", "movielens", str(args.data), *r)
        gpl("data", "simulate", *r, "--config", str(configs / "funnel.yaml"))
        cutoff = cutoff_of(run, 0.8)
        weight = args.collaborative_weight
        collaborative = (
            ["--collaborative-weight", str(weight), "--collaborative-until", cutoff]
            if weight > 0
            else []
        )
        gpl("sids", "train", *r, *collaborative)
        likelihood = args.relevance == "lm_likelihood"
        gpl(
            "anchors",
            "train",
            *r,
            "--config",
            str(configs / "anchors.yaml"),
            "--until",
            cutoff,
            *(["--for-likelihood"] if likelihood else []),
        )
        gpl("anchors", "generate", *r, "--config", str(configs / "anchors.yaml"))
        gpl("pseudo-labels", *r, "--calibrate-until", cutoff, "--relevance", args.relevance)
        gpl("features", "build", *r)
        gpl("features", "apply", *r)
    cutoff = cutoff_of(run, 0.8)
    extra = ["--objectives", args.objectives] if args.objectives else []
    gpl(
        "evaluate",
        *r,
        "--config",
        str(configs / "preranker.yaml"),
        "--since",
        cutoff,
        "--seeds",
        str(args.seeds),
        *extra,
    )
    report = json.loads((run / "evaluation" / "report.json").read_text())
    methods = report.get("methods", report)

    def mean(method: str, key: str) -> float:
        value = methods[method]["mean"].get(key)
        return float("nan") if value is None else float(value)

    keys = ["auc", "gauc", "recall@50", "unexposed_recall@50", "longtail_recall@50", "ndcg@50"]
    rows = {m: {k: mean(m, k) for k in keys} for m in methods}
    print(f"\n{'method':<30}" + "".join(f"{k:>21}" for k in keys))
    for m, v in rows.items():
        print(f"{m:<30}" + "".join(f"{v[k]:>21.4f}" for k in keys))
    out: dict[str, Any] = {
        "benchmark": "preranker",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "funnel": funnel,
        "preranker": preranker,
        "anchors": ANCHORS,
        "collaborative_weight": args.collaborative_weight,
        "relevance": args.relevance,
        "cutoff": cutoff,
        "seeds": args.seeds,
        "results": rows,
        "report": str(run / "evaluation" / "report.md"),
        "seconds": round(time.perf_counter() - began, 1),
    }
    if "exposed" in rows and "gpl_hap" in rows:
        base, ours = rows["exposed"], rows["gpl_hap"]
        out["targets"] = {
            "unexposed_recall@50_relative_gain": ours["unexposed_recall@50"]
            / base["unexposed_recall@50"]
            - 1,
            "longtail_recall@50_gain": ours["longtail_recall@50"] - base["longtail_recall@50"],
            "auc_delta": ours["auc"] - base["auc"],
        }
        print(json.dumps(out["targets"], indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    sys.exit(0)


if __name__ == "__main__":
    main()
