"""``relevance: lm_likelihood``: candidates scored by the anchor LM as its beam search scores."""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from pydantic import ValidationError

from tests.factories import make_requests
from tests.training.anchors.conftest import (
    T0,
    alternating_positives,
    semantics_table,
    tiny_config,
    toy_codes,
)
from training.anchors.catalog import SidCatalog
from training.anchors.generate import beam_search_fast
from training.anchors.job import generate_anchors, train_anchor_model
from training.anchors.sequences import anchor_requests, user_sequences
from training.anchors.trie import SidTrie
from training.anchors.vocab import SidVocabularyError
from training.data.contract import TIMESTAMP
from training.io import read_manifest
from training.pseudo_labels.job import (
    OUTPUT_SCHEMA,
    ConfidenceWeights,
    PseudoLabelConfig,
    PseudoLabelInputError,
    generate_pseudo_labels,
)
from training.pseudo_labels.lm_relevance import LmRelevance, likelihood_caveats

N_ITEMS = 24
CUTOFFS = [T0 + timedelta(days=1), T0 + timedelta(days=2)]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    torch.set_num_threads(1)
    codes, sizes = toy_codes(N_ITEMS)
    semantics = semantics_table(codes)
    positives = alternating_positives(30, N_ITEMS, 10)
    cfg = tiny_config(epochs=1)
    root = tmp_path_factory.mktemp("lm_relevance")
    train_anchor_model(semantics, positives, sizes, cfg, root / "model")
    anchors = generate_anchors(semantics, positives, CUTOFFS, root / "model", cfg, root).table
    requests = make_requests(
        n_requests=80, n_users=30, n_items=N_ITEMS, seed=5, days=2, start=CUTOFFS[0]
    )
    return root, semantics, positives, anchors, requests


def test_relevance_is_the_beam_search_s_log_probability_of_the_candidate(run, tmp_path) -> None:  # type: ignore[no-untyped-def]
    root, semantics, positives, anchors, requests = run
    lm = LmRelevance.load(root / "model", semantics)
    # Without the history density, the relevance is the LM's log-probability alone.
    cfg = PseudoLabelConfig(progress=False, relevance="lm_likelihood", history_density_weight=0)
    result = generate_pseudo_labels(requests, semantics, anchors, positives, cfg, tmp_path, lm=lm)
    out = pq.read_table(result.path)
    assert out.schema.equals(OUTPUT_SCHEMA)
    unexposed = requests.filter(
        pc.is_in(requests["group"], pa.array(["prerank_negative", "rank_negative"]))
    )
    assert out.num_rows == unexposed.num_rows
    ok = out.filter(pc.equal(out["status"], "ok")).to_pandas()
    assert len(ok) > 100 and (ok["relevance"] <= 0).all()

    # Expected: the generation's own sets (history strictly before each cutoff, as long as the
    # model was trained on), every catalog item scored by a beam as wide as the catalog.
    catalog = SidCatalog.from_table(semantics)
    sets = anchor_requests(
        user_sequences(positives, catalog.item_ids), CUTOFFS, lm.max_history, None
    )
    tokens = lm.vocab.item_tokens(catalog.codes)
    prompts = [lm.vocab.encode(tokens[h]) for h in sets.histories]
    trie = SidTrie(catalog.codes, lm.vocab.codebook_sizes)
    beams = beam_search_fast(list(lm.models), prompts, trie, lm.vocab, N_ITEMS, N_ITEMS)
    dense = np.full((len(prompts), N_ITEMS), np.nan)
    for row in range(len(prompts)):
        dense[row, beams.items[row]] = beams.log_probs[row]
    index = {
        (u, int(c)): k for k, (u, c) in enumerate(zip(sets.user_ids, sets.cutoffs, strict=True))
    }
    cutoffs = ok["anchor_cutoff"].astype("datetime64[us, UTC]").astype("int64")
    position = {item: k for k, item in enumerate(catalog.item_ids.tolist())}
    expected = [
        dense[index[(u, int(c))], position[i]]
        for u, c, i in zip(ok["user_id"], cutoffs, ok["item_id"], strict=True)
    ]
    np.testing.assert_allclose(ok["relevance"], expected, atol=1e-4)

    # Calibrated on the exposed rows' clicks, with the LM named in the manifest.
    manifest = read_manifest(tmp_path)
    assert manifest["metrics"]["relevance"] == "lm_likelihood"
    assert manifest["metrics"]["relevance_model"] == str(root / "model")
    # The fixture's LM has the anchors' recipe: all three caveats, recorded for the reader.
    assert len(manifest["metrics"]["relevance_model_caveats"]) == 3
    assert manifest["metrics"]["calibration"]["method"] == "platt"
    assert ok["pseudo_label"].between(0, 1).all()


def test_the_confidence_and_statuses_do_not_depend_on_the_relevance(run, tmp_path) -> None:  # type: ignore[no-untyped-def]
    root, semantics, positives, anchors, requests = run
    lm = LmRelevance.load(root / "model", semantics)
    tables, weights = {}, {}
    for relevance in ("anchor_cosine", "lm_likelihood"):
        for default in (True, False):
            cfg = PseudoLabelConfig(
                progress=False,
                relevance=relevance,
                weights=None if default else ConfidenceWeights(dispersion=1, history=0, lm=0),
            )
            out = tmp_path / f"{relevance}_{default}"
            result = generate_pseudo_labels(
                requests, semantics, anchors, positives, cfg, out, lm=lm
            )
            tables[relevance, default] = pq.read_table(result.path)
            weights[relevance, default] = read_manifest(out)["metrics"]["confidence_weights"]
    # Same weights, same confidence: the factors are the anchors', whatever scores relevance.
    cosine, likelihood = tables["anchor_cosine", False], tables["lm_likelihood", False]
    for column in ("request_id", "item_id", "status", "anchor_cutoff", "confidence"):
        assert cosine[column].equals(likelihood[column]), column
    assert not cosine["relevance"].equals(likelihood["relevance"])
    # By default the LM's relevance is trusted by the anchors' dispersion alone (measured).
    assert weights["lm_likelihood", True] == {"dispersion": 1.0, "history": 0.0, "lm": 0.0}
    assert weights["anchor_cosine", True] == {"dispersion": 0.0, "history": 1.0, "lm": 0.0}
    assert tables["lm_likelihood", True]["confidence"].equals(likelihood["confidence"])


def test_the_lm_is_required_and_only_platt_puts_it_on_the_click_scale(run, tmp_path) -> None:  # type: ignore[no-untyped-def]
    _, semantics, positives, anchors, requests = run
    with pytest.raises(PseudoLabelInputError, match="pass its model directory"):
        generate_pseudo_labels(
            requests,
            semantics,
            anchors,
            positives,
            PseudoLabelConfig(progress=False, relevance="lm_likelihood"),
            tmp_path,
        )
    with pytest.raises(ValidationError, match="needs calibration 'platt'"):
        PseudoLabelConfig(relevance="lm_likelihood", calibration="none")


def test_an_lm_trained_on_other_sids_is_refused(run) -> None:  # type: ignore[no-untyped-def]
    root, semantics, *_ = run
    other = semantics.set_column(
        semantics.schema.get_field_index("sid"),
        "sid",
        pa.array([f"<x_{k}>" for k in range(semantics.num_rows)]),
    )
    with pytest.raises(SidVocabularyError, match=r"re-?trained"):
        LmRelevance.load(root / "model", other)


def test_training_settings_that_distort_the_likelihood_are_named(run, tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    root, semantics, positives, *_ = run
    _, sizes = toy_codes(N_ITEMS)
    caplog.set_level("WARNING", logger="training.pseudo_labels.lm_relevance")
    lm = LmRelevance.load(root / "model", semantics)
    assert [c.split(" ")[2] for c in lm.caveats] == ["popular-item", "label", "held-out"]
    assert sum("downsampling" in r.getMessage() for r in caplog.records) == 1

    # Trained for likelihood: no caveat. And a model copied without its manifest: none known.
    cfg = tiny_config(epochs=1, label_smoothing=0.0, early_stopping_metric="loss")
    cfg = cfg.model_copy(
        update={"sequences": cfg.sequences.model_copy(update={"downsample_threshold": None})}
    )
    train_anchor_model(semantics, positives, sizes, cfg, tmp_path / "model")
    assert LmRelevance.load(tmp_path / "model", semantics).caveats == ()
    (root / "model" / "manifest.json").rename(tmp_path / "kept.json")
    try:
        assert likelihood_caveats(root / "model") == []
    finally:
        (tmp_path / "kept.json").rename(root / "model" / "manifest.json")


def test_an_ensemble_is_scored_with_every_member(run, tmp_path) -> None:  # type: ignore[no-untyped-def]
    _, semantics, positives, *_ = run
    _, sizes = toy_codes(N_ITEMS)
    train_anchor_model(
        semantics, positives, sizes, tiny_config(epochs=1, ensemble_size=2), tmp_path / "model"
    )
    mixture = LmRelevance.load(tmp_path / "model", semantics)
    product = LmRelevance.load(tmp_path / "model", semantics, combine="geometric")
    assert len(mixture.models) == 2
    prompts = mixture.prompts(
        pa.table({"user_id": ["u0", "u1"], "event_timestamp": pa.array(CUTOFFS, TIMESTAMP)}),
        positives,
    )
    set_idx, items = np.array([0, 0, 1, 1, 1]), np.array([0, 3, 1, 2, 3])
    got = mixture.score(prompts, set_idx, items)
    trie = mixture.trie
    beams = beam_search_fast(list(mixture.models), prompts, trie, mixture.vocab, N_ITEMS, N_ITEMS)
    for row, (s, i) in enumerate(zip(set_idx, items, strict=True)):
        where = np.flatnonzero(beams.items[s] == i)
        np.testing.assert_allclose(got[row], beams.log_probs[s][where[0]], atol=1e-4)
    assert not np.allclose(got, product.score(prompts, set_idx, items), atol=1e-4)


def test_by_default_the_lm_s_relevance_adds_the_fitted_history_density(run, tmp_path) -> None:  # type: ignore[no-untyped-def]
    root, semantics, positives, anchors, requests = run
    lm = LmRelevance.load(root / "model", semantics)
    outputs, manifests = {}, {}
    for name, weight in (("default", None), ("off", 0.0), ("fixed", 2.0)):
        cfg = PseudoLabelConfig(
            progress=False, relevance="lm_likelihood", history_density_weight=weight
        )
        assert cfg.density_weight == {"default": "fitted", "off": 0.0, "fixed": 2.0}[name]
        result = generate_pseudo_labels(
            requests, semantics, anchors, positives, cfg, tmp_path / name, lm=lm
        )
        outputs[name] = pq.read_table(result.path).to_pandas()
        manifests[name] = read_manifest(tmp_path / name)["metrics"]
    assert manifests["off"]["history_density"] is None
    fitted, fixed = manifests["default"]["history_density"], manifests["fixed"]["history_density"]
    assert fitted["fitted"] and not fixed["fitted"] and fixed["weight"] == 2.0
    assert fitted["temperature"] == 0.1 and 0 <= fitted["density_auc"] <= 1

    # Expected density: each row's item against the latest 50 positives before its anchor set's
    # cutoff (the LM's prompt), log-mean-exp of the cosines over 0.1.
    vectors = np.stack(semantics["content_embedding"].to_numpy(zero_copy_only=False))
    vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    row_of = {item: k for k, item in enumerate(semantics["item_id"].to_pylist())}
    log = positives.to_pandas().sort_values("event_timestamp", kind="stable")
    off = outputs["off"]
    ok = (off["status"] == "ok").to_numpy()
    density = []
    for user, cutoff, item in zip(
        off["user_id"][ok], off["anchor_cutoff"][ok], off["item_id"][ok], strict=True
    ):
        seen = log[(log["user_id"] == user) & (log["event_timestamp"] < cutoff)]["item_id"]
        history = vectors[[row_of[i] for i in seen.to_list()[-50:]]]
        z = history @ vectors[row_of[item]] / 0.1
        density.append(z.max() + np.log(np.mean(np.exp(z - z.max()))))
    for name in ("default", "fixed"):
        weight = manifests[name]["history_density"]["weight"]
        np.testing.assert_allclose(
            outputs[name]["relevance"][ok],
            off["relevance"][ok] + weight * np.array(density),
            rtol=1e-4,
            atol=1e-3,
        )
    for column in ("request_id", "item_id", "status", "confidence"):
        assert outputs["default"][column].equals(off[column]), column
