"""Click labels as they were known at a point in time (the request log's ``label_timestamp``).

Clicks often arrive after their impression. Anything fitted on the log before a cutoff (the
pre-ranker, the pseudo-labels' calibration) must see only the clicks known by then, or it learns
from the period an offline evaluation scores.
"""

from __future__ import annotations

from typing import Any

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
    return requests, int(count)
