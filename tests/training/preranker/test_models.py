"""The towers' split first layer computes exactly the layer on the concatenated input."""

from __future__ import annotations

import pytest
import torch

from training.preranker.config import PrerankerConfig
from training.preranker.models import build_model


@pytest.mark.parametrize("kind", ["light", "expressive"])
def test_item_vector_equals_the_tower_on_the_concatenation(kind: str) -> None:
    cfg = PrerankerConfig().model
    torch.manual_seed(0)
    model = build_model(kind, 5, 7, 32, cfg).eval()
    numeric = torch.randn(50, 7)
    category = torch.randint(0, cfg.category_vocab + 1, (50,))
    emb = torch.randn(50, 32)

    split = model.item_vector(numeric, category, emb)
    split.sum().backward()
    split_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    whole = model.item_tower(torch.cat([numeric, model.category(category), emb], 1))
    whole.sum().backward()

    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-5)
    assert split_grads.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    for name, grad in split_grads.items():
        torch.testing.assert_close(grad, dict(model.named_parameters())[name].grad)
