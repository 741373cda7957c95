"""``gpl features materialize --full`` on a large view: before and after the reload fix.

A full reload (``materialize(replace=True)``) used to empty the view first in Redis (the whole
view read as missing until it was reloaded) and left entities no longer in the table online in
SQLite. It now removes only the entities gone from the table, then writes every row over what
is online. This benchmark times both on the same data, side by side in one run: ``--items``
entities in ``item_popularity`` (one row each), loaded once, then the table rewritten with the
same timestamps (every count changed, ``--drop`` of the items gone) and reloaded with
``replace=True``. Each reload runs in a fresh run directory and Feast project, old and new
alternating over ``--rounds``. The old code is ``training/features/store.py`` at ``--old-ref``.

Reported per store: the reload's seconds (and, for the new code, the part spent removing the
absent entities), the entities online afterwards against the table's, and whether the rewritten
values are online. SQLite is a file in a temporary directory; Redis is ``--redis-url`` (keys
of the benchmark's projects are deleted at the end).

Prints a table and writes ``benchmarks/results/materialize_full.json``.

    .venv/bin/python benchmarks/materialize_full.py [--items 100000] [--redis-url URL]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from anchors_memory import write_report  # noqa: E402

T0 = datetime(2024, 1, 1, tzinfo=UTC)
VIEW = "item_popularity"


def old_store(ref: str) -> ModuleType:
    """``training/features/store.py`` as of ``ref``, imported as a module of its own."""
    source = subprocess.run(
        ["git", "show", f"{ref}:training/features/store.py"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    spec = importlib.util.spec_from_loader("store_before_fix", loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while building
    exec(compile(source, f"store.py@{ref}", "exec"), module.__dict__)
    return module


def popularity(items: int, seed: int = 0) -> Any:
    """``items`` rows of ``item_popularity``, one per item, a second apart from ``T0``."""
    import numpy as np
    import pyarrow as pa

    rng = np.random.default_rng(seed)
    candidates = rng.integers(1, 1000, items)
    impressions = rng.integers(0, 500, items)
    clicks = rng.integers(0, 50, items)
    return pa.table(
        {
            "item_id": pa.array(np.char.add("i", np.arange(items).astype(str))),
            "event_timestamp": pa.array(
                np.datetime64(T0.replace(tzinfo=None), "s") + np.arange(items), pa.timestamp("us")
            ).cast(pa.timestamp("us", tz="UTC")),
            "candidate_count": pa.array(candidates, pa.int64()),
            "impressions": pa.array(impressions, pa.int64()),
            "clicks": pa.array(clicks, pa.int64()),
            "ctr_smoothed": pa.array((clicks + 1) / (impressions + 20), pa.float32()),
            "exposure_rate": pa.array(impressions / (candidates + impressions), pa.float32()),
            "log_candidate_count": pa.array(np.log1p(candidates), pa.float32()),
        }
    )


def rewritten(table: Any, drop: float) -> Any:
    """The table rebuilt over the same days: the last ``drop`` of the items gone, counts +1000."""
    import pyarrow.compute as pc

    kept = table.slice(0, table.num_rows - int(table.num_rows * drop))
    index = kept.schema.get_field_index("impressions")
    return kept.set_column(
        index, kept.schema.field(index), pc.add(kept.column("impressions"), 1000)
    )


def online_count(store: Any) -> int:
    """Entities holding a row of the view, counted in the store itself."""
    import sqlite3

    config = store.config
    if config.online_store.type == "redis":
        from feast.infra.online_stores.redis import RedisOnlineStore

        client = RedisOnlineStore()._get_client(config.online_store)
        project = config.project.encode()
        return sum(
            1
            for key in client.scan_iter(match=b"*" + project, count=5000)
            if client.hexists(key, f"_ts:{VIEW}")
        )
    with sqlite3.connect(str(config.online_store.path)) as conn:
        table = f"{config.project}_{VIEW}"
        return int(conn.execute(f'SELECT COUNT(DISTINCT entity_key) FROM "{table}"').fetchone()[0])


def values_online(store: Any, table: Any, sample: int = 200) -> bool:
    """The table's impressions of ``sample`` items equal what the store serves."""
    ids = table.column("item_id").to_pylist()[:: max(1, table.num_rows // sample)]
    want = dict(
        zip(
            table.column("item_id").to_pylist(),
            table.column("impressions").to_pylist(),
            strict=True,
        )
    )
    got = store.get_online_features(
        features=[f"{VIEW}:impressions"], entity_rows=[{"item_id": i} for i in ids]
    ).to_dict()["impressions"]
    return [want[i] for i in ids] == list(got)


def one_reload(variant: str, module: ModuleType, backend: str, args: argparse.Namespace) -> dict:
    """A fresh run directory: load the table, rewrite it, time ``materialize(replace=True)``."""
    import pyarrow.parquet as pq

    from training.features import store as new_store
    from training.features.store import StoreSettings, apply_definitions, open_store

    run = Path(tempfile.mkdtemp(prefix="materialize_full_"))
    try:
        project = f"bench_full_{os.getpid()}_{variant}_{backend}_{time.monotonic_ns() % 10**9}"
        args.projects.append(project)
        settings = StoreSettings(
            project=project, redis_url=args.redis_url if backend == "redis" else None
        )
        table = popularity(args.items)
        (run / "features").mkdir(parents=True)
        path = run / "features" / f"{VIEW}.parquet"
        pq.write_table(table, path)
        store = open_store(run, settings)
        apply_definitions(store)
        end = T0 + timedelta(days=30)
        began = time.perf_counter()
        new_store.materialize(store, end=end, views=[VIEW])
        first = time.perf_counter() - began
        assert online_count(store) == table.num_rows

        table = rewritten(table, args.drop)
        pq.write_table(table, path)
        removing = [0.0]
        remove = new_store._remove_absent_entities

        def timed_remove(*a: Any, **k: Any) -> int:
            t = time.perf_counter()
            try:
                return int(remove(*a, **k))
            finally:
                removing[0] += time.perf_counter() - t

        new_store._remove_absent_entities = timed_remove
        try:
            began = time.perf_counter()
            module.materialize(store, end=end + timedelta(days=1), views=[VIEW], replace=True)
            seconds = time.perf_counter() - began
        finally:
            new_store._remove_absent_entities = remove
        row = {
            "variant": variant,
            "store": backend,
            "items": args.items,
            "table_after": table.num_rows,
            "first_load_seconds": round(first, 2),
            "reload_seconds": round(seconds, 2),
            "removing_seconds": round(removing[0], 2) if variant == "new" else None,
            "online_after": online_count(store),
            "new_values_online": values_online(store, table),
        }
        print(row, flush=True)
        return row
    finally:
        shutil.rmtree(run, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--drop", type=float, default=0.05, help="share of items removed")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--stores", nargs="+", default=["sqlite", "redis"])
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--old-ref", default="b0aaa39", help="commit of the code before the fix")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "materialize_full.json"
    )
    args = parser.parse_args()
    args.projects = []
    from training.features import store as new_store

    variants = {"old": old_store(args.old_ref), "new": new_store}
    rows = []
    try:
        for backend in args.stores:
            for r in range(args.rounds):
                order = ["old", "new"] if r % 2 == 0 else ["new", "old"]
                rows += [one_reload(v, variants[v], backend, args) for v in order]
    finally:
        if "redis" in args.stores:
            import redis

            client = redis.Redis.from_url(args.redis_url)
            for project in args.projects:
                keys = list(client.scan_iter(match=b"*" + project.encode(), count=5000))
                for k in range(0, len(keys), 5000):
                    client.delete(*keys[k : k + 5000])
    print()
    print("| store | code | reload seconds (rounds) | removing absent | online after / table |")
    print("| --- | --- | --- | --- | --- |")
    summary = {}
    for backend in args.stores:
        for variant in ("old", "new"):
            mine = [x for x in rows if x["store"] == backend and x["variant"] == variant]
            secs = [x["reload_seconds"] for x in mine]
            rem = [x["removing_seconds"] for x in mine if x["removing_seconds"] is not None]
            summary[f"{backend}/{variant}"] = {"reload_seconds": secs, "removing_seconds": rem}
            print(
                f"| {backend} | {variant} | {', '.join(f'{s:.2f}' for s in secs)} | "
                f"{', '.join(f'{s:.2f}' for s in rem) or '-'} | "
                f"{mine[0]['online_after']:,} / {mine[0]['table_after']:,}"
                f"{'' if all(x['new_values_online'] for x in mine) else ' (old values!)'} |"
            )
    args.projects = len(args.projects)
    write_report(args, rows=rows, summary=summary)


if __name__ == "__main__":
    main()
