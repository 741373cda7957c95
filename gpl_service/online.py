"""Reading the Feast online store: per-view rows, entity enumeration, typed defaults and ttl.

The service reads through Feast's provider (``online_read``, the call its own
``get_online_features`` makes underneath) rather than ``get_online_features`` itself: that call
rebuilds requests, responses and type conversions per call and costs ~40 ms for 1,000 entities,
which a per-request budget cannot carry. What it reads is the same store, keys and values.

Feature semantics match the training-set builder exactly
(:func:`training.features.training_set.build_training_set`): a view with no row for an entity,
or a row older than the view's ``ttl``, contributes its fields' declared defaults and
``<view>__missing = 1``; a present row with a null field contributes that field's default.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from feast import FeatureStore, FeatureView
from feast.infra.key_encoding_utils import deserialize_entity_key
from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
from feast.protos.feast.types.Value_pb2 import Value as ValueProto
from feast.types import Array

from training.features.training_set import field_default


class StoreUnavailableError(RuntimeError):
    """The online store did not answer (connection refused, timeout, locked database...)."""


@dataclass(frozen=True)
class ViewSpec:
    """What the service reads from one feature view.

    Attributes:
        name: Feature view name.
        join_key: ``user_id`` or ``item_id``.
        features: Feature names read, in order.
        defaults: Feature name -> the declared default (typed).
        list_features: The array-valued features.
        ttl_seconds: Rows older than this are treated as missing; 0 = never stale.
    """

    name: str
    join_key: str
    features: tuple[str, ...]
    defaults: dict[str, Any]
    list_features: frozenset[str]
    ttl_seconds: float

    @classmethod
    def of(cls, view: FeatureView, features: Sequence[str] | None = None) -> ViewSpec:
        """The spec of ``view`` (all its features unless ``features`` names some)."""
        names = tuple(features) if features is not None else tuple(f.name for f in view.features)
        known = {f.name: f for f in view.features}
        absent = [n for n in names if n not in known]
        if absent:
            raise KeyError(f"feature view {view.name!r} has no features {absent}")
        join_keys = [e.name for e in view.entity_columns]
        if len(join_keys) != 1:
            raise ValueError(f"feature view {view.name!r} must have one join key: {join_keys}")
        return cls(
            name=view.name,
            join_key=join_keys[0],
            features=names,
            defaults={n: field_default(view, n) for n in names},
            list_features=frozenset(n for n in names if isinstance(known[n].dtype, Array)),
            ttl_seconds=view.ttl.total_seconds() if view.ttl else 0.0,
        )

    def is_stale(self, event_ts: float | None, now: float) -> bool:
        """True when a row stamped ``event_ts`` (epoch seconds) no longer counts."""
        if event_ts is None:
            return True
        return self.ttl_seconds > 0 and event_ts < now - self.ttl_seconds


def decode_value(value: ValueProto | None) -> Any:
    """A Feast ``Value`` proto as a Python value (lists as lists); None when unset."""
    if value is None:
        return None
    kind = value.WhichOneof("val")
    if kind is None or kind == "null_val":
        return None
    raw = getattr(value, kind)
    if kind.endswith("_list_val"):
        return list(raw.val)
    return raw


@dataclass
class Row:
    """One entity's row of one view: its event time (epoch seconds) and feature values."""

    event_ts: float | None
    values: dict[str, Any] | None  # None: the store has no row for the entity


def _epoch(ts: datetime | None) -> float | None:
    return ts.timestamp() if ts is not None else None


class OnlineReader:
    """Reads feature view rows of entities from a Feast store's online store.

    Thread-safe: SQLite reads share Feast's one connection and are serialized; Redis reads go
    through redis-py's connection pool concurrently.
    """

    def __init__(self, store: FeatureStore, timeout_seconds: float = 0.5) -> None:
        self.store = store
        self.config = store.config
        kind = str(getattr(self.config.online_store, "type", "sqlite")).lower()
        self.store_type = "redis" if "redis" in kind else "sqlite" if "sqlite" in kind else kind
        """``sqlite`` or ``redis`` (or the configured type's name)."""
        self._provider = store._get_provider()
        # The concrete store (SqliteOnlineStore / RedisOnlineStore): its connection helpers.
        self._online: Any = self._provider.online_store
        self._serialize = threading.Lock() if self.store_type == "sqlite" else None
        self._views: dict[str, FeatureView] = {}
        self._hash_plans: dict[tuple[str, tuple[str, ...]], tuple[str, list[str], list[Any]]] = {}
        if self.store_type == "redis":
            self._fail_fast(timeout_seconds)

    def _fail_fast(self, timeout: float) -> None:
        """Bound every Redis call: one quick retry, socket timeouts of ``timeout`` seconds.

        redis-py's default retries a refused connection with back-off for ~4.5 s; a request
        must not wait that long on a dead store when cached features can answer it.
        """
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        client = self._online._get_client(self.config.online_store)
        client.set_retry(Retry(NoBackoff(), 1))
        kwargs = client.connection_pool.connection_kwargs
        kwargs["socket_connect_timeout"] = timeout
        kwargs["socket_timeout"] = timeout

    def view(self, name: str) -> FeatureView:
        """The registered feature view ``name`` (cached; :meth:`forget_views` clears it)."""
        if name not in self._views:
            self._views[name] = self.store.get_feature_view(name)
        return self._views[name]

    def forget_views(self) -> None:
        """Drop cached view definitions (after the registry changed)."""
        self._views.clear()
        self._hash_plans.clear()

    def read(self, spec: ViewSpec, ids: Sequence[str]) -> list[Row]:
        """Rows of ``ids`` (same order); a Row with ``values=None`` where the store has none.

        Raises:
            StoreUnavailableError: when the store cannot be read.
        """
        if not ids:
            return []
        keys = [
            EntityKeyProto(join_keys=[spec.join_key], entity_values=[ValueProto(string_val=i)])
            for i in ids
        ]
        view = self.view(spec.name)
        try:
            if self._serialize is not None:
                with self._serialize:
                    raw = self._provider.online_read(self.config, view, keys, list(spec.features))
            else:
                raw = self._provider.online_read(self.config, view, keys, list(spec.features))
        except Exception as exc:  # redis ConnectionError, sqlite OperationalError, timeouts...
            raise StoreUnavailableError(f"{self.store_type} online store: {exc}") from exc
        return [self._row(spec, ts, values) for ts, values in raw]

    def read_views(self, specs: Sequence[ViewSpec], entity_id: str) -> dict[str, Row]:
        """One entity's row of each of ``specs`` (all keyed by the same join key).

        On Redis every view's fields of the entity live in one hash, so this is one pipelined
        round trip instead of one per view (what Feast's own ``get_online_features`` does).

        Raises:
            StoreUnavailableError: when the store cannot be read.
        """
        if self.store_type != "redis" or len(specs) < 2:
            return {s.name: self.read(s, [entity_id])[0] for s in specs}
        online = self._online
        key = EntityKeyProto(
            join_keys=[specs[0].join_key], entity_values=[ValueProto(string_val=entity_id)]
        )
        redis_key = online._generate_redis_keys_for_entities(self.config, [key])[0]
        names = [self._hash_fields(spec) for spec in specs]
        commands = [(redis_key, fields) for _, _, fields in names]
        try:
            replies = online._read_hash_fields(self.config, commands)
        except Exception as exc:
            raise StoreUnavailableError(f"{self.store_type} online store: {exc}") from exc
        out: dict[str, Row] = {}
        for spec, (fv_name, requested, _), reply in zip(specs, names, replies, strict=True):
            ts, values = online._convert_redis_values_to_protobuf([reply], fv_name, requested)[0]
            out[spec.name] = self._row(spec, ts, values)
        return out

    def _hash_fields(self, spec: ViewSpec) -> tuple[str, list[str], list[Any]]:
        """(view name in Redis, requested names, hash fields) of ``spec``, computed once."""
        key = (spec.name, spec.features)
        if key not in self._hash_plans:
            from feast.infra.online_stores.redis import _versioned_fv_name

            view = self.view(spec.name)
            fv_name = _versioned_fv_name(view, self.config)
            requested, fields = self._online._generate_hset_keys_for_features(
                view, list(spec.features), fv_name_override=fv_name
            )
            self._hash_plans[key] = (fv_name, requested, fields)
        return self._hash_plans[key]

    def _row(self, spec: ViewSpec, ts: datetime | None, values: dict[str, Any] | None) -> Row:
        decoded = {n: decode_value(values.get(n)) for n in spec.features} if values else {}
        stamp = _epoch(ts)
        # Redis answers an entity without a row for this view with empty values stamped at the
        # epoch (SQLite with None): both mean "no row".
        if not decoded or (not stamp and all(v is None for v in decoded.values())):
            return Row(None, None)
        return Row(stamp, decoded)

    def ping(self) -> bool:
        """Whether the online store answers right now."""
        try:
            if self.store_type == "redis":
                client = self._online._get_client(self.config.online_store)
                return bool(client.ping())
            if self._serialize is not None:
                with self._serialize:
                    conn = self._online._get_conn(self.config)
                    conn.execute("SELECT 1").fetchone()
            return True
        except Exception:
            return False

    def entity_ids(self, join_key: str, views: Sequence[str]) -> list[str]:
        """Every ``join_key`` value with a row in any of ``views`` (Redis: in any view), sorted.

        Feast has no "list entities" call, so this reads the store's own layout: the tables of
        the SQLite store, or a SCAN over the project's keys in Redis.

        Raises:
            StoreUnavailableError: when the store cannot be read.
            NotImplementedError: for online store types other than SQLite and Redis.
        """
        if self.store_type not in ("sqlite", "redis"):
            raise NotImplementedError(
                f"listing entities of a {self.store_type!r} online store is not supported "
                "(SQLite and Redis are)"
            )
        try:
            blobs = self._sqlite_keys(views) if self.store_type == "sqlite" else self._redis_keys()
        except Exception as exc:
            raise StoreUnavailableError(f"{self.store_type} online store: {exc}") from exc
        version = self.config.entity_key_serialization_version
        found: set[str] = set()
        for blob in blobs:
            try:
                key = deserialize_entity_key(blob, version)
            except Exception:  # a Redis key of another project that shares the suffix
                continue
            if list(key.join_keys) == [join_key]:
                found.add(key.entity_values[0].string_val)
        return sorted(found)

    def _sqlite_keys(self, views: Sequence[str]) -> list[bytes]:
        """Distinct serialized entity keys of the views' tables (each decoded once later)."""
        from feast.infra.online_stores.sqlite import _table_id

        assert self._serialize is not None
        with self._serialize:
            conn = self._online._get_conn(self.config)
            existing = {
                row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
            }
            tables = [_table_id(self.config.project, self.view(n)) for n in views]
            tables = [t for t in tables if t in existing]  # never materialized: no rows
            if not tables:
                return []
            query = " UNION ".join(f'SELECT entity_key FROM "{t}"' for t in tables)
            return [bytes(blob) for (blob,) in conn.execute(query).fetchall()]

    def _redis_keys(self) -> list[bytes]:
        """Serialized entity keys of the project: every Redis key ending in its name."""
        client = self._online._get_client(self.config.online_store)
        suffix = self.config.project.encode()
        return [raw[: -len(suffix)] for raw in client.scan_iter(match=b"*" + suffix, count=5000)]


def now() -> float:
    """Wall-clock epoch seconds (one place, so ttl checks agree)."""
    return time.time()
