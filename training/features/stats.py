"""Point-in-time correct user and item statistics computed from the request log.

Each statistic table holds *daily snapshots*: the row stamped ``D + 1 day 00:00 UTC`` summarizes
every event strictly before that instant (all of day ``D`` and earlier); a click is an event of the
day it became known (the request log's optional ``label_timestamp``, else the request's time). A
request at time ``t`` is joined with the latest snapshot at or before ``t``, so it only ever sees
events from earlier days: no label of its own request, nor any click known only later, can leak
into its features. Rows are written only for days with activity; the point-in-time join carries
the latest one forward (within the feature view's ``ttl``).

Output tables (parquet, one row per entity and active day):

* ``item_content``: item_id, event_timestamp, text_num_words (int64), category (string).
* ``item_popularity``: item_id, event_timestamp, candidate_count, impressions, clicks (int64),
  ctr_smoothed, exposure_rate, log_candidate_count (float32).
* ``user_activity``: user_id, event_timestamp, requests, impressions, clicks, active_days
  (int64; days with a request or a click), ctr_smoothed, clicked_popularity_mean (float32).
* ``user_history``: user_id, event_timestamp, recent_item_ids (list<string>, oldest first, at
  most ``history_length``): the user's latest positives before the snapshot, from the
  engagement log (``interactions``) when there is one, else the clicks of the request log.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field

from training.data.contract import TIMESTAMP
from training.io import write_manifest, write_table

FEATURES_DIR = "features"
TABLES = ("item_content", "item_popularity", "user_activity", "user_history")


class StatsConfig(BaseModel):
    """Settings of the statistics job."""

    model_config = ConfigDict(extra="forbid")

    ctr_prior_clicks: float = Field(
        default=1.0, gt=0, description="Beta prior 'a' of smoothed CTRs (pseudo-clicks)."
    )
    ctr_prior_impressions: float = Field(
        default=20.0,
        gt=0,
        description="Beta prior 'a + b' of smoothed CTRs (pseudo-impressions); a/(a+b): prior CTR.",
    )
    history_length: int = Field(
        default=20,
        ge=1,
        le=200,
        description="Most recent positives kept per user_history snapshot (the expressive "
        "pre-ranker attends over them).",
    )


@dataclass
class FeatureTables:
    """The three statistics tables, ready to write as Feast sources."""

    item_content: pa.Table
    item_popularity: pa.Table
    user_activity: pa.Table
    user_history: pa.Table
    seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)

    def write(self, run_dir: Path, config: StatsConfig) -> dict[str, Path]:
        """Write each table to ``run_dir/features/<name>.parquet`` plus a manifest."""
        out = run_dir / FEATURES_DIR
        paths = {name: write_table(getattr(self, name), out / f"{name}.parquet") for name in TABLES}
        write_manifest(
            out,
            "features",
            inputs={
                "items": "data/items.parquet",
                "requests": "funnel/requests.parquet",
                # user_history comes from the interactions when given, else the log's clicks.
                **(
                    {"interactions": "data/interactions.parquet"}
                    if self.info.get("user_history_source") == "interactions"
                    else {}
                ),
            },
            outputs={k: v.name for k, v in paths.items()},
            config=config.model_dump(),
            metrics={
                **{f"{k}_rows": getattr(self, k).num_rows for k in paths},
                "seconds": round(self.seconds, 3),
                **self.info,
            },
        )
        return paths


def _float32(table: pa.Table, columns: list[str]) -> pa.Table:
    for col in columns:
        i = table.schema.get_field_index(col)
        table = table.set_column(i, col, table.column(col).cast(pa.float32()))
    return table


def compute_feature_tables(
    items: pa.Table,
    requests: pa.Table,
    config: StatsConfig | None = None,
    interactions: pa.Table | None = None,
) -> FeatureTables:
    """Compute item content, item popularity, user activity and user history snapshots.

    Args:
        items: Catalog conforming to the ``items`` contract.
        requests: Request log conforming to the ``requests`` contract.
        config: Smoothing priors and history length.
        interactions: Optional engagement log (``interactions`` contract), the source of
            ``user_history``; without it the request log's clicks are used.

    Returns:
        The four tables, each sorted by entity then time.
    """
    config = config or StatsConfig()
    began = time.perf_counter()
    a = config.ctr_prior_clicks
    ab = config.ctr_prior_impressions

    words = pc.list_value_length(pc.utf8_split_whitespace(items.column("text")))
    category = (
        pc.fill_null(items.column("category"), "")
        if "category" in items.column_names
        else pa.array([""] * items.num_rows, pa.string())
    )
    item_content = pa.table(
        {
            "item_id": items.column("item_id"),
            "event_timestamp": items.column("event_timestamp"),
            "text_num_words": words.cast(pa.int64()),
            "category": category,
        }
    )

    con = duckdb.connect()
    try:
        req = requests.select(
            ["request_id", "user_id", "item_id", "event_timestamp", "stage", "label", "group"]
        )
        # A click counts on the day it became known (label_timestamp), which can be days after
        # the impression: counted on the request's day, the next day's snapshot would hand the
        # features of every request in between an engagement that has not happened yet.
        known_at = req.column("event_timestamp").cast(TIMESTAMP)
        if "label_timestamp" in requests.column_names:
            known_at = pc.coalesce(requests.column("label_timestamp").cast(TIMESTAMP), known_at)
        con.register("req", req.append_column("click_known_at", known_at))
        con.execute("SET TimeZone = 'UTC'")
        item_popularity = con.sql(
            f"""
            WITH events AS (
                -- Global negatives never entered the funnel: they are random items drawn per
                -- exposed positive, so counting them would also date a click before it is known.
                SELECT item_id, date_trunc('day', event_timestamp) AS day, 1 AS n,
                       CASE WHEN stage = 'exposed' THEN 1 ELSE 0 END AS imp, 0 AS clk
                FROM req WHERE "group" IS DISTINCT FROM 'global_negative'
                UNION ALL
                SELECT item_id, date_trunc('day', click_known_at), 0, 0, 1
                FROM req WHERE label = 1
            ), daily AS (
                SELECT item_id, day, sum(n) AS n, sum(imp) AS imp, sum(clk) AS clk
                FROM events GROUP BY ALL
            ), cum AS (
                SELECT item_id, day + INTERVAL 1 DAY AS event_timestamp,
                       sum(n) OVER w AS candidate_count,
                       sum(imp) OVER w AS impressions,
                       sum(clk) OVER w AS clicks
                FROM daily
                WINDOW w AS (PARTITION BY item_id ORDER BY day ROWS UNBOUNDED PRECEDING)
            )
            SELECT item_id, event_timestamp,
                   candidate_count::BIGINT AS candidate_count,
                   impressions::BIGINT AS impressions, clicks::BIGINT AS clicks,
                   (clicks + {a}) / (impressions + {ab}) AS ctr_smoothed,
                   impressions / candidate_count AS exposure_rate,
                   ln(1 + candidate_count) AS log_candidate_count
            FROM cum ORDER BY item_id, event_timestamp
            """
        ).to_arrow_table()
        con.register("ipop", item_popularity)
        user_activity = con.sql(
            f"""
            WITH clicks AS (
                -- Popularity of each clicked item as known at the impression (as-of join on the
                -- snapshots, which only count earlier days), counted on the click's day.
                SELECT r.user_id,
                       date_trunc('day', r.click_known_at) AS day,
                       coalesce(p.log_candidate_count, 0.0) AS pop
                FROM req r ASOF LEFT JOIN ipop p
                  ON r.item_id = p.item_id AND r.event_timestamp >= p.event_timestamp
                WHERE r.label = 1
            ), click_daily AS (
                SELECT user_id, day, sum(pop) AS pop_sum, count(*) AS clk
                FROM clicks GROUP BY ALL
            ), request_daily AS (
                SELECT user_id, date_trunc('day', event_timestamp) AS day,
                       count(DISTINCT request_id) AS nreq,
                       sum(CASE WHEN stage = 'exposed' THEN 1 ELSE 0 END) AS imp
                FROM req GROUP BY ALL
            ), daily AS (
                -- A day with requests, clicks or both.
                SELECT coalesce(q.user_id, c.user_id) AS user_id, coalesce(q.day, c.day) AS day,
                       coalesce(q.nreq, 0) AS nreq, coalesce(q.imp, 0) AS imp,
                       coalesce(c.clk, 0) AS clk, coalesce(c.pop_sum, 0.0) AS pop_sum
                FROM request_daily q FULL OUTER JOIN click_daily c
                  ON q.user_id = c.user_id AND q.day = c.day
            ), cum AS (
                SELECT user_id, day + INTERVAL 1 DAY AS event_timestamp,
                       sum(nreq) OVER w AS requests,
                       sum(imp) OVER w AS impressions,
                       sum(clk) OVER w AS clicks,
                       row_number() OVER w AS active_days,
                       sum(pop_sum) OVER w AS pop_sum
                FROM daily
                WINDOW w AS (PARTITION BY user_id ORDER BY day ROWS UNBOUNDED PRECEDING)
            )
            SELECT user_id, event_timestamp,
                   requests::BIGINT AS requests, impressions::BIGINT AS impressions,
                   clicks::BIGINT AS clicks, active_days::BIGINT AS active_days,
                   (clicks + {a}) / (impressions + {ab}) AS ctr_smoothed,
                   CASE WHEN clicks > 0 THEN pop_sum / clicks ELSE 0.0 END
                       AS clicked_popularity_mean
            FROM cum ORDER BY user_id, event_timestamp
            """
        ).to_arrow_table()
    finally:
        con.close()

    item_popularity = _float32(
        _utc(item_popularity), ["ctr_smoothed", "exposure_rate", "log_candidate_count"]
    )
    user_activity = _float32(_utc(user_activity), ["ctr_smoothed", "clicked_popularity_mean"])
    if interactions is not None:
        positives = interactions.select(["user_id", "item_id", "event_timestamp"])
        history_source = "interactions"
    else:
        clicked = requests.filter(pc.equal(requests.column("label"), 1))
        # A click enters the history when it became known, as it does the click counts.
        when = clicked.column("event_timestamp").cast(TIMESTAMP)
        if "label_timestamp" in clicked.column_names:
            when = pc.coalesce(clicked.column("label_timestamp").cast(TIMESTAMP), when)
        positives = pa.table(
            {
                "user_id": clicked.column("user_id"),
                "item_id": clicked.column("item_id"),
                "event_timestamp": when,
            }
        )
        history_source = "request clicks"
    user_history = user_history_snapshots(positives, config.history_length)
    return FeatureTables(
        item_content=item_content,
        item_popularity=item_popularity,
        user_activity=user_activity,
        user_history=user_history,
        seconds=time.perf_counter() - began,
        info={
            "items": items.num_rows,
            "request_rows": requests.num_rows,
            "user_history_source": history_source,
            # How much label_timestamp matters for this log: clicks a day-based count would
            # otherwise have put before they happened.
            "clicks_known_on_a_later_day": _later_day_clicks(requests),
        },
    )


_DAY_US = 86_400_000_000


def _later_day_clicks(requests: pa.Table) -> int:
    """Clicks whose ``label_timestamp`` falls on a later UTC day than their request."""
    if "label_timestamp" not in requests.column_names:
        return 0
    days = [
        pc.cast(requests.column(c).cast(TIMESTAMP), pa.int64()).to_numpy(zero_copy_only=False)
        // _DAY_US
        for c in ("event_timestamp", "label_timestamp")
    ]
    known = pc.is_valid(requests.column("label_timestamp")).to_numpy(zero_copy_only=False)
    return int(np.count_nonzero(known & (days[1] > days[0])))


def user_history_snapshots(positives: pa.Table, history_length: int) -> pa.Table:
    """Daily snapshots of each user's latest positives.

    The row stamped ``D + 1 day 00:00 UTC`` lists the user's last ``history_length`` positives
    up to the end of day ``D`` (oldest first), so a request joined point-in-time sees only
    earlier days, like the other statistics.

    Args:
        positives: ``user_id``, ``item_id``, ``event_timestamp`` of positive events.
        history_length: Most items per snapshot.

    Returns:
        ``user_id``, ``event_timestamp``, ``recent_item_ids`` sorted by user then time.
    """
    ts = positives.column("event_timestamp").cast(pa.timestamp("us", tz="UTC"))
    micros = pc.cast(ts, pa.int64()).to_numpy(zero_copy_only=False)
    users = positives.column("user_id").to_numpy(zero_copy_only=False).astype(str)
    items = positives.column("item_id").to_numpy(zero_copy_only=False).astype(str)
    order = np.lexsort((micros, users))
    users, items, days = users[order], items[order], micros[order] // _DAY_US
    n = len(order)
    if n == 0:
        empty = pa.array([], pa.timestamp("us", tz="UTC"))
        return pa.table(
            {
                "user_id": pa.array([], pa.string()),
                "event_timestamp": empty,
                "recent_item_ids": pa.array([], pa.list_(pa.string())),
            }
        )
    new_user = np.ones(n, dtype=bool)
    new_user[1:] = users[1:] != users[:-1]
    user_start = np.maximum.accumulate(np.where(new_user, np.arange(n), 0))
    # The last event of each (user, day) closes that day's snapshot.
    last = np.ones(n, dtype=bool)
    last[:-1] = (users[1:] != users[:-1]) | (days[1:] != days[:-1])
    ends = np.flatnonzero(last) + 1
    starts = np.maximum(user_start[ends - 1], ends - history_length)
    lengths = ends - starts
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    # Window j covers starts[j] .. ends[j]-1: one gather builds every list at once.
    take = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])
    values = pa.array(items[take], pa.string())
    return pa.table(
        {
            "user_id": pa.array(users[ends - 1], pa.string()),
            "event_timestamp": pa.array((days[ends - 1] + 1) * _DAY_US, pa.int64()).cast(
                pa.timestamp("us", tz="UTC")
            ),
            "recent_item_ids": pa.ListArray.from_arrays(pa.array(offsets), values),
        }
    )


def _utc(table: pa.Table) -> pa.Table:
    i = table.schema.get_field_index("event_timestamp")
    return table.set_column(
        i, "event_timestamp", table.column("event_timestamp").cast(pa.timestamp("us", tz="UTC"))
    )
