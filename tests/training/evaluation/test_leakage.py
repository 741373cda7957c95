"""`gpl evaluate`'s warnings: upstream stages fitted on data from after the cutoff."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from training.evaluation.leakage import upstream_leaks

CUTOFF = datetime(2024, 3, 1, tzinfo=UTC)


def _manifest(path: Path, metrics: dict[str, Any]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "manifest.json").write_text(json.dumps({"metrics": metrics}))


def _run(tmp_path: Path, latest: str | None, calibrated: str | None, block: str | None) -> Path:
    _manifest(tmp_path / "anchors" / "model", {"latest_positive": latest})
    _manifest(tmp_path / "pseudo_labels", {"calibration": {"method": "platt", "until": calibrated}})
    _manifest(tmp_path / "sids", {"collaborative": {"until": block}})
    return tmp_path


def test_bounds_before_the_cutoff_raise_nothing(tmp_path: Path) -> None:
    run = _run(tmp_path, "2024-02-29T23:59:59+00:00", CUTOFF.isoformat(), CUTOFF.isoformat())
    assert upstream_leaks(run, CUTOFF) == []
    assert upstream_leaks(tmp_path / "no-run", CUTOFF) == []  # nothing run: nothing to say


def test_each_stage_past_the_cutoff_is_named(tmp_path: Path) -> None:
    run = _run(tmp_path, CUTOFF.isoformat(), None, "2024-03-02T00:00:00+00:00")
    warnings = upstream_leaks(run, CUTOFF)
    assert len(warnings) == 3
    assert "anchor LM" in warnings[0] and "--until" in warnings[0]  # a positive at the cutoff
    assert "calibration" in warnings[1] and "whole log" in warnings[1]
    assert "collaborative block" in warnings[2] and "2024-03-02" in warnings[2]


def test_no_calibration_or_block_is_no_leak(tmp_path: Path) -> None:
    _manifest(tmp_path / "pseudo_labels", {"calibration": {"method": "none"}})
    _manifest(tmp_path / "sids", {"codebook_size": 256})
    assert upstream_leaks(tmp_path, CUTOFF) == []
