"""The item cache: filled at start-up, misses read from the store, refreshed on materialization
(detected through the registry, never by blind re-reads), and the degraded mode with Redis
stopped and restarted."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient

from gpl_service.app import create_app
from gpl_service.item_cache import ItemSnapshot
from gpl_service.online import Row
from gpl_service.state import ServiceState
from tests.gpl_service.conftest import RedisServed, materialize_all, settings_for
from training.features.store import materialize


def _wait(condition: Callable[[], bool], seconds: float = 15.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def _client(rs: RedisServed, **overrides: object) -> TestClient:
    settings = settings_for(rs.served, run_dir=rs.root, **overrides)
    return TestClient(create_app(settings, store=rs.store), raise_server_exceptions=False)


def _state(client: TestClient) -> ServiceState:
    state: ServiceState = client.app.state.service  # type: ignore[attr-defined]
    return state


def _prerank(rs: RedisServed, client: TestClient, items: list[str] | None = None) -> dict:
    body = {"user_id": rs.served.users[2], "candidates": items or rs.served.items[:12]}
    got = client.post("/v1/prerank", json=body)
    assert got.status_code == 200, got.text
    return dict(got.json())


def _new_item_row(rs: RedisServed, item_id: str, when: pd.Timestamp) -> None:
    """Append ``item_id`` to the item_content source, stamped ``when``."""
    path = rs.root / "features" / "item_content.parquet"
    table = pq.read_table(path)
    row = pa.table(
        {
            "item_id": [item_id],
            "event_timestamp": pa.array([when], table.schema.field("event_timestamp").type),
            "text_num_words": pa.array([7], table.schema.field("text_num_words").type),
            "category": [table.column("category")[0].as_py()],
        }
    )
    pq.write_table(pa.concat_tables([table, row.select(table.column_names)]), path)


def test_cache_is_filled_from_redis_at_start_up(rs_client: tuple[RedisServed, TestClient]) -> None:
    rs, client = rs_client
    ready = client.get("/v1/ready").json()
    assert ready["ready"] and ready["online_store"] == {"type": "redis", "reachable": True}
    assert ready["items_cached"] == len(rs.served.items)
    out = _prerank(rs, client)
    assert out["stats"]["unknown_items"] == 0 and out["stats"]["fetched_from_store"] == 0
    assert out["stats"]["history_items"] > 0


def test_a_miss_is_read_from_the_store_then_cached(
    rs_client: tuple[RedisServed, TestClient],
) -> None:
    rs, client = rs_client
    row = pd.DataFrame(
        {
            "item_id": ["i-late"],
            "event_timestamp": [pd.Timestamp(rs.served.as_of) - pd.Timedelta(hours=1)],
            "text_num_words": [3],
            "category": [""],
        }
    )
    # Pushed straight to the online store: no materialization, so no refresh; the miss path
    # must find it.
    rs.store.write_to_online_store("item_content", row)
    items = [*rs.served.items[:5], "i-late", "i-never"]
    first = _prerank(rs, client, items)["stats"]
    assert first["fetched_from_store"] == 1 and first["unknown_items"] == 1
    second = _prerank(rs, client, items)["stats"]
    assert second["fetched_from_store"] == 0 and second["unknown_items"] == 1
    assert _state(client).items.index.get("i-late")
    assert "i-never" in _state(client).items.unknown  # not asked again until a refresh
    # The appended item got its precomputed state; scores equal the full graphs'.
    state = _state(client)
    assert state.plan is not None and state.plan.states is not None
    assert state.plan.states.table(state.items).rows == state.items.size
    with _client(rs, precompute_item_states=False) as full:
        want = _prerank(rs, full, items)
    got = _prerank(rs, client, items)
    assert got["stats"]["item_states"] == "precomputed"
    assert want["stats"]["item_states"] == "per request"
    scores = {i["item_id"]: i["score"] for i in want["items"]}
    for item in got["items"]:
        assert abs(item["score"] - scores[item["item_id"]]) <= 1e-5, item


def test_materialization_refreshes_the_cache_and_nothing_else_does(
    rs_client: tuple[RedisServed, TestClient],
) -> None:
    rs, client = rs_client
    state = _state(client)
    generation = state.items.generation
    time.sleep(0.6)  # several watcher rounds: nothing changed, nothing re-read
    assert state.items.generation == generation
    assert state.check_materialization() is False
    # a materialization of user views only rewrites the registry but not an item view
    later = rs.served.as_of + timedelta(hours=1)
    materialize(rs.store, end=later, views=["user_activity"])
    time.sleep(0.6)
    assert state.items.generation == generation
    # a new item materialized into item_content: the watcher sees it and re-reads the items
    _new_item_row(rs, "i-new", pd.Timestamp(rs.served.as_of + timedelta(minutes=30)))
    materialize(rs.store, end=later, views=["item_content"])
    assert _wait(lambda: state.items.generation > generation)
    assert "i-new" in state.items.index
    assert client.get("/v1/ready").json()["items_cached"] == len(rs.served.items) + 1
    # the new snapshot's item states were computed before it was swapped in, not by a request
    assert state.plan is not None and state.plan.states is not None
    table = state.plan.states._table
    assert table is not None and table.snapshot is state.items
    assert table.rows == state.items.size
    out = _prerank(rs, client, ["i-new", *rs.served.items[:3]])["stats"]
    assert out["unknown_items"] == 0 and out["fetched_from_store"] == 0
    assert 'gpl_item_cache_refreshes_total{result="ok"} 2.0' in client.get("/metrics").text


def test_degraded_while_redis_is_down_and_recovers(
    rs_client: tuple[RedisServed, TestClient],
) -> None:
    rs, client = rs_client
    assert _prerank(rs, client)["degraded"] is False
    rs.redis.stop()
    down = _prerank(rs, client)
    assert down["degraded"] is True
    stats = down["stats"]
    assert stats["unknown_items"] == 0  # items still come from the cache
    assert stats["history_items"] == 0 and stats["feature_age_seconds"]["user_activity"] is None
    began = time.perf_counter()
    assert _prerank(rs, client)["degraded"] is True  # within the back-off: no store call
    assert time.perf_counter() - began < 1.0
    ready = client.get("/v1/ready")
    assert ready.status_code == 200
    assert ready.json()["online_store"]["reachable"] is False
    metrics = client.get("/metrics").text
    assert "gpl_degraded_responses_total 2.0" in metrics
    assert "gpl_online_store_up 0.0" in metrics
    rs.redis.start()  # an empty Redis: the store answers again
    materialize_all(rs.store, rs.served.as_of)
    assert _wait(lambda: _prerank(rs, client)["degraded"] is False)
    back = _prerank(rs, client)
    assert back["stats"]["history_items"] > 0
    assert "gpl_online_store_up 1.0" in client.get("/metrics").text


def test_starts_unready_without_redis_and_becomes_ready(served_redis_down: RedisServed) -> None:
    rs = served_redis_down
    with _client(rs) as client:
        ready = client.get("/v1/ready")
        assert ready.status_code == 503 and ready.json()["item_cache_loaded"] is False
        got = client.post("/v1/prerank", json={"user_id": "u1", "candidates": rs.served.items[:3]})
        assert got.status_code == 503 and got.json()["error"]["code"] == "not_ready"
        rs.redis.start()
        materialize_all(rs.store, rs.served.as_of)
        assert _wait(lambda: client.get("/v1/ready").status_code == 200)
        assert _prerank(rs, client)["degraded"] is False


def test_category_ids_follow_each_snapshot(rs_client: tuple[RedisServed, TestClient]) -> None:
    """A refresh numbers category strings afresh; ids must follow the snapshot, not the past."""
    _, client = rs_client
    state = _state(client)
    plan = state.plan
    assert plan is not None
    vocab = plan.bundle.categories
    assert len(vocab) >= 2
    view = next(s for s in state.layout.views if s.name == "item_content")

    def snapshot(generation: int, categories: list[str]) -> ItemSnapshot:
        snap = ItemSnapshot.empty(state.layout, generation, 4)
        ids = [f"x{k}" for k in range(len(categories))]
        rows = {s.name: [Row(None, None)] * len(ids) for s in state.layout.views}
        rows["item_content"] = [Row(1.0, {**view.defaults, "category": c}) for c in categories]
        snap.add(ids, rows)
        return snap

    first = snapshot(1, [vocab[0], vocab[1]])
    second = snapshot(2, [vocab[1], vocab[0]])
    rows = np.array([1, 2], np.int64)
    assert plan.category_ids(first, rows).tolist() == [1, 2]
    assert plan.category_ids(second, rows).tolist() == [2, 1]
    assert plan.category_ids(first, rows).tolist() == [1, 2]


def test_items_without_vectors_first_do_not_break_start_up(redis_served: RedisServed) -> None:
    """70 items sorting before every other id have item_content rows but no content vector.
    The cache's width comes from the bundle, not from the first ids the store lists."""
    rs = redis_served
    when = pd.Timestamp(rs.served.as_of + timedelta(minutes=30))
    for k in range(70):
        _new_item_row(rs, f"a{k:03d}", when)
    materialize(rs.store, end=rs.served.as_of + timedelta(hours=1), views=["item_content"])
    with _client(rs) as client:
        assert client.get("/v1/ready").status_code == 200
        out = _prerank(rs, client, ["a000", *rs.served.items[:5]])
        assert len(out["items"]) == 6 and out["stats"]["unknown_items"] <= 1  # a000: no SID
        state = _state(client)
        assert state.plan is not None and state.layout.dim == state.plan.bundle.embedding_dim
        assert state.items.bad_vectors == 0


def test_a_failed_refresh_after_a_materialization_is_retried(
    rs_client: tuple[RedisServed, TestClient], monkeypatch
) -> None:
    """The store fails the refresh a materialization started (once): the watcher retries after
    the back-off instead of waiting for the next materialization."""
    from gpl_service.online import StoreUnavailableError

    rs, client = rs_client
    state = _state(client)
    calls = {"n": 0}
    listed = state.reader.entity_ids

    def flaky(*args: object, **kwargs: object) -> list[str]:
        calls["n"] += 1
        if calls["n"] == 1:
            raise StoreUnavailableError("timed out while a materialization writes")
        return listed(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(state.reader, "entity_ids", flaky)
    _new_item_row(rs, "i-retried", pd.Timestamp(rs.served.as_of + timedelta(minutes=30)))
    materialize(rs.store, end=rs.served.as_of + timedelta(hours=1), views=["item_content"])
    assert _wait(lambda: "i-retried" in state.items.index)
    assert calls["n"] >= 2
    assert 'gpl_item_cache_refreshes_total{result="failed"} 1.0' in client.get("/metrics").text


def test_a_reload_waits_for_a_refresh_in_progress(
    rs_client: tuple[RedisServed, TestClient], monkeypatch
) -> None:
    """A reload landing while a refresh reads the store swaps in after it, with item states of
    the snapshot then served (not of the one it replaced)."""
    import threading

    import gpl_service.state as state_module

    _, client = rs_client
    state = _state(client)
    reading, release = threading.Event(), threading.Event()
    fill = state_module._fill

    def slow_fill(*args: object, **kwargs: object) -> ItemSnapshot:
        reading.set()
        release.wait(10)
        return fill(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(state_module, "_fill", slow_fill)
    refresh = threading.Thread(target=state.refresh_items, args=("test",))
    refresh.start()
    assert reading.wait(10)
    reload = threading.Thread(target=state.load, args=(state.settings.bundle_path,))
    reload.start()
    time.sleep(0.3)
    assert reload.is_alive()  # waits for the refresh
    release.set()
    refresh.join(10)
    reload.join(30)
    assert state.plan is not None and state.plan.states is not None
    table = state.plan.states._table
    assert table is not None and table.snapshot is state.items


def test_infinite_features_and_vectors_score_as_missing(
    rs_client: tuple[RedisServed, TestClient],
) -> None:
    """+-inf in an item's statistics or content vector: scored as a missing value (never a
    NaN score, which JSON would carry as null), the same score as the value left out."""
    rs, client = rs_client
    when = pd.Timestamp(rs.served.as_of) - pd.Timedelta(hours=1)
    popularity = {
        "event_timestamp": [when],
        "candidate_count": [5],
        "impressions": [2],
        "clicks": [1],
        "exposure_rate": [0.4],
        "log_candidate_count": [1.79],
    }
    for item, ctr in (("zz_inf", float("inf")), ("zz_none", None), ("zz_ninf", float("-inf"))):
        row = pd.DataFrame({"item_id": [item], **popularity, "ctr_smoothed": [ctr]})
        rs.store.write_to_online_store("item_popularity", row)
    dim = _state(client).layout.dim
    vector = [float("inf")] + [0.1] * (dim - 1)
    rs.store.write_to_online_store(
        "item_semantics",
        pd.DataFrame(
            {
                "item_id": ["zz_vec"],
                "event_timestamp": [when],
                "content_embedding": [vector],
                "sid": ["<a_0><b_0><c_0>"],
                "sid_codes": [[0, 0, 0]],
            }
        ),
    )
    # One request each: with ties the cascade would route only the first to the expressive model.
    scores = {}
    for item in ("zz_inf", "zz_none", "zz_ninf", "zz_vec"):
        (answer,) = _prerank(rs, client, [item])["items"]
        scores[item] = (answer["score"], answer["model"])
    assert all(isinstance(s, float) and np.isfinite(s) for s, _ in scores.values()), scores
    assert scores["zz_inf"] == scores["zz_none"] == scores["zz_ninf"]
    assert _state(client).items.bad_vectors == 1


def test_a_row_of_nulls_is_missing_as_in_training(
    rs_client: tuple[RedisServed, TestClient],
) -> None:
    """The training join marks a view missing when all its features are null; serving must too
    (a stored row of nulls is no information), for user and item views alike."""
    rs, client = rs_client
    state = _state(client)
    plan = state.plan
    assert plan is not None
    at = rs.served.as_of.timestamp()
    nulls = {s.name: Row(at - 60, dict.fromkeys(s.features)) for s in plan.user_views}
    absent: dict[str, Row] = {s.name: Row(None, None) for s in plan.user_views}
    with_nulls, *_ = state.scorer._user_inputs(plan, nulls, at)
    without, *_ = state.scorer._user_inputs(plan, absent, at)
    np.testing.assert_array_equal(with_nulls, without)
    assert any(f == "missing" for _, f in plan.user_sources)
    snap = ItemSnapshot.empty(state.layout, 99, 2)
    rows = {s.name: [Row(at - 60, dict.fromkeys(s.features))] for s in state.layout.views}
    snap.add(["x-nulls"], rows)
    snap.add(["x-absent"], {s.name: [Row(None, None)] for s in state.layout.views})
    np.testing.assert_array_equal(
        snap.numeric[snap.index.get("x-nulls")], snap.numeric[snap.index.get("x-absent")]
    )


def test_degraded_is_this_answers_own_reads(
    rs_client: tuple[RedisServed, TestClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An answer is degraded when *its* reads lacked the store, not because another request's
    read failed meanwhile: a fresh user row and cached items are a full answer; an item it had
    to look up, skipped in the back-off that failure started, is not."""
    rs, client = rs_client
    state = _state(client)
    assert _prerank(rs, client)["degraded"] is False  # the candidates are cached now
    user_rows = state.scorer._user_rows

    def then_another_request_fails(*args: Any, **kwargs: Any) -> Any:
        rows = user_rows(*args, **kwargs)
        state.health.failed("a concurrent request's read timed out")
        return rows

    monkeypatch.setattr(state.scorer, "_user_rows", then_another_request_fails)
    monkeypatch.setattr(state.health, "retry_seconds", 60.0)  # the tests' 0.2 s could lapse
    full = _prerank(rs, client)
    assert full["degraded"] is False and full["stats"]["history_items"] > 0
    # The failure's back-off has begun: the next user read is skipped, degraded.
    assert _prerank(rs, client)["degraded"] is True
    state.health.succeeded()
    # An item the cache lacks, skipped because the back-off began after the user's read.
    partial = _prerank(rs, client, ["i-not-cached", *rs.served.items[:3]])
    assert partial["degraded"] is True
    metrics = client.get("/metrics").text
    assert "gpl_degraded_responses_total 2.0" in metrics
    assert "gpl_online_store_up 0.0" in metrics  # the back-off the last failure began


def test_store_up_gauge_follows_readiness_probes_without_traffic(
    rs_client: tuple[RedisServed, TestClient],
) -> None:
    rs, client = rs_client
    assert "gpl_online_store_up 1.0" in client.get("/metrics").text
    rs.redis.stop()
    assert client.get("/v1/ready").json()["online_store"]["reachable"] is False
    assert "gpl_online_store_up 0.0" in client.get("/metrics").text
    rs.redis.start()
    assert _wait(lambda: client.get("/v1/ready").json()["online_store"]["reachable"] is True)
    assert "gpl_online_store_up 1.0" in client.get("/metrics").text
