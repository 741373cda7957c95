"""``POST /v1/admin/reload``: swap the served bundle atomically (token protected)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool

from gpl_service.deps import Admin, State
from gpl_service.errors import ERROR_RESPONSES, BundleRejectedError, ErrorResponse
from gpl_service.models import BundleLoadError
from gpl_service.schemas import ReloadRequest, ReloadResponse

router = APIRouter(prefix="/v1/admin", tags=["admin"])


@router.post(
    "/reload",
    response_model=ReloadResponse,
    responses={
        **ERROR_RESPONSES,
        401: {"model": ErrorResponse, "description": "Missing or wrong token."},
        403: {"model": ErrorResponse, "description": "No admin token configured."},
        409: {"model": ErrorResponse, "description": "Bundle rejected; the old one serves."},
    },
    summary="Load a bundle and swap it in",
)
async def reload(_: Admin, state: State, body: ReloadRequest | None = None) -> ReloadResponse:
    """Swap in a new bundle, or refuse it and keep serving the current one.

    Verifies checksums, loads both models, smoke-tests them and binds them to the online
    store, then swaps them in atomically. A bundle failing any step is refused (409) and the current
    one keeps serving; in-flight requests finish on the bundle they started with.
    """
    path = Path(body.bundle_dir) if body and body.bundle_dir else state.settings.bundle_path
    previous = state.plan.bundle.model_version if state.plan else None
    try:
        bundle = await run_in_threadpool(state.load, path)
    except BundleLoadError as exc:
        state.metrics.reloads.labels("rejected").inc()
        raise BundleRejectedError(f"bundle rejected, still serving {previous}: {exc}") from exc
    state.metrics.reloads.labels("ok").inc()
    return ReloadResponse(
        model_version=bundle.model_version, previous_version=previous, bundle_dir=str(bundle.path)
    )
