"""The input data contract: pyarrow schemas for every table a user brings, and one validator.

Tables (all timestamps are timezone-aware UTC):

* ``items``: the catalog. ``item_id``, ``text``, ``event_timestamp``; optional
  ``content_embedding`` (list<float32>), e.g. an image vector to fuse with the text vector, and
  ``category`` (string, the item's main category, used by diversity metrics).
* ``interactions``: a plain engagement log (what public datasets provide). ``user_id``,
  ``item_id``, ``event_timestamp``; the funnel simulator turns it into ``requests`` + ``truth``.
* ``requests``: one row per candidate that entered the funnel for a request; optional
  ``label_timestamp``, when each click became known.
* ``truth``: evaluation only, never read by training: the true outcome of candidates.

The validator reports *every* violation at once (not just the first) so a user fixes a bad file
in one round trip; :class:`ContractError` carries the list and the CLI prints one line each.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

TIMESTAMP: Final = pa.timestamp("us", tz="UTC")

STAGES: Final[tuple[str, ...]] = ("retrieved", "preranked", "ranked", "exposed")
"""Deepest funnel stage a candidate reached, shallowest first."""

GROUPS: Final[tuple[str, ...]] = (
    "global_negative",
    "prerank_negative",
    "rank_negative",
    "exposed_negative",
    "exposed_positive",
)
"""HAP candidate groups, easiest negatives first."""

UNEXPOSED_GROUPS: Final[tuple[str, ...]] = ("global_negative", "prerank_negative", "rank_negative")

ITEMS_SCHEMA: Final = pa.schema(
    [
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("event_timestamp", TIMESTAMP, nullable=False),
    ]
)
ITEMS_OPTIONAL: Final = {"content_embedding": pa.list_(pa.float32()), "category": pa.string()}

INTERACTIONS_SCHEMA: Final = pa.schema(
    [
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("event_timestamp", TIMESTAMP, nullable=False),
    ]
)
INTERACTIONS_OPTIONAL: Final = {"weight": pa.float32()}

REQUESTS_SCHEMA: Final = pa.schema(
    [
        pa.field("request_id", pa.string(), nullable=False),
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("event_timestamp", TIMESTAMP, nullable=False),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("prerank_position", pa.int32(), nullable=True),
        pa.field("rank_position", pa.int32(), nullable=True),
        pa.field("label", pa.int8(), nullable=True),
        pa.field("group", pa.string(), nullable=False),
    ]
)

REQUESTS_OPTIONAL: Final = {"label_timestamp": TIMESTAMP}
"""``label_timestamp``: when a click became known (its own time), at or after the request. Clicks
often come later than the impression; the statistics count a click on the day it became known, so
a late click never reaches the features of a request that came before it. Null on rows without a
click (and on every row when the log does not know): the request's time is used."""

TRUTH_SCHEMA: Final = pa.schema(
    [
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("label", pa.int8(), nullable=False),
    ]
)
TRUTH_OPTIONAL: Final = {"request_id": pa.string()}

TABLES: Final = {
    "items": (ITEMS_SCHEMA, ITEMS_OPTIONAL, ("item_id",)),
    "interactions": (INTERACTIONS_SCHEMA, INTERACTIONS_OPTIONAL, ("user_id", "item_id")),
    "requests": (REQUESTS_SCHEMA, REQUESTS_OPTIONAL, ("request_id", "user_id", "item_id")),
    "truth": (TRUTH_SCHEMA, TRUTH_OPTIONAL, ("user_id", "item_id")),
}
"""table name -> (required schema, optional columns, id columns that must be non-empty)."""

MAX_REPORTED: Final = 20


@dataclass
class ContractError(Exception):
    """A table broke the data contract. ``problems`` holds one human-readable line each."""

    table: str
    problems: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return "\n".join(self.report_lines())

    def report_lines(self, limit: int = MAX_REPORTED) -> list[str]:
        """Lines for a terminal: the first ``limit`` problems, then how many more there are."""
        lines = [f"{self.table}: {p}" for p in self.problems[:limit]]
        if len(self.problems) > limit:
            lines.append(f"{self.table}: ... and {len(self.problems) - limit} more problems")
        return lines


def _type_matches(actual: pa.DataType, expected: pa.DataType) -> bool:
    if expected == TIMESTAMP:
        return pa.types.is_timestamp(actual)
    if pa.types.is_string(expected):
        return pa.types.is_string(actual) or pa.types.is_large_string(actual)
    if pa.types.is_integer(expected):
        return pa.types.is_integer(actual)
    if pa.types.is_floating(expected):
        return pa.types.is_floating(actual)
    if pa.types.is_list(expected):
        return (pa.types.is_list(actual) or pa.types.is_large_list(actual)) and (
            pa.types.is_floating(actual.value_type)
        )
    return bool(actual.equals(expected))


def _examples(values: Iterable[object], n: int = 3) -> str:
    shown = [repr(v) for _, v in zip(range(n), values, strict=False)]
    return ", ".join(shown)


def validate(table: pa.Table, name: str) -> list[str]:
    """Check ``table`` against the contract for ``name`` and return every problem found.

    Args:
        table: The table to check.
        name: One of ``items``, ``interactions``, ``requests``, ``truth``.

    Returns:
        A list of problems, one line each; empty when the table is valid.
    """
    return _validate(table, name)[0]


def _validate(table: pa.Table, name: str) -> tuple[list[str], pa.Table]:
    """:func:`validate`'s problems, and the table as checked.

    Dictionary columns come back decoded and valid ISO-string timestamp columns parsed, so
    :func:`conform` neither decodes nor parses them again.
    """
    if name not in TABLES:
        raise KeyError(f"unknown contract table {name!r}; expected one of {sorted(TABLES)}")
    schema, optional, id_columns = TABLES[name]
    table = _decode_dictionaries(table)
    problems: list[str] = []
    present = set(table.column_names)
    usable: set[str] = set()
    # ISO-string timestamps, parsed: the row checks (a click before its impression) compare
    # instants, whichever form each column came in.
    parsed_columns: dict[str, pa.ChunkedArray] = {}
    for fld in schema:
        if fld.name not in present:
            problems.append(f"missing column {fld.name!r} (expected {fld.type})")
            continue
        actual = table.schema.field(fld.name).type
        if fld.type == TIMESTAMP and _is_string(actual):
            # ISO-8601 strings with an offset are accepted: say precisely which are not.
            parsed, ts_problems = parse_timestamps(table.column(fld.name), fld.name)
            if ts_problems or parsed is None:
                problems += ts_problems
                continue
            parsed_columns[fld.name] = parsed
        elif not _type_matches(actual, fld.type):
            problems.append(f"column {fld.name!r} has type {actual}, expected {fld.type}")
            continue
        else:
            problems += _range_problems(table.column(fld.name), fld.type, fld.name)
        usable.add(fld.name)
        nulls = table.column(fld.name).null_count
        if not fld.nullable and nulls:
            problems.append(f"column {fld.name!r} has {nulls} null values")
    for col, typ in optional.items():
        if col not in present:
            continue
        actual = table.schema.field(col).type
        if typ == TIMESTAMP and _is_string(actual):
            parsed, ts_problems = parse_timestamps(table.column(col), col)
            if ts_problems or parsed is None:
                problems += ts_problems
                continue
            parsed_columns[col] = parsed
        elif not _type_matches(actual, typ):
            problems.append(f"optional column {col!r} has type {actual}, expected {typ}")
            continue
        else:
            problems += _range_problems(table.column(col), typ, col)
        usable.add(col)
        if typ == TIMESTAMP and pa.types.is_timestamp(actual):
            problems += _zone_problems(actual, col)
    for col, parsed in parsed_columns.items():
        index = table.schema.get_field_index(col)
        table = table.set_column(index, pa.field(col, parsed.type), parsed)

    if "event_timestamp" in usable and pa.types.is_timestamp(
        table.schema.field("event_timestamp").type
    ):
        problems += _zone_problems(table.schema.field("event_timestamp").type, "event_timestamp")

    for col in id_columns:
        if col in usable:
            empty = pc.sum(pc.equal(pc.utf8_trim_whitespace(table.column(col)), "")).as_py() or 0
            if empty:
                problems.append(f"column {col!r} has {empty} empty ids")

    if name == "items" and "item_id" in usable:
        problems += _duplicates(table, ["item_id"])
    if name == "items" and "text" in usable:
        empty = pc.sum(pc.equal(pc.utf8_trim_whitespace(table.column("text")), "")).as_py() or 0
        if empty:
            problems.append(f"column 'text' has {empty} empty texts")
    if name == "requests":
        problems += _check_requests(table, usable)
    if name in ("truth",) and "label" in usable:
        problems += _check_binary(table, "label")
    return problems, table


def _decode_dictionaries(table: pa.Table) -> pa.Table:
    """``table`` with dictionary-encoded columns (pandas categoricals) as their plain values."""
    for index, fld in enumerate(table.schema):
        if pa.types.is_dictionary(fld.type):
            plain = table.column(index).cast(fld.type.value_type)
            table = table.set_column(index, pa.field(fld.name, plain.type), plain)
    return table


def _range_problems(column: pa.ChunkedArray, typ: pa.DataType, name: str) -> list[str]:
    """Values of a wider integer column that the contract's narrower type cannot hold."""
    if not (pa.types.is_integer(typ) and pa.types.is_integer(column.type)):
        return []
    info = np.iinfo(typ.to_pandas_dtype())
    bounds = pc.min_max(column)
    low, high = bounds["min"].as_py(), bounds["max"].as_py()
    if low is None or (info.min <= low and high <= info.max):
        return []
    outside = pc.sum(
        pc.or_(
            pc.less(column, pa.scalar(int(info.min))), pc.greater(column, pa.scalar(int(info.max)))
        )
    ).as_py()
    return [
        f"column {name!r} has {outside} values outside the {typ} range [{info.min}, {info.max}]"
    ]


def _zone_problems(ts_type: pa.TimestampType, column: str) -> list[str]:
    # Arrow stores every zone-aware timestamp as UTC instants and keeps the zone as display
    # metadata, so any zone (Europe/Berlin, +02:00) names its instants exactly and converts to
    # UTC losslessly (``conform`` does; streaming readers cast to ``TIMESTAMP``). Only a naive
    # column is ambiguous.
    if ts_type.tz is None:
        return [f"column {column!r} is timezone-naive; timestamps must be timezone-aware"]
    return []


def check_columns(schema: pa.Schema, name: str, columns: Sequence[str]) -> list[str]:
    """Check only ``columns`` of a table's ``schema`` (presence, type, UTC timestamps).

    For a job that streams a large table and reads a few of its columns: the rules that need
    the rows (nulls, duplicates, allowed values) are :func:`validate`'s.
    """
    contract, optional, _ = TABLES[name]
    expected = {f.name: f.type for f in contract} | dict(optional)
    problems: list[str] = []
    for col in columns:
        if col not in schema.names:
            problems.append(f"missing column {col!r} (expected {expected[col]})")
            continue
        actual = schema.field(col).type
        if not _type_matches(actual, expected[col]):
            problems.append(f"column {col!r} has type {actual}, expected {expected[col]}")
        elif expected[col] == TIMESTAMP:
            problems += _zone_problems(actual, col)
    return problems


def _cast(column: pa.ChunkedArray, typ: pa.DataType) -> pa.ChunkedArray:
    """``column`` as ``typ``; timestamps finer than microseconds are truncated to them."""
    if typ == TIMESTAMP and pa.types.is_timestamp(column.type):
        return pc.cast(column, typ, safe=False)
    return column.cast(typ)


def _is_string(typ: pa.DataType) -> bool:
    return bool(pa.types.is_string(typ) or pa.types.is_large_string(typ))


def parse_timestamps(
    column: pa.ChunkedArray, name: str = "event_timestamp"
) -> tuple[pa.ChunkedArray | None, list[str]]:
    """Parse ISO-8601 strings into UTC timestamps, reporting unparseable and naive values.

    Args:
        column: The strings (nulls stay null).
        name: The column's name, for the problems' wording.

    Returns:
        The parsed column (None when any value failed) and the problems found.
    """
    import pandas as pd

    values = column.to_pandas()
    present = values.notna()
    # RFC 3339 allows a lowercase "t" and "z"; pandas reads only the uppercase ones.
    parsed = pd.to_datetime(values.str.upper(), errors="coerce", utc=True, format="ISO8601")
    # The contract keeps microseconds: finer digits are truncated, as for typed columns.
    parsed = parsed.dt.floor("us")
    bad = values[present & parsed.isna()]
    problems = []
    if len(bad):
        problems.append(
            f"column {name!r} has {len(bad)} unparseable timestamps, e.g. {_examples(bad.tolist())}"
        )
    # A string without an offset would be silently read as UTC: refuse it instead.
    has_offset = (
        values[present].astype(str).str.contains(r"(?:[Zz]|[+-]\d\d(?::?\d\d)?)$", regex=True)
    )
    naive = values[present][~has_offset]
    if len(naive):
        problems.append(
            f"column {name!r} has {len(naive)} naive timestamps without a UTC offset, "
            f"e.g. {_examples(naive.tolist())}"
        )
    if problems:
        return None, problems
    return pa.chunked_array([pa.array(parsed, type=TIMESTAMP)]), []


def _duplicates(table: pa.Table, keys: list[str]) -> list[str]:
    counts = table.select(keys).group_by(keys).aggregate([([], "count_all")])
    dup = counts.filter(pc.greater(counts.column("count_all"), 1))
    if dup.num_rows == 0:
        return []
    sample = _examples(tuple(r[k] for k in keys) for r in dup.slice(0, 3).to_pylist())
    return [f"{dup.num_rows} duplicate ({', '.join(keys)}) keys, e.g. {sample}"]


def _check_binary(table: pa.Table, col: str) -> list[str]:
    values = table.column(col).drop_null()
    bad = pc.sum(pc.invert(pc.is_in(values, pa.array([0, 1], values.type)))).as_py() or 0
    return [f"column {col!r} has {bad} values outside {{0, 1}}"] if bad else []


def _check_requests(table: pa.Table, usable: set[str]) -> list[str]:
    problems: list[str] = []
    if {"request_id", "item_id"} <= usable:
        problems += _duplicates(table, ["request_id", "item_id"])
    for col, allowed in (("stage", STAGES), ("group", GROUPS)):
        if col in usable:
            values = table.column(col).drop_null()
            unknown = pc.unique(values.filter(pc.invert(pc.is_in(values, pa.array(allowed)))))
            if len(unknown):
                problems.append(
                    f"column {col!r} has unknown values {_examples(unknown.to_pylist())}; "
                    f"allowed: {', '.join(allowed)}"
                )
    if {"request_id", "user_id", "event_timestamp"} <= usable:
        problems += _request_consistency(table)
    problems += _position_problems(table, usable)
    if "label" in usable:
        problems += _check_binary(table, "label")
    if {"label", "stage"} <= usable:
        exposed = pc.equal(table.column("stage"), "exposed")
        has_label = pc.is_valid(table.column("label"))
        unexposed_labelled = pc.sum(pc.and_(pc.invert(exposed), has_label)).as_py() or 0
        if unexposed_labelled:
            problems.append(
                f"{unexposed_labelled} unexposed rows carry a label (labels exist only for "
                "exposed rows; leave them null)"
            )
        exposed_unlabelled = pc.sum(pc.and_(exposed, pc.invert(has_label))).as_py() or 0
        if exposed_unlabelled:
            problems.append(f"{exposed_unlabelled} exposed rows have no label")
    if "label_timestamp" in usable:
        problems += _check_label_timestamps(table, usable)
    if {"group", "stage", "label"} <= usable:
        expected_stage = {
            "exposed_positive": "exposed",
            "exposed_negative": "exposed",
            "rank_negative": None,
            "prerank_negative": "retrieved",
            "global_negative": "retrieved",
        }
        for group, stage in expected_stage.items():
            in_group = pc.equal(table.column("group"), group)
            if stage is None:
                bad_mask = pc.and_(
                    in_group,
                    pc.invert(pc.is_in(table.column("stage"), pa.array(["preranked", "ranked"]))),
                )
                want = "'preranked' or 'ranked'"
            else:
                bad_mask = pc.and_(in_group, pc.not_equal(table.column("stage"), stage))
                want = repr(stage)
            bad = pc.sum(bad_mask).as_py() or 0
            if bad:
                problems.append(f"{bad} rows in group {group!r} have a stage other than {want}")
        pos = pc.and_(
            pc.equal(table.column("group"), "exposed_positive"),
            pc.not_equal(table.column("label"), 1),
        )
        neg = pc.and_(
            pc.equal(table.column("group"), "exposed_negative"),
            pc.not_equal(table.column("label"), 0),
        )
        for mask, what in (
            (pos, "exposed_positive rows without label 1"),
            (neg, "exposed_negative rows without label 0"),
        ):
            bad = pc.sum(mask).as_py() or 0
            if bad:
                problems.append(f"{bad} {what}")
    return problems


def _request_consistency(table: pa.Table) -> list[str]:
    """A request is one user at one time: every row of a request_id must agree on both."""
    per_request = table.group_by("request_id").aggregate(
        [("user_id", "count_distinct"), ("event_timestamp", "count_distinct")]
    )
    problems = []
    for col, what in (("user_id", "user_ids"), ("event_timestamp", "event_timestamps")):
        counts = per_request.column(f"{col}_count_distinct")
        mixed = per_request.filter(pc.greater(counts, 1))
        if mixed.num_rows:
            sample = _examples(mixed.column("request_id").to_pylist())
            problems.append(
                f"{mixed.num_rows} requests have rows with different {what} (a request is one "
                f"user at one time), e.g. {sample}"
            )
    return problems


def _position_problems(table: pa.Table, usable: set[str]) -> list[str]:
    """Positions are 1-based, absent on global negatives, and ranks only past pre-ranking."""
    problems = []
    positions = [c for c in ("prerank_position", "rank_position") if c in usable]
    for col in positions:
        below = pc.sum(pc.fill_null(pc.less(table.column(col), 1), False)).as_py() or 0
        if below:
            problems.append(f"column {col!r} has {below} values below 1 (positions are 1-based)")
    if "group" in usable:
        global_negative = pc.equal(table.column("group"), "global_negative")
        for col in positions:
            placed = pc.sum(pc.and_(global_negative, pc.is_valid(table.column(col)))).as_py()
            if placed:
                problems.append(
                    f"{placed} global_negative rows have a {col} (never in the funnel: leave it "
                    "null)"
                )
    if {"rank_position", "stage"} <= usable:
        retrieved = pc.equal(table.column("stage"), "retrieved")
        ranked = pc.sum(pc.and_(retrieved, pc.is_valid(table.column("rank_position")))).as_py()
        if ranked:
            problems.append(
                f"{ranked} rows with stage 'retrieved' have a rank_position (only rows that "
                "passed pre-ranking are ranked)"
            )
    return problems


def _check_label_timestamps(table: pa.Table, usable: set[str]) -> list[str]:
    problems: list[str] = []
    known = pc.is_valid(table.column("label_timestamp"))
    if "label" in usable:
        not_click = pc.fill_null(pc.not_equal(table.column("label"), 1), True)
        bad = pc.sum(pc.and_(known, not_click)).as_py() or 0
        if bad:
            problems.append(
                f"{bad} rows have a label_timestamp but no click (it is the time a click became "
                "known; leave it null elsewhere)"
            )
    if "event_timestamp" in usable and pa.types.is_timestamp(
        table.schema.field("event_timestamp").type
    ):
        # Compared as microseconds: the two columns may differ in unit.
        label_us = pc.cast(table.column("label_timestamp"), TIMESTAMP, safe=False).cast(pa.int64())
        event_us = pc.cast(table.column("event_timestamp"), TIMESTAMP, safe=False).cast(pa.int64())
        early = pc.sum(pc.fill_null(pc.less(label_us, event_us), False)).as_py() or 0
        if early:
            problems.append(
                f"{early} rows have a label_timestamp before their request's event_timestamp "
                "(a click cannot come before the impression)"
            )
    return problems


def conform(table: pa.Table, name: str) -> pa.Table:
    """Validate ``table`` and cast it to the canonical contract schema (column order, types).

    Optional columns that are present are kept, cast to their canonical type; unknown extra
    columns are kept as they are, after the contract columns.

    Raises:
        ContractError: with every problem found, when the table breaks the contract.
    """
    problems, table = _validate(table, name)
    if problems:
        raise ContractError(name, problems)
    schema, optional, _ = TABLES[name]
    columns: dict[str, pa.ChunkedArray] = {}
    for fld in schema:
        columns[fld.name] = _cast(table.column(fld.name), fld.type)
    for col, typ in optional.items():
        if col in table.column_names:
            columns[col] = _cast(table.column(col), typ)
    for col in table.column_names:
        if col not in columns:
            columns[col] = table.column(col)
    fields = [
        schema.field(c) if c in schema.names else pa.field(c, columns[c].type) for c in columns
    ]
    return pa.Table.from_arrays(list(columns.values()), schema=pa.schema(fields))
