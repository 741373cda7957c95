"""``materialize(replace=True)`` (``gpl features materialize --full``) against real stores.

A full reload must leave the online store holding exactly the entities of the reloaded table
(rows rewritten with their old timestamps brought online, entities no longer in the table gone),
keep every entity that stays readable while it runs, and touch nothing but the reloaded view.
"""

from __future__ import annotations

import sqlite3
import struct
from datetime import timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from feast import FeatureStore
from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
from feast.protos.feast.types.Value_pb2 import Value as ValueProto

from tests.factories import T0, make_items, make_requests, write_empty_anchors
from training.features.stats import StatsConfig, compute_feature_tables
from training.features.store import StoreSettings, apply_definitions, materialize, open_store

VIEW = "item_popularity"
END = T0 + timedelta(days=40)


@pytest.fixture(params=["sqlite", "redis"])
def settings(request, tmp_path: Path) -> StoreSettings:  # type: ignore[no-untyped-def]
    project = f"full_{request.param}_{abs(hash(tmp_path)) % 10**8}"
    if request.param == "redis":
        server = request.getfixturevalue("redis_server")
        return StoreSettings(project=project, redis_url=server.url)
    return StoreSettings(project=project)


def _run_dir(run_dir: Path, settings: StoreSettings) -> FeatureStore:
    """A run directory with the statistics tables, applied and loaded once (up to ``END``)."""
    items = make_items(30)
    requests = make_requests(n_requests=80, n_users=8, n_items=30, seed=11)
    compute_feature_tables(items, requests).write(run_dir, StatsConfig())
    write_empty_anchors(run_dir)
    store = open_store(run_dir, settings)
    apply_definitions(store)
    materialize(store, end=END)
    return store


def _popularity_path(run_dir: Path) -> Path:
    return run_dir / "features" / f"{VIEW}.parquet"


def _rewrite_popularity(path: Path, drop: list[str]) -> None:
    """A stage re-run over past data: ``drop`` gone, every other count changed, same timestamps."""
    table = pq.read_table(path)
    table = table.filter(pc.invert(pc.is_in(table.column("item_id"), pa.array(drop))))
    index = table.schema.get_field_index("impressions")
    field = table.schema.field(index)
    bumped = pc.add(table.column("impressions"), 1000).cast(field.type)
    pq.write_table(table.set_column(index, field, bumped), path)


def _item_ids(path: Path) -> list[str]:
    return sorted(set(pq.read_table(path, columns=["item_id"]).column("item_id").to_pylist()))


def _latest_impressions(path: Path, items: list[str]) -> list[int]:
    frame = pq.read_table(path).to_pandas().sort_values("event_timestamp")
    latest = frame.groupby("item_id").last()
    return [int(latest.loc[i, "impressions"]) for i in items]


def _online(store: FeatureStore, feature: str, items: list[str]) -> list[Any]:
    got = store.get_online_features(
        features=[feature], entity_rows=[{"item_id": i} for i in items]
    ).to_dict()
    return list(got[feature.split(":")[1]])


def _entities_holding(store: FeatureStore, view: str) -> int:
    """How many entities the online store holds a row of ``view`` for, read from the store
    itself (not through Feast's reader, which cannot tell a missing row from a removed one)."""
    config = store.config
    if config.online_store.type == "redis":
        import redis
        from feast.infra.key_encoding_utils import deserialize_entity_key, serialize_entity_key

        host, port = str(config.online_store.connection_string).split(",")[0].split(":")
        client = redis.Redis(host=host, port=int(port))
        project = config.project.encode()
        field = f"_ts:{view}"
        count = 0
        for key in client.scan_iter(match=b"*" + project, count=1000):
            entity = key[: -len(project)]
            try:  # a key of project "x<project>" leaves bytes that are no entity key
                ours = serialize_entity_key(deserialize_entity_key(entity)) == entity
            except (ValueError, struct.error):
                ours = False
            count += bool(ours and client.hexists(key, field))
        return count
    with sqlite3.connect(str(config.online_store.path)) as conn:
        table = f"{config.project}_{view}"
        (count,) = conn.execute(f'SELECT COUNT(DISTINCT entity_key) FROM "{table}"').fetchone()
    return int(count)


def test_full_reload_holds_exactly_the_reloaded_entities(
    settings: StoreSettings, tmp_path: Path
) -> None:
    """Rewritten rows (same timestamps) come online, removed entities go, other views stay."""
    store = _run_dir(tmp_path, settings)
    path = _popularity_path(tmp_path)
    before = _item_ids(path)
    removed, kept = before[:4], before[4:]
    catalog = [f"i{i}" for i in range(30)]
    content = _online(store, "item_content:text_num_words", catalog)
    assert None not in content and _entities_holding(store, VIEW) == len(before)

    _rewrite_popularity(path, removed)
    full = materialize(store, end=END + timedelta(days=1), replace=True)

    assert VIEW in full.views
    assert _online(store, f"{VIEW}:impressions", kept) == _latest_impressions(path, kept)
    assert _online(store, f"{VIEW}:impressions", removed) == [None] * len(removed)
    assert _entities_holding(store, VIEW) == len(kept)
    assert full.removed[VIEW] == len(removed)
    assert all(full.removed[name] == 0 for name in full.views if name != VIEW)
    # item_content shares the item's Redis hash: its fields survive, removed items included.
    assert _online(store, "item_content:text_num_words", catalog) == content


def test_full_reload_of_one_view_leaves_the_others(settings: StoreSettings, tmp_path: Path) -> None:
    """Reloading one view removes its stale entities and nothing of the views not reloaded."""
    store = _run_dir(tmp_path, settings)
    path = _popularity_path(tmp_path)
    removed = _item_ids(path)[:4]
    users = [f"u{i}" for i in range(8)]
    clicks = store.get_online_features(
        features=["user_activity:clicks"], entity_rows=[{"user_id": u} for u in users]
    ).to_dict()["clicks"]
    content = _online(store, "item_content:text_num_words", removed)

    _rewrite_popularity(path, removed)
    # Remove the items from the catalog statistics too: a view not reloaded keeps them online.
    content_path = tmp_path / "features" / "item_content.parquet"
    table = pq.read_table(content_path)
    pq.write_table(
        table.filter(pc.invert(pc.is_in(table.column("item_id"), pa.array(removed)))),
        content_path,
    )
    full = materialize(store, end=END, replace=True, views=[VIEW])

    assert full.views == [VIEW]
    assert _online(store, f"{VIEW}:impressions", removed) == [None] * len(removed)
    assert _online(store, "item_content:text_num_words", removed) == content
    assert (
        store.get_online_features(
            features=["user_activity:clicks"], entity_rows=[{"user_id": u} for u in users]
        ).to_dict()["clicks"]
        == clicks
    )
    assert full.removed == {VIEW: len(removed)}


def test_full_reload_keeps_entities_readable_while_it_runs(
    redis_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In Redis, an entity in the table before and after the reload never reads as missing.

    Feast writes the reload in batches (``online_write_batch_size``); before every batch and
    after the last one a second store (its own registry and Redis connection, like a serving
    process) reads the real Redis. Feast's writer is wrapped only to know when a batch starts
    and ends: every write still goes through it.
    """
    settings = StoreSettings(
        project=f"live_{abs(hash(tmp_path)) % 10**8}", redis_url=redis_server.url
    )
    store = _run_dir(tmp_path, settings)
    path = _popularity_path(tmp_path)
    before = _item_ids(path)
    removed, kept = before[:4], before[4:]
    old = _online(store, f"{VIEW}:impressions", kept)
    catalog = [f"i{i}" for i in range(30)]
    content = _online(store, "item_content:text_num_words", catalog)
    _rewrite_popularity(path, removed)
    new = _latest_impressions(path, kept)
    assert all(n != o for n, o in zip(new, old, strict=True))

    # Read like the service does (gpl_service/online.py): through Feast's provider, with the
    # views it holds. Feast's get_online_features refuses any view the registry marks
    # MATERIALIZING, as every load (full or incremental) does while it runs: reading through it
    # would test that registry gate, not what the online store holds.
    reader = open_store(tmp_path, settings)
    provider = reader._get_provider()
    views = {name: reader.get_feature_view(name) for name in (VIEW, "item_content")}

    def read(view: str, feature: str, ids: list[str]) -> list[Any]:
        keys = [
            EntityKeyProto(join_keys=["item_id"], entity_values=[ValueProto(string_val=i)])
            for i in ids
        ]
        rows = provider.online_read(reader.config, views[view], keys, [feature])
        # A hash without this view's fields (other views keep it) reads as empty values.
        got = [None if values is None else values.get(feature) for _, values in rows]
        return [None if v is None or v.WhichOneof("val") is None else v.int64_val for v in got]

    assert read(VIEW, "impressions", kept) == old
    assert read("item_content", "text_num_words", catalog) == content
    seen: list[list[Any]] = []

    def observe() -> None:
        got = read(VIEW, "impressions", kept)
        for value, was, will in zip(got, old, new, strict=True):
            assert value in (was, will), f"an entity kept by the reload read {value!r}"
        assert read("item_content", "text_num_words", catalog) == content
        seen.append(got)

    online_store = store._get_provider().online_store
    write = online_store.online_write_batch

    def write_observed(*args: Any, **kwargs: Any) -> None:
        table = kwargs.get("table", args[1] if len(args) > 1 else None)
        if getattr(table, "name", None) == VIEW:
            observe()
        write(*args, **kwargs)

    monkeypatch.setattr(online_store, "online_write_batch", write_observed)
    monkeypatch.setattr(store.config.materialization_config, "online_write_batch_size", 5)
    materialize(store, end=END + timedelta(days=1), replace=True)
    observe()
    # The timestamp check is off for the full reload only: later loads keep it.
    assert store.config.online_store.skip_dedup is False

    assert len(seen) >= 4  # read before each of several batches, and after the load
    assert seen[-1] == new
    # Some read happened with the reload half done: new values beside old ones.
    assert any(new[k] == v for got in seen[1:-1] for k, v in enumerate(got))
    assert any(old[k] == v for got in seen[1:-1] for k, v in enumerate(got))
    assert _online(store, f"{VIEW}:impressions", removed) == [None] * len(removed)


def test_full_reload_leaves_a_project_whose_name_ends_with_ours(
    redis_server: Any, tmp_path: Path
) -> None:
    """Feast's Redis keys are ``entity key + project``: a scan for ``*project`` also finds the
    keys of project ``x<project>``, whose values a reload of ``project`` must not remove."""
    project = f"sfx_{abs(hash(tmp_path)) % 10**8}"
    ours = _run_dir(tmp_path / "ours", StoreSettings(project=project, redis_url=redis_server.url))
    other = _run_dir(
        tmp_path / "other", StoreSettings(project=f"x{project}", redis_url=redis_server.url)
    )
    path = _popularity_path(tmp_path / "ours")
    items = _item_ids(path)
    theirs = _online(other, f"{VIEW}:impressions", items)
    assert None not in theirs

    _rewrite_popularity(path, items[:4])
    materialize(ours, end=END, replace=True)

    assert _online(ours, f"{VIEW}:impressions", items[:4]) == [None] * 4
    assert _online(other, f"{VIEW}:impressions", items) == theirs


def test_full_reload_keeps_the_entities_of_its_window(
    settings: StoreSettings, tmp_path: Path
) -> None:
    """The window is ``[start, end]``, both ends included as in Feast's load: a reload to an
    earlier ``end`` removes an entity whose only row is later, keeps one whose row is at
    ``end``."""
    store = _run_dir(tmp_path, settings)
    path = _popularity_path(tmp_path)
    table = pq.read_table(path)
    first = table.slice(0, 1).to_pylist()[0]
    at_end = {**first, "item_id": "at_end", "event_timestamp": END, "impressions": 7}
    later = {**first, "item_id": "later", "event_timestamp": END + timedelta(seconds=1)}
    pq.write_table(
        pa.concat_tables([table, pa.Table.from_pylist([at_end, later], table.schema)]), path
    )
    materialize(store, end=END + timedelta(days=2), views=[VIEW])
    assert _online(store, f"{VIEW}:impressions", ["at_end", "later"]) == [7, first["impressions"]]

    full = materialize(store, end=END, replace=True, views=[VIEW])

    assert _online(store, f"{VIEW}:impressions", ["at_end", "later"]) == [7, None]
    assert full.removed == {VIEW: 1}
