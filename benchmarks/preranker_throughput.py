"""Light pre-ranker training throughput (samples/s) on CPU, per objective, side by side.

Reuses the run directory of ``benchmarks/preranker.py`` (MovieLens-100k funnel, its 0.8-quantile
cutoff): joins the training requests through the FeatureServices, then trains the light model
for two epochs per objective, twice each, in one process, as ``gpl train`` trains it (GPL + HAP
with the default popularity debiasing). A sample is one candidate row.

    .venv/bin/python benchmarks/preranker_throughput.py [--run-dir runs/bench_preranker]
"""

from __future__ import annotations

import argparse
import json
import platform
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from training.features.store import open_store
from training.io import read_table
from training.preranker.config import PrerankerConfig
from training.preranker.job import (
    debiased_feature,
    join_features,
    prepare,
    split_at,
    time_quantile,
)
from training.preranker.train import train_model

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--run-dir", type=Path, default=ROOT / "runs" / "bench_preranker")
    p.add_argument("--objectives", default="exposed,gpl_hap")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks/results/preranker_throughput.json"
    )
    args = p.parse_args()
    requests = read_table(args.run_dir / "funnel" / "requests.parquet", "requests")
    train = split_at(requests, time_quantile(requests, 0.8)).before
    joined = join_features(open_store(args.run_dir), train)
    semantics = read_table(args.run_dir / "sids" / "item_semantics.parquet")
    cfg = PrerankerConfig.model_validate(
        {"training": {"epochs": 2, "patience": 5, "progress": False}}
    )
    prepared = prepare(joined, semantics, cfg)
    results: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        for objective in args.objectives.split(","):
            # As `gpl train` trains it: with the default popularity debiasing where it applies.
            popularity = debiased_feature(prepared.prep, cfg, objective)
            trained = train_model(
                "light",
                objective,
                prepared.train,
                prepared.valid,
                prepared.embeddings,
                cfg,
                popularity=popularity,
            )
            results.setdefault(objective, []).append(trained.samples_per_second)
    print(f"light model, {prepared.train.n_rows:,} training rows, 2 epochs, {args.repeats} runs")
    print(f"{'objective':<12}{'samples/s (median)':>20}")
    for objective, values in results.items():
        print(f"{objective:<12}{np.median(values):>20,.0f}")
    out = {
        "benchmark": "preranker_throughput",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "train_rows": prepared.train.n_rows,
        "samples_per_second": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
