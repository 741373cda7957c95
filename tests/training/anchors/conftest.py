"""Toy SID catalogs, positives and tiny models for the anchor tests (all built in code)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import numpy as np
import pyarrow as pa
import pytest

from training.anchors.job import AnchorConfig, TrainResult, train_anchor_model
from training.anchors.vocab import format_sid

T0 = datetime(2024, 1, 1, tzinfo=UTC)
TS = pa.timestamp("us", tz="UTC")
TINY = {
    "hidden_size": 32,
    "num_layers": 2,
    "num_heads": 2,
    "num_kv_heads": 2,
    "intermediate_size": 64,
}


def toy_codes(n_items: int, clusters: int = 2, sub: int = 4) -> tuple[np.ndarray, list[int]]:
    """Codes (cluster, sub-cluster, disambiguation): item i is in cluster i % clusters."""
    seen: dict[tuple[int, int], int] = {}
    rows = []
    for i in range(n_items):
        key = (i % clusters, (i // clusters) % sub)
        rows.append([*key, seen.get(key, 0)])
        seen[key] = seen.get(key, 0) + 1
    codes = np.array(rows, dtype=np.int64)
    return codes, [clusters, sub, int(codes[:, 2].max()) + 1]


def semantics_table(codes: np.ndarray, dim: int = 8, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    n = len(codes)
    emb = rng.standard_normal((n, dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return pa.table(
        {
            "item_id": [f"i{i}" for i in range(n)],
            "event_timestamp": pa.array([T0] * n, TS),
            "sid_codes": pa.array(codes.tolist(), pa.list_(pa.int32())),
            "sid": [format_sid(c) for c in codes.tolist()],
            "content_embedding": pa.array(emb.tolist(), pa.list_(pa.float32())),
        }
    )


def alternating_positives(
    n_users: int, n_items: int, length: int, seed: int = 0, clusters: int = 2
) -> pa.Table:
    """Users alternate between item clusters: the next item's cluster is predictable."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        start = int(rng.integers(clusters))
        for t in range(length):
            cl = (start + t) % clusters
            item = int(rng.choice(np.flatnonzero(np.arange(n_items) % clusters == cl)))
            ts = T0 + timedelta(hours=6 * t + int(rng.integers(0, 6)), minutes=u)
            rows.append({"user_id": f"u{u}", "item_id": f"i{item}", "event_timestamp": ts})
    schema = pa.schema(
        [("user_id", pa.string()), ("item_id", pa.string()), ("event_timestamp", TS)]
    )
    return pa.Table.from_pylist(rows, schema=schema)


def tiny_config(**training: object) -> AnchorConfig:
    return AnchorConfig.model_validate(
        {
            "model": {"compact": TINY},
            "training": {
                "epochs": 3,
                "batch_size": 32,
                "eval_users": 16,
                "progress": False,
                **training,
            },
            "sequences": {"max_history": 6},
            "generation": {"beam_width": 8, "num_anchors": 5, "batch_size": 16},
        }
    )


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread; intra-op threads only add sync overhead here."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def toy_data() -> tuple[pa.Table, pa.Table, list[int]]:
    codes, sizes = toy_codes(24)
    return semantics_table(codes), alternating_positives(30, 24, 10), sizes


@pytest.fixture(scope="session")
def trained_compact(
    toy_data: tuple[pa.Table, pa.Table, list[int]], tmp_path_factory: pytest.TempPathFactory
) -> TrainResult:
    """A compact anchor model trained once for the generation tests."""
    semantics, positives, sizes = toy_data
    import torch

    out = tmp_path_factory.mktemp("anchor_model")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train_anchor_model(semantics, positives, sizes, tiny_config(epochs=2), out)
    finally:
        torch.set_num_threads(before)


def assert_same_anchors(a: pa.Table, b: pa.Table) -> None:
    """Two anchor tables with the same rows and anchors; log-probabilities within 1e-5."""
    import pyarrow.compute as pc

    assert a.num_rows == b.num_rows
    for col in a.column_names:
        if col not in ("anchor_log_probs", "anchor_embeddings"):
            assert a.column(col).equals(b.column(col)), col
    np.testing.assert_allclose(
        pc.list_flatten(a.column("anchor_log_probs")).to_numpy(),
        pc.list_flatten(b.column("anchor_log_probs")).to_numpy(),
        atol=1e-5,
    )
