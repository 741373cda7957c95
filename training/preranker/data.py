"""From a point-in-time joined training set to model-ready arrays.

Rows are grouped by request: user-side inputs (activity statistics, recent positives, anchor
items) are stored once per request, candidate-side inputs once per row, which is also how the
service computes them (the user side once per request). Item content vectors are not joined row
by row: rows carry an index into one item-embedding matrix built from ``item_semantics``, the
same table the service caches, with row 0 all zeros for an item the stage does not know.

Preprocessing (:class:`Preprocessing`) is fitted on training rows only and saved with the model:
counts get a signed ``log1p``, every numeric feature is standardized with training mean and std,
categories map to a vocabulary of the most frequent training categories (0 = other/unknown).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict

from training.data.contract import GROUPS

HISTORY_COLUMN: Final = "user_history__recent_item_ids"
ANCHORS_COLUMN: Final = "user_interest_anchors__anchor_item_ids"
CATEGORY_COLUMN: Final = "item_content__category"
PSEUDO_COLUMNS: Final = ("pseudo_labels__pseudo_label", "pseudo_labels__confidence")
REQUIRED_REQUEST_COLUMNS: Final = (
    "request_id",
    "user_id",
    "item_id",
    "event_timestamp",
    "stage",
    "group",
    "label",
)

F32 = npt.NDArray[np.float32]
I32 = npt.NDArray[np.int32]
I64 = npt.NDArray[np.int64]


class PrerankerDataError(ValueError):
    """The joined training set cannot train a pre-ranker (empty, single-class, columns missing)."""


class NumericSpec(BaseModel):
    """How one numeric column is transformed: optional signed log1p, then standardization."""

    model_config = ConfigDict(extra="forbid")

    column: str
    log1p: bool
    mean: float
    std: float


class Preprocessing(BaseModel):
    """Everything fitted on training rows that export and serving must repeat exactly."""

    model_config = ConfigDict(extra="forbid")

    user_numeric: list[NumericSpec]
    item_numeric: list[NumericSpec]
    categories: list[str]
    history_length: int
    num_anchors: int
    embedding_dim: int

    @classmethod
    def fit(
        cls,
        table: pa.Table,
        entity_of_view: dict[str, str],
        category_vocab: int,
        history_length: int,
        embedding_dim: int,
    ) -> Preprocessing:
        """Fit on the training rows of a joined table.

        Args:
            table: Joined training rows (``<view>__<feature>`` columns).
            entity_of_view: Feature view name -> "user" or "item" (its join key's side).
            category_vocab: Most frequent categories to keep.
            history_length: Recent positives per user.
            embedding_dim: Width of the item content vectors.
        """
        user: list[NumericSpec] = []
        item: list[NumericSpec] = []
        for name in table.column_names:
            view, sep, _ = name.partition("__")
            side = entity_of_view.get(view)
            if not sep or side is None:
                continue
            typ = table.schema.field(name).type
            if not (pa.types.is_integer(typ) or pa.types.is_floating(typ)):
                continue
            values = _as_float(table.column(name))
            is_count = pa.types.is_integer(typ) and not name.endswith("__missing")
            if is_count:
                values = np.sign(values) * np.log1p(np.abs(values))
            std = float(values.std()) if len(values) else 1.0
            spec = NumericSpec(
                column=name,
                log1p=is_count,
                mean=float(values.mean()) if len(values) else 0.0,
                std=std if std > 1e-6 else 1.0,
            )
            (user if side == "user" else item).append(spec)
        categories: list[str] = []
        if CATEGORY_COLUMN in table.column_names:
            counts = pc.value_counts(table.column(CATEGORY_COLUMN)).to_pylist()
            counts = [c for c in counts if c["values"]]
            counts.sort(key=lambda c: (-c["counts"], c["values"]))
            categories = [c["values"] for c in counts[:category_vocab]]
        anchors = 0
        if ANCHORS_COLUMN in table.column_names and table.num_rows:
            lengths = pc.list_value_length(table.column(ANCHORS_COLUMN))
            anchors = int(pc.max(lengths).as_py() or 0)
        return cls(
            user_numeric=user,
            item_numeric=item,
            categories=categories,
            history_length=history_length,
            num_anchors=max(anchors, 1),
            embedding_dim=embedding_dim,
        )

    def transform(self, table: pa.Table, specs: list[NumericSpec]) -> F32:
        """The standardized numeric matrix of ``specs`` for every row of ``table``."""
        out = np.zeros((table.num_rows, len(specs)), dtype=np.float32)
        for j, spec in enumerate(specs):
            if spec.column not in table.column_names:
                raise PrerankerDataError(f"feature {spec.column!r} is missing from the join")
            values = _as_float(table.column(spec.column))
            if spec.log1p:
                values = np.sign(values) * np.log1p(np.abs(values))
            out[:, j] = (values - spec.mean) / spec.std
        return out


def _as_float(column: pa.ChunkedArray | pa.Array) -> npt.NDArray[np.float64]:
    values = column.cast(pa.float64()).to_numpy(zero_copy_only=False)
    # Non-finite values are missing (0), as in the exported graph's preprocessing.
    return np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)


@dataclass
class ItemTable:
    """Item ids and content vectors; index 0 is the all-zero vector of unknown items."""

    item_ids: npt.NDArray[np.str_]
    embeddings: F32  # (n_items + 1, dim), row 0 zeros

    @classmethod
    def from_semantics(cls, semantics: pa.Table) -> ItemTable:
        """Build from an ``item_semantics`` table (item_id, content_embedding)."""
        ids = np.asarray(semantics.column("item_id").to_pylist(), dtype=str)
        emb = semantics.column("content_embedding").combine_chunks()
        dim = len(emb[0]) if len(emb) else 0
        flat = np.asarray(emb.flatten().to_numpy(zero_copy_only=False), dtype=np.float32)
        matrix = np.zeros((len(ids) + 1, dim), dtype=np.float32)
        matrix[1:] = flat.reshape(len(ids), dim)
        return cls(item_ids=ids, embeddings=matrix)

    @property
    def dim(self) -> int:
        """Width of the content vectors."""
        return int(self.embeddings.shape[1])

    @cached_property
    def _sorted(self) -> tuple[I64, npt.NDArray[np.str_]]:
        order = np.argsort(self.item_ids)
        return order, self.item_ids[order]

    def lookup(self, ids: npt.NDArray[np.str_]) -> I32:
        """1-based row of each id in :attr:`embeddings`; 0 for unknown ids."""
        order, sorted_ids = self._sorted
        pos = np.searchsorted(sorted_ids, ids)
        pos = np.clip(pos, 0, max(len(sorted_ids) - 1, 0))
        found = (len(sorted_ids) > 0) & (sorted_ids[pos] == ids) if len(sorted_ids) else None
        out = np.zeros(len(ids), dtype=np.int32)
        if found is not None:
            out[found] = order[pos[found]] + 1
        return out

    def lookup_lists(self, column: pa.ChunkedArray | pa.Array, width: int, keep: str) -> I32:
        """Pad/truncate list<string> rows to ``width`` indices (0 = padding or unknown).

        Args:
            column: list<string> per row.
            width: Output columns.
            keep: "last" keeps the most recent (histories, oldest first), "first" the best
                (anchors, best first).
        """
        arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        n = len(arr)
        out = np.zeros((n, width), dtype=np.int32)
        if n == 0:
            return out
        offsets = arr.offsets.to_numpy()
        values = np.asarray(arr.flatten().to_pylist(), dtype=str)
        idx = self.lookup(values) if len(values) else np.zeros(0, np.int32)
        lengths = np.diff(offsets)
        take = np.minimum(lengths, width)
        row = np.repeat(np.arange(n), take)
        pos = np.arange(take.sum()) - np.repeat(np.cumsum(take) - take, take)
        if keep == "last":
            src = np.repeat(offsets[1:] - take, take) + pos
        else:
            src = np.repeat(offsets[:-1], take) + pos
        out[row, pos] = idx[src - offsets[0]]
        return out


@dataclass
class PrerankData:
    """A request-grouped dataset ready for the models.

    Rows are ordered by request; ``offsets[r]:offsets[r+1]`` are request ``r``'s rows.
    """

    request_ids: npt.NDArray[np.str_]
    user_ids: npt.NDArray[np.str_]
    request_ts: I64  # microseconds
    offsets: I64
    user_numeric: F32  # (R, Fu)
    history: I32  # (R, H) item rows, 0 = padding
    anchors: I32  # (R, A) item rows, 0 = padding
    row_request: I32  # (N,)
    item_ids: npt.NDArray[np.str_]
    item_numeric: F32  # (N, Fi)
    category: I64  # (N,)
    item: I32  # (N,) item rows, 0 = unknown
    group: npt.NDArray[np.int8]  # (N,) index into contract GROUPS
    stage: npt.NDArray[np.str_]
    label: F32  # (N,) NaN when unexposed
    pseudo: F32  # (N,) NaN when no pseudo-label
    confidence: F32  # (N,) 0 when no pseudo-label
    cross: F32  # (N, 4) see cross_features
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def n_requests(self) -> int:
        """Number of requests."""
        return len(self.request_ids)

    @property
    def n_rows(self) -> int:
        """Number of candidate rows."""
        return len(self.row_request)

    def rows_of(self, requests: I64) -> I64:
        """Row indices of the given requests, request by request."""
        starts = self.offsets[requests]
        lengths = self.offsets[requests + 1] - starts
        base = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
        return (base + np.arange(lengths.sum())).astype(np.int64)

    def select_requests(self, requests: I64) -> PrerankData:
        """A new dataset with only ``requests`` (in the given order)."""
        rows = self.rows_of(requests)
        lengths = self.offsets[requests + 1] - self.offsets[requests]
        return PrerankData(
            request_ids=self.request_ids[requests],
            user_ids=self.user_ids[requests],
            request_ts=self.request_ts[requests],
            offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            user_numeric=self.user_numeric[requests],
            history=self.history[requests],
            anchors=self.anchors[requests],
            row_request=np.repeat(np.arange(len(requests)), lengths).astype(np.int32),
            item_ids=self.item_ids[rows],
            item_numeric=self.item_numeric[rows],
            category=self.category[rows],
            item=self.item[rows],
            group=self.group[rows],
            stage=self.stage[rows],
            label=self.label[rows],
            pseudo=self.pseudo[rows],
            confidence=self.confidence[rows],
            cross=self.cross[rows],
            info=dict(self.info),
        )


def check_columns(table: pa.Table, need_pseudo: bool) -> None:
    """Fail with one message naming every column the pre-ranker needs but the join lacks."""
    needed = [*REQUIRED_REQUEST_COLUMNS, HISTORY_COLUMN, ANCHORS_COLUMN]
    if need_pseudo:
        needed += list(PSEUDO_COLUMNS)
    absent = [c for c in needed if c not in table.column_names]
    if absent:
        raise PrerankerDataError(
            f"the joined training set lacks {absent}; join the 'preranker' FeatureService "
            "(and 'training_labels' for pseudo-labels) first"
        )


def encode(
    table: pa.Table, items: ItemTable, prep: Preprocessing, need_pseudo: bool = False
) -> PrerankData:
    """Turn joined rows into a :class:`PrerankData` (rows regrouped by request)."""
    check_columns(table, need_pseudo)
    if table.num_rows == 0:
        raise PrerankerDataError("the training set is empty")
    ts = pc.cast(
        table.column("event_timestamp").cast(pa.timestamp("us", tz="UTC")), pa.int64()
    ).to_numpy(zero_copy_only=False)
    req = np.asarray(table.column("request_id").to_pylist(), dtype=str)
    order = np.lexsort((req, ts))
    table = table.take(pa.array(order))
    req, ts = req[order], ts[order]
    first = np.ones(len(req), dtype=bool)
    first[1:] = req[1:] != req[:-1]
    starts = np.flatnonzero(first)
    offsets = np.concatenate([starts, [len(req)]]).astype(np.int64)
    if len(np.unique(req[starts])) != len(starts):
        raise PrerankerDataError("a request_id has rows at different timestamps")
    row_request = (np.cumsum(first) - 1).astype(np.int32)
    head = table.take(pa.array(starts))

    cats = (
        np.asarray(pc.fill_null(table.column(CATEGORY_COLUMN), "").to_pylist(), dtype=str)
        if (CATEGORY_COLUMN in table.column_names)
        else np.full(table.num_rows, "", dtype=str)
    )
    vocab = {c: i + 1 for i, c in enumerate(prep.categories)}
    category = np.fromiter((vocab.get(c, 0) for c in cats), dtype=np.int64, count=len(cats))

    group_index = {g: i for i, g in enumerate(GROUPS)}
    groups = table.column("group").to_pylist()
    group = np.fromiter((group_index[g] for g in groups), dtype=np.int8, count=len(groups))
    label = np.asarray(
        pc.cast(table.column("label"), pa.float32()).to_numpy(zero_copy_only=False),
        dtype=np.float32,
    )
    if need_pseudo:
        pseudo = np.asarray(
            table.column(PSEUDO_COLUMNS[0]).to_numpy(zero_copy_only=False), dtype=np.float32
        )
        conf = np.asarray(
            table.column(PSEUDO_COLUMNS[1]).to_numpy(zero_copy_only=False), dtype=np.float32
        )
        conf = np.where(np.isfinite(pseudo) & np.isfinite(conf), conf, 0.0).astype(np.float32)
    else:
        pseudo = np.full(table.num_rows, np.nan, dtype=np.float32)
        conf = np.zeros(table.num_rows, dtype=np.float32)
    item_ids = np.asarray(table.column("item_id").to_pylist(), dtype=str)
    item = items.lookup(item_ids)
    history = items.lookup_lists(head.column(HISTORY_COLUMN), prep.history_length, "last")
    anchors = items.lookup_lists(head.column(ANCHORS_COLUMN), prep.num_anchors, "first")
    return PrerankData(
        request_ids=req[starts],
        user_ids=np.asarray(head.column("user_id").to_pylist(), dtype=str),
        request_ts=ts[starts].astype(np.int64),
        offsets=offsets,
        user_numeric=prep.transform(head, prep.user_numeric),
        history=history,
        anchors=anchors,
        row_request=row_request,
        item_ids=item_ids,
        item_numeric=prep.transform(table, prep.item_numeric),
        category=category,
        item=item,
        group=group,
        stage=np.asarray(table.column("stage").to_pylist(), dtype=str),
        label=label,
        pseudo=pseudo,
        confidence=conf,
        cross=cross_features(items.embeddings, offsets, item, history, anchors),
    )


def cross_features(embeddings: F32, offsets: I64, item: I32, history: I32, anchors: I32) -> F32:
    """Per row: max cosine to the user's anchors, has-anchors, max cosine to history, has-history.

    The content vectors are frozen, so these user x candidate similarities are inputs, computed
    once per request (one small matmul each) instead of inside every training step. The
    service computes the same four numbers from its item cache (:func:`cross_one_request`).
    """
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    unit = (embeddings / np.maximum(norms, 1e-12)).astype(np.float32)
    out = np.zeros((len(item), 4), dtype=np.float32)
    for r in range(len(offsets) - 1):
        lo, hi = int(offsets[r]), int(offsets[r + 1])
        out[lo:hi] = cross_one_request(unit, item[lo:hi], history[r], anchors[r])
    return out


def cross_one_request(unit: F32, item: I32, history: I32, anchors: I32) -> F32:
    """:func:`cross_features` for one request's candidates (``unit``: normalized vectors)."""
    out = np.zeros((len(item), 4), dtype=np.float32)
    cand = unit[item]
    for j, slots in enumerate((anchors, history)):
        ids = slots[slots > 0]
        if len(ids):
            out[:, 2 * j] = (cand @ unit[ids].T).max(axis=1)
            out[:, 2 * j + 1] = 1.0
    return out


def split_by_time(data: PrerankData, fraction: float) -> tuple[PrerankData, PrerankData]:
    """The earliest ``1 - fraction`` of requests and the latest ``fraction`` (validation)."""
    order = np.argsort(data.request_ts, kind="stable")
    n_val = max(1, round(len(order) * fraction))
    if len(order) - n_val < 1:
        raise PrerankerDataError(f"{len(order)} requests are too few to hold out a validation set")
    return data.select_requests(order[:-n_val]), data.select_requests(order[-n_val:])


def check_trainable(data: PrerankData) -> None:
    """Fail clearly when there is nothing to learn from (no exposed rows, or one class)."""
    exposed = np.isfinite(data.label)
    if not exposed.any():
        raise PrerankerDataError("the training set has no exposed (labelled) rows")
    labels = np.unique(data.label[exposed])
    if len(labels) < 2:
        raise PrerankerDataError(
            f"every exposed row has label {labels[0]:g}: a single-class training set cannot "
            "train a click model"
        )
