"""The pre-ranker stage: every objective trains, errors are clear, models round-trip."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch

from tests.factories import make_requests
from tests.training.preranker.conftest import Run, small_config
from training.data.contract import validate
from training.preranker.config import OBJECTIVES, PrerankerConfig
from training.preranker.data import PrerankerDataError
from training.preranker.job import (
    debiased_feature,
    fit,
    join_features,
    load_preranker,
    prepare,
    save_preranker,
    split_at,
    time_quantile,
)
from training.preranker.train import score


@pytest.fixture(scope="module")
def joined(run: Run) -> pa.Table:
    return join_features(run.store, run.requests)


def test_join_keeps_every_row_and_brings_pseudo_labels(run: Run, joined: pa.Table) -> None:
    assert joined.num_rows == run.requests.num_rows
    for col in (
        "user_history__recent_item_ids",
        "user_interest_anchors__anchor_item_ids",
        "pseudo_labels__pseudo_label",
        "pseudo_labels__confidence",
    ):
        assert col in joined.column_names, col
    exposed = pc.equal(joined.column("stage"), "exposed")
    pseudo = joined.column("pseudo_labels__pseudo_label").to_numpy(zero_copy_only=False)
    assert np.isnan(pseudo[exposed.to_numpy(zero_copy_only=False)]).all()
    assert np.isfinite(pseudo).sum() > 0


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_every_objective_trains_both_models(joined: pa.Table, run: Run, objective: str) -> None:
    cfg = small_config()
    prepared = prepare(joined, run.semantics, cfg)
    before = score(
        fit(prepared, small_config(epochs=1), "exposed").light.model,
        prepared.valid,
        prepared.embeddings,
    )
    fitted = fit(prepared, cfg, objective)
    assert fitted.objective == objective
    for trained in (fitted.light, fitted.expressive):
        assert 1 <= trained.best_epoch <= len(trained.epochs) <= 2
        assert all(
            np.isfinite(e["train_loss"]) and np.isfinite(e["valid_loss"]) for e in trained.epochs
        )
        scores = score(trained.model, prepared.valid, prepared.embeddings)
        assert scores.shape == (prepared.valid.n_rows,) and np.isfinite(scores).all()
    assert (fitted.teacher is not None) == (objective == "distill")
    if objective in ("hap", "gpl_hap"):
        assert set(fitted.light.hap_weights) >= {"exposed_negative", "rank_negative"}
    # The expressive model trains on the hard groups only and still scores every row.
    assert before.shape == score(fitted.expressive.model, prepared.valid, prepared.embeddings).shape
    assert fitted.flops["expressive"]["per_candidate"] > fitted.flops["light"]["per_candidate"]


def test_training_is_seeded(joined: pa.Table, run: Run) -> None:
    prepared = prepare(joined, run.semantics, small_config())
    a = score(
        fit(prepared, small_config(), "gpl_hap").light.model, prepared.valid, prepared.embeddings
    )
    b = score(
        fit(prepared, small_config(), "gpl_hap").light.model, prepared.valid, prepared.embeddings
    )
    c = score(
        fit(prepared, small_config(seed=1), "gpl_hap").light.model,
        prepared.valid,
        prepared.embeddings,
    )
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_save_and_load_round_trip(joined: pa.Table, run: Run, tmp_path: Path) -> None:
    cfg = small_config()
    prepared = prepare(joined, run.semantics, cfg)
    fitted = fit(prepared, cfg, "gpl")
    save_preranker(fitted, prepared, cfg, tmp_path / "preranker", inputs={})
    loaded = load_preranker(tmp_path / "preranker")
    assert loaded.objective == "gpl" and loaded.prep == prepared.prep
    for original, back in ((fitted.light, loaded.light), (fitted.expressive, loaded.expressive)):
        with torch.no_grad():
            np.testing.assert_array_equal(
                score(original.model, prepared.valid, prepared.embeddings),
                score(back, prepared.valid, prepared.embeddings),
            )
    with pytest.raises(FileNotFoundError, match="gpl train"):
        load_preranker(tmp_path / "nothing")


def test_preprocessing_is_fitted_on_training_rows_only(joined: pa.Table, run: Run) -> None:
    cutoff = time_quantile(run.requests, 0.5)
    early = split_at(joined, cutoff).before
    prep_all = prepare(joined, run.semantics, small_config()).prep
    prep_early = prepare(early, run.semantics, small_config()).prep
    clicks = "user_activity__clicks"
    mean_all = next(s.mean for s in prep_all.user_numeric if s.column == clicks)
    mean_early = next(s.mean for s in prep_early.user_numeric if s.column == clicks)
    # Users accumulate clicks over time: statistics of the early half are smaller.
    assert mean_early < mean_all


def test_training_part_holds_only_clicks_known_at_the_cutoff() -> None:
    """A click known only after the cutoff is, for training, the negative the log showed then."""
    requests = make_requests(n_requests=60, n_users=5, n_items=15, seed=3)
    clicked = requests.column("label").to_numpy(zero_copy_only=False) == 1
    delays = pa.array(
        [timedelta(days=2 * (k % 4)) if c else None for k, c in enumerate(clicked)],
        pa.duration("us"),
    )
    known_at = pc.add(requests.column("event_timestamp"), delays)
    requests = requests.append_column("label_timestamp", known_at)
    cutoff = time_quantile(requests, 0.6)
    plain = split_at(requests.drop_columns(["label_timestamp"]), cutoff)
    split = split_at(requests, cutoff)
    assert plain.clicks_known_later == 0
    assert split.after.equals(
        requests.filter(pc.greater_equal(requests["event_timestamp"], cutoff))
    )
    before = split.before.to_pandas()
    raw = plain.before.to_pandas()
    later = (raw["label"] == 1) & (before["label"] == 0)
    assert split.clicks_known_later == later.sum() > 0
    # Exactly the clicks whose label_timestamp is at or after the cutoff changed, into exposed
    # negatives, and the table still keeps the data contract.
    known = requests.filter(pc.less(requests["event_timestamp"], cutoff)).to_pandas()
    assert (later == (known["label_timestamp"] >= cutoff)).all()
    assert (before.loc[later, "group"] == "exposed_negative").all()
    assert before.loc[later, "label_timestamp"].isna().all()
    unchanged = ~later
    assert (
        before[unchanged]
        .drop(columns="label_timestamp")
        .equals(known[unchanged].drop(columns="label_timestamp"))
    )
    assert validate(split.before, "requests") == []


def test_errors_are_clear(joined: pa.Table, run: Run) -> None:
    cfg = small_config()
    with pytest.raises(PrerankerDataError, match="empty"):
        prepare(joined.slice(0, 0), run.semantics, cfg)
    one_class = joined.set_column(
        joined.schema.get_field_index("label"),
        "label",
        pc.if_else(pc.is_null(joined.column("label")), None, 0).cast(pa.int8()),
    )
    with pytest.raises(PrerankerDataError, match="single-class"):
        prepare(one_class, run.semantics, cfg)
    with pytest.raises(PrerankerDataError, match="user_history__recent_item_ids"):
        prepare(joined.drop_columns(["user_history__recent_item_ids"]), run.semantics, cfg)
    no_pseudo = joined.drop_columns([c for c in joined.column_names if c.startswith("pseudo_")])
    prepared = prepare(no_pseudo, run.semantics, cfg)
    with pytest.raises(PrerankerDataError, match="pseudo-labels"):
        fit(prepared, cfg, "gpl")
    with pytest.raises(ValueError, match="unknown objective"):
        fit(prepared, cfg, "magic")


def test_popularity_debias_changes_the_light_model_of_hap_objectives_only(
    joined: pa.Table, run: Run
) -> None:
    def debiased(gamma: float, feature: str = "item_popularity__clicks") -> PrerankerConfig:
        cfg = small_config()
        return cfg.model_copy(
            update={
                "loss": cfg.loss.model_copy(
                    update={"popularity_debias": gamma, "popularity_feature": feature}
                )
            }
        )

    prepared = prepare(joined, run.semantics, small_config())
    assert "item_popularity__clicks" in [s.column for s in prepared.prep.item_numeric]

    def scores(cfg: PrerankerConfig, objective: str) -> tuple[np.ndarray, np.ndarray]:
        fitted = fit(prepared, cfg, objective)
        return (
            score(fitted.light.model, prepared.valid, prepared.embeddings),
            score(fitted.expressive.model, prepared.valid, prepared.embeddings),
        )

    plain_light, plain_expressive = scores(debiased(0.0), "gpl_hap")
    pd_light, pd_expressive = scores(debiased(1.0), "gpl_hap")
    assert not np.array_equal(plain_light, pd_light)
    # The expressive model is never debiased, and neither are the baselines nor GPL alone.
    np.testing.assert_array_equal(plain_expressive, pd_expressive)
    for objective in ("exposed", "gpl"):
        np.testing.assert_array_equal(
            scores(debiased(0.0), objective)[0], scores(debiased(1.0), objective)[0]
        )
    assert debiased_feature(prepared.prep, debiased(1.0), "hap") is not None
    with pytest.raises(PrerankerDataError, match="popularity_feature 'nope'"):
        fit(prepared, debiased(1.0, "nope"), "gpl_hap")
