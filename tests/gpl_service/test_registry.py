"""Registry browsing: the service's feature-view endpoints, and `feast ui` on the run's repo."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import httpx
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fastapi.testclient import TestClient

from feature_repo.data_sources import user_interest_anchors_source
from feature_repo.feature_views import FEATURE_VIEWS
from gpl_service.process import free_port, wait_ready
from tests.gpl_service.conftest import PROJECT, Served


def test_lists_every_feature_view(client: TestClient) -> None:
    got = client.get("/v1/registry/feature-views")
    assert got.status_code == 200
    views = {v["name"]: v for v in got.json()}
    assert set(views) == {v.name for v in FEATURE_VIEWS}
    assert views["item_popularity"]["ttl_seconds"] == 30 * 86400
    assert views["item_content"]["ttl_seconds"] is None
    assert views["pseudo_labels"]["online"] is False
    assert views["pseudo_labels"]["last_materialized"] is None
    assert views["user_activity"]["entities"] == ["user"]
    assert views["user_activity"]["last_materialized"] is not None
    assert views["user_activity"]["online_age_seconds"] >= 0


def test_describes_one_view_with_fields_and_freshness(client: TestClient) -> None:
    got = client.get("/v1/registry/feature-views/user_interest_anchors").json()
    assert got["join_keys"] == ["user_id"]
    fields = {f["name"]: f for f in got["fields"]}
    assert fields["anchor_item_ids"]["description"] == "The item each anchor SID denotes."
    assert fields["anchor_item_ids"]["default"] == "[]"
    assert "String" in fields["anchor_item_ids"]["dtype"]
    assert all(f["description"] for f in got["fields"])
    assert got["source"] == user_interest_anchors_source.path
    assert got["materialization_intervals"] and len(got["materialization_intervals"][0]) == 2
    assert got["tags"]["stage"] == "anchors"


def test_unknown_view_is_a_404_naming_the_known_ones(client: TestClient) -> None:
    got = client.get("/v1/registry/feature-views/nope")
    assert got.status_code == 404
    error = got.json()["error"]
    assert error["code"] == "not_found" and "item_semantics" in error["message"]


def test_feast_ui_serves_this_registry(served: Served) -> None:
    feast = shutil.which("feast", path=str(Path(sys.executable).parent))
    assert feast, "the feast CLI is installed with the package"
    port = free_port()
    proc = subprocess.Popen(
        [feast, "-c", str(served.root), "ui", "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "FEAST_USAGE": "False"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, f"{url}/health", timeout=90, what="feast ui")
        projects = httpx.get(f"{url}/projects-list.json", timeout=10).json()["projects"]
        assert [p["id"] for p in projects] == [PROJECT]
        assert httpx.get(url, timeout=10).status_code == 200  # the UI's page
        views = httpx.get(
            f"{url}/api/v1/feature_views", params={"project": PROJECT}, timeout=30
        ).json()
        names = {v["spec"]["name"] for v in views["featureViews"]}
        assert {"user_interest_anchors", "item_semantics", "item_popularity"} <= names
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_views_say_how_old_their_online_data_is(client: TestClient, served: Served) -> None:
    """Time since the last job is not the data's age: the newest row the load brought is."""
    views = {v["name"]: v for v in client.get("/v1/registry/feature-views").json()}
    activity = views["user_activity"]
    assert activity["online_store"].startswith(("sqlite:", "redis://"))
    newest = datetime.fromisoformat(activity["newest_online_row"])
    assert newest <= datetime.fromisoformat(activity["last_materialized"])
    assert activity["data_age_seconds"] >= activity["online_age_seconds"]
    table = pq.read_table(served.root / "features" / "user_activity.parquet")
    latest = pc.max(table.column("event_timestamp")).as_py()
    assert newest == latest
    assert views["pseudo_labels"]["newest_online_row"] is None  # offline only, never loaded


def test_lists_feature_services_and_entities(client: TestClient) -> None:
    services = {s["name"]: s for s in client.get("/v1/registry/feature-services").json()}
    assert set(services) == {"preranker", "training_labels"}
    preranker = services["preranker"]
    assert preranker["version"] and "item_popularity" in preranker["views"]
    assert "ctr_smoothed" in preranker["views"]["item_popularity"]
    entities = {e["name"]: e for e in client.get("/v1/registry/entities").json()}
    assert entities["user"]["join_key"] == "user_id" and entities["user"]["value_type"] == "STRING"
    assert all(e["description"] for e in entities.values())


def test_a_view_name_with_a_slash_gets_the_listing_404(client: TestClient) -> None:
    got = client.get("/v1/registry/feature-views/user%2Factivity")
    assert got.status_code == 404
    assert "user_activity" in got.json()["error"]["message"]
