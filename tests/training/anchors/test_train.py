from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.training.anchors.conftest import (
    alternating_positives,
    semantics_table,
    tiny_config,
    toy_codes,
)
from training.anchors.job import train_anchor_model
from training.anchors.model import build_model, causal_lm
from training.anchors.prior import CooccurrencePrior
from training.anchors.sequences import ExampleSet
from training.anchors.train import (
    FusedTerms,
    TrainingPrior,
    WeightAverage,
    collate,
    sid_loss,
)
from training.anchors.trie import SidTrie


def test_compact_model_learns_the_alternating_pattern(tmp_path) -> None:
    codes, sizes = toy_codes(24)
    semantics = semantics_table(codes)
    positives = alternating_positives(60, 24, 12, seed=1)
    cfg = tiny_config(epochs=6, eval_users=30, learning_rate=5e-3, patience=6)
    cfg.sequences.downsample_threshold = None
    result = train_anchor_model(semantics, positives, sizes, cfg, tmp_path / "m")
    epochs = result.history.epochs
    assert epochs[-1].train_loss < epochs[0].train_loss
    best = result.history.best
    assert best.eval_loss is not None and epochs[0].eval_loss is not None
    assert best.eval_loss < epochs[0].eval_loss
    # The next item's cluster (level a) is determined by the last one: an ideal model's per-item
    # NLL is ln(4) + ln(3) = 2.48 nats (levels b, c uniform), a uniform one's is ln(24) = 3.18.
    assert best.eval_loss < 2.9
    # Top-10 of 24 items restricted to the right cluster (12 items): HR@10 >= 10/12 expected.
    assert best.hr_at_10 is not None and best.hr_at_10 >= 0.7
    assert (tmp_path / "m" / "model" / "config.json").exists()
    assert result.metrics["eval_hr@10"] == best.hr_at_10


def test_loss_on_all_items_trains(tmp_path) -> None:
    codes, sizes = toy_codes(24)
    cfg = tiny_config(epochs=2, loss_on="all", eval_users=0)
    result = train_anchor_model(
        semantics_table(codes), alternating_positives(20, 24, 8), sizes, cfg, tmp_path / "m"
    )
    assert result.history.best_epoch == 2 and result.metrics["eval_hr@10"] is None
    assert result.history.epochs[1].train_loss < result.history.epochs[0].train_loss


def test_reverse_augmentation_doubles_the_training_examples_after_the_hold_out(tmp_path) -> None:
    codes, sizes = toy_codes(24)
    positives = alternating_positives(20, 24, 8)
    results = {}
    for reverse in (False, True):
        cfg = tiny_config(epochs=1, loss_on="target", eval_users=5)
        cfg.sequences.downsample_threshold = None
        cfg.sequences.reverse_augmentation = reverse
        results[reverse] = train_anchor_model(
            semantics_table(codes), positives, sizes, cfg, tmp_path / str(reverse)
        ).metrics
    # loss_on "target": one example per item after the first, the same count backwards.
    assert results[True]["train_examples"] == 2 * results[False]["train_examples"]
    # The hold-out split comes first: both runs evaluate the same held-out users.
    assert results[True]["eval_users"] == results[False]["eval_users"] == 5


def test_weight_average_tracks_the_parameters_and_swaps_them_in_and_out() -> None:
    p = torch.nn.Parameter(torch.zeros(3))
    average = WeightAverage([p], decay=0.5)
    with torch.no_grad():
        p.fill_(1.0)
    average.update()  # ramped decay min(0.5, 2/11) = 2/11: shadow = 9/11
    assert torch.allclose(average.shadow[0], torch.full((3,), 9 / 11))
    with torch.no_grad():
        p.fill_(2.0)
    average.update()  # decay min(0.5, 3/12) = 0.25: 0.25 * 9/11 + 0.75 * 2
    expected = 0.25 * 9 / 11 + 0.75 * 2.0
    with average.applied():
        assert torch.allclose(p.detach(), torch.full((3,), expected))
    assert torch.equal(p.detach(), torch.full((3,), 2.0))


def test_weight_averaging_and_label_smoothing_still_learn_the_pattern(tmp_path) -> None:
    codes, sizes = toy_codes(24)
    positives = alternating_positives(60, 24, 12, seed=1)
    cfg = tiny_config(
        epochs=6,
        eval_users=30,
        learning_rate=5e-3,
        patience=6,
        ema_decay=0.9,
        label_smoothing=0.1,
    )
    cfg.sequences.downsample_threshold = None
    result = train_anchor_model(semantics_table(codes), positives, sizes, cfg, tmp_path / "m")
    best = result.history.best
    first = result.history.epochs[0]
    assert best.eval_loss is not None and first.eval_loss is not None
    assert best.eval_loss < first.eval_loss and best.eval_loss < 2.9
    assert best.hr_at_10 is not None and best.hr_at_10 >= 0.7


@pytest.mark.parametrize(("weight", "smoothing"), [(1.0, 0.0), (2.5, 0.1), (0.0, 0.0)])
def test_fused_loss_is_the_product_of_experts_over_the_allowed_codes(weight, smoothing) -> None:
    # Per scored token: log_softmax over the codes the trie allows after the target's prefix of
    # (LM logit + weight * log of the prior's mass under prefix + code), label-smoothed over those
    # codes. Checked against a direct per-token computation from the items' codes.
    codes, sizes = toy_codes(24, clusters=3, sub=3)
    model, vocab = build_model(tiny_config().model, sizes, seed=0)
    model.eval()
    trie = SidTrie(codes, sizes)
    rng = np.random.default_rng(0)
    seqs = [rng.integers(24, size=n) for n in (5, 3, 7, 2)]
    examples = ExampleSet.build(seqs, 4, "target")
    rows = np.arange(len(examples))
    batch = collate(examples, rows, vocab.item_tokens(codes), codes, vocab)
    prior = rng.dirichlet(np.full(24, 0.3), size=len(rows)).astype(np.float32) + 1e-6
    level_ids = [torch.as_tensor(ids) for ids in vocab.level_token_ids]
    fused = FusedTerms.of(trie, prior, weight, torch.device("cpu"))
    with torch.no_grad():
        got, n = sid_loss(model, batch, level_ids, smoothing, fused)
        lm = causal_lm(model)
        hidden = lm.get_decoder()(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask
        ).last_hidden_state
        logits = lm.get_output_embeddings()(hidden.reshape(-1, hidden.shape[-1])[batch.pred_rows])
    expected = 0.0
    for k in range(n):
        level, item = int(batch.levels[k]), int(batch.items[k])
        row = int(batch.item_rows[k])
        under = (codes[:, :level] == codes[item, :level]).all(axis=1)
        allowed = sorted(set(codes[under, level].tolist()))
        scores = []
        for c in allowed:
            mass = prior[row][under & (codes[:, level] == c)].sum()
            token = vocab.level_token_ids[level][c]
            scores.append(float(logits[k, token]) + weight * np.log(mass))
        logp = np.array(scores) - np.logaddexp.reduce(scores)
        target = allowed.index(int(codes[item, level]))
        expected += (1 - smoothing) * -logp[target] + smoothing * -logp.mean()
    assert float(got) == pytest.approx(expected, rel=1e-4)


def test_training_rows_of_examples_follow_collate_order() -> None:
    # One prior row per scored item, in the order collate numbers them (item_rows), each equal
    # to the prior's training row for that position of its sequence.
    seqs = [np.array([0, 1, 2, 3]), np.array([4, 5, 1])]
    ids = np.array([f"i{i}" for i in range(6)])
    cfg = tiny_config().prior
    fitted = CooccurrencePrior.fit(seqs, ids, cfg)
    for loss_on in ("target", "all"):
        examples = ExampleSet.build(seqs, 2, loss_on)
        tp = TrainingPrior(fitted, cfg, 1.0)
        rows = np.arange(len(examples))[::-1].copy()
        got = tp.example_rows(examples, rows).dense()
        expected = []
        for r in rows:
            for pos in range(examples.loss_start[r], examples.end[r]):
                expected.append(
                    fitted.training_probabilities(
                        examples.items,
                        examples.start[r : r + 1],
                        np.array([pos]),
                        examples.seq_start[r : r + 1],
                        examples.seq_end[r : r + 1],
                        cfg,
                    ).dense()[0]
                )
        np.testing.assert_allclose(got, np.array(expected), rtol=1e-6)


def test_training_with_the_prior_fused_learns_and_decodes_with_its_weight(tmp_path) -> None:
    codes, sizes = toy_codes(24)
    positives = alternating_positives(60, 24, 12, seed=1)
    cfg = tiny_config(epochs=4, eval_users=30, learning_rate=5e-3, patience=4)
    cfg.sequences.downsample_threshold = None
    cfg.prior.train_weight = 1.0
    result = train_anchor_model(semantics_table(codes), positives, sizes, cfg, tmp_path / "m")
    epochs = result.history.epochs
    assert epochs[-1].train_loss < epochs[0].train_loss
    # Evaluated fused: the held-out lists come from the product, which finds the cluster.
    assert result.history.best.hr_at_10 is not None and result.history.best.hr_at_10 >= 0.6
    prior = CooccurrencePrior.load(tmp_path / "m")
    assert prior is not None and prior.train_weight == 1.0 and prior.weight == 1.0
    assert result.metrics["prior_weight_chosen"] == 1.0 and result.metrics["prior_tuning"] == []
