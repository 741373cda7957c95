"""Precomputed item states: each model's item graph run once per cached item, not per request.

Every model of a bundle splits into an item graph (what depends on the candidate alone: input
standardization, the item tower, the expressive model's attention query) and a score graph
(:mod:`export.onnx_export`). The item half is most of the light model's work per candidate, and
an item's inputs only change when a materialization changes its views, so the service runs the
item graphs over the whole item cache when a snapshot or a bundle is swapped in, and per request
only gathers rows of the result and runs the score graphs.

Three cases are computed per request instead, so served scores stay equal to the full graph:

* items appended to the snapshot since (cache misses): their states are computed on first use
  and appended (:meth:`StateTable.ensure`);
* rows a request finds past a view's ``ttl``: their inputs become the view's defaults at request
  time, so their state is computed from those inputs on the spot (:mod:`gpl_service.scoring`);
* the unknown item (row 0) is precomputed like any other row, from the defaults.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from gpl_service.item_cache import ItemSnapshot
from gpl_service.models import LoadedBundle

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]
CHUNK: Final = 8192
"""Rows per item-graph call when filling (bounds the graph's working memory)."""

InputsOf = Callable[[ItemSnapshot, I64], tuple[F32, I64, F32]]
"""(snapshot, rows) -> the item graph's raw inputs (item_features, category, item_emb)."""


@dataclass(frozen=True)
class StateTable:
    """Item states of one snapshot for one bundle: ``states[kind][row]``.

    A request holding a table only reads rows below its ``rows``; growing writes rows above it
    (into spare capacity, or into bigger copies) and publishes a new table.

    Attributes:
        snapshot: The snapshot whose rows these are.
        states: Model kind -> (capacity >= rows, S) float32.
        rows: Rows covered (row 0 included).
        seconds: Time spent computing them.
    """

    snapshot: ItemSnapshot
    states: dict[str, F32]
    rows: int
    seconds: float


def compute_states(
    bundle: LoadedBundle, inputs_of: InputsOf, snap: ItemSnapshot, lo: int, hi: int
) -> dict[str, F32]:
    """Item states of rows ``lo..hi-1`` of ``snap`` for every split model of ``bundle``."""
    out = {k: np.empty((hi - lo, s.width), np.float32) for k, s in bundle.split.items()}
    for start in range(lo, hi, CHUNK):
        stop = min(hi, start + CHUNK)
        numeric, category, emb = inputs_of(snap, np.arange(start, stop, dtype=np.int64))
        for kind in bundle.split:
            out[kind][start - lo : stop - lo] = bundle.item_state(kind, numeric, category, emb)
    return out


def _grown(arr: F32, capacity: int, rows: int) -> F32:
    out = np.empty((capacity, arr.shape[1]), np.float32)
    out[:rows] = arr[:rows]
    return out


class ItemStates:
    """The current :class:`StateTable` of a bundle, rebuilt per snapshot, extended on misses."""

    def __init__(self, bundle: LoadedBundle, inputs_of: InputsOf) -> None:
        self.bundle = bundle
        self.inputs_of = inputs_of
        self._table: StateTable | None = None
        self._lock = threading.Lock()

    def table(self, snap: ItemSnapshot) -> StateTable:
        """States covering every row ``snap`` holds now (computed here if they are not yet)."""
        table = self._table
        size = snap.size
        if table is not None and table.snapshot is snap and table.rows >= size:
            return table
        with self._lock:
            table = self._table
            size = snap.size
            began = time.perf_counter()
            if table is None or table.snapshot is not snap:
                states = compute_states(self.bundle, self.inputs_of, snap, 0, size)
                table = StateTable(snap, states, size, time.perf_counter() - began)
            elif table.rows < size:
                more = compute_states(self.bundle, self.inputs_of, snap, table.rows, size)
                states = table.states
                capacity = len(next(iter(states.values()), np.zeros(0)))
                if size > capacity:  # double, so appending misses costs O(1) per row overall
                    grown = max(size, 2 * capacity)
                    states = {k: _grown(v, grown, table.rows) for k, v in states.items()}
                for kind, block in more.items():
                    states[kind][table.rows : size] = block
                table = StateTable(snap, states, size, table.seconds + time.perf_counter() - began)
            self._table = table
            return table
