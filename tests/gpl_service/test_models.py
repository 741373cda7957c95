"""Bundle loading: execution-provider choice, split graphs and the loader's refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from fastapi.testclient import TestClient
from onnx import numpy_helper

from export.bundle import MANIFEST, write_checksums
from gpl_service import models
from gpl_service.app import create_app
from gpl_service.models import CPU, CUDA, BundleLoadError, load_bundle
from tests.gpl_service.conftest import Served, settings_for


def test_auto_uses_cuda_only_where_a_gpu_is_visible(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models.ort, "get_available_providers", lambda: [CUDA, CPU])
    monkeypatch.setattr(models, "gpu_present", lambda: False)
    assert models._providers("auto") == [CPU]
    monkeypatch.setattr(models, "gpu_present", lambda: True)
    assert models._providers("auto") == [CUDA, CPU]
    assert models._providers("cpu") == [CPU]


def test_cuda_without_a_gpu_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "gpu_present", lambda: False)
    with pytest.raises(BundleLoadError, match="no CUDA GPU"):
        models._providers("cuda")


def test_cuda_sessions_that_fall_back_to_the_cpu_are_refused(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Forced CUDA where ONNX Runtime cannot start it: a refusal, never a silent CPU service."""
    if models.gpu_present():
        pytest.skip("a GPU is visible: ONNX Runtime may really start its CUDA provider here")
    preloads: list[int] = []
    monkeypatch.setattr(models, "gpu_present", lambda: True)
    monkeypatch.setattr(models.ort, "preload_dlls", lambda: preloads.append(1), raising=False)
    models._load_cuda_libraries.cache_clear()
    if CUDA not in models.ort.get_available_providers():
        monkeypatch.setattr(models.ort, "get_available_providers", lambda: [CUDA, CPU])
    with pytest.raises(BundleLoadError, match="fell back to the CPU"):
        load_bundle(served.bundle, providers="cuda", threads=1)
    assert preloads == [1]  # the CUDA libraries were looked for once, before the sessions


def test_loaded_bundle_reports_what_it_serves(served: Served) -> None:
    bundle = load_bundle(served.bundle, providers="auto", threads=1)
    if not models.gpu_present():
        assert bundle.providers == [CPU]
    assert len(bundle.model_version) == 16
    assert bundle.hard_fraction == pytest.approx(0.2)
    assert load_bundle(served.bundle, hard_fraction=0.5).hard_fraction == 0.5
    assert bundle.history_length > 0 and bundle.num_anchors > 0


def _copy_bundle(served: Served, tmp_path: Path, name: str) -> Path:
    return Path(shutil.copytree(served.bundle, tmp_path / name))


def test_split_graphs_load_with_their_state_widths(served: Served) -> None:
    bundle = load_bundle(served.bundle, providers="cpu")
    manifest = bundle.manifest["split"]
    assert set(bundle.split) == {"light", "expressive"}
    for kind, split in bundle.split.items():
        assert split.width == manifest[kind]["state_width"]
    assert load_bundle(served.bundle, providers="cpu", precompute=False).split == {}


def test_a_bundle_without_split_graphs_is_served_by_the_full_graphs(
    served: Served, tmp_path: Path
) -> None:
    """Bundles exported before the split graphs existed still load and serve."""
    old = _copy_bundle(served, tmp_path, "old")
    manifest = json.loads((old / MANIFEST).read_text())
    for record in manifest.pop("split").values():
        (old / record["item"]["file"]).unlink()
        (old / record["score"]["file"]).unlink()
    (old / MANIFEST).write_text(json.dumps(manifest))
    write_checksums(old)
    assert load_bundle(old, providers="cpu").split == {}
    app = create_app(settings_for(served, bundle_dir=old), store=served.store)
    with TestClient(app) as client:
        body = {"user_id": served.users[0], "candidates": served.items[:20]}
        got = client.post("/v1/prerank", json=body).json()
    assert got["stats"]["item_states"] == "per request"
    assert len(got["items"]) == 10


def test_split_graphs_that_disagree_with_the_full_graph_are_refused(
    served: Served, tmp_path: Path
) -> None:
    """Checksums only prove the files are the exported ones; the load also proves they agree."""
    bad = _copy_bundle(served, tmp_path, "bad")
    graph = onnx.load(str(bad / "light.score.onnx"))
    weight = max(graph.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    values = numpy_helper.to_array(weight).copy()
    weight.CopyFrom(numpy_helper.from_array(values * 1.5, weight.name))
    onnx.save(graph, str(bad / "light.score.onnx"))
    write_checksums(bad)
    with pytest.raises(BundleLoadError, match=r"light split graphs disagree with light\.onnx"):
        load_bundle(bad, providers="cpu")
    # Turning precomputing off serves the full graphs, which are intact.
    assert load_bundle(bad, providers="cpu", precompute=False).split == {}

    wrong = _copy_bundle(served, tmp_path, "wrong")
    manifest = json.loads((wrong / MANIFEST).read_text())
    manifest["split"]["expressive"]["state_width"] += 1
    (wrong / MANIFEST).write_text(json.dumps(manifest))
    write_checksums(wrong)
    with pytest.raises(BundleLoadError, match="expressive"):
        load_bundle(wrong, providers="cpu")
