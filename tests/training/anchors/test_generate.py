from __future__ import annotations

import logging

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from tests.training.anchors.conftest import TINY
from training.anchors.base_checkpoint import save_random_checkpoint
from training.anchors.generate import (
    BeamOutput,
    beam_search_fast,
    beam_search_reference,
    history_items,
    prior_log_masses,
    prior_without,
    search_in_batches,
)
from training.anchors.model import CompactSettings, ModelConfig, build_model, causal_lm
from training.anchors.prior import CooccurrencePrior, PriorConfig, SparsePriorRows
from training.anchors.trie import SidTrie


@pytest.fixture(scope="module")
def toy():
    rng = np.random.default_rng(0)
    sizes = [4, 5, 6, 3]
    codes: set[tuple[int, ...]] = set()
    while len(codes) < 60:
        codes.add(tuple(int(rng.integers(s)) for s in sizes))
    code_arr = np.array(sorted(codes))
    lm, vocab = build_model(
        ModelConfig(compact=CompactSettings.model_validate(TINY)), sizes, seed=1
    )
    model = causal_lm(lm).eval()
    trie = SidTrie(code_arr, sizes)
    tokens = vocab.item_tokens(code_arr)
    # Histories of different lengths: exercises left padding.
    prompts = [vocab.encode(tokens[rng.integers(60, size=rng.integers(1, 9))]) for _ in range(7)]
    return model, vocab, trie, prompts


@pytest.mark.parametrize(("beams", "anchors"), [(20, 10), (5, 3), (1, 1)])
def test_fast_path_equals_generate_reference(toy, beams: int, anchors: int) -> None:
    model, vocab, trie, prompts = toy
    fast = beam_search_fast(model, prompts, trie, vocab, beams, anchors)
    ref = beam_search_reference(model, prompts, trie, vocab, beams, anchors)
    assert (fast.items == ref.items).all()
    np.testing.assert_allclose(fast.log_probs, ref.log_probs, atol=1e-4)
    # Every anchor is a real item's full SID, scores descend.
    assert (fast.items >= 0).all() and (fast.items < trie.n_items).all()
    assert (np.diff(fast.log_probs, axis=1) <= 0).all()
    for row in fast.items:
        assert len(set(row.tolist())) == anchors


def test_the_checkpoint_s_own_generation_config_never_reaches_the_reference(toy) -> None:
    """An instruct checkpoint ships sampling and a repetition penalty in generation_config.json;
    generate() fills every field its caller left unset from it, which shifted every log-prob."""
    from transformers import GenerationConfig

    model, vocab, trie, prompts = toy
    own = GenerationConfig(do_sample=True, repetition_penalty=1.5, top_k=2, temperature=0.3)
    saved = model.generation_config
    model.generation_config = own
    try:
        ref = beam_search_reference(model, prompts, trie, vocab, 5, 3)
        assert model.generation_config is own  # put back after the call
    finally:
        model.generation_config = saved
    fast = beam_search_fast(model, prompts, trie, vocab, 5, 3)
    assert (fast.items == ref.items).all()
    np.testing.assert_allclose(fast.log_probs, ref.log_probs, atol=1e-4)


@pytest.mark.parametrize("tie", [True, False])
def test_fast_path_equals_generate_on_a_checkpoint_with_a_text_prefix(tmp_path, tie: bool) -> None:
    """The pretrained path's prompts: a text prefix before <bos>, a vocabulary of ordinary tokens
    beside the SID tokens (never allowed by the trie), and left padding before the prefix."""
    rng = np.random.default_rng(3)
    sizes = [4, 5, 3]
    codes = np.array(sorted({tuple(int(rng.integers(s)) for s in sizes) for _ in range(40)}))
    base = save_random_checkpoint(tmp_path / "base", "tiny", tie_word_embeddings=tie, seed=2)
    cfg = ModelConfig(base_model_path=str(base), text_prefix="Items the user liked:")
    wrapped, vocab = build_model(cfg, sizes, seed=2)
    model = wrapped.merge_and_unload().eval()
    assert len(vocab.prefix_ids) > 1 and len(vocab.tokenizer) > 250
    trie = SidTrie(codes, sizes)
    tokens = vocab.item_tokens(codes)
    prompts = [
        vocab.encode(tokens[rng.integers(len(codes), size=rng.integers(1, 7))]) for _ in range(5)
    ]
    fast = beam_search_fast(model, prompts, trie, vocab, 8, 5)
    ref = beam_search_reference(model, prompts, trie, vocab, 8, 5)
    assert (fast.items == ref.items).all()
    np.testing.assert_allclose(fast.log_probs, ref.log_probs, atol=1e-4)
    assert (fast.items >= 0).all() and (fast.items < trie.n_items).all()


def test_scores_are_a_distribution_over_real_items(toy) -> None:
    model, vocab, trie, prompts = toy
    # With beams >= items, the search is exhaustive: probabilities over the catalog sum to 1.
    out = beam_search_fast(
        model, prompts[:2], trie, vocab, beam_width=trie.n_items, num_anchors=trie.n_items
    )
    np.testing.assert_allclose(np.exp(out.log_probs).sum(axis=1), 1.0, atol=1e-4)


def test_fewer_items_than_anchors() -> None:
    sizes = [3, 2, 2]
    codes = np.array([[0, 0, 0], [0, 1, 0], [2, 1, 0], [2, 1, 1], [1, 0, 1]])
    lm, vocab = build_model(ModelConfig(compact=CompactSettings.model_validate(TINY)), sizes)
    model = causal_lm(lm).eval()
    trie = SidTrie(codes, sizes)
    prompts = [vocab.encode(vocab.item_tokens(codes[[0, 1]]))]
    fast = beam_search_fast(model, prompts, trie, vocab, 20, 10)
    ref = beam_search_reference(model, prompts, trie, vocab, 20, 10)
    assert sorted(fast.items[0, :5].tolist()) == [0, 1, 2, 3, 4]
    assert (fast.items[0, 5:] == -1).all() and np.isneginf(fast.log_probs[0, 5:]).all()
    assert (fast.items == ref.items).all()
    np.testing.assert_allclose(fast.log_probs[0, :5], ref.log_probs[0, :5], atol=1e-4)


def test_batched_equals_one_by_one(toy) -> None:
    model, vocab, trie, prompts = toy
    batched = search_in_batches(lambda p: beam_search_fast(model, p, trie, vocab, 8, 4), prompts, 3)
    for i, prompt in enumerate(prompts):
        alone = beam_search_fast(model, [prompt], trie, vocab, 8, 4)
        assert (alone.items[0] == batched.items[i]).all()
        np.testing.assert_allclose(alone.log_probs[0], batched.log_probs[i], atol=1e-5)


def test_out_of_memory_splits_the_batch_and_retries(toy, caplog) -> None:
    model, vocab, trie, prompts = toy
    seen: list[int] = []

    def limited(batch, error=torch.OutOfMemoryError):
        seen.append(len(batch))
        if len(batch) > 2:
            raise error("CUDA out of memory. Tried to allocate 2.00 GiB")
        return beam_search_fast(model, batch, trie, vocab, 8, 4)

    expected = search_in_batches(
        lambda p: beam_search_fast(model, p, trie, vocab, 8, 4), prompts, 64
    )
    with caplog.at_level(logging.WARNING, logger="training.anchors.generate"):
        got = search_in_batches(limited, prompts, 7)
    assert seen[:3] == [7, 4, 2]  # 7 fails, its half (4) fails, then batches of 2
    assert max(seen) == 7 and all(s <= 2 for s in seen[2:])
    assert "splitting in half" in caplog.text
    assert (got.items == expected.items).all()
    np.testing.assert_allclose(got.log_probs, expected.log_probs, atol=1e-5)
    # A RuntimeError that says "out of memory" is treated the same way.
    seen.clear()
    got = search_in_batches(lambda b: limited(b, RuntimeError), prompts, 4)
    assert (got.items == expected.items).all()
    # Other errors, and an OOM on a single prompt, propagate.
    with pytest.raises(ValueError):
        search_in_batches(lambda b: (_ for _ in ()).throw(ValueError("bad")), prompts, 4)

    def always_oom(batch) -> BeamOutput:
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(torch.OutOfMemoryError):
        search_in_batches(always_oom, prompts, 4)


def test_unpadded_batches_skip_the_mask_with_the_same_result(toy) -> None:
    model, vocab, trie, prompts = toy
    rng = np.random.default_rng(5)
    same = [p for p in prompts if len(p) == len(prompts[0])] or [prompts[0]]
    batch = [*same, *[list(same[0])] * 2]
    batch[-1] = [batch[-1][0], *rng.permutation(batch[-1][1:]).tolist()]  # same length, other ids
    free = beam_search_fast(model, batch, trie, vocab, 8, 5, mask_free=True)
    masked = beam_search_fast(model, batch, trie, vocab, 8, 5, mask_free=False)
    ref = beam_search_reference(model, batch, trie, vocab, 8, 5)
    assert (free.items == masked.items).all() and (free.items == ref.items).all()
    np.testing.assert_allclose(free.log_probs, masked.log_probs, atol=1e-5)


@pytest.mark.parametrize("unique_prefixes", [False, True])
def test_shortcuts_change_nothing(toy, unique_prefixes: bool) -> None:
    """Reordering only the generated cache positions, and skipping a last level where every beam
    has one way on, give the very same anchors and log-probabilities as the plain search."""
    model, vocab, _, prompts = toy
    trie = toy[2]
    if unique_prefixes:  # every 3-code prefix has one item: the last level is forced
        rng = np.random.default_rng(9)
        prefixes = {tuple(int(rng.integers(s)) for s in (4, 5, 6)) for _ in range(200)}
        codes = np.array([[*p, 0] for p in sorted(prefixes)])
        trie = SidTrie(codes, [4, 5, 6, 3])
        assert all(len(trie.allowed_codes(tuple(p))) == 1 for p in codes[:, :3])
    fast = beam_search_fast(model, prompts, trie, vocab, 8, 5)
    plain = beam_search_fast(model, prompts, trie, vocab, 8, 5, shortcuts=False)
    ref = beam_search_reference(model, prompts, trie, vocab, 8, 5)
    assert (fast.items == plain.items).all() and (fast.items == ref.items).all()
    np.testing.assert_allclose(fast.log_probs, plain.log_probs, rtol=0, atol=1e-5)


def _mostly_forced_trie(seed: int) -> SidTrie:
    """Unique 3-code prefixes except a few shared by two items: at the last level most users'
    beams are all forced, and some users have a beam with a choice."""
    rng = np.random.default_rng(seed)
    prefixes = sorted({tuple(int(rng.integers(s)) for s in (4, 5, 6)) for _ in range(200)})
    codes = [[*p, 0] for p in prefixes] + [[*p, 1] for p in prefixes[::8]]
    return SidTrie(np.array(codes), [4, 5, 6, 3])


def _decoded_rows(model, call) -> list[tuple[int, int]]:
    """(rows, positions) of every decoder call ``call()`` makes on ``model``."""
    shapes: list[tuple[int, int]] = []

    def record(_module, _args, kwargs) -> None:
        shapes.append(tuple(kwargs["input_ids"].shape))

    handle = model.get_decoder().register_forward_pre_hook(record, with_kwargs=True)
    try:
        call()
    finally:
        handle.remove()
    return shapes


@pytest.mark.parametrize("trie_kind", ["toy", "mostly_forced", "all_forced"])
def test_a_shared_history_decodes_as_copies_of_it(toy, second_model, trie_kind: str) -> None:
    """Beams attending one copy of their user's history through the tree mask give the anchors
    and log-probabilities of the B-fold expanded cache and of generate(), alone, in an
    ensemble and under a fused prior; at a last level where a user's beams are all forced, only
    the other users are decoded."""
    model, vocab, trie, prompts = toy
    if trie_kind == "mostly_forced":
        trie = _mostly_forced_trie(9)
    elif trie_kind == "all_forced":
        rng = np.random.default_rng(9)
        prefixes = {tuple(int(rng.integers(s)) for s in (4, 5, 6)) for _ in range(200)}
        trie = SidTrie(np.array([[*p, 0] for p in sorted(prefixes)]), [4, 5, 6, 3])
    prior = _random_prior(len(prompts), trie.n_items, seed=3)
    ref = beam_search_reference(model, prompts, trie, vocab, 8, 5)
    for members, kw in [
        (model, {}),
        ([model, second_model], {}),
        (model, {"prior": prior, "prior_weight": 0.8}),
    ]:
        shared = beam_search_fast(members, prompts, trie, vocab, 8, 5, **kw)
        expanded = beam_search_fast(members, prompts, trie, vocab, 8, 5, shared_history=False, **kw)
        assert (shared.items == expanded.items).all()
        np.testing.assert_allclose(shared.log_probs, expanded.log_probs, rtol=0, atol=1e-5)
        if members is model and not kw:
            assert (shared.items == ref.items).all()
            np.testing.assert_allclose(shared.log_probs, ref.log_probs, atol=1e-4)
    calls = _decoded_rows(model, lambda: beam_search_fast(model, prompts, trie, vocab, 8, 5))
    # Prefill [users, T], then one block of 8 beams per user per level (never users x beams rows).
    assert calls[0][0] == len(prompts) and all(c[1] == 8 for c in calls[1:])
    last_users = {"toy": [len(prompts)], "all_forced": [], "mostly_forced": None}[trie_kind]
    if last_users is not None:
        assert [c[0] for c in calls[3:]] == last_users
    else:  # some users decoded at the last level, not all
        assert len(calls) == 4 and 0 < calls[3][0] < len(prompts)


def test_attention_without_a_custom_mask_keeps_the_expanded_cache(toy) -> None:
    """Flash attention takes no 4D mask, and a custom mask would replace a sliding window's:
    both keep the B-fold expanded cache (decoder rows = users x beams after the prefill)."""
    import copy

    from training.anchors.generate import _SharedHistory

    model, vocab, trie, prompts = toy
    assert _SharedHistory.mask_dtype([model]) == torch.bool
    config = copy.deepcopy(model.config)
    config.layer_types = ["full_attention", "sliding_attention"]
    config.sliding_window = 4096  # wider than any history here: same anchors
    windowed = type(model)(config).eval()
    windowed.load_state_dict(model.state_dict())
    assert _SharedHistory.mask_dtype([windowed]) is None
    assert _SharedHistory.mask_dtype([model, windowed]) is None
    flash = copy.deepcopy(model)
    flash.config._attn_implementation = "flash_attention_2"
    assert _SharedHistory.mask_dtype([flash]) is None
    calls = _decoded_rows(windowed, lambda: beam_search_fast(windowed, prompts, trie, vocab, 8, 5))
    assert calls[0][0] == len(prompts) and calls[1] == (len(prompts) * 8, 1)
    expanded = beam_search_fast(windowed, prompts, trie, vocab, 8, 5)
    assert (expanded.items == beam_search_fast(model, prompts, trie, vocab, 8, 5).items).all()


def test_generation_batch_size_defaults_to_the_device_s_fastest() -> None:
    from training.anchors.generate import CPU_BATCH_SIZE, CUDA_BATCH_SIZE, GenerateConfig

    default = GenerateConfig()
    assert default.batch_size is None
    assert default.batch_size_on(torch.device("cpu")) == CPU_BATCH_SIZE == 64
    assert default.batch_size_on(torch.device("cuda", 0)) == CUDA_BATCH_SIZE == 512
    assert GenerateConfig(batch_size=8).batch_size_on(torch.device("cuda")) == 8
    with pytest.raises(ValueError, match="greater than or equal to 1"):
        GenerateConfig(batch_size=0)


def test_eager_attention_takes_the_shared_history_as_an_additive_mask(toy) -> None:
    """Eager attention adds its mask to the scores: the tree mask goes in as 0 / -inf floats."""
    import copy

    model, vocab, trie, prompts = toy
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    assert eager.config._attn_implementation == "eager"
    shared = beam_search_fast(eager, prompts, trie, vocab, 8, 5)
    expanded = beam_search_fast(eager, prompts, trie, vocab, 8, 5, shared_history=False)
    sdpa = beam_search_fast(model, prompts, trie, vocab, 8, 5)
    assert (shared.items == expanded.items).all() and (shared.items == sdpa.items).all()
    np.testing.assert_allclose(shared.log_probs, expanded.log_probs, rtol=0, atol=1e-5)
    np.testing.assert_allclose(shared.log_probs, sdpa.log_probs, rtol=0, atol=1e-4)


def _next_code_log_probs(model, prompt, prefix, trie, vocab) -> dict[int, float]:
    """Teacher-forced ``prefix`` after ``prompt``: each next code's trie-normalized log-prob."""
    level = len(prefix)
    tokens = [int(vocab.level_token_ids[lvl][c]) for lvl, c in enumerate(prefix)]
    with torch.no_grad():
        logits = model(input_ids=torch.as_tensor([[*prompt, *tokens]])).logits[0, -1]
    allowed = sorted(trie.allowed_codes(tuple(prefix)))
    row = logits[torch.as_tensor(vocab.level_token_ids[level][allowed])]
    return dict(zip(allowed, torch.log_softmax(row, -1).tolist(), strict=True))


@pytest.fixture(scope="module")
def second_model(toy):
    _, vocab, _, _ = toy
    lm, other_vocab = build_model(
        ModelConfig(compact=CompactSettings.model_validate(TINY)), vocab.codebook_sizes, seed=7
    )
    assert other_vocab.same_sequences(vocab)
    return causal_lm(lm).eval()


@pytest.mark.parametrize("combine", ["geometric", "arithmetic"])
def test_ensemble_of_one_model_twice_is_that_model(toy, combine) -> None:
    model, vocab, trie, prompts = toy
    alone = beam_search_fast(model, prompts, trie, vocab, 8, 5)
    twice = beam_search_fast([model, model], prompts, trie, vocab, 8, 5, combine=combine)
    assert (alone.items == twice.items).all()
    np.testing.assert_allclose(alone.log_probs, twice.log_probs, atol=1e-5)


@pytest.mark.parametrize("combine", ["geometric", "arithmetic"])
def test_ensemble_scores_are_the_combined_distributions(toy, second_model, combine) -> None:
    """Exhaustive search (beams >= items): every item's score is the sum over levels of the two
    models' trie-normalized next-code distributions combined by the rule, computed here by
    teacher forcing each item, one model at a time."""
    model, vocab, trie, prompts = toy
    out = beam_search_fast(
        [model, second_model],
        prompts[:2],
        trie,
        vocab,
        beam_width=trie.n_items,
        num_anchors=trie.n_items,
        combine=combine,
    )
    codes = trie.codes
    for row, prompt in enumerate(prompts[:2]):
        combined: dict[tuple[int, ...], dict[int, float]] = {}
        expected = np.zeros(trie.n_items)
        for item in range(trie.n_items):
            for lvl in range(trie.n_levels):
                prefix = tuple(codes[item, :lvl].tolist())
                if prefix not in combined:
                    dists = [
                        _next_code_log_probs(m, prompt, prefix, trie, vocab)
                        for m in (model, second_model)
                    ]
                    per_code = np.array([[d[c] for c in dists[0]] for d in dists])  # [2, codes]
                    if combine == "arithmetic":
                        mixed = np.log(np.exp(per_code).mean(0))
                    else:  # geometric mean, renormalized over the allowed codes
                        mean = per_code.mean(0)
                        mixed = mean - np.log(np.exp(mean).sum())
                    combined[prefix] = dict(zip(dists[0], mixed.tolist(), strict=True))
                expected[item] += combined[prefix][int(codes[item, lvl])]
        got = dict(zip(out.items[row].tolist(), out.log_probs[row].tolist(), strict=True))
        assert sorted(got) == list(range(trie.n_items))
        np.testing.assert_allclose([got[i] for i in range(trie.n_items)], expected, atol=1e-4)
        # Both rules give a distribution over the catalog.
        np.testing.assert_allclose(np.exp(out.log_probs[row]).sum(), 1.0, atol=1e-4)


def test_ensemble_shortcuts_change_nothing(toy, second_model) -> None:
    model, vocab, trie, prompts = toy
    fast = beam_search_fast([model, second_model], prompts, trie, vocab, 8, 5)
    plain = beam_search_fast([model, second_model], prompts, trie, vocab, 8, 5, shortcuts=False)
    assert (fast.items == plain.items).all()
    np.testing.assert_allclose(fast.log_probs, plain.log_probs, rtol=0, atol=1e-5)
    # And the ensemble is not simply one of its members.
    assert not (fast.items == beam_search_fast(model, prompts, trie, vocab, 8, 5).items).all()


def _random_prior(n_users: int, n_items: int, seed: int = 0) -> np.ndarray:
    """A peaked, strictly positive prior per user (rows sum to 1), like a smoothed co-occurrence."""
    rng = np.random.default_rng(seed)
    raw = rng.gamma(0.3, size=(n_users, n_items)) + 1e-3
    return (raw / raw.sum(axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize(("beams", "anchors"), [(20, 10), (5, 3), (1, 1)])
def test_fused_fast_path_equals_generate_reference(toy, beams: int, anchors: int) -> None:
    model, vocab, trie, prompts = toy
    prior = _random_prior(len(prompts), trie.n_items)
    fast = beam_search_fast(
        model, prompts, trie, vocab, beams, anchors, prior=prior, prior_weight=0.7
    )
    ref = beam_search_reference(
        model, prompts, trie, vocab, beams, anchors, prior=prior, prior_weight=0.7
    )
    assert (fast.items == ref.items).all()
    np.testing.assert_allclose(fast.log_probs, ref.log_probs, atol=1e-4)
    # The prior changed the search (otherwise the test above proves nothing about the fusion).
    assert not (
        fast.items == beam_search_fast(model, prompts, trie, vocab, beams, anchors).items
    ).all()


def test_prior_weight_zero_is_the_lm_alone(toy) -> None:
    model, vocab, trie, prompts = toy
    prior = _random_prior(len(prompts), trie.n_items)
    alone = beam_search_fast(model, prompts, trie, vocab, 8, 5)
    zero = beam_search_fast(model, prompts, trie, vocab, 8, 5, prior=prior, prior_weight=0.0)
    assert (alone.items == zero.items).all()
    np.testing.assert_array_equal(alone.log_probs, zero.log_probs)


def test_fused_scores_are_the_per_level_product_of_experts(toy) -> None:
    """Exhaustive search: each item's score is the sum over levels of log_softmax(LM next-code
    log-prob + w * log of the prior's mass under the child prefix), computed here item by item by
    teacher forcing and summing the prior over the catalog; the scores are a distribution."""
    model, vocab, trie, prompts = toy
    weight = 1.3
    prior = _random_prior(2, trie.n_items, seed=4)
    out = beam_search_fast(
        model,
        prompts[:2],
        trie,
        vocab,
        beam_width=trie.n_items,
        num_anchors=trie.n_items,
        prior=prior,
        prior_weight=weight,
    )
    codes = trie.codes
    for row, prompt in enumerate(prompts[:2]):
        expected = np.zeros(trie.n_items)
        for item in range(trie.n_items):
            for lvl in range(trie.n_levels):
                prefix = tuple(codes[item, :lvl].tolist())
                lm = _next_code_log_probs(model, prompt, prefix, trie, vocab)
                under = (codes[:, :lvl] == codes[item, :lvl]).all(axis=1)
                mass = {c: prior[row][under & (codes[:, lvl] == c)].sum() for c in lm}
                fused = np.array([lm[c] + weight * np.log(mass[c]) for c in lm])
                fused -= np.log(np.exp(fused).sum())
                expected[item] += dict(zip(lm, fused.tolist(), strict=True))[int(codes[item, lvl])]
        got = dict(zip(out.items[row].tolist(), out.log_probs[row].tolist(), strict=True))
        np.testing.assert_allclose([got[i] for i in range(trie.n_items)], expected, atol=1e-4)
        np.testing.assert_allclose(np.exp(out.log_probs[row]).sum(), 1.0, atol=1e-4)


def test_a_strong_prior_on_one_item_puts_it_first(toy) -> None:
    model, vocab, trie, prompts = toy
    prior = np.full((len(prompts), trie.n_items), 1e-4, dtype=np.float32)
    favourite = np.arange(len(prompts)) * 7 % trie.n_items
    prior[np.arange(len(prompts)), favourite] = 1.0
    prior /= prior.sum(axis=1, keepdims=True)
    out = beam_search_fast(model, prompts, trie, vocab, 8, 5, prior=prior, prior_weight=5.0)
    assert (out.items[:, 0] == favourite).all()


def test_fused_batched_equals_one_by_one(toy) -> None:
    model, vocab, trie, prompts = toy
    prior = _random_prior(len(prompts), trie.n_items, seed=2)
    batched = search_in_batches(
        lambda p, prior: beam_search_fast(
            model, p, trie, vocab, 8, 4, prior=prior, prior_weight=0.5
        ),
        prompts,
        3,
        prior_of=lambda rows: prior[rows],
    )
    for i, prompt in enumerate(prompts):
        alone = beam_search_fast(
            model, [prompt], trie, vocab, 8, 4, prior=prior[i : i + 1], prior_weight=0.5
        )
        assert (alone.items[0] == batched.items[i]).all()
        np.testing.assert_allclose(alone.log_probs[0], batched.log_probs[i], atol=1e-5)


def test_fused_shortcuts_and_ensembles(toy, second_model) -> None:
    """The last-level shortcut keeps forced rows at 0 under the fusion; an ensemble fuses too."""
    model, vocab, _, prompts = toy
    rng = np.random.default_rng(9)
    prefixes = {tuple(int(rng.integers(s)) for s in (4, 5, 6)) for _ in range(200)}
    trie = SidTrie(np.array([[*p, 0] for p in sorted(prefixes)]), [4, 5, 6, 3])
    prior = _random_prior(len(prompts), trie.n_items, seed=5)
    for members in (model, [model, second_model]):
        fast = beam_search_fast(members, prompts, trie, vocab, 8, 5, prior=prior, prior_weight=1.0)
        plain = beam_search_fast(
            members, prompts, trie, vocab, 8, 5, shortcuts=False, prior=prior, prior_weight=1.0
        )
        assert (fast.items == plain.items).all()
        np.testing.assert_allclose(fast.log_probs, plain.log_probs, rtol=0, atol=1e-5)


def test_a_prior_of_the_wrong_width_is_refused(toy) -> None:
    model, vocab, trie, prompts = toy
    with pytest.raises(ValueError, match="expected"):
        beam_search_fast(
            model, prompts, trie, vocab, 8, 5, prior=np.ones((len(prompts), 3)), prior_weight=1.0
        )


def _cooccurrence_rows(n_users: int, n_items: int, seed: int = 0) -> SparsePriorRows:
    """A fitted co-occurrence prior's sparse rows: some histories reach a few items, one none."""
    rng = np.random.default_rng(seed)
    seqs = [rng.integers(n_items, size=rng.integers(2, 6)) for _ in range(3 * n_items)]
    cfg = PriorConfig(window=2)
    prior = CooccurrencePrior.fit(seqs, np.array([f"i{i}" for i in range(n_items)]), cfg)
    histories = [rng.integers(n_items, size=k) for k in rng.integers(0, 4, size=n_users)]
    histories[0] = np.zeros(0, dtype=np.int64)  # no history: the background alone
    return prior.sparse_probabilities(histories, cfg)


def _training_rows(n_rows: int, n_items: int, seed: int = 0) -> SparsePriorRows:
    """Training rows of a fitted prior: their own later items left out (negative entries)."""
    rng = np.random.default_rng(seed)
    seqs = [rng.integers(n_items, size=8) for _ in range(3 * n_items)]
    cfg = PriorConfig(window=3)
    prior = CooccurrencePrior.fit(seqs, np.array([f"i{i}" for i in range(n_items)]), cfg)
    items = np.concatenate(seqs)
    positions = 8 * np.arange(n_rows) + rng.integers(1, 8, size=n_rows)
    start = 8 * np.arange(n_rows)
    return prior.training_probabilities(items, start, positions, start, start + 8, cfg)


def _content_rows(n_users: int, n_items: int, seed: int = 0) -> SparsePriorRows:
    """Rows of a prior with the content factor: entries on the histories' content neighbors."""
    rng = np.random.default_rng(seed)
    seqs = [rng.integers(n_items, size=rng.integers(2, 6)) for _ in range(3 * n_items)]
    cfg = PriorConfig(window=2, content_weight=0.8, content_neighbors=5)
    emb = rng.standard_normal((n_items, 4))
    prior = CooccurrencePrior.fit(seqs, np.array([f"i{i}" for i in range(n_items)]), cfg, emb)
    histories = [rng.integers(n_items, size=k) for k in rng.integers(1, 4, size=n_users)]
    return prior.sparse_probabilities(histories, cfg)


@pytest.mark.parametrize("kind", ["generation", "training", "content"])
def test_sparse_prior_masses_equal_the_dense_table(toy, kind) -> None:
    # Every level's log mass of every child prefix, for every user, looked up from the
    # background's per-prefix mass and the sorted sparse entries, equals the dense table's;
    # training rows carry negative entries (their own later items out of the background).
    _, _, trie, prompts = toy
    if kind == "generation":
        rows = _cooccurrence_rows(len(prompts), trie.n_items)
        assert rows.smooth[0] == 1.0  # the empty history
    elif kind == "content":
        rows = _content_rows(len(prompts), trie.n_items)
        assert (rows.smooth < PriorConfig().smoothing).all()  # the factor took mass
    else:
        rows = _training_rows(len(prompts), trie.n_items)
        assert (rows.shares.data < 0).any()
    assert rows.shares.nnz < rows.shape[0] * rows.shape[1]  # sparse indeed
    device = torch.device("cpu")
    sparse = prior_log_masses(trie, rows, device)
    dense = prior_log_masses(trie, rows.dense(), device)
    for level in range(trie.n_levels):
        users = torch.arange(len(prompts)).unsqueeze(1)
        kids = torch.arange(trie.n_children(level)).unsqueeze(0).expand(len(prompts), -1)
        np.testing.assert_allclose(
            sparse[level].at(users, kids).numpy(),
            dense[level].at(users, kids).numpy(),
            rtol=1e-5,
            atol=1e-6,
        )


@pytest.mark.parametrize("search", [beam_search_fast, beam_search_reference])
def test_sparse_prior_rows_decode_as_the_dense_ones(toy, search) -> None:
    model, vocab, trie, prompts = toy
    rows = _cooccurrence_rows(len(prompts), trie.n_items, seed=3)
    sparse = search(model, prompts, trie, vocab, 8, 5, prior=rows, prior_weight=1.5)
    dense = search(model, prompts, trie, vocab, 8, 5, prior=rows.dense(), prior_weight=1.5)
    assert (sparse.items == dense.items).all()
    np.testing.assert_allclose(sparse.log_probs, dense.log_probs, atol=1e-5)
    alone = search(model, prompts, trie, vocab, 8, 5)
    assert not (sparse.items == alone.items).all()


def test_a_sparse_prior_of_the_wrong_width_is_refused(toy) -> None:
    model, vocab, trie, prompts = toy
    rows = _cooccurrence_rows(len(prompts), trie.n_items + 2)
    with pytest.raises(ValueError, match="expected"):
        beam_search_fast(model, prompts, trie, vocab, 8, 5, prior=rows, prior_weight=1.0)


def test_a_cuda_device_that_is_not_visible_is_one_clear_error() -> None:
    from training.anchors.errors import AnchorInputError
    from training.anchors.generate import resolve_device

    visible = torch.cuda.device_count()
    with pytest.raises(AnchorInputError, match=f"{visible} CUDA devices are visible"):
        resolve_device(f"cuda:{visible}")
    assert resolve_device("cpu") == torch.device("cpu")


# Excluding the user's own items (generation.exclude_history).


def _exclusions(found: BeamOutput, n_items: int, seed: int = 0) -> sp.csr_matrix:
    """Per prompt, its first three anchors found without exclusion plus two random items."""
    rng = np.random.default_rng(seed)
    rows = [
        [*found.items[u, :3].tolist(), *rng.integers(n_items, size=2).tolist()]
        for u in range(len(found.items))
    ]
    return history_items(rows, n_items)


@pytest.mark.parametrize(("beams", "anchors"), [(20, 10), (5, 3)])
@pytest.mark.parametrize("fused", [False, True])
def test_excluded_items_never_come_back_and_fast_equals_reference(
    toy, beams: int, anchors: int, fused: bool
) -> None:
    model, vocab, trie, prompts = toy
    prior = _random_prior(len(prompts), trie.n_items) if fused else None
    weight = 0.7 if fused else 0.0
    free = beam_search_fast(
        model, prompts, trie, vocab, beams, anchors, prior=prior, prior_weight=weight
    )
    exclude = _exclusions(free, trie.n_items)
    fast = beam_search_fast(
        model,
        prompts,
        trie,
        vocab,
        beams,
        anchors,
        prior=prior,
        prior_weight=weight,
        exclude=exclude,
    )
    ref = beam_search_reference(
        model,
        prompts,
        trie,
        vocab,
        beams,
        anchors,
        prior=prior,
        prior_weight=weight,
        exclude=exclude,
    )
    assert (fast.items == ref.items).all()
    np.testing.assert_allclose(fast.log_probs, ref.log_probs, atol=1e-4)
    for u, row in enumerate(fast.items):
        banned = set(exclude[u].indices.tolist())
        assert banned.isdisjoint(row.tolist())
    assert np.isfinite(fast.log_probs).all()
    assert not (fast.items == free.items).all()  # the exclusion changed the search


def test_excluding_nothing_changes_nothing(toy) -> None:
    model, vocab, trie, prompts = toy
    free = beam_search_fast(model, prompts, trie, vocab, 8, 5)
    empty = history_items([[] for _ in prompts], trie.n_items)
    same = beam_search_fast(model, prompts, trie, vocab, 8, 5, exclude=empty)
    assert (same.items == free.items).all()
    np.testing.assert_array_equal(same.log_probs, free.log_probs)


@pytest.mark.parametrize("shortcuts", [True, False])
def test_a_subtree_whose_every_item_is_excluded_is_pruned_at_its_root(toy, shortcuts) -> None:
    """Every item under the first level's best codes is excluded: those codes are cut at level
    0 (no beam walks into a dead end), in both paths alike."""
    model, vocab, trie, prompts = toy
    free = beam_search_fast(model, prompts, trie, vocab, 8, 5)
    first = trie.item_prefixes(torch.device("cpu"))[1].numpy()  # each item's level-1 prefix
    rows = []
    for u in range(len(prompts)):
        top = set(first[free.items[u, :2]].tolist())
        rows.append(np.flatnonzero(np.isin(first, list(top))).tolist())
    exclude = history_items(rows, trie.n_items)
    out = beam_search_fast(model, prompts, trie, vocab, 8, 5, shortcuts=shortcuts, exclude=exclude)
    ref = beam_search_reference(model, prompts, trie, vocab, 8, 5, exclude=exclude)
    assert (out.items == ref.items).all()
    np.testing.assert_allclose(out.log_probs, ref.log_probs, atol=1e-4)
    assert (out.items >= 0).all() and np.isfinite(out.log_probs).all()
    for u, row in enumerate(out.items):
        assert set(row.tolist()).isdisjoint(rows[u])


def test_a_user_with_every_item_excluded_gets_no_anchors(toy) -> None:
    model, vocab, trie, prompts = toy
    rows = [list(range(trie.n_items)), *[[] for _ in prompts[1:]]]
    out = beam_search_fast(
        model, prompts, trie, vocab, 8, 5, exclude=history_items(rows, trie.n_items)
    )
    assert (out.items[0] == -1).all() and np.isneginf(out.log_probs[0]).all()
    free = beam_search_fast(model, prompts[1:], trie, vocab, 8, 5)
    assert (out.items[1:] == free.items).all()


def test_exclusion_is_passed_per_batch(toy) -> None:
    model, vocab, trie, prompts = toy
    free = beam_search_fast(model, prompts, trie, vocab, 8, 5)
    exclude = _exclusions(free, trie.n_items, seed=2)
    whole = beam_search_fast(model, prompts, trie, vocab, 8, 5, exclude=exclude)
    batched = search_in_batches(
        lambda p, exclude=None: beam_search_fast(model, p, trie, vocab, 8, 5, exclude=exclude),
        prompts,
        3,
        exclude_of=lambda rows: exclude[rows],
    )
    assert (batched.items == whole.items).all()


@pytest.mark.parametrize("kind", ["generation", "content"])
def test_excluded_items_take_their_prior_mass_out_of_every_prefix(toy, kind) -> None:
    """Own items co-occur with each other: left in, their mass made the prefixes above them
    look heavy after the items themselves were pruned."""
    _, _, trie, prompts = toy
    make = _cooccurrence_rows if kind == "generation" else _content_rows
    rows = make(len(prompts), trie.n_items, seed=5)
    rng = np.random.default_rng(1)
    exclude = history_items(
        [rng.integers(trie.n_items, size=4).tolist() for _ in prompts], trie.n_items
    )
    kept = prior_without(rows, exclude)
    expected = rows.dense() * (1.0 - exclude.toarray())
    np.testing.assert_allclose(kept.dense(), expected, atol=1e-7)
    np.testing.assert_allclose(prior_without(rows.dense(), exclude), expected, atol=1e-7)
    device = torch.device("cpu")
    sparse = prior_log_masses(trie, kept, device)
    dense = prior_log_masses(trie, expected, device)
    for level in range(trie.n_levels):
        users = torch.arange(len(prompts)).unsqueeze(1)
        kids = torch.arange(trie.n_children(level)).unsqueeze(0).expand(len(prompts), -1)
        a, b = sparse[level].at(users, kids).numpy(), dense[level].at(users, kids).numpy()
        live = b > -30  # prefixes whose every item is excluded: both are ~0 mass
        np.testing.assert_allclose(a[live], b[live], rtol=1e-4, atol=1e-5)
        assert (a[~live] < -10).all()
