"""Pre-ranking service latency: naive Feast SDK path vs in-process scoring vs HTTP, one run.

Same data for every path: a synthetic catalog (default 50,000 items with L2-normalized 384-d
content vectors, categories from the bundle's vocabulary plus others) and 2,000 users (activity,
20-item histories, 10 interest anchors), written as the pipeline's parquet sources into a
benchmark run directory, applied to Feast and materialized twice: into SQLite
(``RUN_DIR/sqlite``) and into Redis (``RUN_DIR/redis``, project ``gpl_bench_serve``, whose keys
alone are flushed on a rebuild). The exported bundle of ``make demo`` (``runs/demo/bundle``)
scores every request. For each store and candidate count N it times:

* ``naive``: Feast SDK ``get_online_features`` for the user, for all N candidates (item views
  with ``item_semantics:content_embedding``) and for the history/anchor vectors, then ONNX
  Runtime (light on all, expressive on the top ``hard_fraction``), exactly as the service ranks;
* ``in-process``: the service's own scoring, ``ServiceState.scorer.score`` on the item cache;
* ``http``: the real ``gpl serve`` in a subprocess, ``POST /v1/prerank`` at concurrency 1, 8
  and 32 (one keep-alive ``http.client`` connection per thread, bodies pre-encoded); at
  concurrency 1 an ``httpx`` client alternates with it request by request (``http httpx``):
  the client shares the server's cores, so its own cost is part of every latency;
* ``ort-floor``: ONNX Runtime alone on the same inputs, prebuilt (light on N rows + expressive
  on ``ceil(hard_fraction * N)`` rows), full graphs: the compute of scoring the batch;
* ``ort-split``: ONNX Runtime alone, the models' score graphs on prebuilt item states (what the
  service runs per request once item states are precomputed per cached item).

The service precomputes item states by default; the same paths with precomputing off run
interleaved with it, request by request, in one loop (``in-process full`` against
``in-process``; ``http full`` against ``http ab`` at concurrency 1, two servers up at once), so
the comparison holds on a noisy machine.

Prints a table (p50/p99 ms, requests/s), checks the targets at 2,000 candidates with Redis
(single-stream HTTP p99 <= 15 ms, >= 20x faster than naive, p50 within 3x of the ONNX Runtime
floor) and writes ``benchmarks/results/serve.json``. The generated data is cached in the run
directory (``--rebuild`` regenerates it).

    .venv/bin/python benchmarks/serve.py [--items 50000] [--users 2000]
        [--sizes 1000,2000,5000] [--stores redis,sqlite] [--iterations 200]
        [--naive-iterations 20] [--concurrency 1,8,32] [--run-dir runs/bench_serve]
        [--bundle runs/demo/bundle] [--redis-url redis://127.0.0.1:6379/0] [--rebuild]

Quick smoke run (a couple of minutes):

    .venv/bin/python benchmarks/serve.py --items 5000 --sizes 1000 --iterations 20 \
        --run-dir runs/bench_serve_smoke --out /tmp/serve_smoke.json
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from importlib import metadata
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import pyarrow as pa

ROOT: Final = Path(__file__).resolve().parents[1]
PROJECT: Final = "gpl_bench_serve"
DATA_FORMAT: Final = 1
STORES: Final = ("redis", "sqlite")
TOP_K: Final = 100
OTHER_CATEGORIES: Final = ("books", "travel", "gaming", "fashion", "")
TARGET_N: Final = 2000
TARGET_P99_MS: Final = 15.0
TARGET_SPEEDUP: Final = 20.0
TARGET_FLOOR_RATIO: Final = 3.0
MAX_DATA_AGE: Final = timedelta(days=20)  # item_popularity's ttl is 30 days
_EMB: Final = "item_semantics__content_embedding"
_EMB_REF: Final = "item_semantics:content_embedding"

F32 = npt.NDArray[np.float32]
Inputs = dict[str, npt.NDArray[Any]]

_T0 = time.perf_counter()


def say(message: str) -> None:
    """Print a progress line with the seconds since start."""
    print(f"[{time.perf_counter() - _T0:7.1f}s] {message}", flush=True)


def item_id(k: int) -> str:
    return f"i{k:06d}"


def user_id(k: int) -> str:
    return f"u{k:05d}"


# --- bundle ---------------------------------------------------------------------------------


def bundle_manifest(bundle: Path) -> dict[str, Any]:
    """The bundle's manifest; exits with a hint when there is no bundle."""
    path = bundle / "manifest.json"
    if not path.exists():
        raise SystemExit(
            f"{bundle}: no exported bundle here (no manifest.json); run `make demo` first "
            "(it trains and exports runs/demo/bundle), or pass --bundle"
        )
    manifest: dict[str, Any] = json.loads(path.read_text())
    return manifest


@dataclass(frozen=True)
class DataSpec:
    """What the synthetic data depends on: a cached run directory is reused when it matches."""

    items: int
    users: int
    dim: int
    history: int
    anchors: int
    categories: tuple[str, ...]
    seed: int

    @classmethod
    def of(cls, args: argparse.Namespace, manifest: dict[str, Any]) -> DataSpec:
        fitted = manifest["preprocessing"]["fitted"]
        return cls(
            items=args.items,
            users=args.users,
            dim=int(fitted["embedding_dim"]),
            history=int(fitted["history_length"]),
            anchors=int(fitted["num_anchors"]),
            categories=tuple(manifest["features"]["category"]["vocabulary"]),
            seed=args.seed,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "format": DATA_FORMAT,
            "items": self.items,
            "users": self.users,
            "dim": self.dim,
            "history": self.history,
            "anchors": self.anchors,
            "categories": list(self.categories),
            "seed": self.seed,
        }


# --- synthetic data -------------------------------------------------------------------------


def _list_array(values: npt.NDArray[Any], width: int, typ: pa.DataType) -> pa.Array:
    """Rows of a (rows, width) array as a ``list<typ>`` column."""
    flat = pa.array(values.ravel(), typ)
    return pa.FixedSizeListArray.from_arrays(flat, width).cast(pa.list_(typ))


def make_tables(spec: DataSpec, ts: datetime) -> dict[str, pa.Table]:
    """Every online source table, keyed by its path relative to the run directory.

    Schemas are the pipeline's: ``training/features/stats.py`` (features/*),
    ``training.sids.job.ITEM_SEMANTICS_SCHEMA`` and ``training.anchors.job.ANCHORS_SCHEMA``.
    """
    from training.anchors.schema import ANCHORS_DIR, ANCHORS_FILE, ANCHORS_SCHEMA
    from training.data.contract import TIMESTAMP
    from training.features.stats import FEATURES_DIR
    from training.sids.job import ITEM_SEMANTICS_FILE, ITEM_SEMANTICS_SCHEMA, STAGE_DIR

    rng = np.random.default_rng(spec.seed)
    n, u, d = spec.items, spec.users, spec.dim
    items = [item_id(k) for k in range(n)]
    users = [user_id(k) for k in range(u)]
    item_ts = pa.array([ts] * n, TIMESTAMP)
    user_ts = pa.array([ts] * u, TIMESTAMP)

    # Items: content vectors, SIDs, categories and funnel statistics.
    emb = rng.standard_normal((n, d), dtype=np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    levels = rng.integers(0, 256, (n, 3))
    seen: dict[tuple[int, int, int], int] = {}
    disamb = np.zeros(n, np.int64)
    for k, (a, b, c) in enumerate(levels.tolist()):
        disamb[k] = seen.get((a, b, c), 0)
        seen[(a, b, c)] = int(disamb[k]) + 1
    codes = np.column_stack([levels, disamb]).astype(np.int32)
    sids = [f"<a_{a}><b_{b}><c_{c}><d_{x}>" for a, b, c, x in codes.tolist()]
    vocab = list(spec.categories)
    others = list(OTHER_CATEGORIES)
    in_vocab = rng.random(n) < 0.85
    category = np.where(
        in_vocab,
        np.array(vocab, dtype=object)[rng.integers(0, len(vocab), n)],
        np.array(others, dtype=object)[rng.integers(0, len(others), n)],
    )
    words = np.maximum(rng.poisson(18, n), 1).astype(np.int64)
    candidate_count = np.maximum(np.round(rng.lognormal(4.6, 1.6, n)), 1).astype(np.int64)
    impressions = rng.binomial(candidate_count, rng.beta(1, 12, n)).astype(np.int64)
    clicks = rng.binomial(impressions, rng.beta(2, 18, n)).astype(np.int64)

    item_content = pa.table(
        {
            "item_id": pa.array(items, pa.string()),
            "event_timestamp": item_ts,
            "text_num_words": pa.array(words, pa.int64()),
            "category": pa.array(category.tolist(), pa.string()),
        }
    )
    item_popularity = pa.table(
        {
            "item_id": pa.array(items, pa.string()),
            "event_timestamp": item_ts,
            "candidate_count": pa.array(candidate_count, pa.int64()),
            "impressions": pa.array(impressions, pa.int64()),
            "clicks": pa.array(clicks, pa.int64()),
            "ctr_smoothed": pa.array(((clicks + 1.0) / (impressions + 20.0)), pa.float32()),
            "exposure_rate": pa.array(impressions / candidate_count, pa.float32()),
            "log_candidate_count": pa.array(np.log1p(candidate_count), pa.float32()),
        }
    )
    item_semantics = pa.Table.from_arrays(
        [
            pa.array(items, pa.string()),
            item_ts,
            _list_array(codes, 4, pa.int32()),
            pa.array(sids, pa.string()),
            _list_array(emb, d, pa.float32()),
        ],
        schema=ITEM_SEMANTICS_SCHEMA,
    )

    # Users: activity, history (oldest first) and interest anchors (best first).
    requests = rng.geometric(0.2, u).astype(np.int64)
    u_impressions = requests * 10
    u_clicks = rng.binomial(u_impressions, 0.08).astype(np.int64)
    active_days = np.minimum(requests, rng.integers(1, 30, u)).astype(np.int64)
    user_activity = pa.table(
        {
            "user_id": pa.array(users, pa.string()),
            "event_timestamp": user_ts,
            "requests": pa.array(requests, pa.int64()),
            "impressions": pa.array(u_impressions, pa.int64()),
            "clicks": pa.array(u_clicks, pa.int64()),
            "active_days": pa.array(active_days, pa.int64()),
            "ctr_smoothed": pa.array((u_clicks + 1.0) / (u_impressions + 20.0), pa.float32()),
            "clicked_popularity_mean": pa.array(rng.normal(4.6, 1.0, u), pa.float32()),
        }
    )
    history = rng.integers(0, n, (u, spec.history))
    user_history = pa.table(
        {
            "user_id": pa.array(users, pa.string()),
            "event_timestamp": user_ts,
            "recent_item_ids": pa.array(
                [[items[k] for k in row] for row in history.tolist()], pa.list_(pa.string())
            ),
        }
    )
    anchors = rng.integers(0, n, (u, spec.anchors))
    log_probs = -np.sort(rng.exponential(3.0, (u, spec.anchors)), axis=1)
    user_interest_anchors = pa.Table.from_arrays(
        [
            pa.array(users, pa.string()),
            user_ts,
            pa.array([[sids[k] for k in row] for row in anchors.tolist()], pa.list_(pa.string())),
            pa.array([[items[k] for k in row] for row in anchors.tolist()], pa.list_(pa.string())),
            _list_array(emb[anchors].reshape(u, -1), spec.anchors * d, pa.float32()),
            _list_array(log_probs.astype(np.float32), spec.anchors, pa.float32()),
            pa.array(np.full(u, spec.anchors), pa.int32()),
            pa.array(np.full(u, spec.history), pa.int32()),
            pa.array(rng.integers(-(2**62), 2**62, u), pa.int64()),  # history_hash
        ],
        schema=ANCHORS_SCHEMA,
    )
    return {
        f"{FEATURES_DIR}/item_content.parquet": item_content,
        f"{FEATURES_DIR}/item_popularity.parquet": item_popularity,
        f"{FEATURES_DIR}/user_activity.parquet": user_activity,
        f"{FEATURES_DIR}/user_history.parquet": user_history,
        f"{STAGE_DIR}/{ITEM_SEMANTICS_FILE}": item_semantics,
        f"{ANCHORS_DIR}/{ANCHORS_FILE}": user_interest_anchors,
    }


# --- the two stores -------------------------------------------------------------------------


def store_settings(kind: str, redis_url: str) -> Any:
    """The StoreSettings of store ``kind`` (explicit values, whatever the environment says)."""
    from training.features.store import StoreSettings

    return StoreSettings(project=PROJECT, redis_url=redis_url if kind == "redis" else None)


def flush_redis_project(url: str, project: str) -> int:
    """Delete the Feast keys of ``project`` only (never FLUSHDB); return how many."""
    import redis
    from feast.infra.key_encoding_utils import deserialize_entity_key

    client = redis.Redis.from_url(url)
    suffix = project.encode()
    deleted = 0
    batch: list[bytes] = []
    for key in client.scan_iter(match=b"*" + suffix, count=5000):
        try:  # a Feast key: a serialized entity key, then the project name
            deserialize_entity_key(key[: -len(suffix)], 3)
        except Exception:
            continue
        batch.append(key)
        if len(batch) >= 5000:
            client.delete(*batch)
            deleted += len(batch)
            batch = []
    if batch:
        client.delete(*batch)
        deleted += len(batch)
    return deleted


def store_populated(store: Any, spec: DataSpec) -> bool:
    """Whether the online store answers for the first, middle and last item and a user."""
    from gpl_service.online import OnlineReader, ViewSpec

    try:
        reader = OnlineReader(store)
        probe = [item_id(0), item_id(spec.items // 2), item_id(spec.items - 1)]
        for name in ("item_content", "item_popularity", "item_semantics"):
            rows = reader.read(ViewSpec.of(reader.view(name)), probe)
            if any(r.values is None for r in rows):
                return False
        for name in ("user_activity", "user_history", "user_interest_anchors"):
            rows = reader.read(ViewSpec.of(reader.view(name)), [user_id(spec.users - 1)])
            if rows[0].values is None:
                return False
        return len(reader.entity_ids("item_id", ["item_content"])) == spec.items
    except Exception:
        return False


def materialize_store(store_dir: Path, kind: str, redis_url: str) -> float:
    """Apply the feature repo and materialize every online view; return the seconds."""
    from training.features.store import apply_definitions, materialize, open_store

    settings = store_settings(kind, redis_url)
    if kind == "redis":
        say(f"redis: flushed {flush_redis_project(redis_url, PROJECT):,} keys of {PROJECT}")
    store = open_store(store_dir, settings)
    apply_definitions(store)
    began = time.perf_counter()
    report = materialize(store, end=datetime.now(UTC), start=datetime(1970, 1, 1, tzinfo=UTC))
    seconds = time.perf_counter() - began
    say(f"{kind}: materialized {', '.join(report.views)} in {seconds:.1f}s")
    return seconds


def prepare(args: argparse.Namespace, spec: DataSpec) -> dict[str, Any]:
    """Build (or reuse) the run directory and the stores; return the run manifest."""
    from training.io import write_table

    run_dir: Path = args.run_dir
    manifest_path = run_dir / "manifest.json"
    old: dict[str, Any] = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    if run_dir.exists() and any(run_dir.iterdir()) and old.get("benchmark") != "serve":
        raise SystemExit(f"{run_dir} exists and is not a benchmarks/serve.py run directory")
    reason = ""
    if args.rebuild:
        reason = "--rebuild"
    elif old.get("data") != spec.to_json():
        reason = "no matching data" if old else "no data yet"
    elif datetime.now(UTC) - datetime.fromisoformat(old["event_timestamp"]) > MAX_DATA_AGE:
        reason = "data older than 20 days (feature ttl)"
    if reason:
        say(f"building {run_dir} ({reason}): {spec.items:,} items, {spec.users:,} users")
        for kind in STORES:
            shutil.rmtree(run_dir / kind, ignore_errors=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        ts = (datetime.now(UTC) - timedelta(days=1)).replace(microsecond=0)
        began = time.perf_counter()
        tables = make_tables(spec, ts)
        first = run_dir / STORES[0]
        for rel, table in tables.items():
            write_table(table, first / rel)
            for kind in STORES[1:]:  # the same files, so both stores hold the same data
                target = run_dir / kind / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(first / rel, target)
                except OSError:
                    shutil.copyfile(first / rel, target)
        generate_seconds = time.perf_counter() - began
        say(f"wrote {len(tables)} source tables in {generate_seconds:.1f}s")
        old = {
            "benchmark": "serve",
            "data": spec.to_json(),
            "event_timestamp": ts.isoformat(),
            "generate_seconds": round(generate_seconds, 2),
            "materialize_seconds": {},
        }
        manifest_path.write_text(json.dumps(old, indent=2) + "\n")
    else:
        say(f"reusing {run_dir} (data of {old['event_timestamp']})")
    from training.features.store import open_store

    for kind in args.stores:
        store_dir = run_dir / kind
        settings = store_settings(kind, args.redis_url)
        if kind in old["materialize_seconds"] and store_populated(
            open_store(store_dir, settings), spec
        ):
            say(f"{kind}: online store already materialized")
            continue
        old["materialize_seconds"][kind] = round(
            materialize_store(store_dir, kind, args.redis_url), 2
        )
        manifest_path.write_text(json.dumps(old, indent=2) + "\n")
    return old


# --- requests -------------------------------------------------------------------------------


def make_pool(spec: DataSpec, n: int, size: int, seed: int) -> list[tuple[str, list[str]]]:
    """``size`` requests: a random user and ``n`` distinct random catalog items each."""
    rng = np.random.default_rng([seed, n])
    return [
        (
            user_id(int(rng.integers(0, spec.users))),
            [item_id(int(k)) for k in rng.choice(spec.items, n, replace=False)],
        )
        for _ in range(size)
    ]


def stats_of(latencies: list[float], elapsed: float | None = None) -> dict[str, float]:
    """p50/p99/mean in ms and requests/s (count over ``elapsed``, default the sum)."""
    arr = np.asarray(latencies) * 1e3
    seconds = elapsed if elapsed is not None else float(arr.sum()) / 1e3
    return {
        "requests": len(latencies),
        "p50_ms": round(float(np.percentile(arr, 50)), 3),
        "p99_ms": round(float(np.percentile(arr, 99)), 3),
        "mean_ms": round(float(arr.mean()), 3),
        "req_per_s": round(len(latencies) / seconds, 2) if seconds > 0 else 0.0,
    }


# --- (a) naive: Feast SDK get_online_features + ONNX Runtime -----------------------------------


def _sigmoid(x: F32) -> F32:
    return (1.0 / (1.0 + np.exp(-x.astype(np.float64)))).astype(np.float32)


def route(bundle: Any, inputs: Inputs, top_k: int) -> tuple[list[int], F32]:
    """Light on all, expressive on the top ``hard_fraction`` (ranked first), as the service."""
    n = len(inputs["item_emb"])
    light = bundle.run("light", inputs)
    quota = min(n, math.ceil(bundle.hard_fraction * n)) if n else 0
    by_light = np.argsort(-light, kind="stable")
    hard = by_light[:quota]
    score = _sigmoid(light)
    if not quota:
        return by_light[:top_k].tolist(), score
    sub = dict(inputs)
    sub["row_request"] = np.zeros(quota, np.int64)
    sub["item_features"] = np.ascontiguousarray(inputs["item_features"][hard])
    sub["category"] = inputs["category"][hard]
    sub["item_emb"] = inputs["item_emb"][hard]
    expressive = bundle.run("expressive", sub)
    score[hard] = _sigmoid(expressive)
    order = np.concatenate([hard[np.argsort(-expressive, kind="stable")], by_light[quota:]])
    return order[:top_k].tolist(), score


@dataclass
class NaivePlan:
    """Feature references and defaults of the naive path, from the bundle's manifest."""

    user_refs: list[str]
    item_refs: list[str]
    user_columns: list[str]
    item_columns: list[str]
    category_col: str
    history_col: str
    anchors_col: str
    defaults: dict[str, Any]
    view_cols: dict[str, list[str]] = field(default_factory=dict)  # view -> its fetched columns

    @classmethod
    def build(cls, store: Any, bundle: Any) -> NaivePlan:
        from training.features.training_set import field_default

        features = bundle.manifest["features"]
        history = features["history"]["column"]
        anchors = features["anchors"]["column"]
        category = features["category"]["column"]

        def refs(columns: list[str]) -> tuple[list[str], dict[str, list[str]]]:
            out: list[str] = []
            by_view: dict[str, list[str]] = {}
            for col in columns:
                view, _, name = col.partition("__")
                if name == "missing":
                    by_view.setdefault(view, [])
                    continue
                if col not in by_view.setdefault(view, []):
                    by_view[view].append(col)
                    out.append(f"{view}:{name}")
            for view, cols in by_view.items():  # a view read only for its missing indicator
                if not cols:
                    first = store.get_feature_view(view).features[0].name
                    cols.append(f"{view}__{first}")
                    out.append(f"{view}:{first}")
            return out, by_view

        user_refs, user_views = refs([*bundle.user_columns, history, anchors])
        item_refs, item_views = refs([*bundle.item_columns, category, _EMB])
        defaults: dict[str, Any] = {}
        for col in [c for cols in (*user_views.values(), *item_views.values()) for c in cols]:
            view, _, name = col.partition("__")
            defaults[col] = field_default(store.get_feature_view(view), name)
        return cls(
            user_refs=user_refs,
            item_refs=item_refs,
            user_columns=list(bundle.user_columns),
            item_columns=list(bundle.item_columns),
            category_col=category,
            history_col=history,
            anchors_col=anchors,
            defaults=defaults,
            view_cols={**user_views, **item_views},
        )


def naive_inputs(
    store: Any, bundle: Any, plan: NaivePlan, user: str, candidates: list[str]
) -> Inputs:
    """The graph inputs of one request from three ``get_online_features`` calls."""
    d = bundle.embedding_dim
    got = store.get_online_features(
        features=plan.user_refs, entity_rows=[{"user_id": user}], full_feature_names=True
    ).to_dict()

    def present(view: str, k: int, values: dict[str, list[Any]]) -> bool:
        return any(values[c][k] is not None for c in plan.view_cols[view])

    user_raw = np.zeros((1, len(plan.user_columns)), np.float32)
    for j, col in enumerate(plan.user_columns):
        view, _, name = col.partition("__")
        if name == "missing":
            user_raw[0, j] = 0.0 if present(view, 0, got) else 1.0
        else:
            value = got[col][0]
            user_raw[0, j] = float(plan.defaults[col] if value is None else value)
    history_ids = [str(i) for i in (got[plan.history_col][0] or [])][-bundle.history_length :]
    anchor_ids = [str(i) for i in (got[plan.anchors_col][0] or [])][: bundle.num_anchors]

    items = store.get_online_features(
        features=plan.item_refs,
        entity_rows=[{"item_id": i} for i in candidates],
        full_feature_names=True,
    ).to_dict()
    n = len(candidates)
    item_raw = np.zeros((n, len(plan.item_columns)), np.float32)
    for j, col in enumerate(plan.item_columns):
        view, _, name = col.partition("__")
        if name == "missing":
            item_raw[:, j] = [0.0 if present(view, k, items) else 1.0 for k in range(n)]
        else:
            default = plan.defaults[col]
            item_raw[:, j] = [default if v is None else v for v in items[col]]
    index = bundle.category_index
    category = np.array([index.get(v or "", 0) for v in items[plan.category_col]], np.int64)
    zeros = [0.0] * d
    item_emb = np.array(
        [v if v is not None and len(v) == d else zeros for v in items[_EMB]], np.float32
    )

    context = history_ids + anchor_ids
    vectors = np.zeros((len(context), d), np.float32)
    if context:
        ctx = store.get_online_features(
            features=[_EMB_REF],
            entity_rows=[{"item_id": i} for i in context],
            full_feature_names=True,
        ).to_dict()
        for k, v in enumerate(ctx[_EMB]):
            if v is not None and len(v) == d:
                vectors[k] = v
    history = np.zeros((1, bundle.history_length, d), np.float32)
    history[0, : len(history_ids)] = vectors[: len(history_ids)]
    anchors = np.zeros((1, bundle.num_anchors, d), np.float32)
    anchors[0, : len(anchor_ids)] = vectors[len(history_ids) :]
    return {
        "user_features": user_raw,
        "history_emb": history,
        "anchor_emb": anchors,
        "row_request": np.zeros(n, np.int64),
        "item_features": item_raw,
        "category": category,
        "item_emb": item_emb,
    }


# --- (b) in-process, (a) naive and (d) ORT floor, for one store ------------------------------


def bench_in_process(
    args: argparse.Namespace, kind: str, spec: DataSpec, pools: dict[int, list[Any]]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows of the naive, in-process and ORT-floor paths for every N; plus cache facts."""
    from gpl_service.metrics import Metrics
    from gpl_service.models import load_bundle
    from gpl_service.scoring import ServingPlan
    from gpl_service.settings import ServeSettings
    from gpl_service.state import ServiceState
    from training.features.store import open_store

    store_dir = args.run_dir / kind
    store = open_store(store_dir, store_settings(kind, args.redis_url))
    state = ServiceState(ServeSettings(run_dir=store_dir, bundle_dir=args.bundle), store, Metrics())
    began = time.perf_counter()
    if not state.refresh_items("benchmark"):
        raise SystemExit(f"{kind}: the item cache could not be filled from the online store")
    fill = time.perf_counter() - began
    bundle_obj = state.load(args.bundle)
    plan, snap = state.plan, state.items
    assert plan is not None
    if plan.states is None:
        raise SystemExit(f"{args.bundle}: no split graphs; re-export it with `gpl export`")
    states_seconds = plan.states.table(snap).seconds
    full_plan = ServingPlan.build(
        load_bundle(args.bundle, precompute=False), state.reader, state.layout
    )
    say(f"{kind}: item cache {snap.items:,} items in {fill:.1f}s; bundle {bundle_obj.providers}")
    if snap.items != spec.items:
        raise SystemExit(f"{kind}: the cache holds {snap.items} items, expected {spec.items}")
    naive_plan = NaivePlan.build(store, bundle_obj)
    rows: list[dict[str, Any]] = []
    info: dict[str, Any] = {
        "cache_fill_seconds": round(fill, 2),
        "item_states_seconds": round(states_seconds, 2),
        "cached_items": snap.items,
        "providers": bundle_obj.providers,
        "hard_fraction": bundle_obj.hard_fraction,
        "model_version": bundle_obj.model_version,
        "naive_feature_refs": {"user": naive_plan.user_refs, "item": naive_plan.item_refs},
        "by_n": {},
    }
    for n in args.sizes:
        pool = pools[n]
        base = {"store": kind, "candidates": n, "concurrency": 1}

        # (b) the service's in-process scoring path, alternating with the full graphs.
        for user, cands in pool[:10]:
            state.scorer.score(plan, snap, user, cands, TOP_K)
            state.scorer.score(full_plan, snap, user, cands, TOP_K)
        lat: list[float] = []
        lat_full: list[float] = []
        parts: dict[str, list[float]] = {"features": [], "light": [], "expressive": []}
        parts_full: dict[str, list[float]] = {"features": [], "light": [], "expressive": []}
        degraded = 0
        for k in range(args.iterations):
            user, cands = pool[k % len(pool)]
            runs = [(plan, lat, parts), (full_plan, lat_full, parts_full)]
            for which, times, stages in runs if k % 2 == 0 else runs[::-1]:
                t0 = time.perf_counter()
                scored = state.scorer.score(which, snap, user, cands, TOP_K)
                times.append(time.perf_counter() - t0)
                degraded += scored.degraded
                for part, ms in scored.stats["timings_ms"].items():
                    stages[part].append(ms)
        if degraded:
            raise SystemExit(f"{kind} N={n}: {degraded} in-process answers were degraded")
        for path, times, stages in (
            ("in-process", lat, parts),
            ("in-process full", lat_full, parts_full),
        ):
            row = {**base, "path": path, **stats_of(times)}
            row["stage_p50_ms"] = {k: round(float(np.median(v)), 3) for k, v in stages.items()}
            rows.append(row)
            say(f"{kind} N={n} {path} p50 {row['p50_ms']:.2f} ms p99 {row['p99_ms']:.2f} ms")

        # (a) naive: Feast SDK + ONNX Runtime; its inputs are kept for the floor and parity.
        naive_inputs(store, bundle_obj, naive_plan, *pool[0])  # warm-up (registry, connections)
        lat = []
        kept: list[tuple[int, Inputs, list[int], F32]] = []
        for k in range(args.naive_iterations):
            user, cands = pool[k % len(pool)]
            t0 = time.perf_counter()
            inputs = naive_inputs(store, bundle_obj, naive_plan, user, cands)
            order, score = route(bundle_obj, inputs, TOP_K)
            lat.append(time.perf_counter() - t0)
            if len(kept) < min(10, len(pool)) and k < len(pool):
                kept.append((k, inputs, order, score))
        row = {**base, "path": "naive", **stats_of(lat)}
        rows.append(row)
        say(f"{kind} N={n} naive p50 {row['p50_ms']:.1f} ms p99 {row['p99_ms']:.1f} ms")

        # Parity: the naive path must rank exactly like the service.
        same, diff = 0, 0.0
        for k, _, order, score in kept:
            user, cands = pool[k]
            for which in (plan, full_plan):
                scored = state.scorer.score(which, snap, user, cands, TOP_K)
                same += scored.item_ids == [cands[j] for j in order]
                diff = max(
                    diff,
                    max(
                        abs(a - float(score[j])) for a, j in zip(scored.scores, order, strict=True)
                    ),
                )
        same //= 2
        info["by_n"][n] = {
            "parity_requests": len(kept),
            "parity_paths": ["in-process", "in-process full"],
            "parity_same_top_k": same,
            "parity_max_abs_score_diff": diff,
        }
        if same != len(kept):
            say(f"WARNING {kind} N={n}: naive and service top-{TOP_K} differ ({same}/{len(kept)})")

        # (d) the ONNX Runtime floor: the same models on prebuilt inputs; and the score graphs
        # alone on prebuilt item states (what runs per request with precomputed states).
        prebuilt: list[tuple[Inputs, Inputs, Inputs, Inputs]] = []
        for _, inputs, _, _ in kept:
            light = bundle_obj.run("light", inputs)
            quota = min(n, math.ceil(bundle_obj.hard_fraction * n))
            hard = np.argsort(-light, kind="stable")[:quota]
            sub = dict(inputs)
            sub["row_request"] = np.zeros(quota, np.int64)
            sub["item_features"] = np.ascontiguousarray(inputs["item_features"][hard])
            sub["category"] = np.ascontiguousarray(inputs["category"][hard])
            sub["item_emb"] = np.ascontiguousarray(inputs["item_emb"][hard])
            split = []
            for kind_, x in (("light", inputs), ("expressive", sub)):
                state_ = bundle_obj.item_state(
                    kind_, x["item_features"], x["category"], x["item_emb"]
                )
                split.append(
                    {
                        **{k: x[k] for k in ("user_features", "history_emb", "anchor_emb")},
                        "row_request": x["row_request"],
                        "item_state": state_,
                        "item_emb": x["item_emb"],
                    }
                )
            prebuilt.append((inputs, sub, split[0], split[1]))
        for inputs, sub, s_light, s_expr in prebuilt[:3]:
            bundle_obj.run("light", inputs)
            bundle_obj.run("expressive", sub)
            bundle_obj.run_split("light", s_light)
            bundle_obj.run_split("expressive", s_expr)
        lat, lat_split = [], []
        for k in range(args.iterations):
            inputs, sub, s_light, s_expr = prebuilt[k % len(prebuilt)]
            t0 = time.perf_counter()
            bundle_obj.run("light", inputs)
            bundle_obj.run("expressive", sub)
            t1 = time.perf_counter()
            bundle_obj.run_split("light", s_light)
            bundle_obj.run_split("expressive", s_expr)
            lat_split.append(time.perf_counter() - t1)
            lat.append(t1 - t0)
        for path, times in (("ort-floor", lat), ("ort-split", lat_split)):
            row = {**base, "path": path, **stats_of(times)}
            rows.append(row)
            say(f"{kind} N={n} {path} p50 {row['p50_ms']:.2f} ms p99 {row['p99_ms']:.2f} ms")
        del kept, prebuilt
    del state, snap, plan, full_plan, store
    gc.collect()
    return rows, info


# --- (c) HTTP end to end ----------------------------------------------------------------------


def start_server(
    args: argparse.Namespace, kind: str, precompute: bool = True
) -> tuple[subprocess.Popen[bytes], str, float, Path]:
    """Start ``gpl serve`` for store ``kind``; return it, its URL, start-up seconds, log."""
    from gpl_service.process import ServerStartError, free_port, wait_ready

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("GPL_REDIS_URL", "GPL_PROJECT")}
    env["GPL_PROJECT"] = PROJECT
    env["GPL_SERVE_PRECOMPUTE_ITEM_STATES"] = "1" if precompute else "0"
    if kind == "redis":
        env["GPL_REDIS_URL"] = args.redis_url
    cmd = [
        sys.executable,
        "-m",
        "gpl_service.cli",
        "serve",
        "--run-dir",
        str(args.run_dir / kind),
        "--bundle",
        str(args.bundle),
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    log_path = args.run_dir / f"serve_{kind}{'' if precompute else '_full'}.log"
    say(f"$ {' '.join(f'{k}={env[k]}' for k in _SHOWN_ENV if k in env)} {shlex.join(cmd[2:])}")
    began = time.perf_counter()
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, f"{url}/v1/ready", timeout=600)
    except ServerStartError as exc:
        stop_server(proc)
        tail = log_path.read_text(errors="replace")[-3000:]
        raise SystemExit(f"{kind}: {exc} (log {log_path}):\n{tail}") from exc
    return proc, url, time.perf_counter() - began, log_path


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=20)


_SHOWN_ENV: Final = ("GPL_PROJECT", "GPL_REDIS_URL", "GPL_SERVE_PRECOMPUTE_ITEM_STATES")
_HEADERS: Final = {"content-type": "application/json"}
_OK: Final = b'"degraded":false'


class StdlibClient:
    """One keep-alive HTTP/1.1 connection (``http.client``): the lightest Python client.

    The client runs on the same two cores as the server, so its own cost lands in every
    latency; a production caller (another service, often not Python) adds far less than httpx.
    """

    def __init__(self, url: str) -> None:
        import http.client
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        self._conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=300)

    def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        self._conn.request("POST", path, body=body, headers=_HEADERS)
        resp = self._conn.getresponse()
        return resp.status, resp.read()

    def close(self) -> None:
        self._conn.close()


class HttpxClient:
    """An ``httpx.Client`` (what a Python caller would typically use), for reference."""

    def __init__(self, url: str) -> None:
        import httpx

        self._client = httpx.Client(base_url=url, timeout=300)

    def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        resp = self._client.post(path, content=body, headers=_HEADERS)
        return resp.status_code, resp.content

    def close(self) -> None:
        self._client.close()


Client = StdlibClient | HttpxClient


def _checked(answer: tuple[int, bytes]) -> bytes:
    status, content = answer
    if status != 200 or _OK not in content:
        raise RuntimeError(f"HTTP {status}: {content[:300]!r}")
    return content


def http_load(
    url: str, bodies: list[bytes], concurrency: int, total: int
) -> tuple[list[float], float, list[bytes]]:
    """``total`` requests from ``concurrency`` threads; latencies, elapsed seconds, c=1 answers.

    Each thread has its own keep-alive connection (:class:`StdlibClient`).

    Raises:
        RuntimeError: on a transport error, a non-200 answer or a degraded answer.
    """
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    answers: list[bytes] = []
    errors: list[str] = []
    counter = itertools.count()
    barrier = threading.Barrier(concurrency + 1, timeout=300)

    def worker(w: int) -> None:
        client = StdlibClient(url)
        try:
            _checked(client.post("/v1/prerank", bodies[w % len(bodies)]))
            barrier.wait()
            mine = latencies[w]
            while (k := next(counter)) < total:
                t0 = time.perf_counter()
                answer = client.post("/v1/prerank", bodies[k % len(bodies)])
                mine.append(time.perf_counter() - t0)
                content = _checked(answer)
                if concurrency == 1:
                    answers.append(content)
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
            barrier.abort()
        finally:
            client.close()

    threads = [threading.Thread(target=worker, args=(w,), daemon=True) for w in range(concurrency)]
    for t in threads:
        t.start()
    with contextlib.suppress(threading.BrokenBarrierError):
        barrier.wait()
    began = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - began
    if errors:
        raise RuntimeError(f"{len(errors)} client threads failed, first: {errors[0]}")
    return [x for lat in latencies for x in lat], elapsed, answers


def request_bodies(pool: list[tuple[str, list[str]]]) -> list[bytes]:
    """The pool's (user, candidates) as pre-encoded ``POST /v1/prerank`` bodies."""
    return [json.dumps({"user_id": u, "candidates": c, "top_k": TOP_K}).encode() for u, c in pool]


@contextlib.contextmanager
def opened(*clients: Client) -> Iterator[tuple[Client, ...]]:
    """The clients, closed on the way out."""
    try:
        yield clients
    finally:
        for client in clients:
            client.close()


def alternate(
    pair: tuple[Client, ...], bodies: list[bytes], total: int
) -> tuple[list[float], list[float], list[bytes]]:
    """Each request through both clients back to back, alternating which goes first.

    Returns:
        Single-stream latencies of each client, and the first client's answers.
    """
    lat: tuple[list[float], list[float]] = ([], [])
    answers: list[bytes] = []
    for k in range(total):
        body = bodies[k % len(bodies)]
        order = (0, 1) if k % 2 == 0 else (1, 0)
        for j in order:
            t0 = time.perf_counter()
            answer = pair[j].post("/v1/prerank", body)
            lat[j].append(time.perf_counter() - t0)
            content = _checked(answer)
            if j == 0:
                answers.append(content)
    return lat[0], lat[1], answers


def bench_http_ab(
    args: argparse.Namespace, kind: str, pools: dict[int, list[Any]]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Concurrency 1, precomputed item states vs full graphs: two servers, interleaved."""
    servers = [start_server(args, kind, precompute=p) for p in (True, False)]
    rows: list[dict[str, Any]] = []
    try:
        for n in args.sizes:
            bodies = request_bodies(pools[n])
            with opened(StdlibClient(servers[0][1]), StdlibClient(servers[1][1])) as pair:
                alternate(pair, bodies, 10)  # warm-up
                lat = alternate(pair, bodies, args.iterations)[:2]
            for path, times in zip(("http ab", "http full"), lat, strict=True):
                row = {"store": kind, "candidates": n, "path": path, "concurrency": 1}
                rows.append({**row, **stats_of(times)})
            a, b = rows[-2], rows[-1]
            say(
                f"{kind} N={n} http c=1 interleaved: precomputed p50 {a['p50_ms']:.2f} / p99 "
                f"{a['p99_ms']:.2f} ms, full graphs p50 {b['p50_ms']:.2f} / p99 "
                f"{b['p99_ms']:.2f} ms"
            )
    finally:
        for proc, *_ in servers:
            stop_server(proc)
    return rows, {"startup_seconds": [round(x[2], 2) for x in servers]}


def bench_http(
    args: argparse.Namespace, kind: str, pools: dict[int, list[Any]]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """HTTP rows (every N and concurrency) for store ``kind``, one server for all of them."""
    proc, url, startup, log_path = start_server(args, kind)
    say(f"{kind}: service ready in {startup:.1f}s at {url}")
    rows: list[dict[str, Any]] = []
    try:
        for n in args.sizes:
            bodies = request_bodies(pools[n])
            first = json.loads(http_load(url, bodies[:1], 1, 1)[2][0])
            if len(first["items"]) != TOP_K or first["stats"]["unknown_items"]:
                raise SystemExit(f"{kind} N={n}: unexpected answer {json.dumps(first)[:400]}")
            http_load(url, bodies, 1, 10)  # warm-up
            for c in args.concurrency:
                base = {"store": kind, "candidates": n, "concurrency": c}
                if c == 1:  # single stream: the stdlib client, and httpx interleaved with it
                    with opened(StdlibClient(url), HttpxClient(url)) as pair:
                        lat, lat_httpx, answers = alternate(pair, bodies, args.iterations)
                    row = {**base, "path": "http", "client": "stdlib", **stats_of(lat)}
                    # where the time goes: the scorer's own stages, server side
                    timings = [json.loads(a)["stats"]["timings_ms"] for a in answers]
                    row["server_scoring_p50_ms"] = round(
                        float(np.median([sum(t.values()) for t in timings])), 3
                    )
                    rows.append(row)
                    rows.append(
                        {**base, "path": "http httpx", "client": "httpx", **stats_of(lat_httpx)}
                    )
                    say(
                        f"{kind} N={n} http c=1 (interleaved clients): stdlib p50 "
                        f"{row['p50_ms']:.2f} / p99 {row['p99_ms']:.2f} ms, httpx p50 "
                        f"{rows[-1]['p50_ms']:.2f} / p99 {rows[-1]['p99_ms']:.2f} ms"
                    )
                    continue
                total = max(args.iterations, 10 * c)
                lat, elapsed, _ = http_load(url, bodies, c, total)
                row = {**base, "path": "http", "client": "stdlib", **stats_of(lat, elapsed)}
                rows.append(row)
                say(
                    f"{kind} N={n} http c={c}: p50 {row['p50_ms']:.2f} ms "
                    f"p99 {row['p99_ms']:.2f} ms {row['req_per_s']:.1f} req/s"
                )
    finally:
        stop_server(proc)
    return rows, {"startup_seconds": round(startup, 2), "log": str(log_path)}


# --- report ---------------------------------------------------------------------------------


def find(rows: list[dict[str, Any]], **where: Any) -> dict[str, Any] | None:
    return next((r for r in rows if all(r.get(k) == v for k, v in where.items())), None)


def targets(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's targets at 2,000 candidates with Redis (None where not measured)."""
    at = {"store": "redis", "candidates": TARGET_N}
    http1 = find(rows, **at, path="http", concurrency=1)
    naive = find(rows, **at, path="naive")
    inproc = find(rows, **at, path="in-process")
    floor = find(rows, **at, path="ort-floor")
    out: dict[str, Any] = {"store": "redis", "candidates": TARGET_N}
    if http1:
        out["http_c1_p99_ms"] = http1["p99_ms"]
        out["http_c1_p99_ok"] = http1["p99_ms"] <= TARGET_P99_MS
    if via_httpx := find(rows, **at, path="http httpx", concurrency=1):
        out["http_httpx_c1_p50_ms"] = via_httpx["p50_ms"]
        out["http_httpx_c1_p99_ms"] = via_httpx["p99_ms"]
    if http1 and naive:
        out["naive_over_http_c1_p50"] = round(naive["p50_ms"] / http1["p50_ms"], 2)
        out["speedup_ok"] = out["naive_over_http_c1_p50"] >= TARGET_SPEEDUP
    if inproc and naive:
        out["naive_over_in_process_p50"] = round(naive["p50_ms"] / inproc["p50_ms"], 2)
    if http1 and floor:
        out["http_c1_over_floor_p50"] = round(http1["p50_ms"] / floor["p50_ms"], 2)
        out["floor_ok"] = out["http_c1_over_floor_p50"] <= TARGET_FLOOR_RATIO
    if inproc and floor:
        out["in_process_over_floor_p50"] = round(inproc["p50_ms"] / floor["p50_ms"], 2)
    split = find(rows, **at, path="ort-split")
    if http1 and split:
        out["http_c1_over_split_floor_p50"] = round(http1["p50_ms"] / split["p50_ms"], 2)
    ab, full = find(rows, **at, path="http ab"), find(rows, **at, path="http full")
    if ab and full:
        out["http_full_over_precomputed_p50"] = round(full["p50_ms"] / ab["p50_ms"], 2)
        out["http_full_over_precomputed_p99"] = round(full["p99_ms"] / ab["p99_ms"], 2)
    inproc_full = find(rows, **at, path="in-process full")
    if inproc and inproc_full:
        out["in_process_full_over_precomputed_p50"] = round(
            inproc_full["p50_ms"] / inproc["p50_ms"], 2
        )
    return out


def print_report(rows: list[dict[str, Any]], checks: dict[str, Any]) -> None:
    order = {
        "naive": 0,
        "in-process": 1,
        "in-process full": 2,
        "http": 3,
        "http httpx": 4,
        "http ab": 5,
        "http full": 6,
        "ort-floor": 7,
        "ort-split": 8,
    }
    rows = sorted(
        rows, key=lambda r: (r["store"], r["candidates"], order[r["path"]], r["concurrency"])
    )
    print(
        f"\n{'store':<8}{'N':>6}  {'path':<16}{'conc':>5}{'p50 ms':>10}{'p99 ms':>10}"
        f"{'req/s':>10}{'n':>6}"
    )
    for r in rows:
        print(
            f"{r['store']:<8}{r['candidates']:>6}  {r['path']:<16}{r['concurrency']:>5}"
            f"{r['p50_ms']:>10.2f}{r['p99_ms']:>10.2f}{r['req_per_s']:>10.1f}{r['requests']:>6}"
        )

    def verdict(key: str) -> str:
        return "not measured" if key not in checks else ("PASS" if checks[key] else "FAIL")

    print(f"\ntargets at {TARGET_N:,} candidates, Redis:")
    if "http_c1_p99_ms" in checks:
        print(
            f"  HTTP single-stream p99 {checks['http_c1_p99_ms']:.2f} ms <= {TARGET_P99_MS:g} ms: "
            f"{verdict('http_c1_p99_ok')}"
        )
        if "http_httpx_c1_p99_ms" in checks:
            print(
                f"    (httpx client, interleaved: p50 {checks['http_httpx_c1_p50_ms']:.2f} ms, "
                f"p99 {checks['http_httpx_c1_p99_ms']:.2f} ms)"
            )
    else:
        print("  HTTP single-stream p99: not measured")
    if "naive_over_http_c1_p50" in checks:
        extra = (
            f" (in-process: {checks['naive_over_in_process_p50']:.1f}x)"
            if "naive_over_in_process_p50" in checks
            else ""
        )
        print(
            f"  naive p50 / HTTP c=1 p50 = {checks['naive_over_http_c1_p50']:.1f}x >= "
            f"{TARGET_SPEEDUP:g}x: {verdict('speedup_ok')}{extra}"
        )
    else:
        print("  speed-up over naive: not measured")
    if "http_c1_over_floor_p50" in checks:
        extra = (
            f" (in-process: {checks['in_process_over_floor_p50']:.2f}x)"
            if "in_process_over_floor_p50" in checks
            else ""
        )
        print(
            f"  HTTP c=1 p50 / ORT floor p50 = {checks['http_c1_over_floor_p50']:.2f}x <= "
            f"{TARGET_FLOOR_RATIO:g}x: {verdict('floor_ok')}{extra}"
        )
    else:
        print("  ratio to the ONNX Runtime floor: not measured")
    if "http_c1_over_split_floor_p50" in checks:
        print(
            f"  (HTTP c=1 p50 / score graphs alone p50 = "
            f"{checks['http_c1_over_split_floor_p50']:.2f}x)"
        )
    if "http_full_over_precomputed_p50" in checks:
        print(
            f"  interleaved HTTP c=1, full graphs / precomputed item states: p50 "
            f"{checks['http_full_over_precomputed_p50']:.2f}x, p99 "
            f"{checks['http_full_over_precomputed_p99']:.2f}x"
        )


def _version(*names: str) -> str | None:
    """The installed version of the first distribution found among ``names``."""
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def cpu_counters() -> tuple[float, float] | None:
    """(CPU-seconds the whole machine has been busy, CPU-seconds of this process + children).

    Children count once waited for (the served processes are). None off Linux.
    """
    import resource

    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        ticks = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal: busy is all but idle and iowait.
    busy = (sum(fields[:8]) - fields[3] - fields[4]) / ticks
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return busy, own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def cpu_use(before: tuple[float, float] | None, wall: float) -> dict[str, float] | None:
    """CPU-seconds used since ``before`` by the machine, this benchmark and everything else."""
    after = cpu_counters()
    if before is None or after is None:
        return None
    busy, ours = after[0] - before[0], after[1] - before[1]
    return {
        "wall_seconds": round(wall, 1),
        "machine_busy_cpu_seconds": round(busy, 1),
        "benchmark_cpu_seconds": round(ours, 1),
        "other_processes_cpu_seconds": round(max(busy - ours, 0.0), 1),
    }


def machine(redis_url: str | None) -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "versions": {
            "onnxruntime": _version("onnxruntime", "onnxruntime-gpu"),
            **{p: _version(p) for p in ("feast", "numpy", "fastapi", "uvicorn", "httpx", "redis")},
        },
    }
    if redis_url:
        try:
            import redis

            server: Any = redis.Redis.from_url(redis_url).info("server")
            info["redis_server"] = server["redis_version"]
        except Exception as exc:
            info["redis_server"] = f"unreachable: {exc}"
    return info


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run-dir", type=Path, default=ROOT / "runs" / "bench_serve")
    parser.add_argument("--bundle", type=Path, default=ROOT / "runs" / "demo" / "bundle")
    parser.add_argument("--items", type=int, default=50_000, help="Catalog size.")
    parser.add_argument("--users", type=int, default=2_000)
    parser.add_argument("--sizes", type=_ints, default=[1000, 2000, 5000], help="Candidates.")
    parser.add_argument("--stores", default="redis,sqlite", help="redis,sqlite or one of them.")
    parser.add_argument(
        "--iterations", type=int, default=200, help="Timed requests per in-process/floor/HTTP c=1."
    )
    parser.add_argument(
        "--naive-iterations", type=int, default=None, help="Default: iterations / 10, at least 3."
    )
    parser.add_argument("--concurrency", type=_ints, default=[1, 8, 32])
    parser.add_argument("--pool", type=int, default=50, help="Distinct requests, cycled.")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rebuild", action="store_true", help="Regenerate and re-materialize.")
    parser.add_argument(
        "--no-ab",
        dest="ab",
        action="store_false",
        help="Skip the interleaved HTTP comparison with item-state precomputing off.",
    )
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "serve.json"
    )
    args = parser.parse_args()
    args.stores = [s for s in args.stores.split(",") if s]
    if unknown := set(args.stores) - set(STORES):
        parser.error(f"unknown stores {sorted(unknown)}; use redis and/or sqlite")
    if args.naive_iterations is None:
        args.naive_iterations = max(3, args.iterations // 10)
    if args.iterations < 1 or args.naive_iterations < 1 or args.pool < 1:
        parser.error("--iterations, --naive-iterations and --pool must be at least 1")
    if 1 not in args.concurrency:
        parser.error("--concurrency must include 1 (the single-stream measurement)")
    args.run_dir = args.run_dir.resolve()
    args.bundle = args.bundle.resolve()

    began = time.perf_counter()
    cpu_start = cpu_counters()
    start_machine = machine(args.redis_url if "redis" in args.stores else None)
    manifest = bundle_manifest(args.bundle)
    spec = DataSpec.of(args, manifest)
    if max(args.sizes) > spec.items:
        parser.error(f"--sizes up to {max(args.sizes)} need at least as many --items")
    say(f"load average {start_machine['load_average']}, {start_machine['cpus']} CPUs")
    run_manifest = prepare(args, spec)
    pools = {n: make_pool(spec, n, args.pool, args.seed) for n in args.sizes}

    rows: list[dict[str, Any]] = []
    stores: dict[str, Any] = {}
    for kind in args.stores:
        load_before = [round(x, 2) for x in os.getloadavg()]
        section, cpu_before = time.perf_counter(), cpu_counters()
        got, info = bench_in_process(args, kind, spec, pools)
        rows += got
        got, http_info = bench_http(args, kind, pools)
        rows += got
        ab_info: dict[str, Any] = {}
        if args.ab:
            got, ab_info = bench_http_ab(args, kind, pools)
            rows += got
        stores[kind] = {
            **info,
            "http": http_info,
            "http_ab": ab_info,
            "load_average_before": load_before,
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
            "cpu": cpu_use(cpu_before, time.perf_counter() - section),
        }
        if cpu := stores[kind]["cpu"]:
            say(
                f"{kind}: other processes used {cpu['other_processes_cpu_seconds']:.0f} of "
                f"{cpu['machine_busy_cpu_seconds']:.0f} busy CPU-seconds in "
                f"{cpu['wall_seconds']:.0f}s (a quiet machine: near 0)"
            )

    checks = targets(rows)
    print_report(rows, checks)
    seconds = time.perf_counter() - began
    cpu_total = cpu_use(cpu_start, seconds)
    print(f"\ntotal {seconds:.0f}s")
    if cpu_total:
        print(
            f"CPU-seconds used by other processes meanwhile: "
            f"{cpu_total['other_processes_cpu_seconds']:.0f} "
            f"(this benchmark: {cpu_total['benchmark_cpu_seconds']:.0f})"
        )
    result = {
        "benchmark": "serve",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": shlex.join([".venv/bin/python", *sys.argv]),
        "machine": start_machine,
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "params": {
            **{k: v for k, v in vars(args).items() if k not in ("run_dir", "bundle", "out")},
            "run_dir": str(args.run_dir),
            "bundle": str(args.bundle),
            "top_k": TOP_K,
            "gpl_serve_env": {k: v for k, v in os.environ.items() if k.startswith("GPL_SERVE_")},
        },
        "data": {
            **spec.to_json(),
            "event_timestamp": run_manifest["event_timestamp"],
            "generate_seconds": run_manifest.get("generate_seconds"),
            "materialize_seconds": run_manifest.get("materialize_seconds"),
        },
        "stores": stores,
        "results": rows,
        "targets": checks,
        "seconds": round(seconds, 1),
        "cpu": cpu_total,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
