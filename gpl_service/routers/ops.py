"""Operations: liveness, readiness, Prometheus metrics, the served bundle's manifest."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from gpl_service.deps import State
from gpl_service.errors import ErrorResponse, NotReadyError
from gpl_service.schemas import Health, Readiness

router = APIRouter(tags=["operations"])


@router.get("/v1/health", response_model=Health, summary="Liveness")
async def health() -> Health:
    """200 while the process answers."""
    return Health()


@router.get(
    "/v1/ready",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "Not ready; the body says what."}},
    summary="Readiness: models and stores loaded",
)
def ready(state: State) -> Any:
    """200 once a bundle is loaded and the item cache filled, else 503 with the same body.

    A reachable online store is reported but not required: without it the service still
    answers (``degraded``) from the item cache.
    """
    body = Readiness(**state.ready())
    return JSONResponse(body.model_dump(), status_code=200 if body.ready else 503)


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text."}},
    summary="Prometheus metrics",
)
def metrics(state: State) -> Response:
    """Latency histograms, candidates per request, cache hits, feature age, degraded count."""
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get(
    "/v1/models",
    responses={503: {"model": ErrorResponse}},
    summary="The served bundle",
)
def models(state: State) -> dict[str, Any]:
    """Model version, bundle directory, execution providers and the full bundle manifest."""
    if state.plan is None:
        raise NotReadyError("no model bundle loaded")
    return state.plan.bundle.describe()
