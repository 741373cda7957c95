"""Feature registry browsing: ``/v1/registry/feature-views[/{name}]``."""

from __future__ import annotations

from fastapi import APIRouter

from gpl_service.deps import State
from gpl_service.errors import ErrorResponse
from gpl_service.registry import describe_view, list_views
from gpl_service.schemas import FeatureViewDetail, FeatureViewSummary

router = APIRouter(prefix="/v1/registry", tags=["registry"])


@router.get("/feature-views", response_model=list[FeatureViewSummary], summary="List feature views")
def feature_views(state: State) -> list[FeatureViewSummary]:
    """Every feature view: entities, ttl, online flag, and how fresh its online values are."""
    return list_views(state.store)


@router.get(
    "/feature-views/{name}",
    response_model=FeatureViewDetail,
    responses={404: {"model": ErrorResponse, "description": "No such feature view."}},
    summary="One feature view",
)
def feature_view(name: str, state: State) -> FeatureViewDetail:
    """One feature view in full.

    Entities with join keys, every field with dtype, description and default, ttl, source,
    and the materialized intervals (online freshness).
    """
    return describe_view(state.store, name)
