"""The FastAPI application: lifespan-loaded store, item cache and bundle, thin routers.

Start it with ``gpl serve`` (uvicorn), or build it with :func:`create_app` (tests, embedding).
At start-up the lifespan opens the run directory's Feast store, fills the item cache from the
online store, loads and smoke-tests the bundle, and starts the materialization watcher; a bundle
that cannot be served stops the start-up with the reason. An unreachable online store does not:
the service starts not ready (``/v1/ready`` 503) and fills the cache when the store answers.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final

from fastapi import FastAPI
from feast import FeatureStore

from gpl_service.errors import install_handlers
from gpl_service.metrics import Metrics
from gpl_service.routers import admin, ops, prerank, registry
from gpl_service.settings import ServeSettings
from gpl_service.state import ServiceState

log = logging.getLogger("gpl_service")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[
    [Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]
]

_ROUTES: Final = {
    "/v1/prerank",
    "/v1/health",
    "/v1/ready",
    "/v1/models",
    "/v1/admin/reload",
    "/v1/registry/feature-views",
    "/metrics",
}


class ServiceStartError(RuntimeError):
    """The service cannot start (no run directory, registry or bundle)."""


def _route(path: str) -> str:
    if path in _ROUTES:
        return path
    if path.startswith("/v1/registry/feature-views/"):
        return "/v1/registry/feature-views/{name}"
    return "other"  # unknown paths share one label: no label explosion from scanners


class HttpMetrics:
    """Pure ASGI middleware counting requests and latency per route and status."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        """Pass the request on; count it and time it on the way out."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        began = time.perf_counter()
        status = 500

        async def record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, record)
        finally:
            route = _route(scope.get("path", ""))
            self.metrics.http_requests.labels(route, str(status)).inc()
            self.metrics.http_latency.labels(route).observe(time.perf_counter() - began)


def open_service_store(run_dir: Path) -> FeatureStore:
    """The run directory's Feast store, as the offline jobs configured it.

    Raises:
        ServiceStartError: when the run directory has no applied registry.
    """
    from training.features.store import open_store

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ServiceStartError(f"{run_dir}: no run directory here; run `gpl demo` or the stages")
    store = open_store(run_dir)
    registry = Path(store.config.registry.path)
    if not registry.exists():
        raise ServiceStartError(
            f"{registry}: no feature registry; run `gpl features apply` and "
            "`gpl features materialize` first"
        )
    return store


def create_app(settings: ServeSettings | None = None, store: FeatureStore | None = None) -> FastAPI:
    """The application for ``settings`` (default: from the environment).

    Args:
        settings: Service settings.
        store: A Feast store to use instead of the run directory's (tests).
    """
    settings = settings or ServeSettings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        from gpl_service.models import BundleLoadError

        feast_store = store or open_service_store(settings.run_dir)
        state = ServiceState(settings, feast_store, metrics)
        try:
            # The bundle first: it says how wide the content vectors are that the item cache
            # holds (the store alone may not, e.g. when the first items have no vector).
            state.load(settings.bundle_path)
        except BundleLoadError as exc:
            raise ServiceStartError(f"cannot serve {settings.bundle_path}: {exc}") from exc
        state.refresh_items("start-up")
        state.start_watcher()
        app.state.service = state
        # Everything loaded so far (Feast, torch and ONNX Runtime objects, the registry) lives as
        # long as the process: keep it out of the cyclic GC's full collections, whose traversal
        # of it would otherwise land on some request as a multi-millisecond pause.
        gc.freeze()
        log.info(
            "serving bundle %s (%s) with %d cached items from the %s online store",
            state.plan.bundle.model_version if state.plan else "-",
            ", ".join(state.plan.bundle.providers) if state.plan else "-",
            state.items.items,
            state.reader.store_type,
        )
        try:
            yield
        finally:
            state.stop()

    app = FastAPI(
        title="GPL pre-ranking service",
        version="1",
        summary="Scores recalled candidates from online features with an exported GPL/HAP "
        "pre-ranker (ONNX Runtime).",
        lifespan=lifespan,
    )
    install_handlers(app)
    app.include_router(prerank.make_router(settings))
    app.include_router(ops.router)
    app.include_router(registry.router)
    app.include_router(admin.router)
    app.add_middleware(HttpMetrics, metrics=metrics)
    return app
