"""Served scores equal the exported models on point-in-time joined (offline) features."""

from __future__ import annotations

import math
from datetime import datetime, timedelta

import numpy as np
import pyarrow as pa
import pytest
from fastapi.testclient import TestClient

from export.parity import cases_from_joined, onnx_session
from gpl_service.app import create_app
from gpl_service.models import load_bundle
from tests.gpl_service.conftest import Served, settings_for
from training.features.training_set import build_training_set
from training.preranker.data import ItemTable, Preprocessing


def _offline_scores(
    served: Served, user: str, items: list[str], as_of: datetime
) -> dict[str, np.ndarray]:
    """Light and expressive logits from the PIT join at the service's as_of, via ONNX."""
    ts = as_of - timedelta(seconds=1)  # the offline join keeps rows strictly before
    n = len(items)
    table = pa.table(
        {
            "request_id": ["offline"] * n,
            "user_id": [user] * n,
            "item_id": items,
            "event_timestamp": pa.array([ts] * n, pa.timestamp("us", tz="UTC")),
            "stage": ["retrieved"] * n,
            "group": ["prerank_negative"] * n,
            "label": pa.array([None] * n, pa.float64()),
        }
    )
    joined = build_training_set(served.store, table, "preranker").table
    bundle = load_bundle(served.bundle, providers="cpu")
    prep = Preprocessing.model_validate(bundle.manifest["preprocessing"]["fitted"])
    case = cases_from_joined(joined, ItemTable.from_semantics(served.semantics), prep)[0]
    out = {}
    for kind in ("light", "expressive"):
        session = onnx_session(served.bundle / f"{kind}.onnx")
        out[kind] = session.run(["logit"], case.graph_inputs)[0]
    return out


@pytest.mark.parametrize("precompute", [True, False], ids=["item-states", "full-graphs"])
@pytest.mark.parametrize("days_later", [0, 45])
def test_served_scores_equal_offline_join_scores(
    served: Served, days_later: int, precompute: bool
) -> None:
    """Same scores as the offline join; 45 days on, past the 30-day ttl of item popularity and
    anchors, both sides fall back to the declared defaults and missing indicators alike.

    Both serving paths: precomputed item states (items past a ttl recomputed from their
    defaulted inputs) and the full graphs on every candidate.
    """
    as_of = served.as_of + timedelta(days=days_later)
    settings = settings_for(served, as_of=as_of, precompute_item_states=precompute)
    app = create_app(settings, store=served.store)
    user = served.users[1]
    items = served.items[:30]
    body = {"user_id": user, "candidates": items, "top_k": len(items)}
    with TestClient(app) as client:
        got = client.post("/v1/prerank", json=body).json()
        fraction = client.get("/v1/models").json()["hard_fraction"]
        metrics = client.get("/metrics").text
    rows = float(metrics.split("\ngpl_item_states_rows ")[1].split()[0])
    recomputed = float(metrics.split("\ngpl_item_states_recomputed_total ")[1].split()[0])
    assert rows == (len(served.items) + 1 if precompute else 0)  # + the unknown item's row
    # 45 days on, every candidate is past item_popularity's ttl: recomputed from its defaults
    assert recomputed == (
        len(items) + math.ceil(0.2 * len(items)) if precompute and days_later else 0
    )
    assert got["degraded"] is False
    assert got["stats"]["history_items"] > 0
    assert got["stats"]["item_states"] == ("precomputed" if precompute else "per request")
    if days_later:
        assert got["stats"]["anchors"] == 0  # past the anchors' ttl
        # every candidate's popularity row is past its ttl: the stale path is what is compared
        assert got["stats"]["feature_age_seconds"]["item_popularity"] > 30 * 86400
    else:
        assert got["stats"]["anchors"] > 0
    offline = _offline_scores(served, user, items, as_of)
    light = 1 / (1 + np.exp(-offline["light"].astype(np.float64)))
    expressive = 1 / (1 + np.exp(-offline["expressive"].astype(np.float64)))
    quota = math.ceil(fraction * len(items))
    hard = set(np.argsort(-offline["light"], kind="stable")[:quota].tolist())
    position = {item: k for k, item in enumerate(items)}
    assert [i["model"] for i in got["items"]] == ["expressive"] * quota + ["light"] * (
        len(items) - quota
    )
    for item in got["items"]:
        k = position[item["item_id"]]
        expected = expressive[k] if k in hard else light[k]
        assert (item["model"] == "expressive") == (k in hard)
        assert abs(item["score"] - expected) <= 1e-5, item
    # within each model's block, best first
    blocks = [
        [i["score"] for i in got["items"] if i["model"] == m] for m in ("expressive", "light")
    ]
    for scores in blocks:
        assert scores == sorted(scores, reverse=True)
    assert got["stats"]["scored_expressive"] == quota
    assert got["stats"]["scored_light"] == len(items)


def test_unknown_user_gets_defaults_and_unknown_items_are_reported(
    served: Served, client: TestClient
) -> None:
    items = [*served.items[:5], "no-such-item", served.items[0], "another-unknown"]
    got = client.post("/v1/prerank", json={"user_id": "nobody", "candidates": items}).json()
    stats = got["stats"]
    assert stats["candidates"] == 7 and stats["duplicates_removed"] == 1
    assert stats["unknown_items"] == 2
    assert stats["history_items"] == 0 and stats["anchors"] == 0
    assert stats["feature_age_seconds"]["user_activity"] is None
    assert {i["item_id"] for i in got["items"]} == set(items)
    assert got["degraded"] is False
    # the unknown items are scored like an item no view knows, the same for both
    scores = {i["item_id"]: i["score"] for i in got["items"] if i["model"] == "light"}
    if "no-such-item" in scores and "another-unknown" in scores:
        assert scores["no-such-item"] == scores["another-unknown"]


def test_top_k_default_and_clipped(served: Served, client: TestClient) -> None:
    items = served.items[:25]
    got = client.post("/v1/prerank", json={"user_id": served.users[0], "candidates": items})
    assert len(got.json()["items"]) == 10  # default_top_k
    got = client.post(
        "/v1/prerank", json={"user_id": served.users[0], "candidates": items[:3], "top_k": 50}
    )
    assert len(got.json()["items"]) == 3
