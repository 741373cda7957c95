"""Typed settings of the pre-ranking service, read from ``GPL_SERVE_*`` environment variables.

The online store itself (SQLite in the run directory, or Redis) is chosen by
:class:`training.features.store.StoreSettings` (``GPL_REDIS_URL``, ``GPL_PROJECT``), the same
settings the offline jobs use, so the service reads exactly the store they materialized.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServeSettings(BaseSettings):
    """Everything ``gpl serve`` can be told; every value validated at start-up."""

    model_config = SettingsConfigDict(env_prefix="GPL_SERVE_", extra="ignore")

    run_dir: Path = Field(
        default=Path("runs/demo"),
        description="Run directory: its feature_store.yaml names the registry and online store.",
    )
    bundle_dir: Path | None = Field(
        default=None,
        description="Model bundle written by `gpl export` (default: RUN_DIR/bundle).",
    )
    host: str = Field(default="127.0.0.1", description="Address uvicorn binds.")
    port: int = Field(default=8000, ge=0, le=65535, description="Port uvicorn binds (0: any).")
    max_candidates: int = Field(
        default=10_000, ge=1, le=1_000_000, description="Most candidate ids one request may send."
    )
    default_top_k: int = Field(
        default=100, ge=1, description="Items returned when a request gives no top_k."
    )
    hard_fraction: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="Share of each request's candidates re-scored by the expressive model "
        "(default: the bundle's training setting).",
    )
    providers: Literal["auto", "cpu", "cuda"] = Field(
        default="auto",
        description="ONNX Runtime execution provider: 'auto' uses CUDA when a GPU is present.",
    )
    intra_op_threads: int = Field(
        default=0, ge=0, description="ONNX Runtime threads per inference (0: its default)."
    )
    ort_spinning: bool = Field(
        default=False,
        description="Let idle ONNX Runtime threads spin-wait (faster on dedicated cores, slower "
        "when the cores are shared).",
    )
    precompute_item_states: bool = Field(
        default=True,
        description="Run each model's item graph once per cached item (at fill, refresh and "
        "reload) and only its score graph per request; off: the full graphs on every "
        "candidate (same scores, more work per request). Needs a bundle with split graphs.",
    )
    admin_token: SecretStr | None = Field(
        default=None,
        description="Bearer token of POST /v1/admin/reload; reloading is disabled when unset.",
    )
    store_timeout_seconds: float = Field(
        default=0.5,
        gt=0,
        description="Socket connect/read timeout of online store (Redis) calls.",
    )
    store_retry_seconds: float = Field(
        default=2.0,
        gt=0,
        description="After the online store fails, answer degraded for this long before trying "
        "it again (no request waits on a dead store twice in a row).",
    )
    registry_check_seconds: float = Field(
        default=2.0,
        gt=0,
        description="How often the registry file is checked for a new materialization (a stat "
        "call; items are re-read only when an item view's materialization changed).",
    )
    unknown_cache_size: int = Field(
        default=100_000,
        ge=0,
        description="Item ids remembered as absent from the online store until the next "
        "materialization (spares the store repeated misses).",
    )
    read_chunk: int = Field(
        default=5_000, ge=1, description="Entities per online-store read when filling the cache."
    )
    as_of: datetime | None = Field(
        default=None,
        description="Judge feature ttl and age as if it were this time instead of now. Only for "
        "replaying historical data (the demo's synthetic log ends in the past); never set it "
        "in production.",
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"

    @model_validator(mode="after")
    def _check(self) -> ServeSettings:
        if self.default_top_k > self.max_candidates:
            raise ValueError(
                f"default_top_k ({self.default_top_k}) exceeds max_candidates "
                f"({self.max_candidates})"
            )
        if self.as_of is not None and self.as_of.tzinfo is None:
            raise ValueError("as_of needs a time zone, e.g. 2024-01-31T00:00:00+00:00")
        if self.admin_token is not None and len(self.admin_token.get_secret_value()) < 16:
            raise ValueError("admin_token must be at least 16 characters")
        return self

    @property
    def bundle_path(self) -> Path:
        """The bundle directory to serve."""
        return self.bundle_dir if self.bundle_dir is not None else self.run_dir / "bundle"
