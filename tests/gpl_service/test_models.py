"""Bundle loading: execution-provider choice and the loader's refusals."""

from __future__ import annotations

import pytest

from gpl_service import models
from gpl_service.models import CPU, CUDA, BundleLoadError, load_bundle
from tests.gpl_service.conftest import Served


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


def test_loaded_bundle_reports_what_it_serves(served: Served) -> None:
    bundle = load_bundle(served.bundle, providers="auto", threads=1)
    if not models.gpu_present():
        assert bundle.providers == [CPU]
    assert len(bundle.model_version) == 16
    assert bundle.hard_fraction == pytest.approx(0.2)
    assert load_bundle(served.bundle, hard_fraction=0.5).hard_fraction == 0.5
    assert bundle.history_length > 0 and bundle.num_anchors > 0
