"""The service's state: store, item cache, served bundle, and the watcher that refreshes items.

Everything the routers need hangs off one :class:`ServiceState`, created in the app's lifespan.
The served plan (bundle) and the item snapshot are single references replaced atomically: a
request takes both at its start and finishes on them, whatever a reload or refresh does
meanwhile.

Materialization detection: Feast records every materialization in the registry
(``materialization_intervals`` of each view), and the file registry is rewritten when it does.
The watcher stats the registry file every ``registry_check_seconds``; only when the file changed
does it re-read the registry, and only when an item view's latest materialized interval moved
does it re-read the items, into a new snapshot swapped in when complete.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from feast import FeatureStore

from gpl_service.item_cache import EMBEDDING_FEATURE, EMBEDDING_VIEW, ItemLayout, ItemSnapshot
from gpl_service.item_cache import fill_snapshot as _fill
from gpl_service.metrics import Metrics
from gpl_service.models import BundleLoadError, LoadedBundle, load_bundle
from gpl_service.online import OnlineReader, StoreUnavailableError, ViewSpec
from gpl_service.scoring import Scorer, ServingPlan, StoreHealth
from gpl_service.settings import ServeSettings

log = logging.getLogger("gpl_service")


def item_views(store: FeatureStore) -> list[ViewSpec]:
    """Specs of every online view keyed by item, ``item_semantics`` last."""
    specs = [
        ViewSpec.of(v)
        for v in sorted(store.list_feature_views(), key=lambda v: v.name)
        if v.online and [e.name for e in v.entity_columns] == ["item_id"]
    ]
    return sorted(specs, key=lambda s: s.name == EMBEDDING_VIEW)


def _materialized(store: FeatureStore, names: list[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name in names:
        intervals = store.get_feature_view(name).materialization_intervals
        if intervals:
            out[name] = max(end.timestamp() for _, end in intervals)
    return out


class ServiceState:
    """Store, item cache, bundle, health and metrics of one running service."""

    def __init__(self, settings: ServeSettings, store: FeatureStore, metrics: Metrics) -> None:
        self.settings = settings
        self.store = store
        self.metrics = metrics
        self.reader = OnlineReader(store, settings.store_timeout_seconds)
        self.health = StoreHealth(
            settings.store_retry_seconds, lambda up: metrics.store_up.set(1 if up else 0)
        )
        self.scorer = Scorer(
            self.reader,
            self.health,
            metrics,
            settings.unknown_cache_size,
            settings.read_chunk,
            settings.as_of.timestamp() if settings.as_of else None,
        )
        self.layout = self._layout()
        self.items: ItemSnapshot = ItemSnapshot.empty(self.layout, 0, 0)
        self.items_ready = False
        self.plan: ServingPlan | None = None
        # One lock for refreshing items and reloading the bundle: each prepares the item states
        # of the plan and snapshot it will swap in, which must be the ones the other left (a
        # reload landing during a refresh left states of the old snapshot, recomputed by the
        # first request under its lock). Re-entrant: a reload that changes the vectors' width
        # refreshes the items.
        self._swap_lock = threading.RLock()
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._registry_stamp: tuple[float, int] | None = self._stamp()
        self.started_at = time.time()

    # --- item cache -----------------------------------------------------------------------

    def _layout(self) -> ItemLayout:
        views = item_views(self.store)
        if not any(s.name == EMBEDDING_VIEW for s in views):
            raise BundleLoadError(
                f"the registry has no online {EMBEDDING_VIEW!r} view; run `gpl features apply`"
            )
        emb = next(s for s in views if s.name == EMBEDDING_VIEW)
        if EMBEDDING_FEATURE not in emb.features:
            raise BundleLoadError(f"{EMBEDDING_VIEW} has no {EMBEDDING_FEATURE!r} feature")
        return ItemLayout.of(views, dim=0)

    def refresh_items(self, reason: str) -> bool:
        """Re-read every item from the online store into a new snapshot; swap it in.

        Returns False (keeping the current snapshot) when the store cannot be read.
        """
        with self._swap_lock:
            read = self._read_items(reason, None)
            if read is None:
                return False
            self._swap_items(*read, self.plan, reason)
            return True

    def _read_items(self, reason: str, dim: int | None) -> tuple[ItemLayout, ItemSnapshot] | None:
        """A new snapshot of every item, ``dim``-wide vectors (None: the served bundle's)."""
        names = [s.name for s in self.layout.views]
        try:
            materialized = _materialized(self.store, names)
            ids = self.reader.entity_ids("item_id", names)
            if dim is None:
                # The bundle says how wide the vectors are (the store alone may not: items
                # without one). Before any bundle, 0; loading one then refills at its width.
                dim = self.plan.bundle.embedding_dim if self.plan is not None else 0
            layout = ItemLayout.of(self.layout.views, dim)
            snap = _fill(
                self.reader,
                layout,
                self.items.generation + 1,
                self.settings.read_chunk,
                materialized,
                ids,
            )
        except StoreUnavailableError as exc:
            self.metrics.cache_refreshes.labels("failed").inc()
            self.health.failed(str(exc))
            log.warning("item cache refresh (%s) failed: %s", reason, exc)
            return None
        return layout, snap

    def _swap_items(
        self, layout: ItemLayout, snap: ItemSnapshot, plan: ServingPlan | None, reason: str
    ) -> None:
        """Warm ``plan``'s item states over ``snap``, then make ``snap`` the served snapshot."""
        self._warm_states(plan, snap)
        self.layout = layout
        self.items = snap
        self.items_ready = True
        self.health.succeeded()
        self.metrics.cache_refreshes.labels("ok").inc()
        self.metrics.cache_items.set(snap.items)
        self.metrics.cache_loaded_at.set(snap.loaded_at)
        if snap.bad_vectors:
            log.warning(
                "%d items have content vectors that are not %d-d; they score as unknown "
                "content (zero vectors)",
                snap.bad_vectors,
                layout.dim,
            )
        log.info(
            "item cache (%s): %d items in %.2fs, generation %d",
            reason,
            snap.items,
            snap.fill_seconds,
            snap.generation,
        )

    def _warm_states(self, plan: ServingPlan | None, snap: ItemSnapshot) -> None:
        """Precompute ``plan``'s item states over ``snap`` before either is swapped in."""
        if plan is None or plan.states is None or (snap.items == 0 and not self.items_ready):
            return
        table = plan.states.table(snap)
        self.metrics.item_states_rows.set(table.rows)
        self.metrics.item_states_seconds.set(table.seconds)
        log.info(
            "item states of bundle %s: %d rows in %.2fs (%s)",
            plan.bundle.model_version,
            table.rows,
            table.seconds,
            ", ".join(f"{k} {v.shape[1]}-wide" for k, v in table.states.items()),
        )

    # --- bundle ---------------------------------------------------------------------------

    def load(self, path: Path) -> LoadedBundle:
        """Load, check and swap in the bundle at ``path``; the old one serves until then.

        Raises:
            BundleLoadError: the bundle is bad or does not fit the store; nothing changed.
        """
        with self._swap_lock:
            bundle = load_bundle(
                path,
                providers=self.settings.providers,
                threads=self.settings.intra_op_threads,
                spinning=self.settings.ort_spinning,
                hard_fraction=self.settings.hard_fraction,
                precompute=self.settings.precompute_item_states,
            )
            width_changed = self.layout.dim != bundle.embedding_dim
            layout = (
                ItemLayout.of(self.layout.views, bundle.embedding_dim)
                if width_changed
                else self.layout
            )
            try:
                plan = ServingPlan.build(bundle, self.reader, layout)
                bundle.warnings.extend(self._feature_service_drift(bundle))
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                # A manifest that verify_bundle and load_bundle let through but that does not
                # bind: a load error (409 on reload, one line at start-up), not a 500.
                raise BundleLoadError(f"{path}: manifest lacks or mangles {exc!r}") from exc
            for warning in bundle.warnings:
                log.warning("bundle %s: %s", bundle.model_version, warning)
            if plan.states is None:
                self.metrics.item_states_rows.set(0)
            if plan.states is None and self.settings.precompute_item_states:
                log.info(
                    "bundle %s has no split graphs (exported before they existed): the full "
                    "graphs score every candidate; re-export it to precompute item states",
                    bundle.model_version,
                )
            if width_changed and (self.items_ready or self.items.items):
                # The cache was filled before any bundle said how wide the vectors are (or for
                # another bundle's): re-read it at this bundle's width, then swap both together.
                read = self._read_items("bundle", bundle.embedding_dim)
                if read is None:
                    raise BundleLoadError(
                        f"the bundle's content vectors are {bundle.embedding_dim}-d, the item "
                        f"cache's {self.layout.dim}-d, and the online store could not be read "
                        "to refill it; retry when it answers"
                    )
                self._swap_items(*read, plan, "bundle")
            else:
                self._warm_states(plan, self.items)
            self.plan = plan
            self.metrics.set_model(bundle.model_version)
            return bundle

    def _feature_service_drift(self, bundle: LoadedBundle) -> list[str]:
        """Warnings when the registry's FeatureService is not the one the bundle was trained on.

        Serving still works (every column the bundle needs was bound), but the registry changed
        since training: retrain or re-export when that was deliberate.
        """
        wanted = bundle.manifest.get("feature_service") or {}
        name = wanted.get("name", "preranker")
        try:
            registered = self.store.get_feature_service(name).tags.get("version")
        except Exception:  # FeatureServiceNotFoundException: nothing to compare with
            return [f"feature service {name!r} is not in the registry"]
        if registered != wanted.get("version"):
            return [
                f"trained on feature service {name!r} version {wanted.get('version')!r}, the "
                f"registry has version {registered!r}"
            ]
        return []

    # --- readiness and watching -----------------------------------------------------------

    def ready(self) -> dict[str, Any]:
        """What ``GET /v1/ready`` reports."""
        store_up = self.reader.ping()
        # Readiness probes run without traffic too: the gauge follows them, not only requests.
        self.metrics.store_up.set(1 if store_up else 0)
        return {
            "ready": self.plan is not None and self.items_ready,
            "model_loaded": self.plan is not None,
            "item_cache_loaded": self.items_ready,
            "items_cached": self.items.items,
            "online_store": {"type": self.reader.store_type, "reachable": store_up},
        }

    def _stamp(self) -> tuple[float, int] | None:
        path = Path(self.store.config.registry.path)
        try:
            st = path.stat()
        except OSError:
            return None
        return (st.st_mtime, st.st_size)

    def check_materialization(self) -> bool:
        """Refresh items if an item view was materialized since the snapshot; True if it did.

        The registry's stamp is remembered only once the snapshot is current, so a refresh that
        failed (the store timing out while a materialization writes) is retried at the next
        check, after the store's back-off, not left stale until the next materialization.
        """
        stamp = self._stamp()
        if stamp == self._registry_stamp and self.items_ready:
            return False
        self.store.refresh_registry()
        self.reader.forget_views()
        names = [s.name for s in self.layout.views]
        current = _materialized(self.store, names)
        if self.items_ready and current == self.items.materialized:
            self._registry_stamp = stamp
            return False
        refreshed = self.refresh_items("materialization" if self.items_ready else "retry")
        if refreshed:
            self._registry_stamp = stamp
        return refreshed

    def _watch(self) -> None:
        while not self._stop.wait(self.settings.registry_check_seconds):
            try:
                if not self.health.should_try():
                    continue
                self.check_materialization()
            except Exception:  # keep watching; the next change retries
                log.exception("materialization check failed")

    def start_watcher(self) -> None:
        """Start the background materialization watcher."""
        self._watcher = threading.Thread(target=self._watch, name="gpl-watcher", daemon=True)
        self._watcher.start()

    def stop(self) -> None:
        """Stop the watcher."""
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=5)
