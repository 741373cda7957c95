"""Small, seeded contract tables built in code (tests never read ../shared/datasets)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa

from training.data.contract import conform

T0 = datetime(2024, 1, 1, tzinfo=UTC)


def make_items(n_items: int, *, start: datetime = T0, with_category: bool = True) -> pa.Table:
    """A catalog of ``n_items`` items, all valid from ``start``."""
    data: dict[str, object] = {
        "item_id": [f"i{i}" for i in range(n_items)],
        "text": [f"item number {i} about topic {i % 4}" for i in range(n_items)],
        "event_timestamp": pa.array([start] * n_items, pa.timestamp("us", tz="UTC")),
    }
    if with_category:
        data["category"] = [f"topic{i % 4}" for i in range(n_items)]
    return conform(pa.table(data), "items")


def make_requests(
    *,
    n_requests: int,
    n_users: int,
    n_items: int,
    seed: int = 0,
    candidates: int = 12,
    exposed: int = 3,
    days: int = 30,
    start: datetime = T0,
) -> pa.Table:
    """A valid request log: ``candidates`` rows per request, the first ``exposed`` exposed."""
    rng = np.random.default_rng(seed)
    rows = []
    for r in range(n_requests):
        user = f"u{rng.integers(n_users)}"
        ts = start + timedelta(minutes=int(rng.integers(days * 24 * 60)))
        for j, c in enumerate(rng.choice(n_items, candidates, replace=False)):
            label: int | None
            if j < exposed:
                stage, label = "exposed", int(rng.random() < 0.3)
                group = "exposed_positive" if label else "exposed_negative"
            elif j < 2 * exposed:
                stage, label, group = "ranked", None, "rank_negative"
            else:
                stage, label, group = "retrieved", None, "prerank_negative"
            rows.append(
                {
                    "request_id": f"r{r}",
                    "user_id": user,
                    "item_id": f"i{c}",
                    "event_timestamp": ts,
                    "stage": stage,
                    "prerank_position": j + 1,
                    "rank_position": j + 1 if j < 2 * exposed else None,
                    "label": label,
                    "group": group,
                }
            )
    return conform(pa.Table.from_pylist(rows), "requests")


def write_empty_anchors(run_dir: Path) -> Path:
    """Write a ``user_interest_anchors`` table with no rows: the anchor stage ran, found nothing.

    The ``preranker`` FeatureService reads it; every row then gets the declared defaults.
    """
    from training.anchors.schema import ANCHORS_DIR, ANCHORS_FILE, ANCHORS_SCHEMA
    from training.io import write_table

    return write_table(ANCHORS_SCHEMA.empty_table(), run_dir / ANCHORS_DIR / ANCHORS_FILE)
