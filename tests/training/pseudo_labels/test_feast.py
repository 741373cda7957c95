"""Pseudo-labels are in the offline store and join point-in-time onto the request log."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from tests.factories import make_requests
from tests.training.pseudo_labels.test_job import (
    make_anchors,
    make_item_semantics,
    make_positives,
)
from training.features.store import StoreSettings, apply_definitions, open_store
from training.features.training_set import build_training_set
from training.pseudo_labels.job import PSEUDO_LABELS_DIR, PseudoLabelConfig, generate_pseudo_labels


def test_pseudo_labels_join_through_the_training_labels_service(tmp_path: Path) -> None:
    requests = make_requests(n_requests=60, n_users=5, n_items=40, seed=2, exposed=4)
    users = [f"u{k}" for k in range(5)]
    items = make_item_semantics()
    result = generate_pseudo_labels(
        requests,
        items,
        make_anchors(users, [0, 15], items),
        make_positives(users),
        PseudoLabelConfig(progress=False),
        tmp_path / PSEUDO_LABELS_DIR,
    )
    store = open_store(tmp_path, StoreSettings(project="pl"))
    apply_definitions(store)
    joined = build_training_set(store, requests, "training_labels").table.to_pandas()
    assert len(joined) == requests.num_rows
    labels = pq.read_table(result.path).to_pandas().set_index(["request_id", "item_id"])
    exposed = joined["stage"] == "exposed"
    # Exposed rows have real labels: no pseudo-label joins, and NaN (not 0) says so.
    assert joined.loc[exposed, "pseudo_labels__pseudo_label"].isna().all()
    assert (joined.loc[exposed, "pseudo_labels__status"] == "absent").all()
    assert (joined.loc[exposed, "pseudo_labels__missing"] == 1).all()
    unexposed = joined[~exposed].set_index(["request_id", "item_id"])
    expected = labels.loc[unexposed.index, "pseudo_label"].to_numpy()
    np.testing.assert_allclose(unexposed["pseudo_labels__pseudo_label"].to_numpy(), expected)
    assert (unexposed["pseudo_labels__missing"] == 0).all()
