"""The service's errors: one base class, one JSON shape, one HTTP status per kind.

Every error response, whatever raised it (our code, request validation, an unknown route), has
the body ``{"error": {"code": ..., "message": ..., "details": [...]}}``. A request the service
cannot serve is always a 4xx (or 503 while it is not ready), never a 500.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("gpl_service")


class ErrorBody(BaseModel):
    """What went wrong."""

    code: str = Field(description="Stable machine-readable kind, e.g. 'invalid_request'.")
    message: str = Field(description="What is wrong, for a person.")
    details: list[dict[str, Any]] = Field(
        default_factory=list, description="One entry per problem (location and message)."
    )


class ErrorResponse(BaseModel):
    """Body of every error response."""

    error: ErrorBody


class ServiceError(Exception):
    """Base of every error the service maps to an HTTP status."""

    status_code = 500
    code = "internal_error"

    def __init__(self, message: str, details: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or []


class UnauthorizedError(ServiceError):
    """No or a wrong admin token."""

    status_code = 401
    code = "unauthorized"


class AdminDisabledError(ServiceError):
    """Admin endpoints are off because no token is configured."""

    status_code = 403
    code = "admin_disabled"


class NotFoundError(ServiceError):
    """No such resource (feature view, route)."""

    status_code = 404
    code = "not_found"


class BundleRejectedError(ServiceError):
    """A bundle failed verification or loading; the serving bundle is unchanged."""

    status_code = 409
    code = "bundle_rejected"


class NotReadyError(ServiceError):
    """The service cannot answer yet (models or item cache not loaded)."""

    status_code = 503
    code = "not_ready"


_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    415: "unsupported_media_type",
}

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    422: {"model": ErrorResponse, "description": "The request is invalid; details say where."},
}
"""Common ``responses=`` for routes that validate a body."""


def error_response(status: int, code: str, message: str, details: Any = None) -> JSONResponse:
    """A JSON error response of the one shape."""
    body = ErrorResponse(error=ErrorBody(code=code, message=message, details=details or []))
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def _validation_details(exc: RequestValidationError) -> list[dict[str, Any]]:
    details = []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ())]
        details.append({"loc": loc, "message": err.get("msg", ""), "type": err.get("type", "")})
    return details


def install_handlers(app: FastAPI) -> None:
    """Map every error to the one JSON shape."""

    @app.exception_handler(ServiceError)
    async def _service_error(_: Request, exc: ServiceError) -> JSONResponse:
        return error_response(exc.status_code, exc.code, exc.message, exc.details)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        details = _validation_details(exc)
        first = details[0] if details else {"loc": [], "message": "invalid request"}
        where = ".".join(p for p in first["loc"] if p != "body") or "body"
        more = f" (and {len(details) - 1} more)" if len(details) > 1 else ""
        return error_response(422, "invalid_request", f"{where}: {first['message']}{more}", details)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _STATUS_CODES.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # A bug, not a bad request: log it whole, tell the caller only that it happened.
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", "internal error; see the service log")
