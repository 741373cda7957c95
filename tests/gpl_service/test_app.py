"""Every endpoint, every documented error (4xx JSON, never 500), and the OpenAPI document."""

from __future__ import annotations

import re
from typing import Any

import pytest
from fastapi.testclient import TestClient

from gpl_service.app import create_app
from tests.gpl_service.conftest import Served, settings_for


def _error(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert body["error"]["code"] == code
    assert body["error"]["message"]
    return dict(body["error"])


def _metric(text: str, name: str, labels: str = "") -> float:
    pattern = "^" + re.escape(name) + (r"\{" + re.escape(labels) + r"\}" if labels else "")
    match = re.search(pattern + r" (\S+)$", text, flags=re.M)
    return float(match.group(1)) if match else 0.0


def test_health_ready_models(served: Served, client: TestClient) -> None:
    assert client.get("/v1/health").json() == {"status": "ok"}
    ready = client.get("/v1/ready")
    assert ready.status_code == 200
    body = ready.json()
    assert body["ready"] and body["model_loaded"] and body["item_cache_loaded"]
    assert body["items_cached"] == len(served.items)
    assert body["online_store"] == {"type": "sqlite", "reachable": True}
    models = client.get("/v1/models").json()
    assert len(models["model_version"]) == 16
    assert models["providers"] == ["CPUExecutionProvider"]
    manifest = models["manifest"]
    assert manifest["feature_service"]["name"] == "preranker"
    assert manifest["format"] == "gpl-preranker-bundle"


def test_prerank_response_shape(served: Served, client: TestClient) -> None:
    body = {
        "user_id": served.users[0],
        "candidates": served.items[:20],
        "top_k": 5,
        "request_id": "req-1",
    }
    got = client.post("/v1/prerank", json=body)
    assert got.status_code == 200
    out = got.json()
    assert out["request_id"] == "req-1"
    assert out["model_version"] == client.get("/v1/models").json()["model_version"]
    assert len(out["items"]) == 5
    assert all(0.0 <= i["score"] <= 1.0 for i in out["items"])
    stats = out["stats"]
    assert stats["candidates"] == 20 and stats["unknown_items"] == 0
    assert stats["scored_expressive"] + 0 <= stats["scored_light"] == 20
    assert set(stats["timings_ms"]) == {"features", "light", "expressive"}
    assert stats["feature_age_seconds"]["item_popularity"] is not None
    generated = client.post("/v1/prerank", json={**body, "request_id": None}).json()
    assert re.fullmatch(r"[0-9a-f]{32}", generated["request_id"])


@pytest.mark.parametrize(
    ("body", "where"),
    [
        ({"user_id": "", "candidates": ["i1"]}, "user_id"),
        ({"user_id": "   ", "candidates": ["i1"]}, "user_id"),
        ({"candidates": ["i1"]}, "user_id"),
        ({"user_id": "u1", "candidates": []}, "candidates"),
        ({"user_id": "u1", "candidates": ["i1", ""]}, "candidates.1"),
        ({"user_id": "u1", "candidates": "i1"}, "candidates"),
        ({"user_id": "u1", "candidates": [f"i{k}" for k in range(101)]}, "candidates"),
        ({"user_id": "u1", "candidates": ["i1"], "top_k": 0}, "top_k"),
        ({"user_id": "u1", "candidates": ["i1"], "top_k": "many"}, "top_k"),
        ({"user_id": "u1", "candidates": ["i1"], "top_k": True}, "top_k"),
        ({"user_id": "u1", "candidates": ["i1"], "top_k": "3"}, "top_k"),
        ({"user_id": "u1", "candidates": ["i1"], "top_k": 2.5}, "top_k"),
        ({"user_id": "u1", "candidates": ["i1"], "extra": 1}, "extra"),
        ({"user_id": "u" * 257, "candidates": ["i1"]}, "user_id"),
        ([1, 2], "body"),
    ],
)
def test_bad_requests_get_422_saying_where(client: TestClient, body: Any, where: str) -> None:
    err = _error(client.post("/v1/prerank", json=body), 422, "invalid_request")
    assert err["message"].startswith(where), err
    assert err["details"] and all("loc" in d and "message" in d for d in err["details"])


def test_malformed_json_unknown_routes_and_methods(client: TestClient) -> None:
    err = _error(
        client.post(
            "/v1/prerank", content=b"{not json", headers={"content-type": "application/json"}
        ),
        422,
        "invalid_request",
    )
    assert "JSON" in err["message"] or "json" in err["message"]
    _error(client.get("/v1/nope"), 404, "not_found")
    _error(client.get("/v1/prerank"), 405, "method_not_allowed")


def test_metrics_count_requests_cache_and_latency(served: Served, client: TestClient) -> None:
    before = client.get("/metrics").text
    body = {"user_id": served.users[0], "candidates": [*served.items[:8], "zzz-unknown"]}
    assert client.post("/v1/prerank", json=body).status_code == 200
    client.post("/v1/prerank", json={"user_id": ""})
    text = client.get("/metrics").text
    assert text.startswith("# HELP")

    def grew(name: str, labels: str = "", by: float = 1.0) -> None:
        assert _metric(text, name, labels) - _metric(before, name, labels) == by, name

    grew("gpl_http_requests_total", 'route="/v1/prerank",status="200"')
    grew("gpl_http_requests_total", 'route="/v1/prerank",status="422"')
    grew("gpl_prerank_candidates_count")
    grew("gpl_prerank_candidates_sum", by=9.0)
    grew("gpl_item_cache_lookups_total", 'result="hit"', by=8.0)
    grew("gpl_item_cache_lookups_total", 'result="unknown"', by=1.0)
    grew("gpl_prerank_stage_seconds_count", 'stage="light"')
    assert _metric(text, "gpl_item_cache_items") == len(served.items)
    assert 'gpl_feature_age_seconds_count{view="item_popularity"}' in text
    assert "gpl_http_request_duration_seconds_bucket" in text
    assert "gpl_degraded_responses_total 0.0" in text
    version = client.get("/v1/models").json()["model_version"]
    assert f'gpl_model_info{{model_version="{version}"}} 1.0' in text


def test_openapi_documents_limits_and_errors(served: Served) -> None:
    app = create_app(settings_for(served, max_candidates=77), store=served.store)
    doc = app.openapi()
    paths = set(doc["paths"])
    assert {
        "/v1/prerank",
        "/v1/health",
        "/v1/ready",
        "/metrics",
        "/v1/models",
        "/v1/admin/reload",
        "/v1/registry/feature-views",
        "/v1/registry/feature-views/{name}",
    } <= paths
    schema = doc["components"]["schemas"]["PrerankRequest"]
    assert schema["properties"]["candidates"]["maxItems"] == 77
    assert schema["properties"]["candidates"]["minItems"] == 1
    assert set(schema["required"]) == {"user_id", "candidates"}
    post = doc["paths"]["/v1/prerank"]["post"]
    assert "422" in post["responses"] and "503" in post["responses"]
    assert post["responses"]["422"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/ErrorResponse"
    )
    reload_ = doc["paths"]["/v1/admin/reload"]["post"]["responses"]
    assert {"401", "403", "409"} <= set(reload_)


def test_start_up_fails_clearly_without_a_bundle(served: Served, tmp_path: Any) -> None:
    app = create_app(settings_for(served, bundle_dir=tmp_path / "none"), store=served.store)
    with pytest.raises(Exception, match="no bundle directory"), TestClient(app):
        pass
