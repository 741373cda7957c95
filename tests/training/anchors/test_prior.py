"""The co-occurrence prior: pair counting, per-user probabilities, alignment and persistence."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from training.anchors.errors import AnchorInputError
from training.anchors.prior import CooccurrencePrior, PriorConfig, pair_matrix


def _naive_pairs(seqs, n, window, symmetric):
    out = np.zeros((n, n))
    for s in seqs:
        for a in range(len(s)):
            for d in range(1, window + 1):
                if a + d < len(s):
                    out[s[a], s[a + d]] += 1.0 / d
                    if symmetric:
                        out[s[a + d], s[a]] += 1.0 / d
    return out


def _sequences(seed=0, n_items=12, n_users=30):
    rng = np.random.default_rng(seed)
    return [rng.integers(n_items, size=rng.integers(1, 9)) for _ in range(n_users)], n_items


@pytest.mark.parametrize("window", [1, 3, 5])
@pytest.mark.parametrize("symmetric", [False, True])
def test_pair_matrix_equals_a_loop_over_positions(window, symmetric) -> None:
    seqs, n = _sequences()
    got = pair_matrix(seqs, n, window, symmetric).toarray()
    np.testing.assert_allclose(got, _naive_pairs(seqs, n, window, symmetric), rtol=1e-6)


def test_pairs_never_cross_users() -> None:
    # User 0 ends with item 1, user 1 starts with item 2: no 1 -> 2 pair.
    m = pair_matrix([np.array([0, 1]), np.array([2, 3])], 4, 5, False).toarray()
    assert m[1, 2] == 0 and m[0, 1] == 1 and m[2, 3] == 1 and m.sum() == 2


def test_probabilities_follow_the_documented_formula() -> None:
    seqs, n = _sequences(1)
    cfg = PriorConfig(window=3, decay=0.5, history=4, smoothing=0.2)
    prior = CooccurrencePrior.fit(seqs, np.array([f"i{i}" for i in range(n)]), cfg)
    pairs = _naive_pairs(seqs, n, 3, True)
    counts = np.bincount(np.concatenate(seqs), minlength=n)
    background = (counts + 1) / (counts + 1).sum()
    histories = [np.array([0, 5, 3, 7, 2, 9]), np.array([4]), np.array([], dtype=np.int64)]
    got = prior.probabilities(histories, cfg)
    assert got.shape == (3, n) and got.dtype == np.float32
    for row, h in enumerate(histories):
        latest = h[::-1][:4]
        scores = sum((0.5**j) * pairs[item] for j, item in enumerate(latest)) if len(h) else 0
        total = np.sum(scores)
        expected = 0.8 * scores / total + 0.2 * background if total > 0 else background
        np.testing.assert_allclose(got[row], expected, rtol=1e-5)
        assert (got[row] > 0).all()
        np.testing.assert_allclose(got[row].sum(), 1.0, rtol=1e-5)


def test_a_user_without_co_occurring_items_gets_the_background() -> None:
    ids = np.array(["a", "b", "c", "d"])
    prior = CooccurrencePrior.fit([np.array([0, 1]), np.array([0])], ids, PriorConfig())
    got = prior.probabilities([np.array([3])], PriorConfig())[0]
    np.testing.assert_allclose(got, np.array([3, 2, 1, 1]) / 7, rtol=1e-6)


def test_history_items_outside_the_catalog_are_refused() -> None:
    prior = CooccurrencePrior.fit([np.array([0, 1])], np.array(["a", "b"]), PriorConfig())
    with pytest.raises(AnchorInputError, match="another catalog"):
        prior.probabilities([np.array([5])], PriorConfig())


def test_save_load_round_trip(tmp_path) -> None:
    seqs, n = _sequences(2)
    ids = np.array([f"item-{i}" for i in range(n)])
    prior = CooccurrencePrior.fit(seqs, ids, PriorConfig(window=2, symmetric=False))
    prior.weight, prior.tuning = 0.5, [{"weight": 0.5, "eval_ndcg@10": 0.1}]
    prior.save(tmp_path)
    back = CooccurrencePrior.load(tmp_path)
    assert back is not None
    assert (back.item_ids == ids).all() and back.window == 2 and not back.symmetric
    assert back.weight == 0.5 and back.tuning == prior.tuning
    np.testing.assert_array_equal(back.matrix.toarray(), prior.matrix.toarray())
    np.testing.assert_array_equal(back.counts, prior.counts)
    assert CooccurrencePrior.load(tmp_path / "empty") is None


def test_align_matches_items_by_id() -> None:
    seqs, n = _sequences(3)
    ids = np.array([f"i{i}" for i in range(n)])
    cfg = PriorConfig()
    prior = CooccurrencePrior.fit(seqs, ids, cfg)
    # A later catalog: reordered, one item gone (i0), one new (new).
    later = np.array(["new", *ids[1:][::-1]])
    aligned = prior.align(later)
    row_of = {item: r for r, item in enumerate(later.tolist())}
    old = prior.matrix.toarray()
    new = aligned.matrix.toarray()
    for a in range(1, n):
        for b in range(1, n):
            assert new[row_of[f"i{a}"], row_of[f"i{b}"]] == old[a, b]
    assert new[row_of["new"]].sum() == 0 and aligned.counts[row_of["new"]] == 0
    assert aligned.counts[row_of["i3"]] == prior.counts[3]
    assert prior.align(ids) is prior
    # The same history (by id) gets the same probabilities for the items both catalogs hold,
    # up to the renormalization of the background over the new catalog.
    p_old = prior.probabilities([np.array([3, 5])], cfg)[0]
    p_new = aligned.probabilities([np.array([row_of["i3"], row_of["i5"]])], cfg)[0]
    assert np.argmax(p_new) == row_of[ids[np.argmax(p_old)]]


def test_config_refuses_negative_weights() -> None:
    with pytest.raises(ValidationError):
        PriorConfig(weight=-1.0)
    with pytest.raises(ValidationError):
        PriorConfig(weight_grid=(0.0, -0.5))
    with pytest.raises(ValidationError):
        PriorConfig(train_weight=-1.0)
    assert PriorConfig(weight="auto").weight == "auto" and PriorConfig().weight is None
    assert PriorConfig().train_weight == 0.0


@pytest.mark.parametrize(
    ("symmetric", "reversed_rows"), [(False, False), (True, False), (True, True)]
)
@pytest.mark.parametrize(("window", "history"), [(3, 4), (5, 2), (2, 20)])
def test_training_rows_leave_out_the_rows_own_later_items(
    symmetric, reversed_rows, window, history
) -> None:
    # A training row must see the prior a request at its position would see: counted on every
    # other sequence and on its own sequence only up to (not including) the scored item. Rows
    # of reversed copies (reverse augmentation) against a symmetric prior are exact too.
    counted, n = _sequences(2, n_items=9, n_users=12)
    ids = np.array([f"i{i}" for i in range(n)])
    cfg = PriorConfig(window=window, symmetric=symmetric, decay=0.7, history=history)
    prior = CooccurrencePrior.fit(counted, ids, cfg)
    seqs = [s[::-1].copy() for s in counted] if reversed_rows else counted
    items = np.concatenate(seqs)
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in seqs])])
    u_of, positions, history_start, seq_end = [], [], [], []
    for u, s in enumerate(seqs):
        for t in range(len(s)):
            u_of.append(u)
            positions.append(offsets[u] + t)
            history_start.append(offsets[u] + max(0, t - 6))  # a context cut like max_history
            seq_end.append(offsets[u + 1])
    got = prior.training_probabilities(
        items,
        np.array(history_start),
        np.array(positions),
        offsets[np.array(u_of)],
        np.array(seq_end),
        cfg,
    ).dense()
    assert got.shape == (len(positions), n) and got.dtype == np.float32
    assert (got > 0).all()
    for row, (u, p, h0) in enumerate(zip(u_of, positions, history_start, strict=True)):
        t = p - offsets[u]
        others = [s for v, s in enumerate(seqs) if v != u] + [seqs[u][:t]]
        alone = CooccurrencePrior.fit(others, ids, cfg)
        expected = alone.probabilities([items[h0:p]], cfg)[0]
        np.testing.assert_allclose(got[row], expected, rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize(
    "values",
    [
        {"weight": float("inf")},
        {"weight": float("nan")},
        {"train_weight": float("inf")},
        {"weight_grid": [1.0, float("inf")]},
    ],
)
def test_weights_must_be_finite(values) -> None:
    """An infinite weight turned every log-probability into NaN (and the manifest into invalid
    JSON); NaN silently decoded with the LM alone."""
    with pytest.raises(ValidationError):
        PriorConfig.model_validate(values)


# The content factor: the prior times the history's content kernel density.


def _embeddings(n: int, dim: int = 6, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def _content_reference(prior, plain, histories, emb, cfg) -> np.ndarray:
    """The factor computed densely from the documented formula, applied to ``plain`` rows."""
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    cos = unit @ unit.T
    out = np.zeros_like(plain, dtype=np.float64)
    for row, h in enumerate(histories):
        seen = np.unique(np.asarray(h)[-cfg.history :])
        density, floor = np.zeros(len(emb)), 0.0
        for j in seen:
            near = prior.neighbors[j]
            density[near] += np.exp((cos[j, near] - 1) / cfg.content_temperature) / len(seen)
            floor += np.exp((cos[j, near].min() - 1) / cfg.content_temperature) / len(seen)
        gain = np.maximum(density / floor, 1.0) ** cfg.content_weight if len(seen) else 1.0
        out[row] = plain[row] * gain / np.sum(plain[row] * gain)
    return out


def test_content_neighbors_are_the_nearest_other_items() -> None:
    from training.anchors.prior import content_neighbors

    emb = _embeddings(15)
    emb[4] = 0.0  # an item without content: no neighbors, and nobody's neighbor
    items, cos = content_neighbors(emb, 5, block=4)  # several blocks
    unit = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    full = unit @ unit.T
    for i in range(15):
        if i == 4:
            assert (items[i] == -1).all() and np.isneginf(cos[i]).all()
            continue
        others = [j for j in np.argsort(-full[i]) if j not in (i, 4)][:5]
        assert items[i].tolist() == others
        np.testing.assert_allclose(cos[i], full[i, others], rtol=1e-5)
    assert 4 not in items


@pytest.mark.parametrize("smoothing", [0.1, 1.0])
def test_content_factor_follows_the_documented_formula(smoothing) -> None:
    seqs, n = _sequences(4, n_items=20)
    ids = np.array([f"i{i}" for i in range(n)])
    emb = _embeddings(n)
    cfg = PriorConfig(
        content_weight=0.7, content_temperature=0.2, content_neighbors=4, smoothing=smoothing
    )
    prior = CooccurrencePrior.fit(seqs, ids, cfg, emb)
    plain = CooccurrencePrior.fit(seqs, ids, PriorConfig(smoothing=smoothing))
    histories = [np.array([1, 2, 3]), np.array([4]), np.array([5, 5, 6, 7]), np.array([], int)]
    got = prior.probabilities(histories, cfg)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, rtol=1e-5)
    expected = _content_reference(prior, plain.probabilities(histories, cfg), histories, emb, cfg)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-8)
    # It moved mass (toward the histories' content neighbors), and an empty history is as before.
    assert not np.allclose(got[:3], plain.probabilities(histories[:3], cfg), atol=1e-4)
    np.testing.assert_allclose(got[3], plain.probabilities(histories[3:], cfg)[0], rtol=1e-6)


def test_content_weight_zero_is_co_occurrence_alone() -> None:
    seqs, n = _sequences(4, n_items=20)
    ids = np.array([f"i{i}" for i in range(n)])
    off = CooccurrencePrior.fit(seqs, ids, PriorConfig(), _embeddings(n))
    assert off.neighbors is None and off.content_weight == 0.0
    history = [np.array([1, 2, 3])]
    np.testing.assert_array_equal(
        off.probabilities(history, PriorConfig()),
        CooccurrencePrior.fit(seqs, ids, PriorConfig()).probabilities(history, PriorConfig()),
    )


def test_content_factor_needs_the_items_embeddings() -> None:
    seqs, n = _sequences(4)
    ids = np.array([f"i{i}" for i in range(n)])
    with pytest.raises(AnchorInputError, match="content embeddings"):
        CooccurrencePrior.fit(seqs, ids, PriorConfig(content_weight=0.5))
    with pytest.raises(AnchorInputError, match="one per catalog row"):
        CooccurrencePrior.fit(seqs, ids, PriorConfig(content_weight=0.5), _embeddings(n - 1))


def test_content_settings_are_validated() -> None:
    for bad in (
        {"content_weight": -0.1},
        {"content_weight": float("inf")},
        {"content_temperature": 0.0},
        {"content_neighbors": 0},
    ):
        with pytest.raises(ValidationError):
            PriorConfig.model_validate(bad)


def test_training_rows_with_the_content_factor_leave_out_the_rows_own_later_items() -> None:
    # The identity of the test above holds with the factor: it reads the history only.
    counted, n = _sequences(5, n_items=10, n_users=10)
    ids = np.array([f"i{i}" for i in range(n)])
    emb = _embeddings(n, seed=3)
    cfg = PriorConfig(window=2, decay=0.7, history=4, content_weight=0.5, content_neighbors=3)
    prior = CooccurrencePrior.fit(counted, ids, cfg, emb)
    items = np.concatenate(counted)
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in counted])])
    u_of, positions = [], []
    for u, s in enumerate(counted):
        for t in range(len(s)):
            u_of.append(u)
            positions.append(offsets[u] + t)
    starts = offsets[np.array(u_of)]
    got = prior.training_probabilities(
        items, starts, np.array(positions), starts, offsets[np.array(u_of) + 1], cfg
    ).dense()
    np.testing.assert_allclose(got.sum(axis=1), 1.0, rtol=1e-5)
    for row, (u, p) in enumerate(zip(u_of, positions, strict=True)):
        t = p - offsets[u]
        others = [s for v, s in enumerate(counted) if v != u] + [counted[u][:t]]
        expected = CooccurrencePrior.fit(others, ids, cfg, emb).probabilities(
            [items[starts[row] : p]], cfg
        )
        np.testing.assert_allclose(got[row], expected[0], rtol=2e-5, atol=1e-7)


def test_the_content_factor_survives_save_load_and_align(tmp_path) -> None:
    seqs, n = _sequences(6, n_items=14)
    ids = np.array([f"i{i}" for i in range(n)])
    cfg = PriorConfig(content_weight=0.6, content_temperature=0.3, content_neighbors=4)
    prior = CooccurrencePrior.fit(seqs, ids, cfg, _embeddings(n))
    prior.save(tmp_path)
    back = CooccurrencePrior.load(tmp_path)
    assert back is not None and back.content_weight == 0.6 and back.content_temperature == 0.3
    np.testing.assert_array_equal(back.neighbors, prior.neighbors)
    history = [np.array([2, 7, 9])]
    # The saved settings rule: the generation config's content fields are not read.
    np.testing.assert_allclose(
        back.probabilities(history, PriorConfig()), prior.probabilities(history, cfg), rtol=1e-6
    )
    # A reordered catalog: the same distribution over the same items.
    later = ids[::-1].copy()
    aligned = prior.align(later)
    row_of = {item: r for r, item in enumerate(later.tolist())}
    moved = [np.array([row_of[ids[i]] for i in history[0]])]
    p_new = aligned.probabilities(moved, cfg)[0]
    p_old = prior.probabilities(history, cfg)[0]
    np.testing.assert_allclose(p_new[[row_of[i] for i in ids]], p_old, rtol=1e-5)
