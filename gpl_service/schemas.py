"""Request and response bodies of the HTTP API (they make the OpenAPI document)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StringConstraints, create_model

Id = Annotated[
    str,
    StringConstraints(min_length=1, max_length=256, strip_whitespace=False, pattern=r"\S"),
]
"""A user or item id: 1-256 characters, not only whitespace."""


class PrerankRequestBase(BaseModel):
    """Fields shared by every max-candidates variant of the request."""

    model_config = ConfigDict(extra="forbid")

    user_id: Id = Field(description="The user to pre-rank for (the Feast `user_id` key).")
    request_id: Annotated[str, StringConstraints(min_length=1, max_length=128)] | None = Field(
        default=None, description="Caller's id for this request; generated when absent."
    )


def prerank_request_model(max_candidates: int, default_top_k: int) -> type[PrerankRequestBase]:
    """The request model with this deployment's limits, so the OpenAPI document states them."""
    return create_model(
        "PrerankRequest",
        __base__=PrerankRequestBase,
        candidates=(
            list[Id],
            Field(
                min_length=1,
                max_length=max_candidates,
                description=f"Recalled item ids to score (1 to {max_candidates}). Duplicates "
                "are scored once (first occurrence) and counted in stats.duplicates_removed.",
            ),
        ),
        top_k=(
            # Strict: JSON true or "3" is a caller's bug, not 1 or 3.
            StrictInt | None,
            Field(
                default=None,
                ge=1,
                le=max_candidates,
                description=f"Items to return, best first (default {default_top_k}, at most "
                "the number of unique candidates).",
            ),
        ),
    )


class ScoredItem(BaseModel):
    """One returned candidate."""

    item_id: str
    score: float = Field(description="Click probability from the model that scored it last.")
    model: Literal["light", "expressive"] = Field(
        description="'expressive' for the hard candidates the expressive model re-scored (ranked "
        "first), 'light' for the rest."
    )


class PrerankStats(BaseModel):
    """How the request was served."""

    candidates: int = Field(description="Unique candidates scored.")
    duplicates_removed: int
    scored_light: int
    scored_expressive: int
    unknown_items: int = Field(
        description="Candidates neither the cache nor the online store knows (defaults used)."
    )
    fetched_from_store: int = Field(description="Candidates read from the store on a miss.")
    history_items: int
    anchors: int
    feature_age_seconds: dict[str, float | None] = Field(
        description="Per feature view, age of the row used (items: the oldest candidate row); "
        "null when absent."
    )
    item_cache_age_seconds: float
    item_states: Literal["precomputed", "per request"] = Field(
        description="'precomputed': the models' item halves came from the cache (computed once "
        "per item; rows past a ttl recomputed); 'per request': the full graphs ran on every "
        "candidate (a bundle without split graphs, or precomputing turned off)."
    )
    timings_ms: dict[str, float]


class PrerankResponse(BaseModel):
    """The pre-ranked top-k."""

    request_id: str
    model_version: str
    degraded: bool = Field(
        description="True when the online store could not be read: user features are defaults "
        "and items come from the cache only."
    )
    items: list[ScoredItem]
    stats: PrerankStats


class Health(BaseModel):
    """Liveness."""

    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    """Readiness: models and stores loaded."""

    ready: bool
    model_loaded: bool
    item_cache_loaded: bool
    items_cached: int
    online_store: dict[str, Any]


class ReloadRequest(BaseModel):
    """Which bundle to load."""

    model_config = ConfigDict(extra="forbid")

    bundle_dir: str | None = Field(
        default=None, description="Bundle directory (default: the one the service started with)."
    )


class ReloadResponse(BaseModel):
    """The bundle now served."""

    model_version: str
    previous_version: str | None
    bundle_dir: str


class FieldInfo(BaseModel):
    """One feature of a view."""

    name: str
    dtype: str
    description: str
    default: str | None
    tags: dict[str, str]


class FeatureViewSummary(BaseModel):
    """A feature view as listed."""

    name: str
    description: str
    entities: list[str]
    online: bool
    ttl_seconds: float | None = Field(description="Row lifetime; null = never expires.")
    features: int
    last_materialized: str | None = Field(
        description="End of the latest materialized interval (when the job last ran up to)."
    )
    online_age_seconds: float | None = Field(
        description="Seconds since that end: how long since the online store was last brought "
        "up to date. The values can be older: see data_age_seconds."
    )
    online_store: str | None = Field(
        default=None,
        description="Where the last load wrote (redis://host:port/db or sqlite:PATH); null if "
        "this run never loaded the view.",
    )
    newest_online_row: str | None = Field(
        default=None,
        description="Timestamp of the newest feature row that load brought (ISO); null if none.",
    )
    data_age_seconds: float | None = Field(
        default=None,
        description="Seconds since that row: how old the newest online value is.",
    )


class FeatureServiceInfo(BaseModel):
    """A feature service: the contract between a model's training join and its serving."""

    name: str
    description: str
    version: str | None = Field(description="The service's version tag (the bundle records it).")
    tags: dict[str, str]
    views: dict[str, list[str]] = Field(description="View name -> the features it contributes.")


class EntityInfo(BaseModel):
    """An entity: what feature rows are keyed by."""

    name: str
    join_key: str
    value_type: str
    description: str


class FeatureViewDetail(FeatureViewSummary):
    """A feature view with its entities' join keys and every field."""

    join_keys: list[str]
    fields: list[FieldInfo]
    tags: dict[str, str]
    source: str | None
    materialization_intervals: list[list[str]]
