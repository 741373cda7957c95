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
