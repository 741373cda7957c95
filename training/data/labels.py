"""Click labels as they were known at a point in time (the request log's ``label_timestamp``).

Clicks often arrive after their impression. Anything fitted on the log before a cutoff (the
pre-ranker, the pseudo-labels' calibration) must see only the clicks known by then, or it learns
from the period an offline evaluation scores.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def log_as_of(requests: pa.Table, cutoff: Any) -> tuple[pa.Table, int]:
    """The request log as known at ``cutoff``: rows before it, later clicks not clicks yet.

    Rows at or after ``cutoff`` are left out. A row whose ``label_timestamp`` is at or after
    ``cutoff`` becomes what the log showed then, an exposed negative (label 0, group
    ``exposed_negative`` when the table has groups, no ``label_timestamp``). Without this,
    whatever learns before a cutoff learns from engagements of the period after it, the very
    period an offline evaluation scores (on the synthetic catalog clicks come a median 8.6 days
    after their impression). A log without ``label_timestamp`` keeps its labels.

    Global negatives are drawn in proportion to a request's clicks (the simulator draws
    ``global_negatives_per_positive`` per click), so a request keeps the share of them that its
    clicks known at ``cutoff`` account for, its first rows in log order: at the cutoff the
    others had not been drawn yet, and their number would tell how many clicks were to come.

    Returns:
        The table and how many clicks were turned into negatives.
    """
    ts = requests.column("event_timestamp")
    requests = requests.filter(pc.less(ts, pa.scalar(cutoff, ts.type)))
    if "label_timestamp" not in requests.column_names:
        return requests, 0
    known_at = requests.column("label_timestamp")
    later = pc.fill_null(pc.greater_equal(known_at, pa.scalar(cutoff, known_at.type)), False)
    count = pc.sum(later).as_py() or 0
    if not count:
        return requests, 0
    replaced = {
        "label": pc.if_else(later, pa.scalar(0, pa.int8()), requests.column("label")),
        "label_timestamp": pc.if_else(later, pa.scalar(None, known_at.type), known_at),
    }
    if "group" in requests.column_names:
        replaced["group"] = pc.if_else(later, "exposed_negative", requests.column("group"))
    for name, column in replaced.items():
        index = requests.schema.get_field_index(name)
        requests = requests.set_column(index, requests.schema.field(index), column)
    if {"group", "request_id"} <= set(requests.column_names):
        requests = _drop_unearned_global_negatives(requests, later)
    return requests, int(count)


def _drop_unearned_global_negatives(requests: pa.Table, later: pa.ChunkedArray) -> pa.Table:
    """Keep each request's first ``round(n_global * known / clicks)`` global negatives.

    ``later`` marks the clicks known only after the cutoff (now relabelled); ``requests`` holds
    the relabelled log, so its ``label`` column counts the known clicks.
    """
    codes = pc.dictionary_encode(requests.column("request_id")).combine_chunks().indices
    request = np.asarray(codes.to_numpy(zero_copy_only=False), dtype=np.int64)
    n = int(request.max()) + 1 if len(request) else 0
    is_global = np.asarray(
        pc.fill_null(pc.equal(requests.column("group"), "global_negative"), False), dtype=bool
    )
    known = np.asarray(pc.fill_null(pc.equal(requests.column("label"), 1), False), dtype=bool)
    late = np.asarray(pc.fill_null(later, False), dtype=bool)
    n_known = np.bincount(request, weights=known, minlength=n)
    n_clicks = n_known + np.bincount(request, weights=late, minlength=n)
    n_global = np.bincount(request, weights=is_global, minlength=n)
    # A request without logged clicks keeps its global negatives: nothing says how they were
    # drawn, and none of them depends on a click still to come.
    share = np.divide(n_known, n_clicks, out=np.ones(n), where=n_clicks > 0)
    keep_n = np.rint(n_global * share).astype(np.int64)
    rows = np.flatnonzero(is_global)
    # Rank of each global row within its request, in log order (a stable sort by request).
    order = rows[np.argsort(request[rows], kind="stable")]
    first = np.searchsorted(request[order], request[order], side="left")
    rank = np.empty(len(rows), dtype=np.int64)
    rank[np.searchsorted(rows, order)] = np.arange(len(order)) - first
    dropped = rows[rank >= keep_n[request[rows]]]
    if not len(dropped):
        return requests
    mask = np.ones(requests.num_rows, dtype=bool)
    mask[dropped] = False
    return requests.filter(pa.array(mask))
