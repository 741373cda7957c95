"""Peak memory of ``generate_anchors`` against the number of anchor sets it writes.

Each size runs in a fresh process (``--child``): a synthetic catalog of ``--items`` items with
3-level SIDs and ``--dim``-d content embeddings, ``sets`` users with ``--history`` positives each
(one anchor set per user), and a tiny compact anchor LM trained for one epoch on the first 512
users (its quality is irrelevant here: the point is what the job holds in memory while it decodes
and writes). Reported per size: the process's resident memory just before the call, its peak
during the call (``VmHWM``, reset just before it), their difference (what the job itself held at
its peak), the job's seconds, and the peak difference per anchor set.

Prints a table and writes ``benchmarks/results/anchors_memory.json``.

    .venv/bin/python benchmarks/anchors_memory.py [--sets 25000 100000] [--chunk-sets N]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

T0 = datetime(2024, 1, 1, tzinfo=UTC)


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def current_rss_mb() -> float:
    """Resident memory of this process now, MB."""
    return _status_mb("VmRSS")


def reset_peak() -> None:
    """Start the peak (VmHWM) over from the current resident memory (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss_mb() -> float:
    """Peak resident memory of this process since the last :func:`reset_peak`, MB."""
    return _status_mb("VmHWM")


@dataclass
class JobInputs:
    """A synthetic catalog, positives and a trained anchor model, ready for ``generate_anchors``."""

    semantics: Any
    positives: Any
    cutoffs: list[datetime]
    model_dir: Path
    cfg: Any


def build_job_inputs(
    sets: int,
    *,
    items: int = 20_000,
    dim: int = 384,
    history: int = 20,
    user_ids: str = "short",
    compact: dict[str, int] | None = None,
    generation: dict[str, Any] | None = None,
    train_users: int = 512,
    random_base: str | None = None,
    train_device: str = "cpu",
    seed: int = 0,
) -> JobInputs:
    """``items`` items with 3-level SIDs (32 x 32 x the rest) and ``dim``-d unit embeddings,
    ``sets`` users of ``history`` random positives one hour apart (one anchor set each at the
    cutoff after them), and a compact anchor LM (``compact``: its shape; default the product's)
    trained for one epoch on the first ``train_users`` users, saved in a temporary folder. With
    ``random_base`` (a ``base_checkpoint.SHAPES`` name) the LM is that random-weight checkpoint
    with LoRA instead, trained on ``train_device``."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from training.anchors.job import AnchorConfig, train_anchor_model
    from training.anchors.vocab import format_sid

    rng = np.random.default_rng(seed)
    n = items
    codes = np.stack([np.arange(n) % 32, (np.arange(n) // 32) % 32, np.arange(n) // 1024], axis=1)
    sizes = [32, 32, int(codes[:, 2].max()) + 1]
    emb = rng.standard_normal((n, dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    ts = pa.timestamp("us", tz="UTC")
    semantics = pa.table(
        {
            "item_id": [f"i{i}" for i in range(n)],
            "event_timestamp": pa.array([T0] * n, ts),
            "sid_codes": pa.array(codes.tolist(), pa.list_(pa.int32())),
            "sid": [format_sid(c) for c in codes.tolist()],
            "content_embedding": pa.FixedSizeListArray.from_arrays(
                pa.array(emb.reshape(-1)), dim
            ).cast(pa.list_(pa.float32())),
        }
    )
    h = history
    users = np.repeat(np.arange(sets), h)
    picks = rng.integers(0, n, size=sets * h)
    times = np.datetime64(T0.replace(tzinfo=None), "us") + (
        np.tile(np.arange(h), sets) * 3_600_000_000
    ).astype("timedelta64[us]")
    k = min(sets, train_users)
    if user_ids == "uuid":  # 36 characters, as many production logs have them
        names = np.array([str(uuid.UUID(int=int(x))) for x in rng.integers(0, 2**62, size=sets)])
        names[:k] = [f"u{u}" for u in range(k)]  # the LM's users
        user_col = pa.array(names[users])
    else:
        user_col = pa.array(np.char.add("u", users.astype(str)))
    positives = pa.table(
        {
            "user_id": user_col,
            "item_id": pa.array(np.char.add("i", picks.astype(str))),
            "event_timestamp": pa.array(times, pa.timestamp("us")).cast(ts),
        }
    )
    work = Path(tempfile.mkdtemp(prefix="anchors_bench_"))
    model: dict[str, Any] = {} if compact is None else {"compact": compact}
    if random_base is not None:
        from training.anchors.base_checkpoint import save_random_checkpoint

        model["base_model_path"] = str(save_random_checkpoint(work / "base", random_base))
    cfg = AnchorConfig.model_validate(
        {
            "model": model,
            "sequences": {"max_history": max(h, 1)},
            "training": {
                "epochs": 1,
                "eval_users": 0,
                "progress": False,
                "device": train_device,
            },
            "generation": {"device": "cpu", **(generation or {})},
        }
    )
    chosen = pa.array([f"u{u}" for u in range(k)])
    subset = positives.filter(pc.is_in(positives.column("user_id"), value_set=chosen))
    trained = train_anchor_model(semantics, subset, sizes, cfg, work / "model")
    return JobInputs(semantics, positives, [T0 + timedelta(hours=h + 1)], trained.model_dir, cfg)


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One size in this process: build the inputs, train the tiny LM, time one generation."""
    import torch

    from training.anchors.job import generate_anchors

    torch.set_num_threads(args.threads)
    sets = args.child
    job = build_job_inputs(
        sets,
        items=args.items,
        dim=args.dim,
        history=args.history,
        user_ids=args.user_ids,
        compact={
            "hidden_size": 32,
            "num_layers": 1,
            "num_heads": 2,
            "num_kv_heads": 2,
            "intermediate_size": 64,
        },
        generation={} if args.chunk_sets is None else {"chunk_sets": args.chunk_sets},
    )
    work = job.model_dir.parent
    # The peak counts from here: building the inputs above has its own, larger transients.
    reset_peak()
    rss_before = current_rss_mb()
    t0 = time.perf_counter()
    result = generate_anchors(
        job.semantics, job.positives, job.cutoffs, job.model_dir, job.cfg, work
    )
    seconds = time.perf_counter() - t0
    peak = peak_rss_mb()
    return {
        "sets": result.metrics["anchor_sets"],
        "rss_before_mb": round(rss_before, 1),
        "peak_rss_mb": round(peak, 1),
        "job_peak_mb": round(peak - rss_before, 1),
        "kb_per_set": round((peak - rss_before) * 1024 / max(1, sets), 2),
        "seconds": round(seconds, 2),
        "users_per_second": result.metrics["users_per_second"],
        "file_mb": round(result.path.stat().st_size / 2**20, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sets", type=int, nargs="+", default=[25_000, 100_000])
    p.add_argument("--items", type=int, default=20_000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--history", type=int, default=20, help="positives per user")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--user-ids",
        choices=["short", "uuid"],
        default="short",
        help="user ids 'u<k>' or 36-character UUIDs (how long ids weigh on the job's memory)",
    )
    p.add_argument(
        "--chunk-sets", type=int, default=None, help="generation.chunk_sets (default: product's)"
    )
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/anchors_memory.json")
    args = p.parse_args()
    if args.child is not None:
        print(json.dumps(child(args)))
        return
    rows = []
    for sets in args.sets:
        cmd = [sys.executable, __file__, "--child", str(sets)]
        for flag in ("items", "dim", "history", "threads", "chunk_sets", "user_ids"):
            value = getattr(args, flag)
            if value is not None:
                cmd += [f"--{flag.replace('_', '-')}", str(value)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            sys.exit(f"size {sets} failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    cols = [
        "sets",
        "rss_before_mb",
        "peak_rss_mb",
        "job_peak_mb",
        "kb_per_set",
        "seconds",
        "users_per_second",
        "file_mb",
    ]
    print(" | ".join(f"{c:>16}" for c in cols))
    for r in rows:
        print(" | ".join(f"{r[c]!s:>16}" for c in cols))
    write_report(args, rows=rows)


def write_report(args: argparse.Namespace, **fields: Any) -> None:
    """``args.out``: the date, machine, command and settings (``args`` but ``out`` and
    ``child``), then ``fields``."""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": platform.processor() or platform.machine(),
        "command": " ".join(sys.argv),
        "settings": {k: v for k, v in vars(args).items() if k not in ("child", "out")},
        **fields,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
