"""One pre-ranking request, end to end: online features -> graph inputs -> light -> expressive.

:class:`ServingPlan` binds a loaded bundle to the online store's views once (which view and
feature feeds each graph column; refused up front if the store lacks one). :class:`Scorer`
answers requests with the current plan and item cache:

1. the user's rows of the user views, read from the online store (one entity, one pipelined
   Redis round trip, under a millisecond); defaults and missing indicators where absent or past
   ``ttl``;
2. candidates, history and anchor items gathered from the item cache; ids the cache lacks read
   from the store and appended; ids the store lacks too get the unknown item's defaults;
3. the light model scores every candidate; the top ``hard_fraction`` by light score are
   re-scored by the expressive model and ranked first (difficulty-aware routing, as trained).
   With a split bundle each model's item half comes precomputed per cached item
   (:mod:`gpl_service.item_states`) and only its score graph runs here;
4. the top-k with each score, the model that gave it, and the request's stats.

If the store cannot be read, the request is answered from the cache with default user features
and marked ``degraded``; :class:`StoreHealth` then skips the store for ``store_retry_seconds``
so no request waits on a dead store twice in a row, and the first success after that clears it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from gpl_service.errors import ServiceError
from gpl_service.item_cache import (
    EMBEDDING_FEATURE,
    EMBEDDING_VIEW,
    ItemLayout,
    ItemSnapshot,
    read_items,
)
from gpl_service.item_states import ItemStates
from gpl_service.metrics import Metrics
from gpl_service.models import BundleLoadError, LoadedBundle
from gpl_service.online import OnlineReader, Row, StoreUnavailableError, ViewSpec, now

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]
MISSING: Final = "missing"


def _split(column: str) -> tuple[str, str]:
    view, sep, feature = column.partition("__")
    if not sep:
        raise BundleLoadError(f"feature column {column!r} is not '<view>__<feature>'")
    return view, feature


@dataclass
class ServingPlan:
    """How the graph's raw inputs are read from the online store and the item cache.

    Attributes:
        bundle: The loaded bundle.
        user_views: Specs of the user views read per request.
        user_sources: Per user column, (view, feature or "missing").
        history: (view, feature) of the history id list.
        anchors: (view, feature) of the anchor id list.
        item_cols: Per item column, its column in the cache's ``numeric`` array.
        category_col: The cache's string column of the category.
        states: Precomputed item states of the bundle's split models (None: full graphs).
    """

    bundle: LoadedBundle
    user_views: list[ViewSpec]
    user_sources: list[tuple[str, str]]
    history: tuple[str, str]
    anchors: tuple[str, str]
    item_cols: I64
    category_col: str
    states: ItemStates | None = None
    _category: tuple[tuple[int, int, int], npt.NDArray[np.int64]] = field(
        default_factory=lambda: ((-1, 0, 0), np.zeros(0, np.int64))
    )

    @classmethod
    def build(cls, bundle: LoadedBundle, reader: OnlineReader, items: ItemLayout) -> ServingPlan:
        """Bind ``bundle`` to the registered views and the cache layout.

        Raises:
            BundleLoadError: when a column the bundle needs has no view or feature, the cache
                does not hold it, or the embedding width differs.
        """
        features = bundle.manifest["features"]
        history = _split(features["history"]["column"])
        anchors = _split(features["anchors"]["column"])
        sources = [_split(c) for c in bundle.user_columns]
        wanted: dict[str, list[str]] = {}
        for view, feature in [*sources, history, anchors]:
            names = wanted.setdefault(view, [])
            if feature != MISSING and feature not in names:
                names.append(feature)
        specs: list[ViewSpec] = []
        for view, names in wanted.items():
            try:
                specs.append(ViewSpec.of(reader.view(view), names))
            except Exception as exc:  # FeatureViewNotFoundException, KeyError
                raise BundleLoadError(
                    f"the bundle needs feature view {view!r} features {names}, which the "
                    f"registry does not provide: {exc}"
                ) from exc
        for spec in specs:
            if spec.join_key != "user_id":
                raise BundleLoadError(
                    f"user feature view {spec.name!r} is keyed by {spec.join_key}"
                )
        col_of = {c: j for j, c in enumerate(items.numeric)}
        absent = [c for c in bundle.item_columns if c not in col_of]
        category = features["category"]["column"]
        if category not in items.strings:
            absent.append(category)
        if absent:
            raise BundleLoadError(
                f"the bundle needs item features {absent}, which the online item views "
                f"({', '.join(s.name for s in items.views)}) do not provide"
            )
        if items.dim != bundle.embedding_dim:
            raise BundleLoadError(
                f"the bundle expects {bundle.embedding_dim}-d item vectors; the online store's "
                f"{EMBEDDING_VIEW}.{EMBEDDING_FEATURE} has {items.dim}-d"
            )
        plan = cls(
            bundle=bundle,
            user_views=specs,
            user_sources=sources,
            history=history,
            anchors=anchors,
            item_cols=np.array([col_of[c] for c in bundle.item_columns], np.int64),
            category_col=category,
        )
        if bundle.split:
            plan.states = ItemStates(bundle, plan.item_graph_inputs)
        return plan

    def item_graph_inputs(self, snap: ItemSnapshot, rows: I64) -> tuple[F32, I64, F32]:
        """Raw item-graph inputs of cache rows as stored (no ttl applied): for precomputing."""
        numeric = np.ascontiguousarray(snap.numeric[rows][:, self.item_cols])
        return numeric, self.category_ids(snap, rows), snap.emb[rows]

    def category_ids(self, snap: ItemSnapshot, rows: I64) -> I64:
        """Graph category ids of cache rows (vocabulary of the bundle; 0 = other)."""
        values = snap.string_values[self.category_col]
        # Codes are per snapshot (a refresh numbers strings afresh) and grow with misses; key and
        # map are replaced together, so a request on another snapshot never sees a torn pair.
        key = (snap.generation, id(snap), len(values))
        cached = self._category
        if cached[0] != key:
            index = self.bundle.category_index
            cached = (key, np.array([index.get(v, 0) for v in values], np.int64))
            self._category = cached
        return cached[1][snap.strings[self.category_col][rows]]


class StoreHealth:
    """Whether to try the online store now; counts failures and recoveries."""

    def __init__(
        self, retry_seconds: float, on_change: Callable[[bool], None] | None = None
    ) -> None:
        """A store taken as up.

        Args:
            retry_seconds: How long to skip the store after a failure.
            on_change: Called with the new state (True: up) at every failure and success, so a
                gauge follows the store from start-up on, not only from the first request.
        """
        self.retry_seconds = retry_seconds
        self._on_change = on_change
        self._down_until = 0.0
        self.down_since: float | None = None
        self.last_error: str | None = None

    def should_try(self) -> bool:
        """False while a recent failure's back-off lasts."""
        return time.monotonic() >= self._down_until

    def failed(self, error: str) -> None:
        """Record a failure: back off."""
        self._down_until = time.monotonic() + self.retry_seconds
        if self.down_since is None:
            self.down_since = time.time()
        self.last_error = error
        if self._on_change is not None:
            self._on_change(False)

    def succeeded(self) -> None:
        """Record a success: the store is back."""
        self._down_until = 0.0
        self.down_since = None
        self.last_error = None
        if self._on_change is not None:
            self._on_change(True)

    @property
    def up(self) -> bool:
        """No failure since the last success."""
        return self.down_since is None


@dataclass
class _Candidates:
    """A request's candidates as the item cache holds them, with ttl applied where cheap.

    Attributes:
        rows: Cache row per candidate (0 = unknown).
        category: Graph category id per candidate (0 where the category view is stale).
        emb: Content vector per candidate (zeros where unknown or the embedding view is stale).
        ages: Oldest feature age per item view (None when no candidate has a row).
        stale_by_view: Per view with stale rows, which candidates are past its ttl.
        changed: Candidates past some view's ttl (their graph inputs are not the cached ones).
    """

    rows: I64
    category: I64
    emb: F32
    ages: dict[str, float | None]
    stale_by_view: dict[str, npt.NDArray[np.bool_]]
    changed: npt.NDArray[np.bool_]


@dataclass
class Scored:
    """A pre-ranking answer before serialization."""

    item_ids: list[str]
    scores: list[float]
    models: list[str]
    stats: dict[str, Any]
    degraded: bool


def _sigmoid(x: F32) -> F32:
    return (1.0 / (1.0 + np.exp(-x.astype(np.float64)))).astype(np.float32)


def _take(ids: list[str], width: int, keep: str) -> list[str]:
    if keep == "last":
        return ids[-width:] if len(ids) > width else ids
    return ids[:width]


class Scorer:
    """Answers pre-ranking requests from the online store, the item cache and a bundle."""

    def __init__(
        self,
        reader: OnlineReader,
        health: StoreHealth,
        metrics: Metrics,
        unknown_cache_size: int,
        read_chunk: int,
        as_of: float | None = None,
    ) -> None:
        self.reader = reader
        self.health = health
        self.metrics = metrics
        self.unknown_cache_size = unknown_cache_size
        self.read_chunk = read_chunk
        self.as_of = as_of

    # --- user side ------------------------------------------------------------------------

    def _user_rows(self, plan: ServingPlan, user_id: str) -> dict[str, Row] | None:
        """The user's row of each user view; None when the store is unavailable."""
        if not self.health.should_try():
            return None
        try:
            rows = self.reader.read_views(plan.user_views, user_id)
        except StoreUnavailableError as exc:
            self.health.failed(str(exc))
            self.metrics.store_errors.inc()
            return None
        self.health.succeeded()
        return rows

    def _user_inputs(
        self, plan: ServingPlan, rows: dict[str, Row] | None, at: float
    ) -> tuple[F32, list[str], list[str], dict[str, float | None]]:
        """(1, Fu) raw user features, history ids, anchor ids, feature age per view."""
        specs = {s.name: s for s in plan.user_views}
        live: dict[str, dict[str, Any] | None] = {}
        ages: dict[str, float | None] = {}
        for name, spec in specs.items():
            row = rows.get(name) if rows is not None else None
            ok = row is not None and row.values is not None and not spec.is_stale(row.event_ts, at)
            live[name] = row.values if ok and row is not None else None
            ages[name] = at - row.event_ts if ok and row and row.event_ts else None
        raw = np.zeros((1, len(plan.user_sources)), np.float32)
        for j, (view, feature) in enumerate(plan.user_sources):
            values = live[view]
            if feature == MISSING:
                # As the training join does: a row whose features are all null is missing.
                absent = values is None or all(values.get(f) is None for f in specs[view].features)
                raw[0, j] = 1.0 if absent else 0.0
                continue
            value = values.get(feature) if values is not None else None
            raw[0, j] = float(specs[view].defaults[feature] if value is None else value)

        def ids(source: tuple[str, str]) -> list[str]:
            values = live[source[0]]
            got = values.get(source[1]) if values is not None else None
            return [str(v) for v in (got or [])]

        return raw, ids(plan.history), ids(plan.anchors), ages

    # --- item side ------------------------------------------------------------------------

    def _item_rows(
        self, snap: ItemSnapshot, ids: list[str], store_ok: bool
    ) -> tuple[I64, npt.NDArray[np.bool_], bool]:
        """Cache rows of ``ids`` (0 = unknown), which the cache held, and whether it is complete.

        Complete: every item the cache lacked was looked up in the store (False: some were not,
        or the read failed, so the answer is degraded).
        """
        rows = snap.index.rows(ids)
        cached = rows > 0
        miss = [ids[k] for k in np.flatnonzero(~cached)]
        complete = True
        if miss:
            unknown = snap.unknown
            ask = list(dict.fromkeys(i for i in miss if i not in unknown))
            if ask and not (store_ok and self.health.should_try()):
                complete = False
            elif ask:
                try:
                    got = read_items(self.reader, snap.layout, ask, self.read_chunk)
                except StoreUnavailableError as exc:
                    self.health.failed(str(exc))
                    self.metrics.store_errors.inc()
                    complete = False
                else:
                    added = snap.add(ask, got)
                    absent = [i for i, r in zip(ask, added, strict=True) if not r]
                    snap.remember_unknown(absent, self.unknown_cache_size)
                    found = {i: r for i, r in zip(ask, added, strict=True) if r}
                    if found:
                        for k in np.flatnonzero(rows == 0):
                            rows[k] = found.get(ids[k], 0)
        return rows, cached, complete

    def _item_inputs(
        self, plan: ServingPlan, snap: ItemSnapshot, rows: I64, at: float
    ) -> _Candidates:
        """Category ids, content vectors, feature ages and ttl staleness of candidate rows."""
        layout = snap.layout
        category = plan.category_ids(snap, rows)
        emb = np.take(snap.emb, rows, axis=0)
        category_view = plan.category_col.partition("__")[0]
        ages: dict[str, float | None] = {}
        stale_by_view: dict[str, npt.NDArray[np.bool_]] = {}
        changed = np.zeros(len(rows), np.bool_)
        for spec in layout.views:
            ts = snap.event_ts[spec.name][rows]
            present = ~np.isnan(ts)
            ages[spec.name] = float(at - ts[present].min()) if present.any() else None
            if spec.ttl_seconds <= 0:
                continue
            stale = present & (ts < at - spec.ttl_seconds)
            if not stale.any():
                continue
            stale_by_view[spec.name] = stale
            changed |= stale
            # Past ttl, as in training: a stale category is the default "" (id 0); a stale
            # content vector is an item without content (zeros). Numeric features: _numeric.
            if spec.name == category_view:
                category[stale] = 0
            if spec.name == EMBEDDING_VIEW:
                emb[stale] = 0.0
        return _Candidates(rows, category, emb, ages, stale_by_view, changed)

    @staticmethod
    def _numeric(
        plan: ServingPlan, snap: ItemSnapshot, items: _Candidates, pick: I64 | None = None
    ) -> F32:
        """Raw item features (graph order) of all candidates or of positions ``pick``.

        Past a view's ttl, as in training: the view's defaults, and its missing indicator 1.
        """
        layout = snap.layout
        rows = items.rows if pick is None else items.rows[pick]
        numeric = snap.numeric[rows]
        for name, stale in items.stale_by_view.items():
            hit = np.flatnonzero(stale if pick is None else stale[pick])
            if len(hit):
                cols = layout.view_columns[name]
                numeric[np.ix_(hit, cols)] = layout.default_row[cols]
        return np.ascontiguousarray(numeric[:, plan.item_cols])

    def _states(
        self,
        plan: ServingPlan,
        snap: ItemSnapshot,
        kind: str,
        table: F32,
        items: _Candidates,
        pick: I64 | None = None,
    ) -> F32:
        """Item states of all candidates (or of positions ``pick``).

        Precomputed, except candidates past a ttl, whose inputs differ from the cached ones:
        their states are computed here from those inputs.
        """
        rows = items.rows if pick is None else items.rows[pick]
        state = np.take(table, rows, axis=0)
        changed = items.changed if pick is None else items.changed[pick]
        if changed.any():
            k = np.flatnonzero(changed)
            self.metrics.item_states_recomputed.inc(len(k))
            where = k if pick is None else pick[k]
            state[k] = plan.bundle.item_state(
                kind,
                self._numeric(plan, snap, items, where),
                items.category[where],
                items.emb[where],
            )
        return state

    # --- the request ----------------------------------------------------------------------

    def score(
        self,
        plan: ServingPlan,
        snap: ItemSnapshot,
        user_id: str,
        candidates: list[str],
        top_k: int,
    ) -> Scored:
        """Pre-rank ``candidates`` (unique ids) for ``user_id``; return the top ``top_k``."""
        began = time.perf_counter()
        at = self.as_of if self.as_of is not None else now()
        bundle = plan.bundle
        user_rows = self._user_rows(plan, user_id)
        store_ok = user_rows is not None
        user_raw, history_ids, anchor_ids, user_ages = self._user_inputs(plan, user_rows, at)
        history_ids = _take(history_ids, bundle.history_length, "last")
        anchor_ids = _take(anchor_ids, bundle.num_anchors, "first")
        all_ids = [*candidates, *history_ids, *anchor_ids]
        rows, cached, items_complete = self._item_rows(snap, all_ids, store_ok)
        # Degraded means *this* answer lacks store data (its user read or an item lookup it
        # needed failed or was skipped in back-off), not that another request's read failed
        # meanwhile: cached items and a fresh user row make a full answer.
        store_ok = store_ok and items_complete
        n = len(candidates)
        cand_rows = rows[:n]
        unknown = int((cand_rows == 0).sum())
        hits = int(cached[:n].sum())
        fetched = n - hits - unknown
        items = self._item_inputs(plan, snap, cand_rows, at)
        d = bundle.embedding_dim
        history = np.zeros((1, bundle.history_length, d), np.float32)
        h_rows = rows[n : n + len(history_ids)]
        history[0, : len(h_rows)] = snap.emb[h_rows]
        anchors = np.zeros((1, bundle.num_anchors, d), np.float32)
        a_rows = rows[n + len(history_ids) :]
        anchors[0, : len(a_rows)] = snap.emb[a_rows]
        # Rows appended by this request's misses get their states here (once per item).
        table = plan.states.table(snap).states if plan.states is not None else None
        numeric = self._numeric(plan, snap, items) if table is None else None
        features_done = time.perf_counter()

        user_inputs: dict[str, npt.NDArray[Any]] = {
            "user_features": user_raw,
            "history_emb": history,
            "anchor_emb": anchors,
        }
        if table is not None:
            light = bundle.run_split(
                "light",
                {
                    **user_inputs,
                    "row_request": np.zeros(n, np.int64),
                    "item_state": self._states(plan, snap, "light", table["light"], items),
                    "item_emb": items.emb,
                },
            )
        else:
            assert numeric is not None
            light = bundle.run(
                "light",
                {
                    **user_inputs,
                    "row_request": np.zeros(n, np.int64),
                    "item_features": numeric,
                    "category": items.category,
                    "item_emb": items.emb,
                },
            )
        light_done = time.perf_counter()
        quota = min(n, math.ceil(bundle.hard_fraction * n)) if n else 0
        by_light = np.argsort(-light, kind="stable")
        hard = by_light[:quota]
        expressive = np.zeros(0, np.float32)
        if quota:
            sub: dict[str, npt.NDArray[Any]] = {
                **user_inputs,
                "row_request": np.zeros(quota, np.int64),
                "item_emb": np.take(items.emb, hard, axis=0),
            }
            if table is not None:
                sub["item_state"] = self._states(
                    plan, snap, "expressive", table["expressive"], items, hard
                )
                expressive = bundle.run_split("expressive", sub)
            else:
                assert numeric is not None
                sub["item_features"] = np.ascontiguousarray(numeric[hard])
                sub["category"] = items.category[hard]
                expressive = bundle.run("expressive", sub)
        done = time.perf_counter()

        hard_order = hard[np.argsort(-expressive, kind="stable")] if quota else hard
        order = np.concatenate([hard_order, by_light[quota:]])[:top_k]
        prob_light = _sigmoid(light)
        score = prob_light.copy()
        model = np.zeros(n, np.int8)
        if quota:
            score[hard] = _sigmoid(expressive)
            model[hard] = 1
        degraded = not store_ok
        timings = {
            "features": (features_done - began) * 1e3,
            "light": (light_done - features_done) * 1e3,
            "expressive": (done - light_done) * 1e3,
        }
        self.metrics.observe_request(
            n=n,
            hits=hits,
            fetched=fetched,
            unknown=unknown,
            degraded=degraded,
            timings=timings,
            ages={**user_ages, **items.ages},
        )
        stats = {
            "candidates": n,
            "scored_light": n,
            "scored_expressive": quota,
            "unknown_items": unknown,
            "fetched_from_store": fetched,
            "history_items": len(history_ids),
            "anchors": len(anchor_ids),
            "feature_age_seconds": {
                **{k: None if v is None else round(v, 3) for k, v in user_ages.items()},
                **{k: None if v is None else round(v, 3) for k, v in items.ages.items()},
            },
            "item_cache_age_seconds": round(now() - snap.loaded_at, 3),
            "item_states": "precomputed" if table is not None else "per request",
            "timings_ms": {k: round(v, 3) for k, v in timings.items()},
        }
        if not np.isfinite(score).all():
            # Inputs are cleaned of non-finite values, so this is a model fault: never a 200
            # whose scores JSON cannot carry (they would read as null).
            raise ServiceError(
                f"the model returned {int((~np.isfinite(score)).sum())} non-finite scores for "
                f"user {user_id!r}"
            )
        names = ("light", "expressive")
        return Scored(
            item_ids=[candidates[k] for k in order],
            scores=[float(score[k]) for k in order],
            models=[names[int(model[k])] for k in order],
            stats=stats,
            degraded=degraded,
        )
