"""Fixtures of the SID tests: one tiny BERT folder per session, one torch thread per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.training.sids.helpers import build_tiny_bert


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Run on one thread: these tensors are tiny, so extra threads only add synchronization,
    which costs 100x on a busy two-core machine (threads wait on descheduled peers)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))
