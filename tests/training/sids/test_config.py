"""SID settings that cannot train are refused when the configuration loads."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from training.sids.collaborative import CollaborativeConfig
from training.sids.config import SidConfig
from training.sids.encoder import EncoderConfig


@pytest.mark.parametrize(
    ("values", "where"),
    [
        ({"hidden_dims": (0,)}, "hidden_dims"),  # a zero-width layer: every item one code
        ({"hidden_dims": (128, -1)}, "hidden_dims"),
        ({"lr": float("inf")}, "lr"),  # trains to NaN
        ({"sinkhorn_temperature": float("nan")}, "sinkhorn_temperature"),
        ({"collision_repulsion": float("inf")}, "collision_repulsion"),
        ({"kmeans_samples": 2, "codebook_size": 4}, "kmeans_samples"),  # fewer samples than codes
    ],
)
def test_untrainable_settings_are_refused(values: dict[str, object], where: str) -> None:
    with pytest.raises(ValidationError, match=where):
        SidConfig.model_validate(values)


def test_fusion_weights_are_finite() -> None:
    for values in ({"text_weight": float("inf")}, {"embedding_weight": float("nan")}):
        with pytest.raises(ValidationError):
            EncoderConfig.model_validate(values)
    with pytest.raises(ValidationError):
        CollaborativeConfig.model_validate({"weight": float("inf")})
    assert SidConfig().kmeans_samples >= SidConfig().codebook_size
