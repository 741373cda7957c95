"""Feature registry browsing: feature views, feature services and entities (`/v1/registry/`)."""

from __future__ import annotations

from fastapi import APIRouter

from gpl_service.deps import State
from gpl_service.errors import ErrorResponse
from gpl_service.registry import describe_view, list_entities, list_services, list_views
from gpl_service.schemas import (
    EntityInfo,
    FeatureServiceInfo,
    FeatureViewDetail,
    FeatureViewSummary,
)

router = APIRouter(prefix="/v1/registry", tags=["registry"])


@router.get("/feature-views", response_model=list[FeatureViewSummary], summary="List feature views")
def feature_views(state: State) -> list[FeatureViewSummary]:
    """Every feature view: entities, ttl, online flag, and how fresh its online values are."""
    return list_views(state.store)


@router.get(
    "/feature-services",
    response_model=list[FeatureServiceInfo],
    summary="List feature services",
)
def feature_services(state: State) -> list[FeatureServiceInfo]:
    """Every feature service: its version tag and, per view, the features it joins."""
    return list_services(state.store)


@router.get("/entities", response_model=list[EntityInfo], summary="List entities")
def entities(state: State) -> list[EntityInfo]:
    """Every entity: join key, value type, description."""
    return list_entities(state.store)


@router.get(
    # ``:path`` so a name holding "/" (encoded or not) reaches the handler and gets the 404
    # that lists the views, not the router's bare "Not Found".
    "/feature-views/{name:path}",
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
