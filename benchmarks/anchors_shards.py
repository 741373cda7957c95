"""Anchor generation in ``--shards`` shards against one process: what splitting costs.

``--users`` users of ``--history`` positives, one anchor set each (the product's compact LM,
``anchors_memory.build_job_inputs``). One process decodes every set; then each shard ``K/N`` runs
(``generate_anchors(..., shard=Shard(K, N))``, one after another here: on N hosts they would run
side by side) and ``merge_anchor_shards`` merges them. Reported: each call's seconds and sets, the
work done outside decoding (reading the inputs, building the sequences, writing: every shard
repeats what does not divide), how evenly the hash splits the users, the merge's seconds, the
wall time N hosts would take (the slowest shard plus the merge) against one process, and whether
the merged file holds one process's rows (sorted by user and cutoff; anchor lists equal,
log-probabilities within 1e-5).

Prints a table and writes ``benchmarks/results/anchors_shards.json``.

    .venv/bin/python benchmarks/anchors_shards.py [--users 20000] [--shards 4]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from anchors_memory import build_job_inputs, write_report  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--users", type=int, default=20_000)
    p.add_argument("--history", type=int, default=50)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/anchors_shards.json")
    args = p.parse_args()

    import numpy as np
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    import torch

    from training.anchors.job import generate_anchors
    from training.anchors.schema import ANCHORS_FILE
    from training.anchors.shards import Shard, merge_anchor_shards

    torch.set_num_threads(args.threads)
    job = build_job_inputs(args.users, history=args.history)
    root = job.model_dir.parent
    keys = [("user_id", "ascending"), ("event_timestamp", "ascending")]

    def call(shard: Shard | None, out: Path) -> dict[str, Any]:
        t0 = time.perf_counter()
        result = generate_anchors(
            job.semantics, job.positives, job.cutoffs, job.model_dir, job.cfg, out, shard=shard
        )
        seconds = time.perf_counter() - t0
        m = result.metrics
        row = {
            "run": "one process" if shard is None else f"shard {shard.index}/{shard.count}",
            "seconds": round(seconds, 2),
            "sets": m["anchor_sets"],
            "decoding_seconds": m["generation_seconds"],
            "other_seconds": round(seconds - m["generation_seconds"], 2),
        }
        print(row, flush=True)
        return row

    runs = [call(None, root / "one")]
    for k in range(args.shards):
        runs.append(call(Shard(k, args.shards), root / "sharded"))
    t0 = time.perf_counter()
    merged = merge_anchor_shards(root / "sharded")
    merge_seconds = time.perf_counter() - t0
    a = pq.read_table(root / "one" / ANCHORS_FILE).sort_by(keys)
    b = merged.table.sort_by(keys)
    same_rows = a.num_rows == b.num_rows and all(
        a.column(c).equals(b.column(c))
        for c in ("user_id", "event_timestamp", "anchor_item_ids", "history_hash")
    )
    lp = [pc.list_flatten(t.column("anchor_log_probs")).to_numpy() for t in (a, b)]
    max_diff = float(np.abs(lp[0] - lp[1]).max()) if same_rows and len(lp[0]) else None
    shard_runs = runs[1:]
    sets = [r["sets"] for r in shard_runs]
    slowest = max(r["seconds"] for r in shard_runs)
    summary = {
        "one_process_seconds": runs[0]["seconds"],
        "shards_seconds_summed": round(sum(r["seconds"] for r in shard_runs), 2),
        "largest_shard_share": round(max(sets) / (sum(sets) / len(sets)), 3),
        "merge_seconds": round(merge_seconds, 2),
        "hosts_wall_seconds": round(slowest + merge_seconds, 2),
        "speed_up_on_hosts": round(runs[0]["seconds"] / (slowest + merge_seconds), 2),
    }
    print(f"\n{'run':<14}{'seconds':>9}{'sets':>8}{'decoding s':>12}{'other s':>9}")
    for r in runs:
        print(
            f"{r['run']:<14}{r['seconds']:>9}{r['sets']:>8}{r['decoding_seconds']:>12}"
            f"{r['other_seconds']:>9}"
        )
    for name, value in summary.items():
        print(f"{name}: {value}")
    print(f"merged = one process's rows and anchor lists: {same_rows}; log-prob diff {max_diff}")
    write_report(args, runs=runs, **summary, same_rows=same_rows, max_log_prob_difference=max_diff)


if __name__ == "__main__":
    main()
