"""Point-in-time join benchmark: this project's builder vs Feast's file offline store.

Same data, same Feast API call (``get_historical_features`` through a FeatureService), one run:
200k request rows joined with an item view holding a 384-d embedding and a user view. Prints a
table and writes ``benchmarks/results/pit_join.json``.

    .venv/bin/python benchmarks/pit_join.py [--rows 200000] [--items 20000] [--users 10000]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from feast import Entity, FeatureService, FeatureStore, FeatureView, Field, FileSource, ValueType
from feast.types import Array, Float32, Int64, String

from training.features.store import OFFLINE_STORE_TYPE

T0 = datetime(2024, 1, 1, tzinfo=UTC)
DAYS = 60


def make_data(
    root: Path, rows: int, n_items: int, n_users: int, dim: int, seed: int
) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    # Items: two content versions each (initial, then a re-embedding mid-period).
    item_ids = np.array([f"i{i}" for i in range(n_items)])
    ts_items = np.concatenate([np.full(n_items, 0), rng.integers(10, DAYS, n_items)])
    emb = rng.standard_normal((2 * n_items, dim)).astype(np.float32)
    items = pa.table(
        {
            "item_id": np.concatenate([item_ids, item_ids]),
            "event_timestamp": pa.array(
                [T0 + timedelta(days=int(d)) for d in ts_items], pa.timestamp("us", tz="UTC")
            ),
            "embedding": pa.FixedSizeListArray.from_arrays(emb.ravel(), dim).cast(
                pa.list_(pa.float32())
            ),
            "popularity": rng.integers(0, 1000, 2 * n_items),
        }
    )
    pq.write_table(items, root / "items.parquet")
    # Users: daily snapshots on ~1/3 of days.
    u_rows = []
    for u in range(n_users):
        days = np.sort(rng.choice(DAYS, DAYS // 3, replace=False))
        u_rows.append(
            pd.DataFrame(
                {
                    "user_id": f"u{u}",
                    "day": days,
                    "clicks": np.cumsum(rng.integers(0, 5, len(days))),
                }
            )
        )
    users = pd.concat(u_rows)
    users["event_timestamp"] = pd.Timestamp(T0) + pd.to_timedelta(users.pop("day") + 1, unit="D")
    pq.write_table(pa.Table.from_pandas(users, preserve_index=False), root / "users.parquet")
    # Entity rows: requests spread over the period, a share before any user snapshot.
    minutes = rng.integers(0, DAYS * 24 * 60, rows)
    return pd.DataFrame(
        {
            "request_id": [f"r{k // 50}" for k in range(rows)],
            "user_id": np.array([f"u{u}" for u in rng.integers(0, n_users, rows)]),
            "item_id": item_ids[rng.integers(0, n_items, rows)],
            "event_timestamp": pd.Timestamp(T0) + pd.to_timedelta(minutes, unit="m"),
        }
    )


def make_store(root: Path, offline_type: str, dim: int) -> FeatureStore:
    offline = {"type": offline_type}
    (root / "feature_store.yaml").write_text(
        yaml.safe_dump(
            {
                "project": "bench",
                "provider": "local",
                "registry": str(root / f"registry_{offline_type.rsplit('.', 1)[-1]}.db"),
                "offline_store": offline,
                "online_store": {"type": "sqlite", "path": str(root / "online.db")},
                "entity_key_serialization_version": 3,
            }
        )
    )
    store = FeatureStore(repo_path=str(root))
    item = Entity(name="item", join_keys=["item_id"], value_type=ValueType.STRING)
    user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.STRING)
    item_src = FileSource(
        name="items", path=str(root / "items.parquet"), timestamp_field="event_timestamp"
    )
    user_src = FileSource(
        name="users", path=str(root / "users.parquet"), timestamp_field="event_timestamp"
    )
    item_view = FeatureView(
        name="item_semantics",
        entities=[item],
        ttl=timedelta(0),
        source=item_src,
        schema=[
            Field(name="item_id", dtype=String),
            Field(name="embedding", dtype=Array(Float32)),
            Field(name="popularity", dtype=Int64),
        ],
    )
    user_view = FeatureView(
        name="user_activity",
        entities=[user],
        ttl=timedelta(days=30),
        source=user_src,
        schema=[Field(name="user_id", dtype=String), Field(name="clicks", dtype=Int64)],
    )
    service = FeatureService(name="bench", features=[item_view, user_view])
    store.apply([item, user, item_src, user_src, item_view, user_view, service])
    return store


def run_one(
    root: Path, offline_type: str, entity: pd.DataFrame, dim: int
) -> dict[str, float | int]:
    store = make_store(root, offline_type, dim)
    began = time.perf_counter()
    out = store.get_historical_features(
        entity_df=entity.copy(),
        features=store.get_feature_service("bench"),
        full_feature_names=True,
    ).to_df()
    seconds = time.perf_counter() - began
    return {"seconds": seconds, "rows_in": len(entity), "rows_out": len(out)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "pit_join.json"
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        entity = make_data(root, args.rows, args.items, args.users, args.dim, args.seed)
        ours = run_one(root, OFFLINE_STORE_TYPE, entity, args.dim)
        theirs = run_one(root, "file", entity, args.dim)

    ratio = ours["seconds"] / theirs["seconds"]
    print(
        f"\nPoint-in-time join: {args.rows:,} rows, "
        f"item view with a {args.dim}-d embedding + user view"
    )
    print(f"{'path':<34}{'seconds':>10}{'rows in':>10}{'rows out':>10}")
    for label, res in (
        ("gpl offline store (this project)", ours),
        ("feast file offline store", theirs),
    ):
        print(f"{label:<34}{res['seconds']:>10.2f}{res['rows_in']:>10,}{res['rows_out']:>10,}")
    print(f"time ratio ours/file = {ratio:.3f} (target <= 0.100); speed-up {1 / ratio:.1f}x")
    lost_ours = ours["rows_in"] - ours["rows_out"]
    lost_theirs = theirs["rows_in"] - theirs["rows_out"]
    print(f"rows lost: ours {lost_ours}, file store {lost_theirs}")
    result = {
        "benchmark": "pit_join",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": __import__("os").cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "params": vars(args) | {"out": str(args.out)},
        "gpl": ours,
        "feast_file": theirs,
        "ratio": ratio,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
