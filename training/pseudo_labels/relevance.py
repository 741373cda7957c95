"""Max-pooled cosine relevance of candidates to a user's interest anchors.

All vectors are L2-normalized, so a dot product is a cosine. Rows are processed grouped by anchor
set, so the anchors (loaded once per user and cutoff, by the job's anchor bank) are reused for
every candidate of every request that uses them, never recomputed per candidate.

Two kernels compute the same thing:

* :func:`max_cosine` (the job's): one compiled (numba) loop that reads each candidate's content
  vector once and keeps a running maximum over the anchors, four candidates against two anchors
  at a time, so every vector it loads feeds several multiply-adds. It writes no gathered copy of
  the candidates and no ``(rows x anchors)`` score matrix.
* :func:`max_cosine_blas`, the reference: per anchor set, a gather of its candidates and one
  ``(m x D) @ (D x N)`` matrix product. A product with only ``N`` (~10) columns runs far below
  BLAS's peak (measured here: 16 GFLOP/s for a contiguous 1M x 384 @ 384 x 10 product against
  112 GFLOP/s for a square one), which is why the fused loop is 1.4-2.1x faster on 2 cores.

Both split the groups across threads (one per core by default): the groups are independent, the
compiled loop and numpy's gather and product release the GIL, and results do not depend on the
number of threads.

The fused kernel is bound by memory traffic: every scoring reads one 1.5 KB content vector, and a
catalog's table (77 MB for 50,000 x 384 floats) is larger than the last-level cache. It therefore
groups rows by (slice of the item table, anchor set) rather than by set alone: all threads work
through one slice of about a third of the last-level cache at a time, so after its first read a
vector comes from the cache for every other candidate row of the slice (1.3-1.45x the kernel
grouped by set alone, measured on a 32 MB-L3 box). A set's anchors are then read once per slice
instead of once, which is why a batch is cut into only as many slices as keep its groups at
:data:`MIN_GROUP_ROWS` rows or more on average.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import numpy as np
import numpy.typing as npt
from threadpoolctl import ThreadpoolController

from training.jit import compiled
from training.threads import default_workers

FloatMatrix = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]


@cache
def _threadpools() -> ThreadpoolController:
    # Found once per process: scanning the loaded libraries took ~2 ms per call, per batch.
    return ThreadpoolController()


#: Rows a (slice, set) group should hold on average before a batch is cut into more slices: each
#: group re-reads its set's anchors (15 KB for 10 x 384 floats), so tiny groups would trade the
#: cache's savings on candidate vectors for anchor reads (16/32/64 measured within noise).
MIN_GROUP_ROWS = 32

#: Last-level cache size assumed where the system does not say (Linux's sysfs does).
FALLBACK_CACHE_BYTES = 16 * 2**20


@cache
def last_level_cache_bytes() -> int:
    """Size of this machine's last-level CPU cache, from sysfs on Linux (else a fallback)."""
    best_level, size = 0, FALLBACK_CACHE_BYTES
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            level = int((index / "level").read_text())
            kind = (index / "type").read_text().strip()
            text = (index / "size").read_text().strip()
        except (OSError, ValueError):
            continue
        if kind == "Instruction" or level <= best_level:
            continue
        units = {"K": 2**10, "M": 2**20, "G": 2**30}
        try:
            value = int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
        except ValueError:
            continue
        best_level, size = level, value
    return size


def default_slice_bytes() -> int:
    """Bytes of item table per slice: a third of the last-level cache.

    The slice shares the cache with the anchors, the row indices and the other process's data;
    on a 32 MB-L3 box slices of 6 and 12 MB ran at 1.30-1.45x, 24 MB at 1.25x.
    """
    return max(1, last_level_cache_bytes() // 3)


def slice_count(table_bytes: int, rows: int, used_sets: int, slice_bytes: int) -> int:
    """How many slices of the item table a batch is worked through in.

    Enough for each slice to fit ``slice_bytes``, but no more than keep the (slice, set) groups at
    :data:`MIN_GROUP_ROWS` rows on average; at least one.
    """
    by_cache = -(-table_bytes // slice_bytes)
    by_rows = rows // max(1, used_sets * MIN_GROUP_ROWS)
    return max(1, min(by_cache, by_rows))


@cache
def _pool(workers: int, pid: int) -> ThreadPoolExecutor:
    # One pool per process and size, kept: starting two threads per call cost ~4 ms a batch. The
    # pid is part of the key because a forked child inherits the pool without its threads.
    return ThreadPoolExecutor(workers, thread_name_prefix="relevance")


@compiled
def _fused_groups(
    table: FloatMatrix,
    sorted_items: IntArray,
    anchor_vectors: FloatMatrix,
    anchor_rows: IntArray,
    counts: IntArray,
    starts: IntArray,
    ends: IntArray,
    sets: IntArray,
    relevance: npt.NDArray[np.float32],
    matched: IntArray,
) -> None:  # pragma: no cover - compiled; covered through max_cosine
    dim = table.shape[1]
    for g in range(starts.shape[0]):
        chosen = anchor_rows[sets[g]]
        n = counts[sets[g]]
        last = ends[g] - 1
        r = starts[g]
        while r <= last:
            # Four rows at a time; past the group's end the last row is repeated (same answer
            # written twice) so the block needs no tail loop. The 4 x 2 block is written out by
            # hand on purpose: named scalars stay in registers, while a row against all anchors
            # accumulated in a small local array ran at 0.5M scorings/s (this block: 3.6M).
            p0 = r
            p1 = min(r + 1, last)
            p2 = min(r + 2, last)
            p3 = min(r + 3, last)
            v0 = table[sorted_items[p0]]
            v1 = table[sorted_items[p1]]
            v2 = table[sorted_items[p2]]
            v3 = table[sorted_items[p3]]
            b0 = b1 = b2 = b3 = np.float32(-np.inf)
            w0 = w1 = w2 = w3 = 0
            for k in range(0, n, 2):
                # An odd last anchor is paired with itself: the tie keeps the lower slot.
                j = min(k + 1, n - 1)
                a = anchor_vectors[chosen[k]]
                c = anchor_vectors[chosen[j]]
                s0a = s1a = s2a = s3a = s0c = s1c = s2c = s3c = np.float32(0.0)
                for d in range(dim):
                    s0a += v0[d] * a[d]
                    s1a += v1[d] * a[d]
                    s2a += v2[d] * a[d]
                    s3a += v3[d] * a[d]
                    s0c += v0[d] * c[d]
                    s1c += v1[d] * c[d]
                    s2c += v2[d] * c[d]
                    s3c += v3[d] * c[d]
                # Strict comparisons in slot order: the first of equal maxima wins, as argmax.
                if s0a > b0:
                    b0, w0 = s0a, k
                if s0c > b0:
                    b0, w0 = s0c, j
                if s1a > b1:
                    b1, w1 = s1a, k
                if s1c > b1:
                    b1, w1 = s1c, j
                if s2a > b2:
                    b2, w2 = s2a, k
                if s2c > b2:
                    b2, w2 = s2c, j
                if s3a > b3:
                    b3, w3 = s3a, k
                if s3c > b3:
                    b3, w3 = s3c, j
            relevance[p0] = b0
            matched[p0] = w0
            relevance[p1] = b1
            matched[p1] = w1
            relevance[p2] = b2
            matched[p2] = w2
            relevance[p3] = b3
            matched[p3] = w3
            r += 4


@compiled
def _bucket_rows(keys: IntArray, n_keys: int) -> tuple[IntArray, IntArray]:  # pragma: no cover
    """Stable counting sort: rows by key; key k's rows are ``order[bounds[k]:bounds[k + 1]]``."""
    bounds = np.zeros(n_keys + 1, np.int64)
    for k in keys:
        bounds[k + 1] += 1
    for k in range(n_keys):
        bounds[k + 1] += bounds[k]
    fill = bounds[:-1].copy()
    order = np.empty(keys.shape[0], np.int64)
    for r in range(keys.shape[0]):
        order[fill[keys[r]]] = r
        fill[keys[r]] += 1
    return order, bounds


def _sliced_groups(
    item_index: IntArray, set_index: IntArray, n_items: int, n_sets: int, slice_items: int
) -> tuple[IntArray, IntArray, IntArray, IntArray, IntArray]:
    """Rows grouped by (item-table slice, anchor set), slices in table order.

    Returns:
        ``(order, starts, ends, sets, slices)``: the rows in group order, each group's
        ``[start, end)`` run in that order, its anchor set and its slice.
    """
    # Keys over the sets this batch uses only, so the counting array stays small when the bank
    # holds many more sets than one batch touches.
    present = np.bincount(set_index, minlength=n_sets) > 0
    used = np.flatnonzero(present)
    local = np.cumsum(present) - 1
    keys = (item_index // slice_items) * len(used) + local[set_index]
    n_slices = -(-n_items // slice_items)
    order, bounds = _bucket_rows(keys.astype(np.int64), n_slices * len(used))
    nonempty = np.flatnonzero(np.diff(bounds))
    starts = bounds[nonempty]
    ends = bounds[nonempty + 1]
    return order, starts, ends, used[nonempty % len(used)], nonempty // len(used)


def _split_slices(
    starts: IntArray, ends: IntArray, slices: IntArray, workers: int
) -> list[IntArray]:
    """Groups per thread: each slice's groups cut into ``workers`` runs of about equal rows.

    Every thread then works in the same slice as the others at the same time, so one slice of the
    item table is in the cache for all of them, not one per thread.
    """
    first = np.searchsorted(slices, slices, side="left")
    last = np.searchsorted(slices, slices, side="right") - 1
    slice_start = starts[first]
    slice_rows = ends[last] - slice_start
    # A group goes to the thread whose share of the slice holds its middle row; the shares run
    # backwards in every other slice so that the groups straddling a cut do not always fall to
    # the same thread.
    middle = (starts + ends - 1) // 2 - slice_start
    owner = np.minimum(middle * workers // slice_rows, workers - 1)
    owner = np.where(slices % 2 == 1, workers - 1 - owner, owner)
    return [np.flatnonzero(owner == w) for w in range(workers)]


def _groups(set_index: IntArray) -> tuple[IntArray, IntArray, IntArray]:
    """Rows sorted by anchor set, and each set's ``[start, end)`` run in that order."""
    order = np.argsort(set_index, kind="stable")
    bounds = np.flatnonzero(np.diff(set_index[order])) + 1
    starts = np.concatenate([[0], bounds]).astype(np.int64)
    ends = np.concatenate([bounds, [len(order)]]).astype(np.int64)
    return order, starts, ends


def _spans(starts: IntArray, rows: int, workers: int) -> list[tuple[int, int]]:
    """Contiguous runs of groups holding about the same number of rows each."""
    cuts = np.searchsorted(starts, np.linspace(0, rows, workers + 1)[1:-1]).tolist()
    return list(zip([0, *cuts], [*cuts, len(starts)], strict=True))


def _run(work: Callable[[int, int], None], starts: IntArray, rows: int, workers: int) -> None:
    if workers <= 1:
        work(0, len(starts))
        return
    with ThreadPoolExecutor(workers) as pool:
        for done in [pool.submit(work, a, b) for a, b in _spans(starts, rows, workers)]:
            done.result()


def max_cosine(
    item_embeddings: FloatMatrix,
    item_index: IntArray,
    anchors: npt.NDArray[np.float32],
    anchor_mask: npt.NDArray[np.bool_],
    set_index: IntArray,
    workers: int | None = None,
    slice_bytes: int | None = None,
) -> tuple[npt.NDArray[np.float32], IntArray]:
    """Relevance r = max over a row's anchors of cos(candidate, anchor), and which anchor won.

    Args:
        item_embeddings: ``(n_items, D)`` normalized item content embeddings.
        item_index: ``(R,)`` row -> item row in ``item_embeddings`` (all valid).
        anchors: ``(S, N, D)`` normalized anchor embeddings of ``S`` anchor sets.
        anchor_mask: ``(S, N)`` which anchor slots are real: each set's real anchors come first
            (sets may have fewer than ``N``).
        set_index: ``(R,)`` row -> anchor set.
        workers: Threads (default: one per available core; results do not depend on it).
        slice_bytes: Bytes of the item table worked through at a time (default: a third of the
            last-level cache, :func:`default_slice_bytes`; results do not depend on it).

    Returns:
        ``(relevance, matched)``: float32 ``(R,)`` and the winning anchor slot ``(R,)``; a set
        without anchors gives ``-inf`` and slot 0.

    Raises:
        ValueError: When a set's real anchors do not come first in ``anchor_mask``, or an item or
            set index is out of range (the compiled loop does not check bounds).

    Vectors must be finite: the loop does not scan its inputs (it runs at memory speed), and a
    NaN makes it disagree with :func:`max_cosine_blas` (NaN never wins a comparison here, it
    propagates there). The job guarantees it: items with non-finite or zero vectors have no
    usable embedding, and anchors with non-finite vectors stop it.
    """
    bank = np.ascontiguousarray(anchors, np.float32)
    n_sets, n_slots, dim = bank.shape
    return max_cosine_rows(
        item_embeddings,
        item_index,
        bank.reshape(n_sets * n_slots, dim),
        np.arange(n_sets * n_slots, dtype=np.int64).reshape(n_sets, n_slots),
        anchor_mask,
        set_index,
        workers,
        slice_bytes,
    )


def max_cosine_rows(
    item_embeddings: FloatMatrix,
    item_index: IntArray,
    anchor_vectors: FloatMatrix,
    anchor_rows: IntArray,
    anchor_mask: npt.NDArray[np.bool_],
    set_index: IntArray,
    workers: int | None = None,
    slice_bytes: int | None = None,
) -> tuple[npt.NDArray[np.float32], IntArray]:
    """:func:`max_cosine` with each anchor given as a row of ``anchor_vectors``.

    Anchor slot ``k`` of set ``s`` is ``anchor_vectors[anchor_rows[s, k]]``. With the catalog's
    own table as ``anchor_vectors`` (anchors are catalog items), a set costs ``N`` integers instead
    of ``N x D`` floats.

    Args:
        item_embeddings: ``(n_items, D)`` normalized item content embeddings.
        item_index: ``(R,)`` row -> item row in ``item_embeddings`` (all valid).
        anchor_vectors: ``(M, D)`` normalized anchor embeddings.
        anchor_rows: ``(S, N)`` row of ``anchor_vectors`` per set and slot (any value in masked
            slots).
        anchor_mask: ``(S, N)`` which anchor slots are real, real anchors first.
        set_index: ``(R,)`` row -> anchor set.
        workers: Threads (default: one per available core; results do not depend on it).
        slice_bytes: As in :func:`max_cosine`.

    Returns:
        As :func:`max_cosine`.

    Raises:
        ValueError: As :func:`max_cosine`, and when a real slot's row is out of range.
    """
    rows = len(item_index)
    relevance = np.empty(rows, np.float32)
    matched = np.empty(rows, np.int64)
    if rows == 0:
        return relevance, matched
    for name, index, size in (
        ("item_index", item_index, len(item_embeddings)),
        ("set_index", set_index, len(anchor_rows)),
        ("anchor_rows", anchor_rows[anchor_mask], len(anchor_vectors)),
    ):
        if len(index) and (index.min() < 0 or index.max() >= size):
            raise ValueError(f"{name} holds values outside [0, {size})")
    counts = anchor_mask.sum(axis=1).astype(np.int64)
    if not np.array_equal(anchor_mask, np.arange(anchor_mask.shape[1]) < counts[:, None]):
        raise ValueError("anchor_mask must list each set's real anchors first")
    table = np.ascontiguousarray(item_embeddings, np.float32)
    vectors = np.ascontiguousarray(anchor_vectors, np.float32)
    slots = np.ascontiguousarray(anchor_rows, np.int64)
    n_items, n_sets = len(table), len(slots)
    used_sets = int(np.count_nonzero(np.bincount(set_index, minlength=n_sets)))
    n_slices = slice_count(table.nbytes, rows, used_sets, slice_bytes or default_slice_bytes())
    order, starts, ends, sets, slices = _sliced_groups(
        np.asarray(item_index, np.int64),
        np.asarray(set_index, np.int64),
        n_items,
        n_sets,
        -(-n_items // n_slices),
    )
    # The kernel reads and writes rows in group order, sequentially; numpy does the one random
    # gather before and the one random scatter after (2-3% faster than scattering from inside
    # the kernel, on request-ordered and on shuffled rows alike, measured).
    sorted_items = np.ascontiguousarray(item_index[order], np.int64)
    sorted_relevance = np.empty(rows, np.float32)
    sorted_matched = np.empty(rows, np.int64)

    def work(groups: IntArray) -> None:
        _fused_groups(
            table,
            sorted_items,
            vectors,
            slots,
            counts,
            starts[groups],
            ends[groups],
            sets[groups],
            sorted_relevance,
            sorted_matched,
        )

    workers = min(workers or default_workers(), len(starts))
    if workers <= 1:
        work(np.arange(len(starts)))
    else:
        pool = _pool(workers, os.getpid())
        for done in [pool.submit(work, g) for g in _split_slices(starts, ends, slices, workers)]:
            done.result()
    relevance[order] = sorted_relevance
    matched[order] = sorted_matched
    return relevance, matched


def warm_up() -> None:
    """Load the compiled kernels now (numba's first call in a process costs ~0.35 s).

    The job calls this on a spare thread while it loads the catalog and the anchor bank, so that
    the first batch does not wait for it.
    """
    # Read-only, like the catalog and anchors the job reads in place from Arrow's buffers (numba
    # compiles read-only and writable arrays separately).
    unit = np.eye(2, dtype=np.float32)
    unit.flags.writeable = False
    anchors = unit[None]
    max_cosine(unit, np.array([0, 1]), anchors, np.ones((1, 2), bool), np.array([0, 0]), 1)


def max_cosine_blas(
    item_embeddings: FloatMatrix,
    item_index: IntArray,
    anchors: npt.NDArray[np.float32],
    anchor_mask: npt.NDArray[np.bool_],
    set_index: IntArray,
    workers: int | None = None,
) -> tuple[npt.NDArray[np.float32], IntArray]:
    """The reference kernel: :func:`max_cosine` by one gather and matrix product per set.

    Same arguments and results (up to float rounding; ``anchor_mask`` may be any pattern). Kept
    to check the fused kernel against, and to measure it by in
    ``benchmarks/pseudo_labels_throughput.py``.
    """
    rows = len(item_index)
    relevance = np.empty(rows, np.float32)
    matched = np.empty(rows, np.int64)
    if rows == 0:
        return relevance, matched
    order, starts, ends = _groups(set_index)
    sorted_sets = set_index[order]
    # Masked slots score -inf so they can never be the maximum (added only where some are).
    penalty = np.where(anchor_mask, 0.0, -np.inf).astype(np.float32)
    partial: npt.NDArray[np.bool_] = ~np.all(anchor_mask, axis=1)
    widest = int((ends - starts).max())

    def work(first: int, last: int) -> None:
        # One gather buffer per thread: a fresh array per group would be a fresh (page-faulted)
        # allocation each time (measured ~12% of this kernel).
        buffer = np.empty((widest, item_embeddings.shape[1]), np.float32)
        for start, end in zip(starts[first:last].tolist(), ends[first:last].tolist(), strict=True):
            s = int(sorted_sets[start])
            rows_here = order[start:end]
            candidates = np.take(
                item_embeddings,
                item_index[rows_here],
                axis=0,
                out=buffer[: end - start],
                mode="clip",
            )
            scores = candidates @ anchors[s].T
            if partial[s]:
                scores += penalty[s]
            best = scores.argmax(axis=1)
            matched[rows_here] = best  # threads write disjoint rows
            relevance[rows_here] = np.take_along_axis(scores, best[:, None], axis=1)[:, 0]

    workers = min(workers or default_workers(), len(starts))
    # A group's product is too thin for BLAS to spread over cores: one BLAS thread per worker.
    with _threadpools().limit(limits=1, user_api="blas"):
        _run(work, starts, rows, workers)
    return relevance, matched
