"""A small, complete run directory for the pre-ranker: features, anchors, pseudo-labels, Feast."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pytest
from feast import FeatureStore

from tests.factories import make_items, make_requests
from tests.training.pseudo_labels.test_job import (
    N_ITEMS,
    make_anchors,
    make_item_semantics,
    make_positives,
)
from training.anchors.schema import ANCHORS_DIR, ANCHORS_FILE
from training.features.stats import StatsConfig, compute_feature_tables
from training.features.store import StoreSettings, apply_definitions, open_store
from training.io import write_table
from training.preranker.config import PrerankerConfig
from training.pseudo_labels.job import PSEUDO_LABELS_DIR, PseudoLabelConfig, generate_pseudo_labels

USERS = [f"u{k}" for k in range(8)]


@dataclass
class Run:
    """What the tests need from the fixture run."""

    root: Path
    store: FeatureStore
    items: pa.Table
    semantics: pa.Table
    requests: pa.Table


def write_run_inputs(root: Path) -> tuple[pa.Table, pa.Table, pa.Table]:
    """Feature tables, anchors and pseudo-labels of a small run in ``root``.

    Returns:
        (items, requests, item semantics) the tables were made from.
    """
    items = make_items(N_ITEMS)
    requests = make_requests(
        n_requests=160, n_users=len(USERS), n_items=N_ITEMS, seed=4, candidates=16, exposed=4
    )
    semantics = make_item_semantics()
    compute_feature_tables(items, requests).write(root, StatsConfig())
    anchors = make_anchors(USERS, [0, 10, 20], semantics)
    write_table(anchors, root / ANCHORS_DIR / ANCHORS_FILE)
    generate_pseudo_labels(
        requests,
        semantics,
        anchors,
        make_positives(USERS),
        PseudoLabelConfig(progress=False),
        root / PSEUDO_LABELS_DIR,
    )
    return items, requests, semantics


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    root = tmp_path_factory.mktemp("preranker_run")
    items, requests, semantics = write_run_inputs(root)
    store = open_store(root, StoreSettings(project="preranker_test"))
    apply_definitions(store)
    return Run(root, store, items, semantics, requests)


def small_config(**training: object) -> PrerankerConfig:
    """A config that trains in a second or two."""
    return PrerankerConfig.model_validate(
        {
            "model": {"light_hidden": 16, "expressive_hidden": 32, "tower_dim": 8},
            "training": {
                "epochs": 2,
                "batch_requests": 16,
                "progress": False,
                "validation_fraction": 0.2,
                **training,
            },
        }
    )
