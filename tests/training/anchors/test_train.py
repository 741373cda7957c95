from __future__ import annotations

import torch

from tests.training.anchors.conftest import (
    alternating_positives,
    semantics_table,
    tiny_config,
    toy_codes,
)
from training.anchors.job import train_anchor_model
from training.anchors.train import WeightAverage


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
