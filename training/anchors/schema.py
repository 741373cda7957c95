"""The anchor stage's output: ``RUN_DIR/anchors/user_interest_anchors.parquet``.

One row per anchor set, i.e. per (user, cutoff) whose history changed:

=================  =============================  =============================================
column             type                           meaning
=================  =============================  =============================================
user_id            string                         the user
event_timestamp    timestamp[us, UTC]             the cutoff: history is strictly before it
anchor_sids        list<string> (N)               the anchors' SIDs, best first
anchor_item_ids    list<string> (N)               the item each SID denotes
anchor_embeddings  list<float32> (N * D)          the anchors' content embeddings, row-major
                                                  (flat: Feast has no nested arrays)
anchor_log_probs   list<float32> (N)              log P(item | history), descending
num_anchors        int32                          N (less only when the catalog is smaller)
history_length     int32                          history items fed to the model (<= max)
history_hash       int64                          fingerprint of that history (catalog rows in
                                                  order): what an incremental run compares
=================  =============================  =============================================
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import pyarrow as pa

from training.data.contract import TIMESTAMP
from training.io import read_table

ANCHORS_DIR: Final = "anchors"
ANCHORS_FILE: Final = "user_interest_anchors.parquet"

ANCHORS_SCHEMA: Final = pa.schema(
    [
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("event_timestamp", TIMESTAMP, nullable=False),
        pa.field("anchor_sids", pa.list_(pa.string()), nullable=False),
        pa.field("anchor_item_ids", pa.list_(pa.string()), nullable=False),
        pa.field("anchor_embeddings", pa.list_(pa.float32()), nullable=False),
        pa.field("anchor_log_probs", pa.list_(pa.float32()), nullable=False),
        pa.field("num_anchors", pa.int32(), nullable=False),
        pa.field("history_length", pa.int32(), nullable=False),
        pa.field("history_hash", pa.int64(), nullable=False),
    ]
)


@dataclass
class AnchorResult:
    """Outcome of :func:`training.anchors.job.generate_anchors` (or of merging its shards)."""

    path: Path
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def table(self) -> pa.Table:
        """The written anchors, read back whole from ``path`` (the job streams them out)."""
        return read_table(self.path)
