"""The collaborative block: co-engaged items close, the time bound kept, the fusion's layout."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.factories import T0
from tests.training.sids.helpers import make_catalog, tiny_config
from training.io import read_manifest
from training.sids.collaborative import CollaborativeConfig, collaborative_vectors
from training.sids.job import ITEM_SEMANTICS_FILE, SidInputError, assign_sids, train_sids

ITEMS = [f"i{k:04d}" for k in range(12)]


def _log(rows: list[tuple[str, str, int]]) -> pa.Table:
    """(user, item, hour after T0) rows as a contract interactions table."""
    return pa.table(
        {
            "user_id": pa.array([u for u, _, _ in rows], pa.string()),
            "item_id": pa.array([i for _, i, _ in rows], pa.string()),
            "event_timestamp": pa.array(
                [T0 + timedelta(hours=h) for _, _, h in rows], pa.timestamp("us", tz="UTC")
            ),
        }
    )


def _pairs_log(users: int = 30) -> list[tuple[str, str, int]]:
    """Every user takes i0000 then i0001 and i0002 then i0003, far apart in their sequence,
    among random other items; i0011 is never taken."""
    rng = np.random.default_rng(0)
    rows: list[tuple[str, str, int]] = []
    for u in range(users):
        fillers = [ITEMS[k] for k in rng.integers(4, 11, size=8)]
        sequence = ["i0000", "i0001", *fillers, "i0002", "i0003"]
        rows += [(f"u{u}", item, h) for h, item in enumerate(sequence)]
    return rows


def _cos(m: np.ndarray, a: int, b: int) -> float:
    return float(m[a] @ m[b] / (np.linalg.norm(m[a]) * np.linalg.norm(m[b])))


def test_items_taken_together_are_close_and_unseen_items_have_no_vector() -> None:
    cfg = CollaborativeConfig(weight=1.0, dim=4, window=2)
    built = collaborative_vectors(ITEMS, _log(_pairs_log()), cfg)
    m = built.matrix
    assert m.shape == (len(ITEMS), 4) and m.dtype == np.float32
    # Each pair is closer to its partner than to the other pair.
    assert _cos(m, 0, 1) > _cos(m, 0, 2) + 0.3
    assert _cos(m, 2, 3) > _cos(m, 1, 3) + 0.3
    assert not m[11].any()
    assert built.metrics["items_without_vector"] == 1
    assert built.metrics["interactions_before_until"] == 30 * 12
    # Same input, same vectors (the SVD's start vector is seeded).
    assert np.array_equal(collaborative_vectors(ITEMS, _log(_pairs_log()), cfg).matrix, m)


def test_until_keeps_later_interactions_out_and_unknown_items_are_counted() -> None:
    rows = _pairs_log()
    # Late rows: i0010 follows i0000 for every user, but only after the bound.
    late_pair = ["i0000", "i0010"]
    rows += [(f"u{u}", item, 100 + h) for u in range(30) for h, item in enumerate(late_pair)]
    rows += [("u0", "not-in-catalog", 5)]
    until = T0 + timedelta(hours=50)
    built = collaborative_vectors(
        ITEMS, _log(rows), CollaborativeConfig(weight=1.0, dim=4, window=2, until=until)
    )
    assert not built.matrix[10].any() or _cos(built.matrix, 0, 10) < 0.5
    assert built.metrics["interactions_total"] == len(rows)
    assert built.metrics["interactions_before_until"] == 30 * 12 + 1
    assert built.metrics["interactions_unknown_item"] == 1
    assert built.metrics["until"] == until.isoformat()
    every = CollaborativeConfig(weight=1.0, dim=4, window=2)
    late = collaborative_vectors(ITEMS, _log(rows), every)
    assert _cos(late.matrix, 0, 10) > _cos(built.matrix, 0, 10)


def test_a_log_with_fewer_directions_than_dim_pads_with_zero_columns() -> None:
    rows = [(f"u{u}", item, h) for u in range(5) for h, item in enumerate(["i0000", "i0001"])]
    built = collaborative_vectors(ITEMS, _log(rows), CollaborativeConfig(weight=1.0, dim=8))
    assert built.matrix.shape == (len(ITEMS), 8)
    assert built.metrics["rank"] == 1
    assert not built.matrix[:, 1:].any()
    empty = collaborative_vectors(ITEMS, _log([]), CollaborativeConfig(weight=1.0, dim=8))
    assert not empty.matrix.any() and empty.metrics["items_without_vector"] == len(ITEMS)


@pytest.fixture(scope="module")
def catalog() -> pa.Table:
    return make_catalog(120, seed=1)


def _catalog_log(catalog: pa.Table) -> pa.Table:
    ids = catalog.column("item_id").to_pylist()
    rng = np.random.default_rng(2)
    rows = []
    for u in range(80):
        for h, k in enumerate(rng.integers(0, 100, size=10)):  # items 100-119: never taken
            rows.append((f"u{u}", ids[int(k)], h))
    return _log(rows)


def test_sid_stage_fuses_the_block_and_assigns_new_items_the_same_layout(
    catalog: pa.Table, tiny_bert: Path, tmp_path: Path
) -> None:
    cfg = tiny_config(tiny_bert, collaborative={"weight": 1.0, "dim": 8})
    old, new = catalog.slice(0, 110), catalog.slice(110)
    result = train_sids(old, cfg, tmp_path, _catalog_log(catalog))
    emb = np.array(result.table.column("content_embedding").to_pylist(), np.float32)
    # text (32) + content_embedding (16) + collaborative (8), one unit vector per item
    assert emb.shape == (110, 32 + 16 + 8)
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert not emb[100:, -8:].any()  # never taken: a zero block
    assert np.abs(emb[:100, -8:]).sum(axis=1).min() > 0
    manifest = read_manifest(tmp_path)
    fusion = manifest["config"]["fusion"]
    assert (fusion["collaborative_dim"], fusion["collaborative_weight"]) == (8, 1.0)
    assert "collaborative" in fusion["method"]
    assert manifest["metrics"]["collaborative"]["items_without_vector"] == 10
    assert manifest["config"]["collaborative"]["weight"] == 1.0

    assigned = assign_sids(new, tmp_path)
    assert assigned.metrics["new_items"] == 10
    table = pq.read_table(tmp_path / ITEM_SEMANTICS_FILE)
    vectors = np.array(table.column("content_embedding").to_pylist(), np.float32)
    assert vectors.shape == (120, 56)
    assert not vectors[110:, -8:].any()


def test_a_positive_weight_without_interactions_is_refused(
    catalog: pa.Table, tiny_bert: Path, tmp_path: Path
) -> None:
    cfg = tiny_config(tiny_bert, collaborative={"weight": 0.5})
    with pytest.raises(SidInputError, match="no interactions"):
        train_sids(catalog, cfg, tmp_path)
    broken = _catalog_log(catalog).drop_columns(["event_timestamp"])
    with pytest.raises(SidInputError, match="event_timestamp"):
        train_sids(catalog, cfg, tmp_path, broken)
    # Weight 0 (the default) reads no interactions and fuses no block.
    plain = train_sids(catalog, tiny_config(tiny_bert), tmp_path / "plain", broken)
    assert "collaborative" not in plain.metrics
    assert read_manifest(tmp_path / "plain")["config"]["fusion"]["collaborative_dim"] == 0
