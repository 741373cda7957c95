"""Teacher-forced item scores equal what the beam search gives the same items."""

from __future__ import annotations

import numpy as np
import pytest

from tests.training.anchors.conftest import TINY
from training.anchors.base_checkpoint import save_random_checkpoint
from training.anchors.generate import beam_search_fast
from training.anchors.model import CompactSettings, ModelConfig, build_model, causal_lm
from training.anchors.scoring import score_items
from training.anchors.trie import SidTrie


def _catalog_scores(model, vocab, trie, prompts) -> np.ndarray:
    """Every item's log-probability per prompt, by a beam as wide as the catalog."""
    n = trie.n_items
    out = beam_search_fast(model, prompts, trie, vocab, n, n)
    dense = np.full((len(prompts), n), np.nan)
    for row in range(len(prompts)):
        dense[row, out.items[row]] = out.log_probs[row]
    assert not np.isnan(dense).any()
    return dense


@pytest.fixture(scope="module")
def toy():
    rng = np.random.default_rng(0)
    sizes = [4, 5, 6, 3]
    codes = np.array(sorted({tuple(int(rng.integers(s)) for s in sizes) for _ in range(80)}))
    lm, vocab = build_model(
        ModelConfig(compact=CompactSettings.model_validate(TINY)), sizes, seed=1
    )
    model = causal_lm(lm).eval()
    trie = SidTrie(codes, sizes)
    tokens = vocab.item_tokens(codes)
    # Histories of different lengths: exercises left padding.
    prompts = [
        vocab.encode(tokens[rng.integers(len(codes), size=rng.integers(1, 9))]) for _ in range(6)
    ]
    return model, vocab, trie, prompts, rng


@pytest.mark.parametrize("rows_per_step", [2048, 7, 1])
def test_scores_equal_the_catalog_wide_beam(toy, rows_per_step: int) -> None:
    model, vocab, trie, prompts, rng = toy
    dense = _catalog_scores(model, vocab, trie, prompts)
    # Each prompt its own candidates, repeats and an empty list included.
    items = [rng.integers(trie.n_items, size=k) for k in (5, 0, 17, 3, 40, 1)]
    got = score_items(model, vocab, trie, prompts, items, rows_per_step=rows_per_step)
    for row, (rows, scores) in enumerate(zip(items, got, strict=True)):
        assert scores.dtype == np.float32 and scores.shape == rows.shape
        np.testing.assert_allclose(scores, dense[row, rows], atol=1e-4)
    # The whole catalog's scores are a distribution.
    everything = score_items(model, vocab, trie, prompts[:2], [np.arange(trie.n_items)] * 2)
    np.testing.assert_allclose(np.exp(everything[0]).sum(), 1.0, atol=1e-4)
    np.testing.assert_allclose(np.exp(everything[1]).sum(), 1.0, atol=1e-4)


@pytest.mark.parametrize("combine", ["arithmetic", "geometric"])
def test_an_ensemble_scores_as_its_beam_search_does(toy, combine: str) -> None:
    model, vocab, trie, prompts, rng = toy
    settings = ModelConfig(compact=CompactSettings.model_validate(TINY))
    other = causal_lm(build_model(settings, [4, 5, 6, 3], seed=2)[0]).eval()
    n = trie.n_items
    beams = beam_search_fast([model, other], prompts, trie, vocab, n, n, combine=combine)
    items = [rng.integers(n, size=k) for k in (5, 0, 17, 3, 40, 1)]
    got = score_items([model, other], vocab, trie, prompts, items, rows_per_step=7, combine=combine)
    alone = score_items(model, vocab, trie, prompts, items)
    for row, (rows, scores) in enumerate(zip(items, got, strict=True)):
        dense = np.full(n, np.nan)
        dense[beams.items[row]] = beams.log_probs[row]
        np.testing.assert_allclose(scores, dense[rows], atol=1e-4)
    # The second member changes the scores: the combination is not member 0 alone.
    assert max(np.abs(g - a).max() for g, a in zip(got, alone, strict=True) if len(g)) > 1e-3


def test_scores_on_a_checkpoint_with_a_text_prefix(tmp_path) -> None:
    """The pretrained path: a text prefix before <bos>, ordinary tokens beside the SID ones."""
    rng = np.random.default_rng(3)
    sizes = [4, 5, 3]
    codes = np.array(sorted({tuple(int(rng.integers(s)) for s in sizes) for _ in range(40)}))
    base = save_random_checkpoint(tmp_path / "base", "tiny", seed=2)
    cfg = ModelConfig(base_model_path=str(base), text_prefix="Items the user liked:")
    wrapped, vocab = build_model(cfg, sizes, seed=2)
    model = wrapped.merge_and_unload().eval()
    trie = SidTrie(codes, sizes)
    tokens = vocab.item_tokens(codes)
    prompts = [vocab.encode(tokens[rng.integers(len(codes), size=k)]) for k in (1, 4, 6)]
    dense = _catalog_scores(model, vocab, trie, prompts)
    items = [rng.integers(trie.n_items, size=9) for _ in prompts]
    for row, scores in enumerate(score_items(model, vocab, trie, prompts, items)):
        np.testing.assert_allclose(scores, dense[row, items[row]], atol=1e-4)


def test_bad_inputs_are_refused(toy) -> None:
    model, vocab, trie, prompts, _ = toy
    with pytest.raises(ValueError, match="2 prompts but 1 item lists"):
        score_items(model, vocab, trie, prompts[:2], [np.array([0])])
    with pytest.raises(ValueError, match="outside the catalog"):
        score_items(model, vocab, trie, prompts[:1], [np.array([trie.n_items])])
    assert score_items(model, vocab, trie, [], []) == []
