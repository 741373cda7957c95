"""Feature registry browsing: feature views, feature services and entities as registered.

Freshness comes from two places: Feast's registry says when each view was last materialized
(the job), the loads record beside it (``training.features.store.read_online_loads``) what that
load brought: the newest feature row, whose age is how old the online values really are.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

from feast import FeatureStore, FeatureView

from gpl_service.errors import NotFoundError
from gpl_service.schemas import (
    EntityInfo,
    FeatureServiceInfo,
    FeatureViewDetail,
    FeatureViewSummary,
    FieldInfo,
)
from training.features.store import read_online_loads


def _age(moment: datetime | None) -> float | None:
    return round(time.time() - moment.timestamp(), 3) if moment else None


def _summary(view: FeatureView, loads: dict[str, dict[str, Any]]) -> dict[str, Any]:
    intervals = view.materialization_intervals
    last = max((end for _, end in intervals), default=None)
    load = loads.get(view.name, {})
    newest = load.get("newest_row")
    newest_at = datetime.fromisoformat(newest) if isinstance(newest, str) else None
    return {
        "name": view.name,
        "description": view.description,
        "entities": list(view.entities),
        "online": bool(view.online),
        "ttl_seconds": view.ttl.total_seconds() if view.ttl else None,
        "features": len(view.features),
        "last_materialized": last.isoformat() if last else None,
        "online_age_seconds": _age(last),
        "online_store": load.get("online_store"),
        "newest_online_row": newest,
        "data_age_seconds": _age(newest_at),
    }


def list_views(store: FeatureStore) -> list[FeatureViewSummary]:
    """Every feature view, by name."""
    loads = read_online_loads(store)
    views = sorted(store.list_feature_views(), key=lambda v: v.name)
    return [FeatureViewSummary(**_summary(v, loads)) for v in views]


def list_services(store: FeatureStore) -> list[FeatureServiceInfo]:
    """Every feature service: the views and features it joins, its version tag."""
    out = []
    for service in sorted(store.list_feature_services(), key=lambda s: s.name):
        out.append(
            FeatureServiceInfo(
                name=service.name,
                description=service.description,
                version=service.tags.get("version"),
                tags=dict(service.tags),
                views={
                    p.name_to_use(): [f.name for f in p.features]
                    for p in service.feature_view_projections
                },
            )
        )
    return out


def list_entities(store: FeatureStore) -> list[EntityInfo]:
    """Every entity with its join key and value type."""
    return [
        EntityInfo(
            name=e.name,
            join_key=e.join_key,
            value_type=e.value_type.name,
            description=e.description,
        )
        for e in sorted(store.list_entities(), key=lambda e: e.name)
    ]


def describe_view(store: FeatureStore, name: str) -> FeatureViewDetail:
    """One feature view in full.

    Raises:
        NotFoundError: naming the views that exist.
    """
    views = {v.name: v for v in store.list_feature_views()}
    view = views.get(name)
    if view is None:
        raise NotFoundError(
            f"no feature view {name!r}; the registry has: {', '.join(sorted(views))}"
        )
    fields = [
        FieldInfo(
            name=f.name,
            dtype=str(f.dtype),
            description=f.description,
            default=f.tags.get("default"),
            tags=dict(f.tags),
        )
        for f in view.features
    ]
    source = view.batch_source
    return FeatureViewDetail(
        **_summary(view, read_online_loads(store)),
        join_keys=[c.name for c in view.entity_columns],
        fields=fields,
        tags=dict(view.tags),
        source=getattr(source, "path", None) or (source.name if source else None),
        materialization_intervals=[
            [start.isoformat(), end.isoformat()] for start, end in view.materialization_intervals
        ],
    )
