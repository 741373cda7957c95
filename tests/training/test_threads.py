"""Scoped torch thread counts: set inside, restored after (also on errors), validated."""

from __future__ import annotations

import pytest
import torch

from training.threads import torch_threads


@pytest.fixture
def two_threads():  # type: ignore[no-untyped-def]
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("two_threads")
def test_sets_and_restores() -> None:
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2


@pytest.mark.usefixtures("two_threads")
def test_restores_when_the_body_raises() -> None:
    with pytest.raises(RuntimeError, match="boom"), torch_threads(1):
        raise RuntimeError("boom")
    assert torch.get_num_threads() == 2


@pytest.mark.usefixtures("two_threads")
def test_none_leaves_the_count_alone() -> None:
    with torch_threads(None):
        assert torch.get_num_threads() == 2


def test_rejects_a_count_below_one() -> None:
    with pytest.raises(ValueError, match=">= 1"), torch_threads(0):
        pass
