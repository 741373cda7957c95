"""``POST /v1/prerank``: score recalled candidates for a user."""

# No `from __future__ import annotations`: the body type is built at run time, and FastAPI
# must see the class itself, not the string "request_model".
import uuid
from typing import Any

from fastapi import APIRouter, Response
from fastapi.concurrency import run_in_threadpool

from gpl_service.deps import Plan, State
from gpl_service.errors import ERROR_RESPONSES, ErrorResponse
from gpl_service.schemas import PrerankResponse, prerank_request_model
from gpl_service.settings import ServeSettings


def make_router(settings: ServeSettings) -> APIRouter:
    """The pre-rank router, its request model carrying this deployment's limits."""
    router = APIRouter(prefix="/v1", tags=["prerank"])
    request_model: Any = prerank_request_model(settings.max_candidates, settings.default_top_k)

    @router.post(
        "/prerank",
        response_model=PrerankResponse,
        responses={
            **ERROR_RESPONSES,
            503: {"model": ErrorResponse, "description": "No bundle or item cache loaded yet."},
        },
        summary="Pre-rank candidates for a user",
    )
    async def prerank(body: request_model, state: State, plan: Plan) -> Response:
        """Score every candidate from online features and return the top-k, best first.

        The light model scores all candidates; the hardest share (the top by light score) is
        re-scored by the expressive model and ranked first. Unknown items get the feature
        views' defaults and are counted in ``stats.unknown_items``; when the online store is
        unreachable the answer is ``degraded``.
        """
        unique = list(dict.fromkeys(body.candidates))
        top_k = min(body.top_k or state.settings.default_top_k, len(unique))
        snap = state.items
        # ONNX Runtime releases the GIL; a worker thread keeps the event loop answering.
        scored = await run_in_threadpool(
            state.scorer.score, plan, snap, body.user_id, unique, top_k
        )
        # One validation of plain dicts (in pydantic-core) instead of a model per item: half
        # the cost at top_k 100; then serialized once, instead of FastAPI dumping it,
        # re-validating it against response_model and encoding it again.
        answer = PrerankResponse.model_validate(
            {
                "request_id": body.request_id or uuid.uuid4().hex,
                "model_version": plan.bundle.model_version,
                "degraded": scored.degraded,
                "items": [
                    {"item_id": i, "score": s, "model": m}
                    for i, s, m in zip(scored.item_ids, scored.scores, scored.models, strict=True)
                ],
                "stats": {
                    **scored.stats,
                    "duplicates_removed": len(body.candidates) - len(unique),
                },
            }
        )
        return Response(answer.model_dump_json(), media_type="application/json")

    return router
