"""Hot reload: token checks, a good bundle swapped in, bad bundles refused while the old serves."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from export.bundle import write_checksums
from gpl_service.app import create_app
from tests.gpl_service.conftest import ADMIN_TOKEN, Served, settings_for

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def _copy(served: Served, dest: Path) -> Path:
    shutil.copytree(served.bundle, dest)
    return dest


def _version(client: TestClient) -> str:
    return str(client.get("/v1/models").json()["model_version"])


def _still_serves(served: Served, client: TestClient, version: str) -> None:
    got = client.post("/v1/prerank", json={"user_id": served.users[0], "candidates": served.items})
    assert got.status_code == 200 and got.json()["model_version"] == version


def test_reload_needs_the_token(served: Served, client: TestClient) -> None:
    for headers, code in [
        ({}, "unauthorized"),
        ({"Authorization": "Bearer wrong-token-wrong-token"}, "unauthorized"),
        ({"Authorization": f"Basic {ADMIN_TOKEN}"}, "unauthorized"),
    ]:
        got = client.post("/v1/admin/reload", headers=headers)
        assert got.status_code == 401 and got.json()["error"]["code"] == code
        assert got.headers["www-authenticate"] == "Bearer"


def test_reload_is_off_without_a_configured_token(served: Served) -> None:
    app = create_app(settings_for(served, admin_token=None), store=served.store)
    with TestClient(app) as client:
        got = client.post("/v1/admin/reload", headers=AUTH)
    assert got.status_code == 403 and got.json()["error"]["code"] == "admin_disabled"
    assert "GPL_SERVE_ADMIN_TOKEN" in got.json()["error"]["message"]


def test_reload_swaps_a_good_bundle(served: Served, client: TestClient, tmp_path: Path) -> None:
    old = _version(client)
    new_dir = _copy(served, tmp_path / "next")
    manifest = json.loads((new_dir / "manifest.json").read_text())
    manifest["created_at"] = "2030-01-01T00:00:00+00:00"  # another export of the same models
    (new_dir / "manifest.json").write_text(json.dumps(manifest))
    write_checksums(new_dir)
    got = client.post("/v1/admin/reload", headers=AUTH, json={"bundle_dir": str(new_dir)})
    assert got.status_code == 200, got.text
    body = got.json()
    assert body["previous_version"] == old and body["model_version"] != old
    assert _version(client) == body["model_version"]
    assert client.get("/v1/models").json()["bundle_dir"] == str(new_dir.resolve())
    _still_serves(served, client, body["model_version"])
    metrics = client.get("/metrics").text
    assert 'gpl_bundle_reloads_total{result="ok"} 1.0' in metrics
    assert f'gpl_model_info{{model_version="{old}"}}' not in metrics
    # no body: reload the configured bundle
    again = client.post("/v1/admin/reload", headers=AUTH)
    assert again.status_code == 200 and again.json()["model_version"] == old


def _bad_bundles(served: Served, root: Path) -> dict[str, Any]:
    bad: dict[str, Any] = {"missing": root / "nowhere"}
    tampered = _copy(served, root / "tampered")
    data = bytearray((tampered / "light.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tampered / "light.onnx").write_bytes(bytes(data))
    bad["tampered"] = tampered
    garbage = _copy(served, root / "garbage")  # checksums agree, the graph is not ONNX
    (garbage / "expressive.onnx").write_bytes(b"not an onnx graph")
    write_checksums(garbage)
    bad["garbage"] = garbage
    foreign = _copy(served, root / "foreign")  # a model for features the store lacks
    manifest = json.loads((foreign / "manifest.json").read_text())
    manifest["features"]["user"]["columns"][0] = "user_activity__no_such_feature"
    (foreign / "manifest.json").write_text(json.dumps(manifest))
    write_checksums(foreign)
    bad["foreign"] = foreign
    mangled: dict[str, Any] = {
        "no_history_section": lambda m: m["features"].pop("history"),
        "no_split_item": lambda m: m["split"]["light"].pop("item"),
        "feature_service_a_string": lambda m: m.update(feature_service="preranker"),
    }
    for name, change in mangled.items():
        d = _copy(served, root / name)
        manifest = json.loads((d / "manifest.json").read_text())
        change(manifest)
        (d / "manifest.json").write_text(json.dumps(manifest))
        write_checksums(d)
        bad[name] = d
    listed = _copy(served, root / "a_list")
    (listed / "manifest.json").write_text("[]")
    write_checksums(listed)
    bad["a_list"] = listed
    return bad


def test_bad_bundles_are_refused_and_the_old_one_keeps_serving(
    served: Served, client: TestClient, tmp_path: Path
) -> None:
    old = _version(client)
    expect = {
        "missing": "no bundle directory",
        "tampered": "light.onnx does not match its sha256",
        "garbage": "ONNX Runtime cannot load it",
        "foreign": "no_such_feature",
        "no_history_section": "manifest lacks or mangles 'history'",
        "no_split_item": "'split' section lacks or mangles 'item'",
        "feature_service_a_string": "manifest lacks or mangles",
        "a_list": "not a JSON object",
    }
    for name, path in _bad_bundles(served, tmp_path).items():
        got = client.post("/v1/admin/reload", headers=AUTH, json={"bundle_dir": str(path)})
        assert got.status_code == 409, (name, got.text)
        error = got.json()["error"]
        assert error["code"] == "bundle_rejected"
        assert expect[name] in error["message"], (name, error["message"])
        assert old in error["message"]
        assert _version(client) == old
        _still_serves(served, client, old)
    assert 'gpl_bundle_reloads_total{result="rejected"} 8.0' in client.get("/metrics").text


def test_reload_body_is_validated(client: TestClient) -> None:
    got = client.post("/v1/admin/reload", headers=AUTH, json={"bundle": "x"})
    assert got.status_code == 422 and got.json()["error"]["code"] == "invalid_request"


def test_a_bundle_from_another_feature_service_version_loads_with_a_warning(
    served: Served, client: TestClient, tmp_path: Path
) -> None:
    assert client.get("/v1/models").json()["warnings"] == []
    other = _copy(served, tmp_path / "v1")
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["feature_service"]["version"] = "1"
    (other / "manifest.json").write_text(json.dumps(manifest))
    write_checksums(other)
    got = client.post("/v1/admin/reload", headers=AUTH, json={"bundle_dir": str(other)})
    assert got.status_code == 200
    warnings = client.get("/v1/models").json()["warnings"]
    assert len(warnings) == 1 and "version '1'" in warnings[0]


def test_a_file_replaced_after_verification_is_not_loaded(
    served: Served, tmp_path: Path, monkeypatch: Any
) -> None:
    """The sessions are built from the bytes whose sha256 was checked: replacing light.onnx by
    the expressive graph right after the check changes nothing that is loaded."""
    import numpy as np

    import export.bundle as bundle_module
    from gpl_service import models

    bundle = _copy(served, tmp_path / "b")
    honest = models.load_bundle(bundle, providers="cpu", precompute=False)
    read = bundle_module.read_bundle

    def read_then_swap(path: Path) -> Any:
        verified = read(path)
        (path / "light.onnx").write_bytes((path / "expressive.onnx").read_bytes())
        return verified

    monkeypatch.setattr(models, "read_bundle", read_then_swap)
    loaded = models.load_bundle(bundle, providers="cpu", precompute=False)
    inputs = models.smoke_inputs(loaded)
    assert loaded.model_version == honest.model_version
    np.testing.assert_array_equal(loaded.run("light", inputs), honest.run("light", inputs))
    assert not np.array_equal(loaded.run("light", inputs), loaded.run("expressive", inputs))
