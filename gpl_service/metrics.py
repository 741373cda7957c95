"""Prometheus metrics of the service, on a registry of its own (one per app instance).

Exposed at ``GET /metrics``. Names are prefixed ``gpl_``; latencies in seconds.
"""

from __future__ import annotations

import warnings

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, values

_LATENCY_BUCKETS = (
    0.001,
    0.002,
    0.003,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.03,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)
_CANDIDATE_BUCKETS = (10, 50, 100, 250, 500, 1000, 2000, 3000, 5000, 10000, 20000)
_AGE_BUCKETS = (60, 600, 3600, 6 * 3600, 86400, 3 * 86400, 7 * 86400, 30 * 86400, 90 * 86400)


class Metrics:
    """Every metric the service exports."""

    def __init__(self) -> None:
        # Importing feast switches prometheus_client into multiprocess mode (feast/metrics.py
        # sets PROMETHEUS_MULTIPROC_DIR for its own Gunicorn feature server): values would then
        # live in shared mmap files, summed over every metric of the same name in the process.
        # This service is one process with its own registry; its values belong in memory.
        # Labelled children are created lazily, so the switch must stay for the process.
        values.ValueClass = values.MutexValue
        self.registry = CollectorRegistry()
        r = self.registry
        self.http_requests = Counter(
            "gpl_http_requests",
            "HTTP requests by route and status.",
            ["route", "status"],
            registry=r,
        )
        self.http_latency = Histogram(
            "gpl_http_request_duration_seconds",
            "HTTP request latency by route.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.stage_latency = Histogram(
            "gpl_prerank_stage_seconds",
            "Pre-rank latency by stage: features (online store + item cache), light, expressive.",
            ["stage"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.candidates = Histogram(
            "gpl_prerank_candidates",
            "Candidates per pre-rank request (after de-duplication).",
            buckets=_CANDIDATE_BUCKETS,
            registry=r,
        )
        self.item_lookups = Counter(
            "gpl_item_cache_lookups",
            "Candidate item lookups: hit (in the cache), fetched (read from the online store on "
            "a miss), unknown (in neither; defaults used).",
            ["result"],
            registry=r,
        )
        self.cache_items = Gauge("gpl_item_cache_items", "Items in the item cache.", registry=r)
        self.cache_refreshes = Counter(
            "gpl_item_cache_refreshes", "Item cache refreshes by outcome.", ["result"], registry=r
        )
        self.cache_loaded_at = Gauge(
            "gpl_item_cache_loaded_timestamp_seconds",
            "When the item cache was filled.",
            registry=r,
        )
        self.item_states_rows = Gauge(
            "gpl_item_states_rows",
            "Cache rows whose item states (the models' item halves) are precomputed; 0 when the "
            "full graphs score every candidate.",
            registry=r,
        )
        self.item_states_seconds = Gauge(
            "gpl_item_states_seconds",
            "Time the last full item-state precomputation took (a snapshot or bundle swap).",
            registry=r,
        )
        self.item_states_recomputed = Counter(
            "gpl_item_states_recomputed",
            "Candidate rows whose item state was computed during a request because a view was "
            "past its ttl (their inputs are the view's defaults, not the cached values).",
            registry=r,
        )
        self.feature_age = Histogram(
            "gpl_feature_age_seconds",
            "Age of the feature rows a request used, by view (items: the oldest candidate row).",
            ["view"],
            buckets=_AGE_BUCKETS,
            registry=r,
        )
        self.degraded = Counter(
            "gpl_degraded_responses",
            "Responses answered without the online store (cached items, default user features).",
            registry=r,
        )
        self.store_errors = Counter(
            "gpl_online_store_errors", "Failed online store reads.", registry=r
        )
        self.store_up = Gauge(
            "gpl_online_store_up",
            "1 unless the online store's last read or readiness ping failed.",
            registry=r,
        )
        self.reloads = Counter(
            "gpl_bundle_reloads",
            "Bundle reloads by outcome (ok, rejected).",
            ["result"],
            registry=r,
        )
        self.model_info = Gauge(
            "gpl_model_info", "The served bundle (value 1).", ["model_version"], registry=r
        )
        self._model_version: str | None = None

    def observe_request(
        self,
        *,
        n: int,
        hits: int,
        fetched: int,
        unknown: int,
        degraded: bool,
        timings: dict[str, float],
        ages: dict[str, float | None],
    ) -> None:
        """Record one scored pre-rank request (timings in ms, ages in s)."""
        self.candidates.observe(n)
        self.item_lookups.labels("hit").inc(hits)
        self.item_lookups.labels("fetched").inc(fetched)
        self.item_lookups.labels("unknown").inc(unknown)
        for stage, ms in timings.items():
            self.stage_latency.labels(stage).observe(ms / 1e3)
        for view, age in ages.items():
            if age is not None:
                self.feature_age.labels(view).observe(age)
        if degraded:
            self.degraded.inc()

    def set_model(self, version: str) -> None:
        """Mark ``version`` as the served bundle."""
        if self._model_version is not None and self._model_version != version:
            with warnings.catch_warnings():  # the multiprocess-mode warning; see __init__
                warnings.simplefilter("ignore", UserWarning)
                self.model_info.remove(self._model_version)
        self.model_info.labels(version).set(1)
        self._model_version = version

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        return generate_latest(self.registry)
