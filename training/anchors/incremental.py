"""Incremental anchor generation: reuse the sets an earlier run already decoded.

A daily `gpl anchors generate` sees yesterday's (user, cutoff) pairs again; with the same model
and settings their anchors would come out the same, so decoding them again is wasted work.
``generation.incremental`` keeps an earlier output's row when three things match:

* the **generation key** in the earlier run's manifest: a fingerprint of the model directories
  (every file's path and contents, so that copies on other hosts agree), the catalog (item
  ids, SID codes, content vectors) and every setting that shapes a set (beam width, anchors,
  implementation, ensemble rule, dtype, prior weight and settings, history length);
* the set's (user, cutoff), the row's ``user_id`` and ``event_timestamp``;
* the set's **history**: ``history_hash``, a 64-bit fingerprint of the catalog rows the set was
  decoded from, so a positive that arrived late, before an old cutoff, makes that set decoded
  again.

Everything else is decoded, and rows of sets no longer requested are dropped: the output equals
what a full run would write, up to row order (kept rows first).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.parquet as pq

from training.anchors.catalog import SidCatalog
from training.anchors.sequences import AnchorRequests

logger = logging.getLogger(__name__)

IntArray = npt.NDArray[np.int64]


def history_hashes(histories: Sequence[IntArray]) -> IntArray:
    """A 64-bit fingerprint of each history: its catalog rows, in order (blake2b)."""
    return np.fromiter(
        (
            int.from_bytes(
                hashlib.blake2b(np.asarray(h, dtype="<i8").tobytes(), digest_size=8).digest(),
                "little",
                signed=True,
            )
            for h in histories
        ),
        dtype=np.int64,
        count=len(histories),
    )


def generation_key(
    model_dirs: Sequence[Path], catalog: SidCatalog, settings: dict[str, Any]
) -> str:
    """The fingerprint of what shapes every anchor set but its history (see the module doc)."""
    digest = hashlib.sha256()
    for d in model_dirs:
        for f in sorted(p for p in d.rglob("*") if p.is_file()):
            # The files' bytes, not their times: copies of one model on several hosts (sharded
            # generation) must agree, and a retrained model differs. sha256 reads ~1.5 GB/s, a
            # second for a Qwen2.5-0.5B-sized model.
            with f.open("rb") as fh:
                content = hashlib.file_digest(fh, "sha256").hexdigest()
            digest.update(f"{f.relative_to(d).as_posix()}:{content}\n".encode())
    digest.update("\n".join(catalog.item_ids.tolist()).encode())
    digest.update(np.ascontiguousarray(catalog.codes, dtype="<i8").tobytes())
    digest.update(np.ascontiguousarray(catalog.embeddings, dtype="<f4").tobytes())
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class Reuse:
    """What an incremental run keeps of the earlier output.

    Attributes:
        path: The earlier output file.
        old_rows: Its rows to copy, ascending.
        decode: The requested sets still to decode (their indices), ascending.
        fewer_anchors: Kept rows whose set has fewer anchors than asked.
    """

    path: Path
    old_rows: IntArray
    decode: IntArray
    fewer_anchors: int


def plan_reuse(
    path: Path,
    manifest: dict[str, Any] | None,
    key: str,
    requests: AnchorRequests,
    hashes: IntArray,
    schema: pa.Schema,
    num_anchors: int,
) -> Reuse | None:
    """Which rows of the earlier output ``path`` to keep; None (decode all) when none can be.

    Args:
        path: The earlier output.
        manifest: Its stage manifest (None when absent).
        key: This run's :func:`generation_key`.
        requests: This run's sets; ``hashes`` their :func:`history_hashes`.
        hashes: See ``requests``.
        schema: The output schema an earlier file must have.
        num_anchors: Anchors asked per set (to count kept sets with fewer).
    """
    why = None
    if manifest is None or not path.exists():
        why = "no earlier output"
    elif manifest.get("metrics", {}).get("generation_key") != key:
        why = "the model, the catalog or a generation setting changed since the earlier run"
    else:
        try:
            if not pq.read_schema(path).equals(schema):
                why = "the earlier output has another schema (written by an older version)"
            else:
                old = pq.read_table(
                    path, columns=["user_id", "event_timestamp", "history_hash", "num_anchors"]
                )
        except (OSError, ValueError) as exc:  # ArrowInvalid: a truncated or corrupt file
            why = f"the earlier output is unreadable ({exc})"
    if why is not None:
        logger.warning("incremental generation: %s; decoding every set", why)
        return None
    # One hash join in Arrow on (user, cutoff, history): no Python object per set.
    n = len(hashes)
    wanted = pa.table(
        {
            "user_id": pa.array(requests.user_ids, pa.string()),
            "cutoff": pa.array(requests.cutoffs, pa.int64()),
            "history_hash": pa.array(hashes, pa.int64()),
            "set": pa.array(np.arange(n, dtype=np.int64)),
        }
    )
    have = pa.table(
        {
            "user_id": old.column("user_id"),
            "cutoff": old.column("event_timestamp").cast(pa.int64()),
            "history_hash": old.column("history_hash"),
            "row": pa.array(np.arange(old.num_rows, dtype=np.int64)),
        }
    )
    matched = wanted.join(have, keys=["user_id", "cutoff", "history_hash"], join_type="inner")
    found = np.full(n, -1, dtype=np.int64)
    found[matched.column("set").to_numpy()] = matched.column("row").to_numpy()
    old_rows = np.sort(found[found >= 0])
    counts = old.column("num_anchors").to_numpy()
    return Reuse(
        path=path,
        old_rows=old_rows,
        decode=np.flatnonzero(found < 0),
        fewer_anchors=int((counts[old_rows] < num_anchors).sum()),
    )


def kept_batches(reuse: Reuse, batch_rows: int) -> Iterator[pa.RecordBatch]:
    """The earlier output's kept rows, read ``batch_rows`` at a time (memory stays bounded)."""
    start = 0
    for batch in pq.ParquetFile(reuse.path).iter_batches(batch_size=batch_rows):
        stop = start + batch.num_rows
        lo, hi = np.searchsorted(reuse.old_rows, [start, stop])
        if hi > lo:
            yield batch.take(pa.array(reuse.old_rows[lo:hi] - start))
        start = stop
