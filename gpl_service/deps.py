"""FastAPI dependencies: the service state, the served plan, the admin check."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Header, Request

from gpl_service.errors import AdminDisabledError, NotReadyError, UnauthorizedError
from gpl_service.scoring import ServingPlan
from gpl_service.state import ServiceState

# The dependencies are `async def` on purpose: FastAPI runs plain `def` dependencies in its
# threadpool, a thread hop each, per request.


async def get_state(request: Request) -> ServiceState:
    """The state the lifespan created."""
    state: ServiceState | None = getattr(request.app.state, "service", None)
    if state is None:
        raise NotReadyError("the service is starting")
    return state


State = Annotated[ServiceState, Depends(get_state)]


async def get_plan(state: State) -> ServingPlan:
    """The served bundle's plan; 503 until one is loaded and the item cache is filled."""
    if state.plan is None:
        raise NotReadyError("no model bundle loaded")
    if not state.items_ready:
        raise NotReadyError(
            "item cache not loaded yet (the online store was unreachable at start-up; retrying)"
        )
    return state.plan


Plan = Annotated[ServingPlan, Depends(get_plan)]


async def require_admin(
    state: State,
    authorization: Annotated[str | None, Header(description="`Bearer <admin token>`")] = None,
) -> None:
    """Accept only ``Authorization: Bearer <GPL_SERVE_ADMIN_TOKEN>``."""
    token = state.settings.admin_token
    if token is None:
        raise AdminDisabledError(
            "admin endpoints are disabled: set GPL_SERVE_ADMIN_TOKEN to enable"
        )
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise UnauthorizedError("missing 'Authorization: Bearer <token>' header")
    if not secrets.compare_digest(given.encode(), token.get_secret_value().encode()):
        raise UnauthorizedError("wrong admin token")


Admin = Annotated[None, Depends(require_admin)]
