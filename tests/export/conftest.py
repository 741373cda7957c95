"""Reuse the pre-ranker's small complete run (features, anchors, pseudo-labels, Feast)."""

from tests.training.preranker.conftest import run  # noqa: F401
