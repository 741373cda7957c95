"""``gpl anchors generate`` in one process against worker processes (``generation.devices``).

The whole job (``generate_anchors``: sequences, decoding, writing the parquet file) on the same
inputs, alternating the two configurations ``--repeats`` times each: ``--single`` (one device,
in this process) and ``--devices`` (one worker process per entry, e.g. ``cpu,cpu`` on a CPU or
``cuda:0,cuda:1`` on a GPU host). Inputs (``anchors_memory.build_job_inputs``): a synthetic
catalog with 3-level SIDs, ``--users`` users of ``--history`` random positives each, and the
product's default compact anchor LM (or ``--hidden``/``--layers``) trained for one epoch (the
weights' quality does not change the work of a beam search). Reported: each run's wall time and
anchor sets per second of the whole call (worker start-up included), whether every anchor list
equals the single process's, and, per worker configuration, the wall time of a job of only
``--startup-users`` users (mostly the workers' start-up: spawning, imports, loading the model).

Prints a table and writes ``benchmarks/results/anchors_devices.json``.

    .venv/bin/python benchmarks/anchors_devices.py --users 4000 --single cpu --devices cpu,cpu
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from anchors_memory import build_job_inputs, write_report  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--users", type=int, default=4000)
    p.add_argument("--history", type=int, default=50)
    p.add_argument("--items", type=int, default=20_000)
    p.add_argument(
        "--hidden", type=int, default=None, help="compact hidden size (default: product's)"
    )
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--single", default="cpu", help="generation.device of the one-process runs")
    p.add_argument(
        "--devices",
        nargs="+",
        default=["cpu,cpu"],
        help="generation.devices of the worker runs, comma-separated; several lists: several "
        "configurations (e.g. cuda:0,cuda:0 cuda:0,cuda:0,cuda:0,cuda:0)",
    )
    p.add_argument(
        "--random-base",
        default=None,
        help="a random-weight checkpoint shape (qwen2.5-0.5b) with LoRA instead of the compact LM",
    )
    p.add_argument("--train-device", default="cpu", help="where the one training epoch runs")
    p.add_argument("--batch-size", type=int, default=None, help="generation.batch_size")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument(
        "--startup-users",
        type=int,
        default=64,
        help="before the timed runs, each worker configuration decodes this many users alone: "
        "its wall time is mostly the workers' start-up (0: skip)",
    )
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/anchors_devices.json")
    args = p.parse_args()

    import pyarrow.compute as pc

    from training.anchors.job import AnchorConfig, generate_anchors

    compact = None
    if args.hidden or args.layers:
        compact = {
            "hidden_size": args.hidden or 128,
            "num_layers": args.layers or 2,
            "intermediate_size": 3 * (args.hidden or 128),
        }
    generation = {} if args.batch_size is None else {"batch_size": args.batch_size}
    job = build_job_inputs(
        args.users,
        items=args.items,
        history=args.history,
        compact=compact,
        generation=generation,
        random_base=args.random_base,
        train_device=args.train_device,
    )

    def with_generation(**update: object) -> AnchorConfig:
        return job.cfg.model_copy(
            update={"generation": job.cfg.generation.model_copy(update=update)}
        )

    configs = {f"one process ({args.single})": with_generation(device=args.single)}
    for spec in args.devices:
        devices = [d.strip() for d in spec.split(",")]
        configs[f"workers ({', '.join(devices)})"] = with_generation(devices=devices)
    startup: dict[str, float] = {}
    first = [f"u{u}" for u in range(args.startup_users)]
    for name, cfg in configs.items():
        if args.startup_users and "workers" in name:
            t0 = time.perf_counter()
            generate_anchors(
                job.semantics,
                job.positives,
                job.cutoffs,
                job.model_dir,
                cfg,
                job.model_dir.parent / "startup",
                users=first,
            )
            startup[name] = round(time.perf_counter() - t0, 2)
            print(f"{name}: {args.startup_users} users in {startup[name]} s", flush=True)
    runs: list[dict[str, Any]] = []
    reference = None
    for rep in range(args.repeats):
        for name, cfg in configs.items():
            out = job.model_dir.parent / f"out_{len(runs)}"
            t0 = time.perf_counter()
            result = generate_anchors(
                job.semantics, job.positives, job.cutoffs, job.model_dir, cfg, out
            )
            wall = time.perf_counter() - t0
            lists = result.table.column("anchor_item_ids")
            if reference is None:
                reference = lists
            same = float(
                pc.mean(
                    pc.equal(pc.binary_join(lists, " "), pc.binary_join(reference, " "))
                ).as_py()
            )
            runs.append(
                {
                    "config": name,
                    "repeat": rep,
                    "seconds": round(wall, 2),
                    "sets_per_second": round(result.metrics["anchor_sets"] / wall, 1),
                    "generation_seconds": result.metrics["generation_seconds"],
                    "worker_start_seconds": result.metrics["worker_start_seconds"],
                    "identical_lists": round(same, 4),
                    "device": result.metrics["device"],
                    "batch_size": result.metrics["batch_size"],
                }
            )
            print(json.dumps(runs[-1]), flush=True)
    print(f"\n{'config':<34}{'repeat':>7}{'seconds':>10}{'sets/s':>10}{'identical':>11}")
    for r in runs:
        print(
            f"{r['config']:<34}{r['repeat']:>7}{r['seconds']:>10}{r['sets_per_second']:>10}"
            f"{r['identical_lists']:>11}"
        )
    write_report(args, sets=args.users, startup_job_seconds=startup, runs=runs)


if __name__ == "__main__":
    main()
