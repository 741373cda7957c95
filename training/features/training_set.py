"""The training-set builder: the request log, point-in-time joined through the FeatureService.

``build_training_set`` passes the requests table as the entity dataframe to Feast's
``get_historical_features`` with the pre-ranker's FeatureService. Guarantees, checked on every
build rather than assumed:

* rows out == rows in, in the same order (the offline store never drops a row);
* a feature row stamped after a request is never joined (point-in-time, no leakage);
* where a view has no row for an entity at that time (or it is older than the view's ``ttl``),
  its features get the explicit default from the field's ``default`` tag and the row gets
  ``<view>__missing = 1``; the same defaults are used online.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from feast import FeatureService, FeatureStore, FeatureView
from feast.types import Array, Bool, Float32, Float64, Int32, Int64, String

from training.io import write_manifest, write_table

TRAINING_SET_DIR = "training_set"
DEFAULT_SERVICE = "preranker"


class RowsLostError(RuntimeError):
    """The join returned a different number of rows than it was given."""


_ARROW_TYPES: dict[Any, pa.DataType] = {
    Int64: pa.int64(),
    Int32: pa.int32(),
    Float32: pa.float32(),
    Float64: pa.float64(),
    String: pa.string(),
    Bool: pa.bool_(),
}


def field_default(view: FeatureView, name: str) -> Any:
    """The declared default of feature ``name`` of ``view``, typed by the field's dtype.

    Raises:
        KeyError: when the field is unknown or declares no ``default`` tag.
    """
    for fld in view.features:
        if fld.name == name:
            if "default" not in fld.tags:
                raise KeyError(f"feature {view.name}:{name} declares no 'default' tag")
            raw = fld.tags["default"]
            if isinstance(fld.dtype, Array):
                value = json.loads(raw)
                if not isinstance(value, list):
                    raise ValueError(
                        f"feature {view.name}:{name}: list default must be a JSON list"
                    )
                return value
            if fld.dtype in (Int64, Int32):
                return int(raw)
            if fld.dtype in (Float32, Float64):
                return float(raw)
            if fld.dtype == Bool:
                return raw.lower() == "true"
            return raw
    raise KeyError(f"feature view {view.name!r} has no feature {name!r}")


def arrow_type(view: FeatureView, name: str) -> pa.DataType:
    """Arrow type of feature ``name`` of ``view``."""
    for fld in view.features:
        if fld.name == name:
            if isinstance(fld.dtype, Array):
                return pa.list_(_ARROW_TYPES[fld.dtype.base_type])
            return _ARROW_TYPES[fld.dtype]
    raise KeyError(f"feature view {view.name!r} has no feature {name!r}")


def service_views(
    store: FeatureStore, service: FeatureService
) -> list[tuple[FeatureView, list[str]]]:
    """The feature views of ``service`` with the feature names it selects from each."""
    result = []
    for projection in service.feature_view_projections:
        view = store.get_feature_view(projection.name)
        result.append((view, [f.name for f in projection.features]))
    return result


@dataclass
class TrainingSet:
    """A built training set and what it is made of."""

    table: pa.Table
    feature_columns: list[str]
    missing_indicators: list[str]
    service: str
    seconds: float = 0.0
    coverage: dict[str, float] = field(default_factory=dict)

    def write(self, run_dir: Path) -> Path:
        """Write the table and its manifest; return the table's path.

        The default service's set goes to ``run_dir/training_set/training_set.parquet``, any
        other's to ``run_dir/training_set/SERVICE/training_set.parquet``: joining one service
        never overwrites another's set.
        """
        out = run_dir / TRAINING_SET_DIR
        if self.service != DEFAULT_SERVICE:
            out = out / self.service
        path = write_table(self.table, out / "training_set.parquet")
        write_manifest(
            out,
            "training_set",
            inputs={"requests": "funnel/requests.parquet", "feature_service": self.service},
            outputs={"training_set": path.name},
            config={
                "feature_columns": self.feature_columns,
                "missing_indicators": self.missing_indicators,
            },
            metrics={
                "rows": self.table.num_rows,
                "seconds": round(self.seconds, 3),
                "coverage": self.coverage,
            },
        )
        return path


def build_training_set(
    store: FeatureStore, requests: pa.Table, service_name: str = DEFAULT_SERVICE
) -> TrainingSet:
    """Point-in-time join ``requests`` with every feature of the FeatureService.

    Args:
        store: Feature store whose definitions have been applied.
        requests: Entity rows: at least the service's join keys and ``event_timestamp``; every
            other column (labels, groups, ...) is carried through unchanged.
        service_name: The FeatureService to join.

    Returns:
        The training set: the request columns, then ``<view>__<feature>`` columns with defaults
        filled, then one ``<view>__missing`` int8 indicator per view.

    Raises:
        RowsLostError: if the join returned a different number of rows.
    """
    began = time.perf_counter()
    service = store.get_feature_service(service_name)
    entity_df = requests.to_pandas()
    job = store.get_historical_features(
        entity_df=entity_df, features=service, full_feature_names=True
    )
    joined = job.to_arrow()
    if joined.num_rows != requests.num_rows:
        raise RowsLostError(
            f"point-in-time join returned {joined.num_rows} rows for {requests.num_rows} requests"
        )

    table = requests
    feature_columns: list[str] = []
    indicators: list[str] = []
    coverage: dict[str, float] = {}
    for view, names in service_views(store, service):
        columns = [f"{view.name}__{n}" for n in names]
        absent = [c for c in columns if c not in joined.column_names]
        if absent:
            raise KeyError(f"feature view {view.name!r}: columns {absent} missing from the join")
        missing = pc.is_null(joined.column(columns[0]))
        for col in columns[1:]:
            missing = pc.and_(missing, pc.is_null(joined.column(col)))
        for name, col in zip(names, columns, strict=True):
            typ = arrow_type(view, name)
            values = joined.column(col).cast(typ)
            default = field_default(view, name)
            table = table.append_column(col, pc.fill_null(values, pa.scalar(default, typ)))
            feature_columns.append(col)
        indicator = f"{view.name}__missing"
        table = table.append_column(indicator, missing.cast(pa.int8()))
        indicators.append(indicator)
        n_missing = pc.sum(missing).as_py() or 0
        coverage[view.name] = round(1.0 - n_missing / max(requests.num_rows, 1), 6)
    return TrainingSet(
        table=table,
        feature_columns=feature_columns,
        missing_indicators=indicators,
        service=service_name,
        seconds=time.perf_counter() - began,
        coverage=coverage,
    )
