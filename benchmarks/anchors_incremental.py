"""A daily `gpl anchors generate`: every set decoded again against an incremental run.

Day 1: ``--users`` users of ``--history`` positives, one anchor set each at the cutoff after them
(``anchors_memory.build_job_inputs``, the product's compact LM). Day 2: ``--changed`` of the users
add one positive and a second cutoff follows, so those users get a new set and everyone's day-1
set is requested again, unchanged. Day 2 is generated twice from day 1's output, alternating
``--repeats`` times: a full run and an incremental one (``generation.incremental``). Reported:
seconds of each call, sets decoded and reused, and whether the two outputs hold the same rows
(sorted by user and cutoff; anchor lists equal, log-probabilities within 1e-5).

Prints a table and writes ``benchmarks/results/anchors_incremental.json``.

    .venv/bin/python benchmarks/anchors_incremental.py [--users 20000] [--changed 0.1]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from anchors_memory import build_job_inputs, write_report  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--users", type=int, default=20_000)
    p.add_argument("--history", type=int, default=50)
    p.add_argument("--changed", type=float, default=0.1, help="share of users with a new positive")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/anchors_incremental.json")
    args = p.parse_args()

    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import torch

    from training.anchors.job import generate_anchors

    torch.set_num_threads(args.threads)
    job = build_job_inputs(args.users, history=args.history)
    day1 = job.cutoffs[0]
    rng = np.random.default_rng(1)
    changed = rng.choice(args.users, int(args.changed * args.users), replace=False)
    new = pa.table(
        {
            "user_id": pa.array(np.char.add("u", changed.astype(str))),
            "item_id": pa.array(
                np.char.add("i", rng.integers(0, 20_000, len(changed)).astype(str))
            ),
            "event_timestamp": pa.array([day1 + timedelta(hours=1)] * len(changed)),
        }
    ).cast(job.positives.schema)
    day2_positives = pa.concat_tables([job.positives, new])
    day2_cutoffs = [day1, day1 + timedelta(hours=2)]
    base = job.model_dir.parent / "day1"
    generate_anchors(job.semantics, job.positives, [day1], job.model_dir, job.cfg, base)
    full_cfg = job.cfg
    inc_cfg = job.cfg.model_copy(
        update={"generation": job.cfg.generation.model_copy(update={"incremental": True})}
    )
    runs: list[dict[str, Any]] = []
    tables: dict[str, Any] = {}
    for rep in range(args.repeats):
        for name, cfg in (("full", full_cfg), ("incremental", inc_cfg)):
            out = job.model_dir.parent / f"{name}_{rep}"
            shutil.rmtree(out, ignore_errors=True)
            shutil.copytree(base, out)
            t0 = time.perf_counter()
            result = generate_anchors(
                job.semantics, day2_positives, day2_cutoffs, job.model_dir, cfg, out
            )
            seconds = time.perf_counter() - t0
            m = result.metrics
            tables[name] = result.table.sort_by(
                [("user_id", "ascending"), ("event_timestamp", "ascending")]
            )
            runs.append(
                {
                    "run": name,
                    "repeat": rep,
                    "seconds": round(seconds, 2),
                    "sets": m["anchor_sets"],
                    "decoded": m["sets_decoded"],
                    "reused": m["sets_reused"],
                }
            )
            print(runs[-1], flush=True)
    a, b = tables["full"], tables["incremental"]
    same_rows = all(
        a.column(c).equals(b.column(c))
        for c in ("user_id", "event_timestamp", "anchor_item_ids", "history_hash")
    )
    lp = [pc.list_flatten(t.column("anchor_log_probs")).to_numpy() for t in (a, b)]
    max_diff = float(np.abs(lp[0] - lp[1]).max()) if len(lp[0]) else 0.0
    print(f"\n{'run':<13}{'repeat':>7}{'seconds':>9}{'sets':>8}{'decoded':>9}{'reused':>8}")
    for r in runs:
        print(
            f"{r['run']:<13}{r['repeat']:>7}{r['seconds']:>9}{r['sets']:>8}{r['decoded']:>9}"
            f"{r['reused']:>8}"
        )
    print(f"same rows and anchor lists: {same_rows}; max |log-prob difference| {max_diff:.2e}")
    write_report(args, runs=runs, same_rows=same_rows, max_log_prob_difference=max_diff)


if __name__ == "__main__":
    main()
