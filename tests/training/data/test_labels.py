"""The request log as known at a cutoff: later clicks, and the global negatives drawn for them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pyarrow as pa
import pyarrow.compute as pc

from training.data.contract import validate
from training.data.labels import log_as_of

T0 = datetime(2024, 1, 1, tzinfo=UTC)
CUTOFF = T0 + timedelta(days=10)


def _request(
    rid: str, user: str, day: int, clicks_known_on: list[int | None], n_global: int
) -> list[dict[str, object]]:
    """One request: an exposed row per entry (a click known on that day, or None: no click),
    then ``n_global`` global negatives."""
    rows = []
    for k, known_on in enumerate(clicks_known_on):
        clicked = known_on is not None
        rows.append(
            {
                "request_id": rid,
                "user_id": user,
                "item_id": f"{rid}-e{k}",
                "event_timestamp": T0 + timedelta(days=day),
                "stage": "exposed",
                "prerank_position": k + 1,
                "rank_position": k + 1,
                "label": 1 if clicked else 0,
                "group": "exposed_positive" if clicked else "exposed_negative",
                "label_timestamp": T0 + timedelta(days=known_on) if clicked else None,
            }
        )
    for k in range(n_global):
        rows.append(
            {
                "request_id": rid,
                "user_id": user,
                "item_id": f"{rid}-g{k}",
                "event_timestamp": T0 + timedelta(days=day),
                "stage": "retrieved",
                "prerank_position": None,
                "rank_position": None,
                "label": None,
                "group": "global_negative",
                "label_timestamp": None,
            }
        )
    return rows


SCHEMA = pa.schema(
    [
        ("request_id", pa.string()),
        ("user_id", pa.string()),
        ("item_id", pa.string()),
        ("event_timestamp", pa.timestamp("us", tz="UTC")),
        ("stage", pa.string()),
        ("prerank_position", pa.int32()),
        ("rank_position", pa.int32()),
        ("label", pa.int8()),
        ("group", pa.string()),
        ("label_timestamp", pa.timestamp("us", tz="UTC")),
    ]
)


def _log() -> pa.Table:
    rows = [
        # Two clicks, one known before the cutoff: keeps 2 of its 4 global negatives.
        *_request("r1", "u1", 5, [6, 12, None], 4),
        # Both clicks known only later: keeps none.
        *_request("r2", "u1", 8, [11, 15], 4),
        # Every click known in time: keeps all.
        *_request("r3", "u2", 2, [3, None], 2),
        # No click at all but global negatives (another producer's log): kept.
        *_request("r4", "u2", 3, [None], 3),
        # After the cutoff: left out entirely.
        *_request("r5", "u2", 12, [13], 2),
    ]
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def test_global_negatives_of_clicks_known_later_are_dropped() -> None:
    log = _log()
    assert validate(log, "requests") == []
    before, later = log_as_of(log, CUTOFF)
    assert later == 3
    globals_ = before.filter(pc.equal(before["group"], "global_negative"))
    kept = globals_.column("item_id").to_pylist()
    # The first ones of each request in log order.
    assert kept == ["r1-g0", "r1-g1", "r3-g0", "r3-g1", "r4-g0", "r4-g1", "r4-g2"]
    others = before.filter(pc.not_equal(before["group"], "global_negative"))
    assert others.num_rows == 3 + 2 + 2 + 1  # every funnel row before the cutoff is kept
    assert pc.sum(before["label"]).as_py() == 2  # r1's first click and r3's
    assert validate(before, "requests") == []


def test_a_log_without_label_times_or_late_clicks_is_unchanged() -> None:
    log = _log().filter(pc.less(_log()["event_timestamp"], CUTOFF))
    plain, later = log_as_of(log.drop_columns(["label_timestamp"]), CUTOFF)
    assert later == 0 and plain.equals(log.drop_columns(["label_timestamp"]))
    # Every click known in time: nothing to drop.
    early = log.filter(pc.is_in(log["request_id"], pa.array(["r3", "r4"])))
    same, later = log_as_of(early, CUTOFF)
    assert later == 0 and same.equals(early)
