"""The SID stage's ``item_semantics`` table as the anchor stage uses it: aligned numpy arrays.

``RUN_DIR/sids/item_semantics.parquet`` holds one row per item (and version): ``item_id``,
``event_timestamp``, ``sid_codes`` (list<int32>, one code per level; the last level is a
disambiguation index that makes every item's code tuple unique), ``sid`` (the same codes as a
string such as ``<a_12><b_7><c_201><d_0>``) and ``content_embedding`` (list<float32>).

The anchor model is trained on one codebook, so when an item has several versions the latest one
(largest ``event_timestamp``) is used.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from training.anchors.errors import AnchorInputError
from training.arrow import string_array

SIDS_DIR: Final = "sids"
ITEM_SEMANTICS_FILE: Final = "item_semantics.parquet"
REQUIRED_COLUMNS: Final = ("item_id", "event_timestamp", "sid_codes", "sid", "content_embedding")


class ItemSemanticsError(AnchorInputError):
    """The item semantics table cannot be used (missing columns, ragged codes, duplicates)."""


@dataclass(frozen=True)
class SidCatalog:
    """Items with their SID codes and content embeddings, row ``i`` of every array = item ``i``.

    Attributes:
        item_ids: Item ids, shape ``[n_items]``.
        codes: SID codes, shape ``[n_items, n_levels]`` (int64).
        sids: SID strings exactly as the SID stage wrote them, shape ``[n_items]``.
        embeddings: Content embeddings, shape ``[n_items, dim]`` (float32).
    """

    item_ids: npt.NDArray[np.str_]
    codes: npt.NDArray[np.int64]
    sids: npt.NDArray[np.str_]
    embeddings: npt.NDArray[np.float32]

    @property
    def n_items(self) -> int:
        """Number of items."""
        return int(self.codes.shape[0])

    @property
    def n_levels(self) -> int:
        """SID levels per item, the disambiguation level included."""
        return int(self.codes.shape[1])

    @cached_property
    def arrow_strings(self) -> tuple[pa.StringArray, pa.StringArray]:
        """The SIDs and the item ids as Arrow arrays, converted once per catalog.

        The anchors job gathers every output chunk's strings from them.
        """
        return string_array(self.sids), string_array(self.item_ids)

    def index(self) -> dict[str, int]:
        """Map item id -> row."""
        return {item: i for i, item in enumerate(self.item_ids.tolist())}

    @classmethod
    def from_table(cls, table: pa.Table) -> SidCatalog:
        """Build the catalog from an ``item_semantics`` table (latest version of each item).

        Raises:
            ItemSemanticsError: when a column is missing, codes or embeddings are ragged, or the
                table is empty.
        """
        missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
        if missing:
            raise ItemSemanticsError(f"item_semantics lacks columns {missing}")
        if table.num_rows == 0:
            raise ItemSemanticsError("item_semantics is empty")
        ts = pc.cast(table.column("event_timestamp"), pa.timestamp("us", tz="UTC"))
        ids = table.column("item_id").to_numpy(zero_copy_only=False).astype(str)
        order = np.lexsort((ts.cast(pa.int64()).to_numpy(), ids))
        ids_sorted = ids[order]
        # The last row of each id's run is its latest version.
        is_last = np.append(ids_sorted[1:] != ids_sorted[:-1], True)
        rows = order[is_last]

        codes = _fixed_width(table.column("sid_codes"), "sid_codes").astype(np.int64)[rows]
        if (codes < 0).any():
            raise ItemSemanticsError("sid_codes has negative codes")
        emb = _fixed_width(table.column("content_embedding"), "content_embedding")
        return cls(
            item_ids=ids[rows],
            codes=codes,
            sids=table.column("sid").to_numpy(zero_copy_only=False).astype(str)[rows],
            embeddings=emb.astype(np.float32)[rows],
        )


def _fixed_width(column: pa.ChunkedArray, name: str) -> npt.NDArray[np.generic]:
    """A list column whose lists all have one length, as a 2-d numpy array."""
    arr = column.combine_chunks()
    if arr.null_count:
        raise ItemSemanticsError(f"column {name!r} has {arr.null_count} null values")
    lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
    if len(np.unique(lengths)) != 1 or lengths[0] == 0:
        raise ItemSemanticsError(
            f"column {name!r} must hold lists of one non-zero length, found lengths "
            f"{sorted(set(lengths.tolist()))[:5]}"
        )
    values = pc.list_flatten(arr).to_numpy(zero_copy_only=False)
    return np.asarray(values).reshape(len(arr), int(lengths[0]))


def derive_codebook_sizes(table: pa.Table) -> list[int]:
    """Per-level vocabulary sizes as ``max(code) + 1`` of each level in ``item_semantics``.

    This is a lower bound of the SID stage's real codebook sizes (codes that no item uses are
    invisible here); prefer :func:`read_codebook_sizes`, which reads the manifest first.
    """
    codes = _fixed_width(table.column("sid_codes"), "sid_codes").astype(np.int64)
    return [int(v) + 1 for v in codes.max(axis=0)]


def read_codebook_sizes(sids_dir: Path, table: pa.Table | None = None) -> list[int]:
    """Per-level vocabulary sizes of the SID stage's output.

    Reads ``outputs.codebook_sizes`` (where ``training.sids`` writes them) or
    ``metrics.codebook_sizes`` from ``sids_dir/manifest.json`` when present, else derives
    ``max(code) + 1`` per level from ``table`` (or from ``sids_dir/item_semantics.parquet``).

    Args:
        sids_dir: The SID stage's output folder, ``RUN_DIR/sids``.
        table: The item semantics table when already loaded.

    Raises:
        FileNotFoundError: when neither the manifest entry nor a table is available.
    """
    manifest = sids_dir / "manifest.json"
    if manifest.exists():
        content = json.loads(manifest.read_text())
        # training.sids writes them under "outputs"; "metrics" is accepted too.
        for section in ("outputs", "metrics"):
            sizes = content.get(section, {}).get("codebook_sizes")
            if isinstance(sizes, list) and sizes and all(isinstance(s, int) for s in sizes):
                return [int(s) for s in sizes]
    if table is None:
        import pyarrow.parquet as pq

        path = sids_dir / ITEM_SEMANTICS_FILE
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file; run the SID stage first")
        table = pq.read_table(path, columns=["sid_codes"])
    return derive_codebook_sizes(table)
