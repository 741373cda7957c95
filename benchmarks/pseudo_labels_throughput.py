"""Pseudo-label throughput: candidate scorings per second on this machine.

A candidate scoring = one unexposed candidate's max-pooled cosine against its user's anchors
(384-d embeddings, 10 anchors per user) plus its three confidence factors and calibration. Two
figures, measured in one run on the same data:

* kernel: ``max_cosine`` alone over all rows (the fused compiled loop), on one thread per core
  (the default) and on one thread, alternating with the reference kernel ``max_cosine_blas`` (one
  gather and matrix product per anchor set) on one thread per core (``--repeats`` times each;
  the median is reported);
* job: the whole ``generate_pseudo_labels`` call streaming the request log from parquet,
  including anchor-set lookup, confidence, calibration and writing the output (``--job-repeats``
  runs; the median is reported), alternating with the same job on the reference kernel;
* job in a fresh process (``--fresh-runs``, median): ``gpl pseudo-labels`` itself, once per run
  in a new process on a run directory holding the same inputs, paying the one-off costs a warm
  process has behind it (loading the compiled kernels, first touches of fresh memory); the job's
  seconds come from its manifest, and the whole command's wall time is reported beside them.

    .venv/bin/python benchmarks/pseudo_labels_throughput.py [--requests 4000] [--candidates 500]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from unittest import mock

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from training.io import write_table
from training.pseudo_labels import job as pseudo_labels_job
from training.pseudo_labels.job import (
    ItemIndex,
    PseudoLabelConfig,
    generate_pseudo_labels,
    load_anchor_bank,
)
from training.pseudo_labels.relevance import max_cosine, max_cosine_blas, max_cosine_rows
from training.threads import default_workers
from training.vectors import l2_normalize

T0 = datetime(2024, 1, 1, tzinfo=UTC)


def candidate_items(rng: np.random.Generator, items: int, n: int, skew: float) -> np.ndarray:
    """``n`` candidate item rows: uniform (``skew`` 0), or Zipf-like with exponent ``skew``.

    Uniform is the worst case for the CPU caches (every gather a likely miss in the 77 MB table);
    real candidate lists lean to popular items (the funnel simulator's unexposed candidates fit a
    rank-frequency slope of about -0.5), so a few hot rows stay in cache.
    """
    if skew == 0:
        return rng.integers(0, items, n)
    weights = 1.0 / np.arange(1, items + 1) ** skew
    ranked = rng.permutation(items)  # which item gets which popularity rank
    return ranked[rng.choice(items, n, p=weights / weights.sum())]


def reference_kernel() -> Callable[..., tuple[np.ndarray, np.ndarray]]:
    """The reference kernel in the job's place, for one job: its anchors gathered once.

    The job hands ``max_cosine_rows`` the anchors as rows of a table; the reference takes an
    ``(S, N, D)`` array, gathered at the job's first call (the bank does not change within a job).
    """
    gathered: list[np.ndarray] = []

    def kernel(
        table: np.ndarray,
        item_index: np.ndarray,
        anchor_vectors: np.ndarray,
        anchor_rows: np.ndarray,
        anchor_mask: np.ndarray,
        set_index: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        if not gathered:
            gathered.append(anchor_vectors[anchor_rows])
        return max_cosine_blas(table, item_index, gathered[0], anchor_mask, set_index)

    return kernel


def build(args: argparse.Namespace) -> tuple[pa.Table, pa.Table, pa.Table, pa.Table]:
    rng = np.random.default_rng(args.seed)
    emb = l2_normalize(rng.standard_normal((args.items, args.dim)).astype(np.float32))
    item_ids = np.array([f"i{i}" for i in range(args.items)])
    items = pa.table(
        {
            "item_id": item_ids,
            "content_embedding": pa.FixedSizeListArray.from_arrays(emb.ravel(), args.dim).cast(
                pa.list_(pa.float32())
            ),
        }
    )
    users = np.array([f"u{u}" for u in range(args.users)])
    picks = rng.integers(0, args.items, (args.users, args.anchors))
    anchors = pa.table(
        {
            "user_id": users,
            "event_timestamp": pa.array([T0] * args.users, pa.timestamp("us", tz="UTC")),
            "anchor_item_ids": pa.array(list(item_ids[picks]), pa.list_(pa.string())),
            "anchor_embeddings": pa.array(
                list(emb[picks].reshape(args.users, -1)), pa.list_(pa.float32())
            ),
            "anchor_log_probs": pa.array(
                list(
                    np.sort(rng.uniform(-9, -1, (args.users, args.anchors)), axis=1)[
                        :, ::-1
                    ].astype(np.float32)
                ),
                pa.list_(pa.float32()),
            ),
            "num_anchors": pa.array(np.full(args.users, args.anchors, np.int32)),
        }
    )
    positives = pa.table(
        {
            "user_id": np.repeat(users, 20),
            "item_id": item_ids[rng.integers(0, args.items, args.users * 20)],
            "event_timestamp": pa.array(
                [T0 - timedelta(days=1)] * (args.users * 20), pa.timestamp("us", tz="UTC")
            ),
        }
    )
    n = args.requests * args.candidates
    req_user = users[rng.integers(0, args.users, args.requests)]
    stage = np.where(np.arange(args.candidates) < 10, "exposed", "retrieved")
    group = np.where(np.arange(args.candidates) < 10, "exposed_negative", "prerank_negative")
    label = np.where(np.arange(args.candidates) < 10, 0, -1)
    label_all = np.tile(label, args.requests)
    pos = rng.random(n) < 0.15
    label_all = np.where((label_all == 0) & pos, 1, label_all)
    group_all = np.where(label_all == 1, "exposed_positive", np.tile(group, args.requests))
    requests = pa.table(
        {
            "request_id": np.repeat([f"r{r}" for r in range(args.requests)], args.candidates),
            "user_id": np.repeat(req_user, args.candidates),
            "item_id": item_ids[candidate_items(rng, args.items, n, args.item_skew)],
            "event_timestamp": pa.array(
                np.repeat(T0 + timedelta(days=1), n).tolist(), pa.timestamp("us", tz="UTC")
            ),
            "stage": np.tile(stage, args.requests),
            "label": pa.array(label_all, pa.int8(), mask=label_all < 0),
            "group": group_all,
        }
    )
    return items, anchors, positives, requests


def fresh_process_runs(
    directory: Path, tables: dict[str, pa.Table], runs: int
) -> tuple[list[float], list[float]]:
    """``runs`` times ``gpl pseudo-labels`` in a new process on a run directory of these tables.

    Returns:
        The job's own seconds (from its manifest; the denominator of scorings/s) and each
        command's wall seconds (Python start-up, imports and reading the inputs included).
    """
    run_dir = directory / "run"
    for name, table in tables.items():
        path = run_dir / FRESH_LAYOUT[name]
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path)
    config = directory / "pseudo_labels.yaml"
    config.write_text("progress: false\n")
    gpl = Path(sys.executable).with_name("gpl")
    job, wall = [], []
    for _ in range(runs):
        began = time.perf_counter()
        subprocess.run(
            [str(gpl), "pseudo-labels", "--run-dir", str(run_dir), "--config", str(config)],
            check=True,
            capture_output=True,
        )
        wall.append(time.perf_counter() - began)
        manifest = json.loads((run_dir / "pseudo_labels" / "manifest.json").read_text())
        job.append(float(manifest["metrics"]["seconds"]))
    return job, wall


#: Where ``gpl pseudo-labels`` reads each input in a run directory.
FRESH_LAYOUT = {
    "requests": "funnel/requests.parquet",
    "items": "sids/item_semantics.parquet",
    "anchors": "anchors/user_interest_anchors.parquet",
    "positives": "data/interactions.parquet",
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--items", type=int, default=50_000)
    parser.add_argument("--users", type=int, default=4_000)
    parser.add_argument("--requests", type=int, default=4_000)
    parser.add_argument("--candidates", type=int, default=500)
    parser.add_argument("--anchors", type=int, default=10)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--item-skew",
        type=float,
        default=0.0,
        help="Zipf exponent of the candidates' item popularity (0: uniform, the default and the "
        "worst case for caches; the funnel simulator's unexposed candidates measure ~0.5)",
    )
    parser.add_argument("--repeats", type=int, default=5, help="kernel timings per variant")
    parser.add_argument("--job-repeats", type=int, default=3, help="whole-job runs (median)")
    parser.add_argument(
        "--fresh-runs", type=int, default=3, help="jobs run one per new process (median)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).parent / "results" / "pseudo_labels_throughput.json",
    )
    args = parser.parse_args()
    items, anchors, positives, requests = build(args)
    index = ItemIndex.from_item_semantics(items)
    bank = load_anchor_bank(anchors, index, positives, 50)
    anchor_vectors = bank.anchors.vectors[bank.anchors.rows]  # (S, N, D), for the kernels here

    # Kernel: every row of the log against its user's anchor set.
    item_idx = index.lookup(requests.column("item_id"))
    set_idx = np.asarray(
        [int(u[1:]) for u in requests.column("user_id").to_pylist()], np.int64
    )  # users were built in order u0..uN, one set each
    variants = {
        "threads": (max_cosine, None),
        "one thread": (max_cosine, 1),
        "blas threads": (max_cosine_blas, None),
    }
    # The first call of the fused kernel compiles it (or loads it from numba's cache).
    max_cosine(index.embeddings, item_idx[:10], anchor_vectors, bank.mask, set_idx[:10])
    timings: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, (kernel, workers) in variants.items():
            began = time.perf_counter()
            kernel(index.embeddings, item_idx, anchor_vectors, bank.mask, set_idx, workers)
            timings[name].append(time.perf_counter() - began)
    kernel_s = float(np.median(timings["threads"]))
    single_s = float(np.median(timings["one thread"]))
    blas_s = float(np.median(timings["blas threads"]))

    job_all: list[float] = []
    job_blas: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        path = write_table(requests, Path(tmp) / "requests.parquet")
        for _ in range(args.job_repeats):
            for kernel, seconds in ((max_cosine_rows, job_all), (reference_kernel(), job_blas)):
                # The job's one relevance call swapped for the A/B, nothing else changed.
                with mock.patch.object(pseudo_labels_job, "max_cosine_rows", kernel):
                    began = time.perf_counter()
                    result = generate_pseudo_labels(
                        path,
                        items,
                        anchors,
                        positives,
                        PseudoLabelConfig(progress=False),
                        Path(tmp) / "out",
                    )
                    seconds.append(time.perf_counter() - began)
        fresh, fresh_wall = fresh_process_runs(
            Path(tmp),
            {"requests": requests, "items": items, "anchors": anchors, "positives": positives},
            args.fresh_runs,
        )
    job_s = float(np.median(job_all))
    fresh_s = float(np.median(fresh))
    job_blas_s = float(np.median(job_blas))
    scored = result.metrics["unexposed_rows"] + result.metrics["calibration"]["exposed_rows"]

    rows = requests.num_rows
    print(
        f"\nPseudo-label throughput: {rows:,} candidates, {args.dim}-d, "
        f"{args.anchors} anchors, {os.cpu_count()} cores"
    )
    print(f"{'path':<44}{'seconds':>9}{'scorings/s':>14}")
    print(
        f"{'kernel (max_cosine, all rows, threads)':<44}{kernel_s:>9.2f}{rows / kernel_s:>14,.0f}"
    )
    one = "kernel (max_cosine, all rows, one thread)"
    print(f"{one:<44}{single_s:>9.2f}{rows / single_s:>14,.0f}")
    ref = "reference (max_cosine_blas, threads)"
    print(f"{ref:<44}{blas_s:>9.2f}{rows / blas_s:>14,.0f}")
    print(f"fused / reference kernel speed: {blas_s / kernel_s:.2f}x")
    print(f"{'job (stream parquet -> labels parquet)':<44}{job_s:>9.2f}{scored / job_s:>14,.0f}")
    ref_job = "job on the reference kernel"
    print(f"{ref_job:<44}{job_blas_s:>9.2f}{scored / job_blas_s:>14,.0f}")
    fresh_label = "job, `gpl pseudo-labels` in a fresh process"
    print(f"{fresh_label:<44}{fresh_s:>9.2f}{scored / fresh_s:>14,.0f}")
    wall_s = float(np.median(fresh_wall))
    print(f"{'  that command, start to end':<44}{wall_s:>9.2f}{scored / wall_s:>14,.0f}")
    print("target: >= 2,000,000 scorings/s")
    out = {
        "benchmark": "pseudo_labels_throughput",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "params": {k: v for k, v in vars(args).items() if k != "out"},
        "kernel": {
            "rows": rows,
            "workers": default_workers(),
            "seconds": kernel_s,
            "scorings_per_s": rows / kernel_s,
            "seconds_all": timings["threads"],
        },
        "kernel_one_thread": {
            "rows": rows,
            "seconds": single_s,
            "scorings_per_s": rows / single_s,
            "seconds_all": timings["one thread"],
        },
        "kernel_blas_reference": {
            "rows": rows,
            "seconds": blas_s,
            "scorings_per_s": rows / blas_s,
            "seconds_all": timings["blas threads"],
        },
        "job": {
            "rows_scored": scored,
            "seconds": job_s,
            "scorings_per_s": scored / job_s,
            "seconds_all": job_all,
        },
        "job_fresh_process": {
            "rows_scored": scored,
            "seconds": fresh_s,
            "scorings_per_s": scored / fresh_s,
            "seconds_all": fresh,
            "command_seconds": wall_s,
            "command_seconds_all": fresh_wall,
        },
        "job_blas_reference": {
            "rows_scored": scored,
            "seconds": job_blas_s,
            "scorings_per_s": scored / job_blas_s,
            "seconds_all": job_blas,
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
