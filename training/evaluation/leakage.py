"""Upstream stages that saw the evaluation period: what `gpl evaluate` warns about.

An evaluation trains on requests before a cutoff and scores those after it. GPL's inputs come
from stages that may have been fitted on their own, earlier, with other bounds: the anchor LM
(``gpl anchors train --until``), the pseudo-labels' calibration (``gpl pseudo-labels
--calibrate-until``) and the SIDs' collaborative block (``gpl sids train
--collaborative-until``). Fitted on data from after the cutoff, they hand GPL the evaluation
period's engagements and its figures are optimistic. ``gpl demo`` lines them up; a run built by
hand may not, so each stage's manifest is read and every bound past the cutoff named.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any


def _manifest(path: Path) -> dict[str, Any] | None:
    try:
        loaded = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return loaded if isinstance(loaded, dict) else None


def _after(value: str | None, cutoff: datetime, *, inclusive: bool) -> bool:
    """``value`` (ISO time) at or after (``inclusive``) / strictly after ``cutoff``."""
    if value is None:
        return False
    when = datetime.fromisoformat(value)
    return when >= cutoff if inclusive else when > cutoff


def _past(until: str | None, cutoff: datetime, what: str, fix: str) -> list[str]:
    """A warning when an exclusive bound ``until`` is unset or after ``cutoff``."""
    if until is not None and not _after(until, cutoff, inclusive=False):
        return []
    seen = "of the whole log" if until is None else f"up to {until}"
    return [
        f"{what} {seen}, past the evaluation cutoff {cutoff.isoformat()}: run `{fix}` the cutoff"
    ]


def upstream_leaks(run_dir: Path, cutoff: datetime) -> list[str]:
    """One line per upstream stage of ``run_dir`` fitted on data at or after ``cutoff``.

    Stages without a manifest (not run, or run before they recorded their bound) are skipped.
    """
    out: list[str] = []
    anchors = _manifest(run_dir / "anchors" / "model" / "manifest.json")
    if anchors is not None:
        latest = anchors.get("metrics", {}).get("latest_positive")
        # A positive at the cutoff itself is an engagement of the evaluation period.
        if _after(latest, cutoff, inclusive=True):
            out.append(
                f"the anchor LM was trained on positives up to {latest}, at or after the "
                f"evaluation cutoff {cutoff.isoformat()}: train it with `gpl anchors train "
                "--until` the cutoff"
            )
    labels = _manifest(run_dir / "pseudo_labels" / "manifest.json")
    calibration = (labels or {}).get("metrics", {}).get("calibration", {})
    if calibration.get("method") == "platt":
        out += _past(
            calibration.get("until"),
            cutoff,
            "the pseudo-labels' calibration was fitted on exposed rows",
            "gpl pseudo-labels --calibrate-until",
        )
    sids = _manifest(run_dir / "sids" / "manifest.json")
    block = (sids or {}).get("metrics", {}).get("collaborative")
    if isinstance(block, dict):
        out += _past(
            block.get("until"),
            cutoff,
            "the SIDs' collaborative block was built from interactions",
            "gpl sids train --collaborative-until",
        )
    return out
