"""Paired request-level bootstrap of metric differences between the methods of one evaluation.

The seed spread in the report says how much a method moves when it is retrained; it says nothing
about how much the figures depend on *which* requests happened to be evaluated. This module
answers the second question: it resamples the evaluation's requests with replacement and
recomputes, for every resample, each method's metric minus the baseline's, on the same resample
for both (paired: the request-to-request variation that both methods share cancels).

It never re-ranks anything. :func:`training.evaluation.ranking.evaluate_scores` writes every
metric as a ratio of per-request sums (:class:`RequestValues`): a mean over evaluated requests
is ``sum(value * evaluated) / sum(evaluated)``, GAUC is ``sum(auc_r * size_r) / sum(size_r)``.
A resample is a vector of counts ``c_r`` (how often request r was drawn), and the metric on it
is ``sum(c * numerator) / sum(c * denominator)``: one matrix product of the counts with every
(method, metric) column at once, chunks of resamples at a time.

Pooled AUCs are not sums over requests (every positive is compared with every request's
negatives). Their per-request values are the AUC's first-order expansion in the request weights
(its influence function, the clustered DeLong decomposition), so the resampled AUC is exact to
first order, off by ``O(1/n_requests)``; the exact alternative needs a requests x requests pair
matrix per method and seed, too large for tens of thousands of requests.

A method's seeds are averaged per request before resampling, so the interval is that of the
difference of the means in the report's table with the trained models held fixed: it does not
include the seed variance.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

import numpy as np
import numpy.typing as npt

DEFAULT_RESAMPLES: Final = 1000
DEFAULT_CONFIDENCE: Final = 0.95
_CHUNK_CELLS: Final = 1 << 22
"""Resample x request counts materialized at once (32 MiB of float64)."""

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class RequestValues:
    """One evaluation's metrics as ratios of per-request sums, for resampling requests.

    For every metric ``m`` it covers, the value reported is
    ``sum(numerator[m]) / sum(denominator[m])`` over the requests (NaN when the denominator
    sums to 0); a request that does not count for ``m`` (e.g. one without a positive, for
    recall) has 0 in both.

    Attributes:
        request_ids: The evaluation's request ids, sorted and unique: every request of the
            scored table, also those that count for no metric (they are resampled too).
        numerator: Metric name -> ``(n_requests,)`` float64.
        denominator: Metric name -> ``(n_requests,)`` float64, non-negative; the same keys.
    """

    request_ids: npt.NDArray[np.object_]
    numerator: Mapping[str, FloatArray]
    denominator: Mapping[str, FloatArray]

    def __post_init__(self) -> None:
        n = len(self.request_ids)
        if set(self.numerator) != set(self.denominator):
            raise ValueError("numerator and denominator must cover the same metrics")
        for name in self.numerator:
            if self.numerator[name].shape != (n,) or self.denominator[name].shape != (n,):
                raise ValueError(f"{name}: per-request arrays must have shape ({n},)")

    def value(self, metric: str) -> float:
        """The metric on all requests: the ratio of the sums."""
        den = float(self.denominator[metric].sum())
        return float(self.numerator[metric].sum()) / den if den > 0 else math.nan


@dataclass(frozen=True)
class BootstrapSettings:
    """How to resample.

    Attributes:
        resamples: Number of bootstrap resamples of the requests.
        confidence: Coverage of the percentile interval, in (0, 1).
        seed: Seed of the numpy Generator drawing the resamples, non-negative (same seed,
            same data: same intervals).
    """

    resamples: int = DEFAULT_RESAMPLES
    confidence: float = DEFAULT_CONFIDENCE
    seed: int = 0

    def __post_init__(self) -> None:
        if self.resamples < 2:
            raise ValueError(f"resamples must be at least 2, got {self.resamples}")
        if not 0.0 < self.confidence < 1.0:
            raise ValueError(f"confidence must be in (0, 1), got {self.confidence}")
        # numpy refuses a negative seed only when the resamples are drawn: after the training.
        if self.seed < 0:
            raise ValueError(f"seed must be non-negative, got {self.seed}")


@dataclass(frozen=True)
class Interval:
    """A method's metric minus the baseline's, and its bootstrap percentile interval."""

    difference: float
    low: float
    high: float


@dataclass(frozen=True)
class BootstrapResult:
    """Intervals of every (method, metric) against one baseline.

    Attributes:
        baseline: The method every difference is taken against.
        settings: The resampling settings used.
        requests: Requests resampled (every request of the evaluation).
        estimates: Method -> metric -> its value on all requests (mean over seeds), the point
            the differences are taken from; the baseline included.
        intervals: Method -> metric -> difference to the baseline and its interval; the
            baseline itself is not listed.
        seconds: Wall time of the resampling.
    """

    baseline: str
    settings: BootstrapSettings
    requests: int
    estimates: dict[str, dict[str, float]] = field(default_factory=dict)
    intervals: dict[str, dict[str, Interval]] = field(default_factory=dict)
    seconds: float = 0.0


def resample_counts(n_requests: int, settings: BootstrapSettings) -> Iterator[FloatArray]:
    """The resamples as count matrices, in chunks of rows: ``counts[b, r]`` = draws of request r.

    Each resample draws ``n_requests`` requests uniformly with replacement; chunks bound memory
    to about ``_CHUNK_CELLS`` counts. The chunk size depends only on ``n_requests``, so the
    same settings and request count give the same resamples.
    """
    rng = np.random.default_rng(settings.seed)
    chunk = max(1, _CHUNK_CELLS // max(1, n_requests))
    done = 0
    while done < settings.resamples:
        b = min(chunk, settings.resamples - done)
        draws = rng.integers(0, n_requests, size=(b, n_requests))
        flat = (draws + n_requests * np.arange(b)[:, None]).ravel()
        counts = np.bincount(flat, minlength=b * n_requests).reshape(b, n_requests)
        yield counts.astype(np.float64)
        done += b


def paired_bootstrap(
    values: Mapping[str, Sequence[RequestValues]],
    baseline: str,
    settings: BootstrapSettings | None = None,
    metrics: Sequence[str] | None = None,
) -> BootstrapResult:
    """Percentile intervals of each method's metric minus the baseline's, resampling requests.

    A method's seeds are averaged request by request (their denominators must agree, as they
    do when the seeds scored the same candidates: no denominator depends on the scores), so the
    difference is that of the seed means; a (method, metric) whose seeds disagree is left out.

    Args:
        values: Method -> one :class:`RequestValues` per seed, all over the same requests.
        baseline: The method to compare against; one of ``values``.
        settings: Resamples, confidence and seed; default :class:`BootstrapSettings`.
        metrics: Metrics to compare; default every metric of the baseline's first seed.

    Returns:
        The intervals; a metric appears for a method when both it and the baseline have it.

    Raises:
        ValueError: ``baseline`` not in ``values``, a method without seeds, or request ids that
            differ between methods or seeds (the bootstrap pairs requests by position).
    """
    began = time.perf_counter()
    settings = settings or BootstrapSettings()
    if baseline not in values:
        raise ValueError(f"baseline {baseline!r} is not among the methods {list(values)}")
    empty = [name for name, seeds in values.items() if not seeds]
    if empty:
        raise ValueError(f"methods without any per-request values: {empty}")
    ids = values[baseline][0].request_ids
    for name, seeds in values.items():
        for rv in seeds:
            if not np.array_equal(rv.request_ids, ids):
                raise ValueError(
                    f"{name!r} was evaluated on other requests than {baseline!r}: a paired "
                    "bootstrap needs the same requests for every method"
                )
    wanted = list(metrics) if metrics is not None else list(values[baseline][0].numerator)

    # One column per (method, metric); denominators are shared by position when equal, as they
    # are across methods that scored the same candidates (they never depend on the scores).
    columns: list[tuple[str, str]] = []
    numerators: list[FloatArray] = []
    den_of: list[int] = []
    dens: list[FloatArray] = []
    base_column: dict[str, int] = {}
    order = [baseline, *(name for name in values if name != baseline)]
    for metric in wanted:
        for name in order:
            averaged = _seed_average(values[name], metric)
            if averaged is None:
                if name == baseline:
                    break  # nothing to compare against
                continue
            num, den = averaged
            match = next((i for i, d in enumerate(dens) if np.array_equal(d, den)), None)
            if match is None:
                dens.append(den)
                match = len(dens) - 1
            if name == baseline:
                base_column[metric] = len(columns)
            columns.append((name, metric))
            numerators.append(num)
            den_of.append(match)

    n = len(ids)
    estimates: dict[str, dict[str, float]] = {}
    intervals: dict[str, dict[str, Interval]] = {}
    if not columns:
        return BootstrapResult(baseline, settings, n, seconds=time.perf_counter() - began)
    x = np.column_stack(numerators)
    d = np.column_stack(dens)
    den_index = np.asarray(den_of)
    base_index = np.asarray([base_column[metric] for _, metric in columns])
    full = _ratio(x.sum(axis=0), d.sum(axis=0)[den_index])
    diffs = np.empty((settings.resamples, len(columns)))
    done = 0
    for counts in resample_counts(n, settings):
        replicate = _ratio(counts @ x, (counts @ d)[:, den_index])
        diffs[done : done + len(counts)] = replicate - replicate[:, base_index]
        done += len(counts)
    tail = (1.0 - settings.confidence) / 2.0
    with warnings.catch_warnings():
        # A column whose metric is undefined on every resample (NaN) yields a NaN interval.
        warnings.simplefilter("ignore", RuntimeWarning)
        low, high = np.nanquantile(diffs, [tail, 1.0 - tail], axis=0)

    for j, (name, metric) in enumerate(columns):
        estimates.setdefault(name, {})[metric] = float(full[j])
        if name != baseline:
            intervals.setdefault(name, {})[metric] = Interval(
                float(full[j] - full[base_index[j]]), float(low[j]), float(high[j])
            )
    return BootstrapResult(
        baseline, settings, n, estimates, intervals, seconds=time.perf_counter() - began
    )


def _seed_average(
    seeds: Sequence[RequestValues], metric: str
) -> tuple[FloatArray, FloatArray] | None:
    """Mean numerator over seeds and the common denominator.

    None when a seed lacks the metric or the denominators differ (the seeds did not score the
    same candidates).
    """
    if any(metric not in rv.numerator for rv in seeds):
        return None
    den = seeds[0].denominator[metric]
    if any(not np.array_equal(rv.denominator[metric], den) for rv in seeds[1:]):
        return None
    num = np.mean([rv.numerator[metric] for rv in seeds], axis=0)
    return np.asarray(num, np.float64), np.asarray(den, np.float64)


def _ratio(num: FloatArray, den: FloatArray) -> FloatArray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
