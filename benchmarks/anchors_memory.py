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


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One size in this process: build the inputs, train the tiny LM, time one generation."""
    import numpy as np
    import pyarrow as pa
    import torch

    from training.anchors.job import AnchorConfig, generate_anchors, train_anchor_model
    from training.anchors.vocab import format_sid

    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    n, sets = args.items, args.child
    codes = np.stack([np.arange(n) % 32, (np.arange(n) // 32) % 32, np.arange(n) // 1024], axis=1)
    sizes = [32, 32, int(codes[:, 2].max()) + 1]
    emb = rng.standard_normal((n, args.dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    ts = pa.timestamp("us", tz="UTC")
    semantics = pa.table(
        {
            "item_id": [f"i{i}" for i in range(n)],
            "event_timestamp": pa.array([T0] * n, ts),
            "sid_codes": pa.array(codes.tolist(), pa.list_(pa.int32())),
            "sid": [format_sid(c) for c in codes.tolist()],
            "content_embedding": pa.FixedSizeListArray.from_arrays(
                pa.array(emb.reshape(-1)), args.dim
            ).cast(pa.list_(pa.float32())),
        }
    )
    h = args.history
    users = np.repeat(np.arange(sets), h)
    items = rng.integers(0, n, size=sets * h)
    times = np.datetime64(T0.replace(tzinfo=None), "us") + (
        np.tile(np.arange(h), sets) * 3_600_000_000
    ).astype("timedelta64[us]")
    if args.user_ids == "uuid":  # 36 characters, as many production logs have them
        names = np.array([str(uuid.UUID(int=int(x))) for x in rng.integers(0, 2**62, size=sets)])
        names[: min(sets, 512)] = [f"u{u}" for u in range(min(sets, 512))]  # the LM's users
        user_col = pa.array(names[users])
    else:
        user_col = pa.array(np.char.add("u", users.astype(str)))
    positives = pa.table(
        {
            "user_id": user_col,
            "item_id": pa.array(np.char.add("i", items.astype(str))),
            "event_timestamp": pa.array(times, pa.timestamp("us")).cast(ts),
        }
    )
    cfg = AnchorConfig.model_validate(
        {
            "model": {
                "compact": {
                    "hidden_size": 32,
                    "num_layers": 1,
                    "num_heads": 2,
                    "num_kv_heads": 2,
                    "intermediate_size": 64,
                }
            },
            "training": {"epochs": 1, "eval_users": 0, "progress": False, "device": "cpu"},
            "generation": {
                "device": "cpu",
                **({} if args.chunk_sets is None else {"chunk_sets": args.chunk_sets}),
            },
        }
    )
    work = Path(tempfile.mkdtemp(prefix="anchors_memory_"))
    train_users = pa.array([f"u{u}" for u in range(min(sets, 512))])
    import pyarrow.compute as pc

    subset = positives.filter(pc.is_in(positives.column("user_id"), value_set=train_users))
    trained = train_anchor_model(semantics, subset, sizes, cfg, work / "model")
    cutoff = [T0 + timedelta(hours=h + 1)]
    # The peak counts from here: building the inputs above has its own, larger transients.
    reset_peak()
    rss_before = current_rss_mb()
    t0 = time.perf_counter()
    result = generate_anchors(semantics, positives, cutoff, trained.model_dir, cfg, work)
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
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "date": datetime.now(UTC).isoformat(timespec="seconds"),
                "machine": platform.processor() or platform.machine(),
                "command": " ".join(sys.argv),
                "settings": {k: v for k, v in vars(args).items() if k not in ("child", "out")},
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
