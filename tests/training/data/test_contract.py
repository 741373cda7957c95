"""The data contract validator: every problem reported at once, clearly."""

from __future__ import annotations

from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from tests.factories import make_items, make_requests
from training.data.contract import (
    REQUESTS_SCHEMA,
    ContractError,
    check_columns,
    conform,
    validate,
)


def test_valid_tables_pass() -> None:
    assert validate(make_items(5), "items") == []
    assert validate(make_requests(n_requests=4, n_users=2, n_items=20), "requests") == []


def test_every_requests_problem_is_reported_at_once() -> None:
    good = make_requests(n_requests=3, n_users=2, n_items=20).to_pylist()
    bad = [dict(r) for r in good]
    bad[0]["request_id"] = ""  # empty id
    bad[1]["item_id"] = bad[2]["item_id"]  # duplicate (request_id, item_id)
    bad[1]["request_id"] = bad[2]["request_id"]
    bad[3]["stage"] = "clicked"  # unknown stage
    bad[4]["group"] = "hard_negative"  # unknown group
    bad[5]["label"] = 1  # label on an unexposed row (rank_negative)
    table = pa.Table.from_pylist(bad, schema=REQUESTS_SCHEMA)
    problems = validate(table, "requests")
    text = "\n".join(problems)
    assert "empty ids" in text
    assert "duplicate (request_id, item_id)" in text
    assert "unknown values 'clicked'" in text
    assert "unknown values 'hard_negative'" in text
    assert "unexposed rows carry a label" in text
    assert len(problems) >= 5


def test_missing_and_mistyped_columns() -> None:
    table = pa.table({"item_id": [1, 2], "event_timestamp": ["x", "y"]})
    problems = validate(table, "items")
    assert "column 'item_id' has type int64, expected string" in problems
    assert any("missing column 'text'" in p for p in problems)
    assert any("unparseable timestamps" in p for p in problems)


def test_naive_and_string_timestamps() -> None:
    naive = pa.table(
        {
            "item_id": ["a"],
            "text": ["t"],
            "event_timestamp": pa.array([datetime(2024, 1, 1)], pa.timestamp("us")),
        }
    )
    assert any("timezone-naive" in p for p in validate(naive, "items"))
    strings = pa.table(
        {
            "item_id": ["a", "b"],
            "text": ["t", "u"],
            "event_timestamp": ["2024-01-01T00:00:00Z", "2024-01-02 10:00"],
        }
    )
    problems = validate(strings, "items")
    assert any(
        "naive timestamps without a UTC offset" in p and "2024-01-02 10:00" in p for p in problems
    )
    ok = pa.table(
        {"item_id": ["a"], "text": ["t"], "event_timestamp": ["2024-01-01T05:00:00+02:00"]}
    )
    table = conform(ok, "items")
    assert table.column("event_timestamp")[0].as_py() == datetime(2024, 1, 1, 3, tzinfo=UTC)


def test_string_timestamps_keep_every_other_problem_and_cover_label_timestamp() -> None:
    """Valid ISO strings are no problem, so a real one found after them must still be listed;
    the optional label_timestamp accepts the same strings (its nulls stay null)."""
    requests = make_requests(n_requests=4, n_users=2, n_items=15, seed=0)
    when = [t.isoformat() for t in requests.column("event_timestamp").to_pylist()]
    as_strings = requests.set_column(
        requests.schema.get_field_index("event_timestamp"), "event_timestamp", pa.array(when)
    )
    groups = as_strings.column("group").to_pylist()
    groups[0] = None
    broken = as_strings.set_column(
        as_strings.schema.get_field_index("group"), "group", pa.array(groups, pa.string())
    )
    assert validate(broken, "requests") == ["column 'group' has 1 null values"]
    clicked = [label == 1 for label in requests.column("label").to_pylist()]
    known = pa.array([w if c else None for w, c in zip(when, clicked, strict=True)])
    table = conform(as_strings.append_column("label_timestamp", known), "requests")
    assert table.column("label_timestamp").to_pylist() == [
        t if c else None
        for t, c in zip(requests.column("event_timestamp").to_pylist(), clicked, strict=True)
    ]
    naive = pa.array([w[:19] if c else None for w, c in zip(when, clicked, strict=True)])
    assert any(
        "column 'label_timestamp' has" in p and "naive timestamps" in p
        for p in validate(as_strings.append_column("label_timestamp", naive), "requests")
    )


def test_contract_error_report_is_capped() -> None:
    err = ContractError("requests", [f"problem {i}" for i in range(25)])
    lines = err.report_lines()
    assert len(lines) == 21
    assert lines[-1] == "requests: ... and 5 more problems"


def test_conform_raises_with_all_problems() -> None:
    with pytest.raises(ContractError) as info:
        conform(pa.table({"x": [1]}), "truth")
    assert len(info.value.problems) == 3  # user_id, item_id, label missing


def test_group_stage_consistency() -> None:
    rows = make_requests(n_requests=1, n_users=1, n_items=20).to_pylist()
    rows[0]["stage"] = "ranked"  # an exposed_positive/negative row must be 'exposed'
    rows[0]["label"] = None
    problems = validate(pa.Table.from_pylist(rows, schema=REQUESTS_SCHEMA), "requests")
    assert any("have a stage other than 'exposed'" in p for p in problems)


def test_check_columns_looks_at_the_named_columns_only() -> None:
    """For jobs that stream a table: presence, type and UTC of the columns they read."""
    requests = make_requests(n_requests=3, n_users=2, n_items=20)
    read = ["request_id", "item_id", "event_timestamp", "label"]
    assert check_columns(requests.drop_columns(["rank_position"]).schema, "requests", read) == []
    naive = requests.schema.set(
        requests.schema.get_field_index("event_timestamp"),
        pa.field("event_timestamp", pa.timestamp("us")),
    )
    broken = naive.remove(naive.get_field_index("item_id"))
    broken = broken.set(broken.get_field_index("label"), pa.field("label", pa.string()))
    assert check_columns(broken, "requests", read) == [
        "missing column 'item_id' (expected string)",
        "column 'event_timestamp' is timezone-naive; timestamps must be timezone-aware",
        "column 'label' has type string, expected int8",
    ]


def _with_label_timestamps(requests: pa.Table, values: list[datetime | None]) -> pa.Table:
    return requests.append_column("label_timestamp", pa.array(values, pa.timestamp("us", "UTC")))


def test_label_timestamp_is_optional_and_checked() -> None:
    """When a click became known: at or after its request, and only on clicked rows."""
    requests = make_requests(n_requests=6, n_users=2, n_items=20, seed=1)
    rows = requests.to_pylist()
    clicked = [i for i, r in enumerate(rows) if r["label"] == 1]
    unclicked = [i for i, r in enumerate(rows) if r["label"] != 1]
    assert clicked and unclicked
    late = [r["event_timestamp"].replace(year=2025) if r["label"] == 1 else None for r in rows]
    good = _with_label_timestamps(requests, late)
    assert validate(good, "requests") == []
    assert conform(good, "requests").column_names[-1] == "label_timestamp"

    bad = list(late)
    bad[clicked[0]] = rows[clicked[0]]["event_timestamp"].replace(year=2000)  # before its request
    bad[unclicked[0]] = rows[unclicked[0]]["event_timestamp"]  # on a row without a click
    problems = validate(_with_label_timestamps(requests, bad), "requests")
    assert problems == [
        "1 rows have a label_timestamp but no click (it is the time a click became known; "
        "leave it null elsewhere)",
        "1 rows have a label_timestamp before their request's event_timestamp (a click cannot "
        "come before the impression)",
    ]
    naive = requests.append_column(
        "label_timestamp", pa.array([None] * requests.num_rows, pa.timestamp("us"))
    )
    assert validate(naive, "requests") == [
        "column 'label_timestamp' is timezone-naive; timestamps must be timezone-aware"
    ]


def _set(table: pa.Table, name: str, values: pa.Array) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), name, values)


def test_a_click_before_its_impression_is_refused_in_iso_strings_too() -> None:
    """With ISO-string event timestamps the check was skipped: a 2020 click on a 2024 impression
    passed validation and leaked the click into features before its time."""
    requests = make_requests(n_requests=6, n_users=2, n_items=20, seed=1)
    rows = requests.to_pylist()
    clicked = next(i for i, r in enumerate(rows) if r["label"] == 1)
    known: list[datetime | None] = [None] * len(rows)
    known[clicked] = rows[clicked]["event_timestamp"].replace(year=2000)
    iso = pa.array([r["event_timestamp"].isoformat() for r in rows])
    table = _with_label_timestamps(_set(requests, "event_timestamp", iso), known)
    assert validate(table, "requests") == [
        "1 rows have a label_timestamp before their request's event_timestamp (a click cannot "
        "come before the impression)"
    ]
    strings = [None if k is None else k.isoformat() for k in known]
    both = _set(requests, "event_timestamp", iso).append_column(
        "label_timestamp", pa.array(strings)
    )
    assert len(validate(both, "requests")) == 1


def test_sub_microsecond_strings_are_truncated_and_offsets_read() -> None:
    requests = make_requests(n_requests=2, n_users=2, n_items=20)
    n = requests.num_rows
    stamps = ["2024-01-02T00:00:00.123456789Z", "2024-01-02T02:00:00+02", "2024-01-02t00:00:00z"]
    for stamp in stamps:
        table = _set(requests, "event_timestamp", pa.array([stamp] * n))
        assert validate(table, "requests") == [], stamp
        got = conform(table, "requests").column("event_timestamp")[0].as_py()
        assert got == datetime(2024, 1, 2, 0, 0, 0, 123456 if "." in stamp else 0, tzinfo=UTC)


def test_requests_must_be_one_user_at_one_time_with_funnel_positions() -> None:
    requests = make_requests(n_requests=3, n_users=2, n_items=20)
    rows = requests.to_pylist()
    first = rows[0]["request_id"]
    same = [i for i, r in enumerate(rows) if r["request_id"] == first]
    rows[same[1]]["user_id"] = "someone-else"
    rows[same[2]]["event_timestamp"] = rows[same[2]]["event_timestamp"].replace(year=2030)
    retrieved = next(i for i, r in enumerate(rows) if r["stage"] == "retrieved")
    rows[retrieved]["rank_position"] = 3
    rows[same[0]]["prerank_position"] = 0
    problems = validate(pa.Table.from_pylist(rows, requests.schema), "requests")
    assert (
        "1 requests have rows with different user_ids (a request is one user at one time), "
        f"e.g. {first!r}" in problems
    )
    assert any("different event_timestamps" in p for p in problems)
    assert "column 'prerank_position' has 1 values below 1 (positions are 1-based)" in problems
    assert any("stage 'retrieved' have a rank_position" in p for p in problems), problems
    global_rows = [
        dict(r, group="global_negative", stage="retrieved", label=None) for r in rows[:1]
    ]
    global_rows[0]["prerank_position"] = 5
    global_rows[0]["rank_position"] = None
    global_rows[0]["request_id"] = "r-new"
    got = validate(pa.Table.from_pylist(global_rows, requests.schema), "requests")
    assert got == [
        "1 global_negative rows have a prerank_position (never in the funnel: leave it null)"
    ]


def test_categorical_columns_and_out_of_range_integers() -> None:
    requests = make_requests(n_requests=3, n_users=2, n_items=20)
    categorical = _set(requests, "stage", pc.dictionary_encode(requests.column("stage")))
    assert validate(categorical, "requests") == []
    assert conform(categorical, "requests").schema.field("stage").type == pa.string()
    wide = pc.cast(requests.column("prerank_position"), pa.int64()).to_pylist()
    wide[0] = 2**40
    problems = validate(_set(requests, "prerank_position", pa.array(wide, pa.int64())), "requests")
    assert problems == [
        "column 'prerank_position' has 1 values outside the int32 range [-2147483648, 2147483647]"
    ]


def test_typed_timestamps_in_any_zone_are_converted_to_utc() -> None:
    # A column typed timestamp[us, Europe/Berlin] names its instants exactly (Arrow stores UTC
    # values), like an ISO string with an offset: it is converted, not refused.
    requests = make_requests(n_requests=3, n_users=2, n_items=20)
    for zone in ("Europe/Berlin", "+02:00", "America/New_York"):
        zoned = requests.column("event_timestamp").cast(pa.timestamp("us", tz=zone))
        table = _set(requests, "event_timestamp", zoned)
        assert validate(table, "requests") == [], zone
        assert check_columns(table.schema, "requests", ["event_timestamp"]) == [], zone
        out = conform(table, "requests").column("event_timestamp")
        assert out.type == pa.timestamp("us", tz="UTC")
        assert out.to_pylist() == requests.column("event_timestamp").to_pylist()
    # Nanoseconds in a named zone: converted and truncated like a UTC column.
    ns = requests.column("event_timestamp").cast(pa.timestamp("ns", tz="Asia/Tokyo"))
    out = conform(_set(requests, "event_timestamp", ns), "requests").column("event_timestamp")
    assert out.to_pylist() == requests.column("event_timestamp").to_pylist()
