"""The funnel simulator: a plain interaction log becomes a request log with exposure bias.

Public datasets record what users engaged with, not what a production funnel showed them. This
module replays the log through a simulated funnel (retrieval -> pre-rank -> rank -> exposure) so
the output looks like a real request log: one row per candidate with the deepest stage it reached,
click labels only on the few exposed candidates, and the HAP candidate groups. A held-out truth
table records, for every candidate, whether the user really engaged with it in the near future,
which is exactly what a pre-ranker trained on exposed rows never sees.

The funnel's models (popularity, item-item co-occurrence) are leak-free: a request at time ``t``
only uses interactions from time buckets strictly before the bucket of ``t``. The protocol is
documented in ``docs/simulator.md``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Self

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tqdm import tqdm

from training.data.contract import GROUPS, STAGES, TIMESTAMP, conform
from training.io import write_manifest, write_table

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]

_STAGE: Final = {name: code for code, name in enumerate(STAGES)}
_GROUP: Final = {name: code for code, name in enumerate(GROUPS)}
_NULL: Final = -1
"""Sentinel for a null position or label in the per-row numpy buffers."""

# Seed-sequence tags keep the independent random streams apart: changing how many requests are
# drawn must not shift the noise of another request, nor a bucket's popularity tie-breaks.
_STREAM_REQUEST: Final = 0
_STREAM_BUCKET: Final = 1
_STREAM_SELECTION: Final = 2


class RetrievalMix(BaseModel):
    """Shares of the retrieval set that each retrieval source fills, summing to 1.

    Attributes:
        popular: Share filled with the most popular items.
        cooccurrence: Share filled with the items co-occurring most with the user's recent items.
        random: Share filled with uniformly random items.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    popular: float = Field(
        default=0.3,
        allow_inf_nan=False,
        ge=0.0,
        le=1.0,
        description="Share of the retrieval set filled by popularity.",
    )
    cooccurrence: float = Field(
        default=0.5,
        allow_inf_nan=False,
        ge=0.0,
        le=1.0,
        description="Share filled by co-occurrence with the user's recent history items.",
    )
    random: float = Field(
        default=0.2,
        allow_inf_nan=False,
        ge=0.0,
        le=1.0,
        description="Share filled by uniformly random catalog items.",
    )

    @model_validator(mode="after")
    def _sums_to_one(self) -> Self:
        total = self.popular + self.cooccurrence + self.random
        if not math.isclose(total, 1.0, abs_tol=1e-6):
            raise ValueError(f"retrieval_mix shares must sum to 1, got {total:.6f}")
        return self

    def counts(self, size: int) -> tuple[int, int, int]:
        """Split ``size`` retrieval slots into (popular, co-occurrence, random) counts.

        Rounds half up and gives the rounding remainder to the random source, so the three
        counts always sum to ``size``.
        """
        n_pop = min(size, math.floor(self.popular * size + 0.5))
        n_cooc = min(size - n_pop, math.floor(self.cooccurrence * size + 0.5))
        return n_pop, n_cooc, size - n_pop - n_cooc


class SimulatorConfig(BaseModel):
    """Every setting of the funnel simulator. Defaults follow ``docs/simulator.md``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int = Field(
        default=0, ge=0, description="Seed of every random choice; same seed, same output."
    )
    min_history: int = Field(
        default=5, ge=1, description="Interactions a user must have before a request point."
    )
    requests_per_user: int = Field(
        default=4,
        ge=1,
        description="Most request points drawn per user (uniformly, without replacement).",
    )
    future_horizon: int = Field(
        default=20,
        ge=1,
        description="How many interactions from the request time on count as the user's real "
        "next engagements (the truth positives).",
    )
    time_buckets: int = Field(
        default=8,
        ge=1,
        description="Time buckets (quantiles of the interaction timestamps); a request in bucket "
        "b sees funnel models built only from buckets < b.",
    )
    cooc_window: int = Field(
        default=3,
        ge=2,
        description="Window of consecutive interactions in a user's sequence within which item "
        "pairs count as co-occurring.",
    )
    retrieval_size: int = Field(default=500, ge=1, description="Candidates retrieved per request.")
    retrieval_mix: RetrievalMix = Field(
        default_factory=lambda: RetrievalMix(),
        description="Shares of the retrieval set from popularity, co-occurrence and random.",
    )
    recent_items: int = Field(
        default=10,
        ge=1,
        description="Last history items whose co-occurrence rows score candidates.",
    )
    exclude_history: bool = Field(
        default=True, description="Never retrieve an item the user already interacted with."
    )
    prerank_size: int = Field(default=200, ge=1, description="Candidates kept by the pre-ranker.")
    prerank_w_pop: float = Field(
        default=1.0,
        allow_inf_nan=False,
        description="Pre-rank weight of the z-scored log(1+popularity).",
    )
    prerank_w_cooc: float = Field(
        default=0.5,
        allow_inf_nan=False,
        description="Pre-rank weight of the z-scored co-occurrence.",
    )
    prerank_noise: float = Field(
        default=0.5,
        allow_inf_nan=False,
        ge=0.0,
        description="Standard deviation of the Gaussian noise in the pre-rank score.",
    )
    rank_size: int = Field(default=50, ge=1, description="Candidates kept by the ranker.")
    rank_w_cooc: float = Field(
        default=1.0, allow_inf_nan=False, description="Rank weight of the z-scored co-occurrence."
    )
    rank_w_pop: float = Field(
        default=0.5,
        allow_inf_nan=False,
        description="Rank weight of the z-scored log(1+popularity).",
    )
    rank_noise: float = Field(
        default=0.3,
        allow_inf_nan=False,
        ge=0.0,
        description="Standard deviation of the Gaussian noise in the rank score.",
    )
    exposed_size: int = Field(
        default=10, ge=1, description="Top ranked candidates exposed to the user."
    )
    global_negatives_per_positive: int = Field(
        default=2,
        ge=0,
        description="Uniform catalog negatives added per exposed positive of a request "
        "(excluding the request's candidates and history).",
    )
    progress: bool = Field(
        default=True,
        description="Show a progress bar (tqdm hides it anyway when not on a terminal).",
    )

    @model_validator(mode="after")
    def _funnel_narrows(self) -> Self:
        sizes = [self.retrieval_size, self.prerank_size, self.rank_size, self.exposed_size]
        if sizes != sorted(sizes, reverse=True):
            raise ValueError(
                "funnel sizes must narrow: retrieval_size >= prerank_size >= rank_size >= "
                f"exposed_size, got {sizes}"
            )
        return self


@dataclass
class FunnelResult:
    """What :func:`simulate_funnel` produces.

    Attributes:
        requests: Table conforming to the ``requests`` contract.
        truth: Table conforming to the ``truth`` contract, with ``request_id``; one row per
            requests row.
        stats: Counts and funnel metrics (see ``docs/simulator.md``), JSON-serialisable.
    """

    requests: pa.Table
    truth: pa.Table
    stats: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Fail at construction: a simulator bug must never produce an off-contract artifact.
        self.requests = conform(self.requests, "requests")
        self.truth = conform(self.truth, "truth")

    def write(
        self,
        directory: Path,
        config: Mapping[str, Any],
        inputs: Mapping[str, Any] | None = None,
    ) -> dict[str, Path]:
        """Write ``requests.parquet``, ``truth.parquet`` and a manifest into ``directory``.

        Args:
            directory: Output directory (created when missing).
            config: Settings to record in the manifest, e.g. ``cfg.model_dump()``.
            inputs: What was read (dataset name, paths), recorded in the manifest.

        Returns:
            The path of each written table, by table name.
        """
        paths = {
            "requests": write_table(self.requests, directory / "requests.parquet"),
            "truth": write_table(self.truth, directory / "truth.parquet"),
        }
        write_manifest(
            directory,
            "funnel",
            inputs=dict(inputs or {}),
            outputs={k: v.name for k, v in paths.items()},
            config=config,
            metrics=self.stats,
        )
        return paths


@dataclass
class _Log:
    """The catalog-filtered interaction log sorted by (user, time), as integer codes."""

    user: IntArray  # user code per row, codes ordered like the sorted user ids
    item: IntArray  # catalog index per row
    ts: IntArray  # microseconds since the epoch, UTC
    pos: IntArray  # position of the row in its user's sequence
    user_ids: pa.Array  # user id string per user code
    dropped: int  # interactions whose item is not in the catalog


def _encode_log(items: pa.Table, interactions: pa.Table) -> _Log:
    catalog = items.column("item_id").combine_chunks()
    item_idx = pc.index_in(interactions.column("item_id").combine_chunks(), value_set=catalog)
    known = pc.is_valid(item_idx)
    dropped = len(item_idx) - (pc.sum(known).as_py() or 0)
    kept = interactions.filter(known)
    item = item_idx.filter(known).to_numpy(zero_copy_only=False).astype(np.int64)
    ts = kept.column("event_timestamp").combine_chunks().cast(pa.int64()).to_numpy()

    # Codes follow the lexicographic order of user ids, so results do not depend on row order.
    encoded = pc.dictionary_encode(kept.column("user_id").combine_chunks())
    order = pc.sort_indices(encoded.dictionary).to_numpy()
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    user = rank[encoded.indices.to_numpy(zero_copy_only=False)]
    user_ids = encoded.dictionary.take(pa.array(order))

    # lexsort is stable: interactions with equal timestamps keep their input order.
    sort = np.lexsort((ts, user))
    user, item, ts = user[sort], item[sort], ts[sort]
    starts = np.flatnonzero(np.r_[True, user[1:] != user[:-1]]) if len(user) else np.zeros(0, int)
    lengths = np.diff(np.r_[starts, len(user)])
    pos = np.arange(len(user)) - np.repeat(starts, lengths)
    return _Log(user, item, ts, pos, user_ids, dropped)


def _draw_requests(log: _Log, cfg: SimulatorConfig) -> IntArray:
    """Rows of ``log`` that are request points, sorted by (time, user, position).

    A request point is a position p >= min_history that starts a run of equal timestamps, so the
    history (timestamps < t) is exactly the first p interactions and holds >= min_history items.
    Two positions sharing a timestamp would make identical requests, hence the first-of-tie rule.
    """
    n = len(log.user)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    new_time = np.r_[True, (log.user[1:] != log.user[:-1]) | (log.ts[1:] != log.ts[:-1])]
    eligible = np.flatnonzero(new_time & (log.pos >= cfg.min_history))
    rng = np.random.default_rng([cfg.seed, _STREAM_SELECTION])
    shuffled = eligible[np.lexsort((rng.random(len(eligible)), log.user[eligible]))]
    users = log.user[shuffled]
    index = np.arange(len(shuffled))
    group_start = np.maximum.accumulate(np.where(np.r_[True, users[1:] != users[:-1]], index, 0))
    chosen = shuffled[(index - group_start) < cfg.requests_per_user]
    return chosen[np.lexsort((log.pos[chosen], log.user[chosen], log.ts[chosen]))]


def _time_buckets(ts: IntArray, n_buckets: int) -> IntArray:
    """Bucket of each timestamp: how many quantile edges are <= it (0 .. n_buckets-1)."""
    if len(ts) == 0 or n_buckets == 1:
        return np.zeros(len(ts), dtype=np.int64)
    edges = np.quantile(ts, np.arange(1, n_buckets) / n_buckets, method="lower")
    return np.searchsorted(edges, ts, side="right").astype(np.int64)


class _FunnelModels:
    """Leak-free popularity and co-occurrence, advanced one time bucket at a time."""

    def __init__(self, log: _Log, buckets: IntArray, n_items: int, cfg: SimulatorConfig) -> None:
        self.n_items = n_items
        self.seed = cfg.seed
        self.bucket = 0
        flat = np.bincount(buckets * n_items + log.item, minlength=cfg.time_buckets * n_items)
        self._pop_increments = flat.reshape(cfg.time_buckets, n_items)
        self.popularity = np.zeros(n_items, dtype=np.float64)
        self.log_popularity = np.zeros(n_items, dtype=np.float64)
        self.popular_order = np.zeros(0, dtype=np.int64)

        # A pair becomes known when its later interaction happens, so it joins that bucket.
        left, right, pair_bucket = [], [], []
        for d in range(1, cfg.cooc_window):
            same_user = log.user[:-d] == log.user[d:]
            distinct = log.item[:-d] != log.item[d:]  # re-consuming an item is no co-occurrence
            keep = same_user & distinct
            left.append(log.item[:-d][keep])
            right.append(log.item[d:][keep])
            pair_bucket.append(buckets[d:][keep])
        lefts, rights = np.concatenate(left), np.concatenate(right)
        pair_buckets = np.concatenate(pair_bucket)
        order = np.argsort(pair_buckets, kind="stable")
        self._pairs = (lefts[order], rights[order])
        self._pair_bounds = np.searchsorted(
            pair_buckets[order], np.arange(cfg.time_buckets + 1), side="left"
        )
        self.cooc: sp.csr_matrix = sp.csr_matrix((n_items, n_items), dtype=np.float64)

    def advance_to(self, bucket: int) -> None:
        """Fold the interactions of buckets [current, bucket) into the models."""
        if bucket <= self.bucket:
            return
        self.popularity += self._pop_increments[self.bucket : bucket].sum(axis=0)
        lo, hi = self._pair_bounds[self.bucket], self._pair_bounds[bucket]
        if hi > lo:
            a, b = self._pairs[0][lo:hi], self._pairs[1][lo:hi]
            ones = np.ones(2 * (hi - lo), dtype=np.float64)
            inc = sp.csr_matrix(
                (ones, (np.r_[a, b], np.r_[b, a])), shape=(self.n_items, self.n_items)
            )
            self.cooc = (self.cooc + inc).tocsr()
        self.bucket = bucket
        self.log_popularity = np.log1p(self.popularity)
        # Most popular first; equal counts in a seeded random order rather than catalog order.
        seen = np.flatnonzero(self.popularity > 0)
        rng = np.random.default_rng([self.seed, _STREAM_BUCKET, bucket])
        self.popular_order = seen[np.lexsort((rng.random(len(seen)), -self.popularity[seen]))]

    def cooc_scores(self, recent: IntArray) -> FloatArray:
        """Summed co-occurrence counts of every item with the ``recent`` items (dense vector)."""
        rows = self.cooc[recent]
        scores = np.bincount(rows.indices, weights=rows.data, minlength=self.n_items)
        return scores.astype(np.float64, copy=False)


def _zscore(x: FloatArray) -> FloatArray:
    std = float(x.std())
    if std < 1e-12:
        # A constant feature carries no ranking signal (e.g. no popularity yet in bucket 0).
        return np.zeros_like(x)
    return (x - x.mean()) / std


def _top(keys: FloatArray, k: int) -> IntArray:
    """Indices of the ``k`` largest keys, in no particular order."""
    if k >= len(keys):
        return np.arange(len(keys))
    return np.argpartition(-keys, k - 1)[:k].astype(np.int64)


@dataclass
class _Rows:
    """Per-row output buffers of one request (numpy, ``_NULL`` for nulls)."""

    item: IntArray
    prerank_position: npt.NDArray[np.int32]
    rank_position: npt.NDArray[np.int32]
    stage: npt.NDArray[np.int8]
    group: npt.NDArray[np.int8]
    label: npt.NDArray[np.int8]
    label_ts: IntArray  # microseconds; meaningful only where label == 1
    truth: npt.NDArray[np.int8]


def _simulate_request(
    models: _FunnelModels,
    history: IntArray,
    future: IntArray,
    future_ts: IntArray,
    released: npt.NDArray[np.bool_],
    rng: np.random.Generator,
    cfg: SimulatorConfig,
    counters: dict[str, int],
) -> _Rows | None:
    """Run one request through retrieval, pre-rank, rank and exposure; None if no candidates.

    ``history`` and ``future`` are catalog indices in time order, ``future_ts`` the times of the
    ``future`` engagements (a click label becomes known at the item's first one); ``released``
    marks the items already in the catalog at the request (its ``event_timestamp`` at or before
    the request's time): no other item is retrieved or drawn as a global negative. ``counters``
    accumulates the clamps and the funnel-recall numerators and denominator.
    """
    n_items = models.n_items
    available = released.copy()
    if cfg.exclude_history:
        available[history] = False
    future_mask = np.zeros(n_items, dtype=bool)
    future_mask[future] = True
    n_allowed = int(available.sum())
    size = min(cfg.retrieval_size, n_allowed)
    if size < cfg.retrieval_size:
        counters["requests_retrieval_clamped"] += 1
    if size == 0:
        counters["requests_skipped_no_candidates"] += 1
        return None
    counters["future_reachable"] += int(np.count_nonzero(future_mask & available))
    n_pop, n_cooc, _ = cfg.retrieval_mix.counts(size)

    # Retrieval. Popular: walk the bucket's popularity order past the history items.
    head = models.popular_order[: n_pop + len(history)]
    popular = head[available[head]][:n_pop]
    available[popular] = False
    cooc = models.cooc_scores(history[-cfg.recent_items :])
    scored = np.flatnonzero((cooc > 0) & available)
    # Co-occurrence sums are integer counts: a jitter below 1 only breaks ties, at random.
    jittered = cooc[scored] + 0.5 * rng.random(len(scored))
    co_items = scored[_top(jittered, n_cooc)]
    available[co_items] = False
    n_fill = size - len(popular) - len(co_items)  # the random share plus any shortfall
    pool = np.flatnonzero(available)
    fill = rng.choice(pool, n_fill, replace=False) if n_fill else pool[:0]
    available[fill] = False
    candidates = np.concatenate([popular, co_items, fill])

    # Pre-rank: popularity-biased, noisy. Rows are emitted in pre-rank order.
    pre_score = (
        cfg.prerank_w_pop * _zscore(models.log_popularity[candidates])
        + cfg.prerank_w_cooc * _zscore(cooc[candidates])
        + cfg.prerank_noise * rng.standard_normal(size)
    )
    candidates = candidates[np.argsort(-pre_score, kind="stable")]
    n_pre = min(cfg.prerank_size, size)
    n_rank = min(cfg.rank_size, n_pre)
    n_exp = min(cfg.exposed_size, n_rank)

    # Rank: co-occurrence first, on the pre-ranked candidates only.
    pre = candidates[:n_pre]
    rank_score = (
        cfg.rank_w_cooc * _zscore(cooc[pre])
        + cfg.rank_w_pop * _zscore(models.log_popularity[pre])
        + cfg.rank_noise * rng.standard_normal(n_pre)
    )
    rank_position = np.full(size, _NULL, dtype=np.int32)
    rank_position[np.argsort(-rank_score, kind="stable")] = np.arange(1, n_pre + 1)

    stage = np.full(size, _STAGE["retrieved"], dtype=np.int8)
    stage[:n_pre] = _STAGE["preranked"]
    stage[(rank_position >= 1) & (rank_position <= n_rank)] = _STAGE["ranked"]
    exposed = (rank_position >= 1) & (rank_position <= n_exp)
    stage[exposed] = _STAGE["exposed"]
    truth = future_mask[candidates].astype(np.int8)
    label = np.where(exposed, truth, _NULL).astype(np.int8)
    # A click is the item's first engagement in the future window, often days after the
    # impression: the statistics must not see it before then.
    first_item, first_at = np.unique(future, return_index=True)
    clicked = label == 1
    label_ts = np.zeros(size, dtype=np.int64)
    label_ts[clicked] = future_ts[first_at[np.searchsorted(first_item, candidates[clicked])]]
    group = np.full(size, _GROUP["prerank_negative"], dtype=np.int8)
    group[:n_pre] = _GROUP["rank_negative"]
    group[exposed] = np.where(
        truth[exposed] == 1, _GROUP["exposed_positive"], _GROUP["exposed_negative"]
    )

    counters["future_retrieved"] += int(truth.sum())
    counters["future_preranked"] += int(truth[:n_pre].sum())
    counters["future_ranked"] += int(truth[(rank_position >= 1) & (rank_position <= n_rank)].sum())
    n_positive = int(truth[exposed].sum())
    counters["future_exposed"] += n_positive

    # Global negatives: uniform over the catalog minus this request's candidates and history.
    available[history] = False
    wanted = cfg.global_negatives_per_positive * n_positive
    pool = np.flatnonzero(available)
    n_global = min(wanted, len(pool))
    counters["global_negatives_shortfall"] += wanted - n_global
    negatives = rng.choice(pool, n_global, replace=False) if n_global else pool[:0]

    def pad(values: npt.NDArray[Any], fill_value: int, dtype: type[np.generic]) -> npt.NDArray[Any]:
        return np.concatenate([values, np.full(n_global, fill_value, dtype=dtype)]).astype(dtype)

    return _Rows(
        item=np.concatenate([candidates, negatives]).astype(np.int64),
        prerank_position=pad(np.arange(1, size + 1, dtype=np.int32), _NULL, np.int32),
        rank_position=pad(rank_position, _NULL, np.int32),
        stage=pad(stage, _STAGE["retrieved"], np.int8),
        group=pad(group, _GROUP["global_negative"], np.int8),
        label=pad(label, _NULL, np.int8),
        label_ts=pad(label_ts, 0, np.int64),
        truth=np.concatenate([truth, future_mask[negatives].astype(np.int8)]),
    )


def simulate_funnel(items: pa.Table, interactions: pa.Table, cfg: SimulatorConfig) -> FunnelResult:
    """Replay an interaction log through a simulated recommendation funnel.

    Args:
        items: The catalog (``items`` contract); only these items are retrieved or counted.
        interactions: The engagement log (``interactions`` contract); ``weight`` is ignored,
            every interaction counts as one engagement.
        cfg: Simulator settings.

    Returns:
        The ``requests`` log, the ``truth`` table (one row per requests row) and the stats.
    """
    items = conform(items, "items")
    interactions = conform(interactions, "interactions")
    n_items = items.num_rows
    log = _encode_log(items, interactions)
    buckets = _time_buckets(log.ts, cfg.time_buckets)
    models = _FunnelModels(log, buckets, n_items, cfg)
    request_rows = _draw_requests(log, cfg)

    counters = dict.fromkeys(
        (
            "requests_retrieval_clamped",
            "requests_skipped_no_candidates",
            "global_negatives_shortfall",
            "future_reachable",
            "future_retrieved",
            "future_preranked",
            "future_ranked",
            "future_exposed",
            "unreleased_items_excluded",
        ),
        0,
    )
    # An item enters the catalog at its event_timestamp (MovieLens: its first rating): a funnel
    # before that cannot retrieve it, nor its features exist (a point-in-time join finds none).
    item_ts = items.column("event_timestamp").combine_chunks().cast(pa.int64()).to_numpy()
    kept: list[int] = []
    rows: list[_Rows] = []
    requests_per_bucket = np.zeros(cfg.time_buckets, dtype=np.int64)
    disable = None if cfg.progress else True
    # Each request's user sequence ends where the next user's begins (the log is user-sorted).
    user_ends = np.searchsorted(log.user, log.user[request_rows], side="right")
    progress = tqdm(request_rows, desc="simulating funnel", unit="req", disable=disable)
    for row, user_end in zip(progress, user_ends, strict=True):
        bucket = int(buckets[row])
        models.advance_to(bucket)
        p = int(log.pos[row])
        history = log.item[row - p : row]
        future_end = min(row + cfg.future_horizon, int(user_end))
        future, future_ts = log.item[row:future_end], log.ts[row:future_end]
        rng = np.random.default_rng([cfg.seed, _STREAM_REQUEST, int(log.user[row]), p])
        released = item_ts <= log.ts[row]
        counters["unreleased_items_excluded"] += n_items - int(np.count_nonzero(released))
        result = _simulate_request(models, history, future, future_ts, released, rng, cfg, counters)
        if result is None:
            continue
        kept.append(int(row))
        rows.append(result)
        requests_per_bucket[bucket] += 1

    kept_rows = np.asarray(kept, dtype=np.int64)
    requests, truth = _build_tables(log, kept_rows, rows, items)
    stats = _stats(
        log, rows, log.user[kept_rows], counters, requests_per_bucket, n_items, requests.num_rows
    )
    stats["interactions_dropped_not_in_catalog"] = log.dropped
    stats["interactions_used"] = len(log.item)
    return FunnelResult(requests=requests, truth=truth, stats=stats)


def _build_tables(
    log: _Log, request_rows: IntArray, rows: list[_Rows], items: pa.Table
) -> tuple[pa.Table, pa.Table]:
    lengths = np.array([len(r.item) for r in rows], dtype=np.int64)
    per_row = pa.array(np.repeat(np.arange(len(rows), dtype=np.int64), lengths))
    user_codes = log.user[request_rows]
    request_ids = pc.binary_join_element_wise(
        log.user_ids.take(pa.array(user_codes)),
        pa.array(log.pos[request_rows]).cast(pa.string()),
        ":",
    )

    def cat(name: str) -> npt.NDArray[Any]:
        if not rows:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([getattr(r, name) for r in rows])

    def nullable(values: npt.NDArray[Any], typ: pa.DataType) -> pa.Array:
        return pa.array(values, type=typ, mask=values == _NULL)

    request_id = request_ids.take(per_row)
    user_id = log.user_ids.take(pa.array(user_codes)).take(per_row)
    item_id = items.column("item_id").combine_chunks().take(pa.array(cat("item")))
    timestamp = pa.array(log.ts[request_rows], type=pa.int64()).cast(TIMESTAMP).take(per_row)
    stage = pa.array(STAGES, type=pa.string()).take(pa.array(cat("stage")))
    group = pa.array(GROUPS, type=pa.string()).take(pa.array(cat("group")))
    label = cat("label")
    label_timestamp = pa.array(cat("label_ts"), type=pa.int64(), mask=label != 1).cast(TIMESTAMP)
    requests = pa.table(
        {
            "request_id": request_id,
            "user_id": user_id,
            "item_id": item_id,
            "event_timestamp": timestamp,
            "stage": stage,
            "prerank_position": nullable(cat("prerank_position"), pa.int32()),
            "rank_position": nullable(cat("rank_position"), pa.int32()),
            "label": nullable(label, pa.int8()),
            "group": group,
            "label_timestamp": label_timestamp,
        }
    )
    truth = pa.table(
        {
            "user_id": user_id,
            "item_id": item_id,
            "label": pa.array(cat("truth"), type=pa.int8()),
            "request_id": request_id,
        }
    )
    return requests, truth


def _safe_div(num: float, den: float) -> float | None:
    return num / den if den else None


def _stats(
    log: _Log,
    rows: list[_Rows],
    request_users: IntArray,
    counters: dict[str, int],
    requests_per_bucket: IntArray,
    n_items: int,
    n_rows: int,
) -> dict[str, Any]:
    def cat(name: str) -> npt.NDArray[Any]:
        return np.concatenate([getattr(r, name) for r in rows]) if rows else np.zeros(0, np.int64)

    item, stage, group, truth = cat("item"), cat("stage"), cat("group"), cat("truth")
    # Whole-log popularity: a measuring stick for the bias, never an input of the funnel.
    log_pop = np.log1p(np.bincount(log.item, minlength=n_items).astype(np.float64))
    exposed = stage == _STAGE["exposed"]
    funnel = group != _GROUP["global_negative"]
    positive = truth == 1

    def mean_log_pop(mask: npt.NDArray[np.bool_]) -> float | None:
        return float(log_pop[item[mask]].mean()) if mask.any() else None

    reachable = counters["future_reachable"]
    return {
        "requests": len(rows),
        "users": len(np.unique(log.user)),
        "users_with_requests": len(np.unique(request_users)),
        "rows": n_rows,
        "rows_per_group": {g: int(np.sum(group == c)) for g, c in _GROUP.items()},
        "rows_per_stage": {s: int(np.sum(stage == c)) for s, c in _STAGE.items()},
        "requests_per_bucket": [int(x) for x in requests_per_bucket],
        "ctr_exposed": _safe_div(float(truth[exposed].sum()), float(exposed.sum())),
        "recall": {
            stage_name: _safe_div(counters[f"future_{stage_name}"], reachable)
            for stage_name in ("retrieved", "preranked", "ranked", "exposed")
        },
        "future_engagements_reachable": reachable,
        "exposure_bias": {
            "mean_log_popularity_exposed": mean_log_pop(exposed),
            "mean_log_popularity_retrieved": mean_log_pop(funnel),
            "mean_log_popularity_exposed_positives": mean_log_pop(exposed & positive),
            "mean_log_popularity_unexposed_positives": mean_log_pop(~exposed & positive),
            "truth_positives": int(positive.sum()),
            "unexposed_positive_share": _safe_div(
                float((positive & ~exposed).sum()), float(positive.sum())
            ),
        },
        "requests_retrieval_clamped": counters["requests_retrieval_clamped"],
        "requests_skipped_no_candidates": counters["requests_skipped_no_candidates"],
        "global_negatives_shortfall": counters["global_negatives_shortfall"],
        # Summed over requests: catalog items not yet released at each request's time.
        "unreleased_items_excluded": counters["unreleased_items_excluded"],
    }
