"""Feature registry browsing: the feature views as the registry describes them."""

from __future__ import annotations

import time
from typing import Any

from feast import FeatureStore, FeatureView

from gpl_service.errors import NotFoundError
from gpl_service.schemas import FeatureViewDetail, FeatureViewSummary, FieldInfo


def _summary(view: FeatureView) -> dict[str, Any]:
    intervals = view.materialization_intervals
    last = max((end for _, end in intervals), default=None)
    return {
        "name": view.name,
        "description": view.description,
        "entities": list(view.entities),
        "online": bool(view.online),
        "ttl_seconds": view.ttl.total_seconds() if view.ttl else None,
        "features": len(view.features),
        "last_materialized": last.isoformat() if last else None,
        "online_age_seconds": round(time.time() - last.timestamp(), 3) if last else None,
    }


def list_views(store: FeatureStore) -> list[FeatureViewSummary]:
    """Every feature view, by name."""
    views = sorted(store.list_feature_views(), key=lambda v: v.name)
    return [FeatureViewSummary(**_summary(v)) for v in views]


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
        **_summary(view),
        join_keys=[c.name for c in view.entity_columns],
        fields=fields,
        tags=dict(view.tags),
        source=getattr(source, "path", None) or (source.name if source else None),
        materialization_intervals=[
            [start.isoformat(), end.isoformat()] for start, end in view.materialization_intervals
        ],
    )
