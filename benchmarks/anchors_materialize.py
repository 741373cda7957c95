"""Materializing the anchors into the online store, with and without their vectors online.

``user_interest_anchors`` (online) holds the anchors' ids, SIDs and log-probabilities; their
content vectors are the offline-only view ``user_interest_anchor_embeddings``. This benchmark
writes ``--sets`` synthetic anchor sets (``--anchors`` x ``--dim`` float32 vectors each) and
materializes them twice per size into a fresh feature store: with the repository's views
(``split``), and with ``anchor_embeddings`` put back into the online view (``vectors online``, the
layout before 2026-12-04). Reported: the seconds of ``materialize`` and the online store's size
(SQLite: the file; Redis, with ``--redis-url``: the server's ``used_memory`` growth).

Prints a table and writes ``benchmarks/results/anchors_materialize.json``.

    .venv/bin/python benchmarks/anchors_materialize.py [--sets 5000 20000] [--redis-url URL]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from anchors_memory import write_report  # noqa: E402

T0 = datetime(2024, 1, 1, tzinfo=UTC)


def anchors(sets: int, k: int, dim: int, seed: int = 0) -> Any:
    """``sets`` anchor sets of ``k`` random anchors with ``dim``-d vectors, one per user."""
    import numpy as np
    import pyarrow as pa

    from training.anchors.schema import ANCHORS_SCHEMA

    rng = np.random.default_rng(seed)
    ids = pa.ListArray.from_arrays(
        pa.array(np.arange(0, sets * k + 1, k, dtype=np.int32)),
        pa.array(np.char.add("i", rng.integers(0, 50_000, sets * k).astype(str))),
    )
    per_set = np.arange(0, sets + 1, dtype=np.int32)
    return pa.Table.from_arrays(
        [
            pa.array(np.char.add("u", np.arange(sets).astype(str))),
            pa.array(
                np.datetime64(T0.replace(tzinfo=None), "s") + np.arange(sets), pa.timestamp("us")
            ).cast(pa.timestamp("us", tz="UTC")),
            ids,
            ids,
            pa.ListArray.from_arrays(
                pa.array(per_set * k * dim),
                pa.array(rng.standard_normal(sets * k * dim).astype(np.float32)),
            ),
            pa.ListArray.from_arrays(
                pa.array(per_set * k), pa.array(-rng.random(sets * k).astype(np.float32))
            ),
            pa.array(np.full(sets, k, np.int32)),
            pa.array(np.full(sets, 20, np.int32)),
            pa.array(rng.integers(-(2**62), 2**62, sets), pa.int64()),  # history_hash
        ],
        schema=ANCHORS_SCHEMA,
    )


def definitions(vectors_online: bool) -> list[Any]:
    """The repository's Feast objects; with ``vectors_online`` the anchors' online view also
    carries ``anchor_embeddings`` (and the offline-only view is left out)."""
    from feast import FeatureView

    from feature_repo import definitions as repo_definitions
    from feature_repo.entities import user
    from feature_repo.feature_views import user_interest_anchor_embeddings as vectors_view

    objects = repo_definitions()
    if not vectors_online:
        return objects
    out = []
    for obj in objects:
        if isinstance(obj, FeatureView) and obj.name == vectors_view.name:
            continue
        if isinstance(obj, FeatureView) and obj.name == "user_interest_anchors":
            obj = FeatureView(
                name=obj.name,
                entities=[user],
                ttl=obj.ttl,
                schema=[*obj.schema, *(f for f in vectors_view.schema if f.name != "user_id")],
                source=obj.batch_source,
                online=True,
                description=obj.description,
                tags=obj.tags,
            )
        out.append(obj)
    return out


def run_once(
    table: Any, vectors_online: bool, redis_url: str | None, work: Path, tag: str
) -> dict[str, Any]:
    """Apply and materialize the anchors into a fresh store; seconds and online bytes."""
    from training.anchors.schema import ANCHORS_DIR, ANCHORS_FILE
    from training.features.store import StoreSettings, apply_definitions, materialize, open_store
    from training.io import write_table

    run = work / tag
    shutil.rmtree(run, ignore_errors=True)
    write_table(table, run / ANCHORS_DIR / ANCHORS_FILE)
    settings = StoreSettings(project=f"bench_{tag}", redis_url=redis_url)
    store = open_store(run, settings)
    apply_definitions(store, definitions(vectors_online))
    used_before = _redis_used(redis_url)
    t0 = time.perf_counter()
    materialize(
        store,
        end=T0 + timedelta(days=30),
        start=T0 - timedelta(days=1),
        views=["user_interest_anchors"],
    )
    seconds = time.perf_counter() - t0
    if redis_url:
        online_mb = (_redis_used(redis_url) - used_before) / 2**20
        import redis

        client = redis.Redis.from_url(redis_url)
        for key in client.scan_iter(match=f"*bench_{tag}", count=10_000):  # project-suffixed
            client.delete(key)
    else:
        online_mb = sum(p.stat().st_size for p in run.rglob("*.db")) / 2**20
    return {"seconds": round(seconds, 2), "online_mb": round(online_mb, 1)}


def _redis_used(url: str | None) -> int:
    if not url:
        return 0
    import redis

    info: Any = redis.Redis.from_url(url).info("memory")
    return int(info["used_memory"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sets", type=int, nargs="+", default=[5_000, 20_000])
    p.add_argument("--anchors", type=int, default=10)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument(
        "--redis-url",
        default=None,
        help="also a Redis online store (e.g. redis://127.0.0.1:6379/0)",
    )
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/anchors_materialize.json")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="anchors_materialize_"))
    rows = []
    stores = ["sqlite"] + (["redis"] if args.redis_url else [])
    for sets in args.sets:
        table = anchors(sets, args.anchors, args.dim)
        for store in stores:
            url = args.redis_url if store == "redis" else None
            for layout, online in (("split", False), ("vectors online", True)):
                tag = f"{store}_{sets}_{'v' if online else 's'}"
                got = run_once(table, online, url, work, tag)
                rows.append({"sets": sets, "store": store, "layout": layout, **got})
                print(rows[-1], flush=True)
    print(f"\n{'sets':>8} {'store':<8}{'layout':<16}{'seconds':>9}{'online MB':>11}")
    for r in rows:
        print(
            f"{r['sets']:>8} {r['store']:<8}{r['layout']:<16}{r['seconds']:>9}{r['online_mb']:>11}"
        )
    shutil.rmtree(work, ignore_errors=True)
    write_report(args, rows=rows)


if __name__ == "__main__":
    main()
