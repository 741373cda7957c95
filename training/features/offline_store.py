"""A Feast offline store for parquet sources that keeps every entity row and is fast.

Feast's file (Dask) offline store has two problems for this workload: it silently drops entity
rows that have no feature row at or before their timestamp, and it is slow on list-valued
(embedding) columns because it carries them through a pandas merge. This store keeps the Feast
API (``FeatureStore.get_historical_features`` and ``materialize`` call it through the
``offline_store.type`` setting) but does the point-in-time join differently:

1. For each feature view, DuckDB's ``ASOF LEFT JOIN`` matches every entity row with the index of
   the latest feature row whose timestamp is ``<=`` the entity timestamp (ties broken by the
   created timestamp). Only keys, timestamps and row indices go through the join.
2. A row older than the view's ``ttl`` is unmatched. An unmatched row keeps nulls: it is never
   dropped. A feature row stamped after the entity timestamp is never matched (no leakage).
3. Feature columns, embeddings included, are gathered with one vectorized ``take`` per column.

Entity rows come back in the order they went in. Sources are ``FileSource`` parquet files; a
relative path is resolved against ``data_dir`` (default: the Feast repo path).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from feast import FeatureView, FileSource
from feast.infra.offline_stores.dask import DaskOfflineStore, DaskOfflineStoreConfig
from feast.infra.offline_stores.offline_store import RetrievalJob, RetrievalMetadata
from feast.infra.registry.base_registry import BaseRegistry
from feast.on_demand_feature_view import OnDemandFeatureView
from feast.repo_config import RepoConfig

ENTITY_TIMESTAMP = "event_timestamp"
_ROW = "__gpl_row"
_FROW = "__gpl_feature_row"


class GplOfflineStoreConfig(DaskOfflineStoreConfig):
    """Offline store settings (``offline_store:`` in ``feature_store.yaml``)."""

    type: Literal["training.features.offline_store.GplOfflineStore"] = (
        "training.features.offline_store.GplOfflineStore"  # type: ignore[assignment]
    )
    """Selects this store."""

    data_dir: str | None = None
    """Directory that relative source paths resolve against; default: the Feast repo path."""


class GplRetrievalJob(RetrievalJob):
    """A lazy retrieval: the join runs when the result is first asked for, then is cached."""

    def __init__(
        self,
        compute: Callable[[], pa.Table],
        full_feature_names: bool,
        metadata: RetrievalMetadata | None = None,
    ) -> None:
        self._compute = compute
        self._full_feature_names = full_feature_names
        self._metadata = metadata
        self._result: pa.Table | None = None

    @property
    def full_feature_names(self) -> bool:
        """Whether feature columns are named ``view__feature``."""
        return self._full_feature_names

    @property
    def on_demand_feature_views(self) -> list[OnDemandFeatureView]:
        """On-demand views are not used by this project."""
        return []

    @property
    def metadata(self) -> RetrievalMetadata | None:
        """Feature names, keys and time bounds of the retrieval."""
        return self._metadata

    def _table(self) -> pa.Table:
        if self._result is None:
            self._result = self._compute()
        return self._result

    def _to_arrow_internal(self, timeout: int | None = None) -> pa.Table:
        return self._table()

    def _to_df_internal(self, timeout: int | None = None) -> pd.DataFrame:
        return self._table().to_pandas()

    def supports_remote_storage_export(self) -> bool:
        """No remote export: results are local Arrow tables."""
        return False


def source_path(config: RepoConfig, source: FileSource) -> Path:
    """Absolute path of a file source, resolving relative paths against ``data_dir``."""
    path = Path(source.path)
    if path.is_absolute():
        return path
    data_dir = getattr(config.offline_store, "data_dir", None) or config.repo_path
    return Path(data_dir or ".") / path


def _read_source(config: RepoConfig, source: FileSource, columns: list[str]) -> pa.Table:
    path = source_path(config, source)
    if not path.exists():
        raise FileNotFoundError(
            f"feature source {source.name!r} reads {path}, which does not exist; "
            "run the stage that writes it first"
        )
    schema = pq.read_schema(path)
    missing = [c for c in columns if c not in schema.names]
    if missing:
        raise ValueError(f"feature source {source.name!r} ({path}) lacks columns {missing}")
    table = pq.read_table(path, columns=columns)
    ts = source.timestamp_field
    if table.schema.field(ts).type.tz is None:
        # A naive source timestamp is taken as UTC, the contract's time zone.
        idx = table.schema.get_field_index(ts)
        table = table.set_column(idx, ts, table.column(ts).cast(pa.timestamp("us", tz="UTC")))
    return table


def _as_utc_arrow(entity_df: pd.DataFrame) -> pa.Table:
    table = pa.Table.from_pandas(entity_df, preserve_index=False)
    ts_type = table.schema.field(ENTITY_TIMESTAMP).type
    if not pa.types.is_timestamp(ts_type):
        raise ValueError(
            f"entity_df column {ENTITY_TIMESTAMP!r} must be a timestamp, got {ts_type}"
        )
    if ts_type.tz is None:
        raise ValueError(
            f"entity_df column {ENTITY_TIMESTAMP!r} is timezone-naive; pass UTC-aware timestamps"
        )
    return table


def match_rows(
    entity: pa.Table,
    features: pa.Table,
    join_keys: list[str],
    timestamp_field: str,
    created_field: str | None,
    ttl: timedelta | None,
) -> pa.Array:
    """For each entity row, the index of the point-in-time feature row (null when none).

    Args:
        entity: Entity rows: ``join_keys`` and ``event_timestamp``.
        features: Feature rows: ``join_keys``, ``timestamp_field`` and optionally ``created_field``.
        join_keys: Columns that must be equal.
        timestamp_field: Feature timestamp; the match is the latest one ``<=`` the entity's.
        created_field: Breaks ties between feature rows with equal keys and timestamp.
        ttl: When positive, a match older than this is discarded.

    Returns:
        An int64 array aligned with ``entity``: feature row index, or null.
    """
    # Imported here, not at the top: Feast imports this module whenever it opens the store, the
    # service included, which never joins offline; DuckDB's binding loaded there prints ~45
    # lines of nanobind "leaked" reports when `gpl serve` exits.
    import duckdb

    con = duckdb.connect()
    try:
        ent = pa.table(
            {
                **{k: entity.column(k) for k in join_keys},
                "__ts": entity.column(ENTITY_TIMESTAMP).cast(pa.timestamp("us", tz="UTC")),
                _ROW: pa.array(np.arange(entity.num_rows, dtype=np.int64)),
            }
        )
        feat_cols = {k: features.column(k) for k in join_keys}
        feat_cols["__fts"] = features.column(timestamp_field).cast(pa.timestamp("us", tz="UTC"))
        feat_cols["__created"] = (
            features.column(created_field).cast(pa.timestamp("us", tz="UTC"))
            if created_field
            else pa.nulls(features.num_rows, pa.timestamp("us", tz="UTC"))
        )
        feat_cols[_FROW] = pa.array(np.arange(features.num_rows, dtype=np.int64))
        con.register("ent", ent)
        con.register("feat_raw", pa.table(feat_cols))
        keys = ", ".join(f'"{k}"' for k in join_keys)
        on_keys = " AND ".join(f'e."{k}" = f."{k}"' for k in join_keys)
        # Equal (keys, timestamp) rows: the latest created wins, then the last written row.
        con.execute(
            f"""
            CREATE TEMP TABLE feat AS
            SELECT * FROM feat_raw
            QUALIFY row_number() OVER (
                PARTITION BY {keys}, __fts ORDER BY __created DESC NULLS LAST, {_FROW} DESC
            ) = 1
            """
        )
        ttl_clause = ""
        if ttl is not None and ttl > timedelta(0):
            micros = int(ttl / timedelta(microseconds=1))
            ttl_clause = f"AND e.__ts - f.__fts <= INTERVAL {micros} MICROSECOND"
        result = con.sql(
            f"""
            SELECT e.{_ROW}, CASE WHEN f.{_FROW} IS NOT NULL {ttl_clause}
                                  THEN f.{_FROW} END AS {_FROW}
            FROM ent e ASOF LEFT JOIN feat f ON {on_keys} AND e.__ts >= f.__fts
            ORDER BY e.{_ROW}
            """
        ).to_arrow_table()
    finally:
        con.close()
    return result.column(_FROW).combine_chunks()


def point_in_time_join(
    config: RepoConfig,
    entity_df: pd.DataFrame,
    views_to_features: dict[FeatureView, list[str]],
    full_feature_names: bool,
) -> pa.Table:
    """The leak-free, row-preserving join behind :meth:`GplOfflineStore.get_historical_features`."""
    entity = _as_utc_arrow(entity_df)
    out = entity
    for view, features in views_to_features.items():
        source = view.batch_source
        if not isinstance(source, FileSource):
            raise TypeError(f"feature view {view.name!r}: only FileSource (parquet) is supported")
        join_keys = [view.projection.join_key_map.get(k, k) for k in view.join_keys]
        source_keys = list(view.join_keys)
        missing = [k for k in join_keys if k not in entity.column_names]
        if missing:
            raise ValueError(
                f"entity_df lacks join keys {missing} needed by feature view {view.name!r}"
            )
        columns = list(
            dict.fromkeys(
                [*source_keys, source.timestamp_field]
                + ([source.created_timestamp_column] if source.created_timestamp_column else [])
                + features
            )
        )
        table = _read_source(config, source, columns)
        renamed = table.rename_columns(
            [dict(zip(source_keys, join_keys, strict=True)).get(c, c) for c in table.column_names]
        )
        idx = match_rows(
            entity,
            renamed,
            join_keys,
            source.timestamp_field,
            source.created_timestamp_column or None,
            view.ttl,
        )
        for feature in features:
            name = f"{view.projection.name_to_use()}__{feature}" if full_feature_names else feature
            out = out.append_column(name, table.column(feature).take(idx))
    return out


def _views_to_features(
    feature_refs: list[str], feature_views: list[FeatureView]
) -> dict[FeatureView, list[str]]:
    by_name = {fv.projection.name_to_use(): fv for fv in feature_views}
    result: dict[FeatureView, list[str]] = {}
    for ref in feature_refs:
        view_name, feature = ref.split(":", 1)
        if view_name not in by_name:
            raise ValueError(f"feature reference {ref!r} names no known feature view")
        result.setdefault(by_name[view_name], []).append(feature)
    return result


class GplOfflineStore(DaskOfflineStore):
    """Feast offline store: Dask's file store with a fast, row-preserving point-in-time join."""

    supports_filter_by_created_timestamp = False

    @staticmethod
    def get_historical_features(
        config: RepoConfig,
        feature_views: list[FeatureView],
        feature_refs: list[str],
        entity_df: Any,
        registry: BaseRegistry,
        project: str,
        full_feature_names: bool = False,
        filter_by_created_timestamp: bool = False,
        **kwargs: Any,
    ) -> RetrievalJob:
        """Point-in-time join of ``feature_refs`` onto every row of ``entity_df``."""
        if not isinstance(entity_df, pd.DataFrame):
            raise TypeError(
                "GplOfflineStore needs entity_df as a pandas DataFrame "
                f"(got {type(entity_df).__name__})"
            )
        if ENTITY_TIMESTAMP not in entity_df.columns:
            raise ValueError(f"entity_df needs an {ENTITY_TIMESTAMP!r} column")
        views = _views_to_features(feature_refs, feature_views)
        ts = entity_df[ENTITY_TIMESTAMP]
        metadata = RetrievalMetadata(
            features=feature_refs,
            keys=[c for c in entity_df.columns if c != ENTITY_TIMESTAMP],
            min_event_timestamp=ts.min() if len(ts) else None,
            max_event_timestamp=ts.max() if len(ts) else None,
        )
        return GplRetrievalJob(
            lambda: point_in_time_join(config, entity_df, views, full_feature_names),
            full_feature_names,
            metadata,
        )

    @staticmethod
    def pull_latest_from_table_or_query(
        config: RepoConfig,
        data_source: Any,
        join_key_columns: list[str],
        feature_name_columns: list[str],
        timestamp_field: str,
        created_timestamp_column: str | None,
        start_date: datetime | None = None,
        end_date: datetime | None = None,
    ) -> RetrievalJob:
        """Latest row per entity within ``[start_date, end_date)``: what ``materialize`` writes."""

        def compute() -> pa.Table:
            columns = list(
                dict.fromkeys(
                    [*join_key_columns, *feature_name_columns, timestamp_field]
                    + ([created_timestamp_column] if created_timestamp_column else [])
                )
            )
            table = _read_source(config, data_source, columns)
            ts = table.column(timestamp_field)
            mask = None
            if start_date is not None:
                mask = pc.greater_equal(ts, pa.scalar(start_date, ts.type))
            if end_date is not None:
                upper = pc.less(ts, pa.scalar(end_date, ts.type))
                mask = upper if mask is None else pc.and_(mask, upper)
            if mask is not None:
                table = table.filter(mask)
            return _latest_per_key(
                table, join_key_columns, timestamp_field, created_timestamp_column
            )

        return GplRetrievalJob(compute, full_feature_names=False)


def _latest_per_key(table: pa.Table, keys: list[str], ts: str, created: str | None) -> pa.Table:
    import duckdb  # here, not at the top: see match_rows

    con = duckdb.connect()
    try:
        light = pa.table(
            {
                **{k: table.column(k) for k in keys},
                "__ts": table.column(ts),
                "__created": table.column(created)
                if created
                else pa.nulls(table.num_rows, pa.int8()),
                _FROW: pa.array(np.arange(table.num_rows, dtype=np.int64)),
            }
        )
        con.register("t", light)
        partition = ", ".join(f'"{k}"' for k in keys) if keys else "1"
        idx = con.sql(
            f"""
            SELECT {_FROW} FROM t
            QUALIFY row_number() OVER (
                PARTITION BY {partition} ORDER BY __ts DESC, __created DESC NULLS LAST, {_FROW} DESC
            ) = 1
            ORDER BY {_FROW}
            """
        ).to_arrow_table()
    finally:
        with contextlib.suppress(Exception):
            con.close()
    return table.take(idx.column(_FROW))
