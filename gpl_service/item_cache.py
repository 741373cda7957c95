"""The in-process item cache: every item's online features in flat numpy arrays.

Per request the service needs features of thousands of items; reading them from the online
store each time would cost more than the whole latency budget. So the cache is filled from the
online store at start-up (every item entity the store holds, every online item view), kept as
arrays indexed by ``item_id -> row`` (:class:`~gpl_service.id_index.IdIndex`), and replaced
wholesale when a materialization changes an item view (:mod:`gpl_service.watcher`). Items a
request names that the cache lacks are read from the store on the spot and appended; items the
store lacks too are *unknown*: they get the views' declared defaults and missing indicators
(row 0), and are remembered as unknown until the next refresh so repeated requests do not hit
the store again.

Layout (row 0 is the unknown item):

* ``numeric``: (rows, C) float32, every numeric item feature ``<view>__<feature>`` plus one
  ``<view>__missing`` indicator per view, as the training-set builder names them;
* ``strings``: per string feature, an int32 code per row into a growing list of values;
* ``emb``: (rows, D) float32 content vectors from ``item_semantics`` (zeros when absent);
* ``event_ts``: per view, the row's event time (NaN when absent), for ttl checks at read time.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from gpl_service.id_index import IdIndex
from gpl_service.online import OnlineReader, Row, ViewSpec

EMBEDDING_VIEW: Final = "item_semantics"
EMBEDDING_FEATURE: Final = "content_embedding"
F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]


def _is_numeric(value: Any) -> bool:
    return isinstance(value, int | float | bool) and not isinstance(value, str)


@dataclass
class ItemLayout:
    """Which item views and features the cache holds, in column order."""

    views: list[ViewSpec]
    numeric: list[str]  # <view>__<feature> and <view>__missing
    strings: list[str]  # <view>__<feature> of string features
    dim: int

    @classmethod
    def of(cls, views: Sequence[ViewSpec], dim: int) -> ItemLayout:
        """Columns of ``views``: scalar numeric and string features; lists only the embedding."""
        numeric: list[str] = []
        strings: list[str] = []
        for spec in views:
            for name in spec.features:
                default = spec.defaults[name]
                col = f"{spec.name}__{name}"
                if name in spec.list_features:
                    continue
                if isinstance(default, str):
                    strings.append(col)
                elif _is_numeric(default):
                    numeric.append(col)
            numeric.append(f"{spec.name}__missing")
        return cls(list(views), numeric, strings, dim)

    @cached_property
    def defaults(self) -> dict[str, Any]:
        """``<view>__<feature>`` -> the field's declared default."""
        return {f"{s.name}__{n}": s.defaults[n] for s in self.views for n in s.features}

    @cached_property
    def column(self) -> dict[str, int]:
        """Numeric column name -> its index."""
        return {c: j for j, c in enumerate(self.numeric)}

    @cached_property
    def view_columns(self) -> dict[str, npt.NDArray[np.int64]]:
        """View name -> indices of its numeric columns (missing indicator included)."""
        return {
            s.name: np.array(
                [j for j, c in enumerate(self.numeric) if c.startswith(f"{s.name}__")], np.int64
            )
            for s in self.views
        }

    @cached_property
    def default_row(self) -> F32:
        """The numeric row of an item no view knows: defaults, every missing indicator 1.

        Shared: copy it before writing into it.
        """
        out = np.zeros(len(self.numeric), np.float32)
        for j, col in enumerate(self.numeric):
            out[j] = 1.0 if col.endswith("__missing") else float(self.defaults[col])
        return out


@dataclass
class ItemSnapshot:
    """One generation of the cache. Rows are only ever appended; a refresh makes a new one."""

    layout: ItemLayout
    generation: int
    numeric: F32
    strings: dict[str, npt.NDArray[np.int32]]
    string_values: dict[str, list[str]]
    emb: F32
    event_ts: dict[str, npt.NDArray[np.float64]]
    index: IdIndex
    size: int  # rows in use, row 0 included
    loaded_at: float
    fill_seconds: float = 0.0
    materialized: dict[str, float] = field(default_factory=dict)
    unknown: OrderedDict[str, None] = field(default_factory=OrderedDict)
    bad_vectors: int = 0  # items whose content vector is the wrong width or not finite (zeros)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _string_codes: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def items(self) -> int:
        """Items held (row 0 excluded)."""
        return self.size - 1

    @classmethod
    def empty(cls, layout: ItemLayout, generation: int, capacity: int) -> ItemSnapshot:
        """A snapshot holding only row 0 (the unknown item)."""
        cap = max(capacity + 1, 16)
        numeric = np.zeros((cap, len(layout.numeric)), np.float32)
        numeric[0] = layout.default_row
        snap = cls(
            layout=layout,
            generation=generation,
            numeric=numeric,
            strings={c: np.zeros(cap, np.int32) for c in layout.strings},
            string_values={},
            emb=np.zeros((cap, layout.dim), np.float32),
            event_ts={s.name: np.full(cap, np.nan) for s in layout.views},
            index=IdIndex(),
            size=1,
            loaded_at=time.time(),
        )
        for col in layout.strings:  # code 0 is the default value
            snap.string_values[col] = [str(layout.defaults[col])]
            snap._string_codes[col] = {str(layout.defaults[col]): 0}
        return snap

    def _grow(self, needed: int) -> None:
        cap = len(self.numeric)
        if needed <= cap:
            return
        new = max(needed, cap * 2)

        def grown(arr: npt.NDArray[Any], fill: float = 0.0) -> npt.NDArray[Any]:
            out = np.full((new, *arr.shape[1:]), fill, dtype=arr.dtype)
            out[:cap] = arr
            return out

        # Readers may hold the old arrays; they stay valid for every row they can index.
        self.numeric = grown(self.numeric)
        self.emb = grown(self.emb)
        self.strings = {c: grown(a) for c, a in self.strings.items()}
        self.event_ts = {v: grown(a, np.nan) for v, a in self.event_ts.items()}

    def _code(self, col: str, value: str) -> int:
        codes = self._string_codes[col]
        code = codes.get(value)
        if code is None:
            code = len(self.string_values[col])
            self.string_values[col].append(value)
            codes[value] = code
        return code

    def add(self, ids: Sequence[str], rows_by_view: dict[str, list[Row]]) -> list[int]:
        """Append items (their rows per view, aligned with ``ids``); return their row numbers.

        An item with no row in any view is not added (row 0 is returned for it).
        """
        layout = self.layout
        with self._lock:
            self._grow(self.size + len(ids))
            out: list[int] = []
            added: dict[str, int] = {}
            col_of = layout.column
            for k, item_id in enumerate(ids):
                known = self.index.get(item_id) or added.get(item_id)
                if known:
                    out.append(known)
                    continue
                present = [s for s in layout.views if rows_by_view[s.name][k].values is not None]
                if not present:
                    out.append(0)
                    continue
                r = self.size
                row = layout.default_row.copy()
                for spec in layout.views:
                    got = rows_by_view[spec.name][k]
                    values = got.values
                    if values is None:
                        continue
                    self.event_ts[spec.name][r] = got.event_ts if got.event_ts else np.nan
                    # As the training join does: a row whose features are all null is missing.
                    if any(values.get(name) is not None for name in spec.features):
                        row[col_of[f"{spec.name}__missing"]] = 0.0
                    for name in spec.features:
                        col = f"{spec.name}__{name}"
                        value = values.get(name)
                        if spec.name == EMBEDDING_VIEW and name == EMBEDDING_FEATURE:
                            vector = None if value is None else np.asarray(value, np.float32)
                            if (
                                vector is not None
                                and len(vector) == layout.dim
                                and np.isfinite(vector).all()
                            ):
                                self.emb[r] = vector
                            elif value:  # another width or non-finite: the item has no content
                                self.bad_vectors += 1
                        elif col in col_of and value is not None:
                            row[col_of[col]] = float(value)
                        elif col in self._string_codes:
                            text = spec.defaults[name] if value is None else str(value)
                            self.strings[col][r] = self._code(col, text)
                self.numeric[r] = row
                added[item_id] = r
                self.size = r + 1
                out.append(r)
            self.index.extend(list(added), list(added.values()))
            return out

    def remember_unknown(self, ids: Sequence[str], limit: int) -> None:
        """Remember ids the store lacks, oldest forgotten first beyond ``limit``."""
        if limit <= 0:
            return
        with self._lock:
            for item_id in ids:
                self.unknown[item_id] = None
                self.unknown.move_to_end(item_id)
            while len(self.unknown) > limit:
                self.unknown.popitem(last=False)


def read_items(
    reader: OnlineReader,
    layout: ItemLayout,
    ids: Sequence[str],
    chunk: int,
    progress: Callable[[int], None] | None = None,
) -> dict[str, list[Row]]:
    """Rows of every cached view for ``ids``, read in chunks of ``chunk`` entities."""
    out: dict[str, list[Row]] = {s.name: [] for s in layout.views}
    for lo in range(0, len(ids), chunk):
        part = ids[lo : lo + chunk]
        for spec in layout.views:
            out[spec.name].extend(reader.read(spec, part))
        if progress is not None:
            progress(len(part))
    return out


def fill_snapshot(
    reader: OnlineReader,
    layout: ItemLayout,
    generation: int,
    chunk: int,
    materialized: dict[str, float] | None = None,
    ids: Sequence[str] | None = None,
) -> ItemSnapshot:
    """A new snapshot holding every item entity the online store has (or ``ids``).

    Raises:
        gpl_service.online.StoreUnavailableError: when the store cannot be read.
    """
    began = time.perf_counter()
    if ids is None:
        ids = reader.entity_ids("item_id", [s.name for s in layout.views])
    snap = ItemSnapshot.empty(layout, generation, len(ids))
    for lo in range(0, len(ids), chunk):
        part = ids[lo : lo + chunk]
        snap.add(part, read_items(reader, layout, part, chunk))
    snap.fill_seconds = time.perf_counter() - began
    snap.materialized = dict(materialized or {})
    snap.loaded_at = time.time()
    return snap
