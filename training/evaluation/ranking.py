"""Offline evaluation of pre-ranker scores against a truth table, vectorized end to end.

A *scored* table holds one row per candidate of a request with the model's score; a *truth*
table (the data contract's ``truth``) says which candidates were truly relevant, exposed or not.
:func:`evaluate_scores` joins the two and computes, in one pass over sorted numpy arrays:

* ``auc`` (all rows pooled) and ``gauc`` (per-request AUC weighted by request size, over
  requests with both classes);
* per-request ranking metrics at each cut-off K, averaged over requests with at least one
  positive: ``hr@K`` (1 if any positive is in the top K), ``recall@K`` (positives in the top K /
  positives), ``ndcg@K`` (binary gains, ``1 / log2(rank + 1)`` discount, ideal DCG over
  ``min(K, positives)`` positives);
* ``longtail_recall@K``: recall@K counting only positives that are long-tail items (outside the
  top ``head_share`` of items by popularity), averaged over requests with at least one long-tail
  positive;
* the same ranking metrics prefixed ``unexposed_`` after dropping ``stage == 'exposed'`` rows, so
  unexposed candidates are ranked among themselves;
* diversity of every request's top-K list: ``ild@K`` (mean pairwise ``1 - cosine`` of the items'
  content embeddings, averaged over lists with at least two items);
* ``category_recall@K``: the share of the distinct known categories of a request's positives
  that its top K shows, averaged over requests with a positive of known category
  (``category_requests_evaluated``): whether the list reaches each of the user's true
  interests, not only the dominant one;
* counts: ``requests_evaluated``, ``rows``, ``positives``, ``longtail_requests_evaluated``,
  ``longtail_positives`` and ``truth_coverage``.

Rows are ordered by (request, score descending, item_id ascending), so ties in score are broken
deterministically by item id. Nothing loops over rows in Python; a million rows take seconds.

The result is an :class:`Evaluation`, a plain metrics dict that also carries every metric's
per-request parts (:class:`~training.evaluation.bootstrap.RequestValues`) for the report's
paired request bootstrap. The evaluated candidates are whatever the scored table holds: pass the
recalled candidates only (:func:`without_global_negatives`), as the pre-ranker sees them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from training.arrow import string_array
from training.data.contract import STAGES, validate
from training.evaluation.bootstrap import RequestValues

#: Share of items, by training popularity, that form the head; the rest is the long tail.
LONG_TAIL_HEAD_SHARE: Final = 0.2
SCORED_COLUMNS: Final[tuple[str, ...]] = ("request_id", "user_id", "item_id", "stage", "score")
"""Columns a scored table must have."""

UNEXPOSED_PREFIX: Final = "unexposed_"
#: HAP's random negatives from the whole catalog (docs/data_contract.md): training negatives,
#: never among the candidates the pre-ranker scores at serving.
GLOBAL_NEGATIVE: Final = "global_negative"
#: The metrics that compare scores across requests (all others are per request): a score only
#: meaningful within its request (a cascade's order offset) must not be judged by them.
POOLED_METRICS: Final = ("auc", UNEXPOSED_PREFIX + "auc")

_CHUNK_ROWS: Final = 1 << 16
"""Top-K rows gathered at once for the intra-list distance (bounds memory to chunk x dim)."""

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]
Parts = dict[str, tuple[FloatArray, FloatArray]]
"""Metric -> (numerator, denominator) per request list: the metric is sum(num) / sum(den)."""


class EvaluationError(ValueError):
    """The scored or truth table cannot be evaluated; the message says why and what to fix."""


class Evaluation(dict[str, float]):
    """Metric name -> value, as :func:`evaluate_scores` returns it, plus per-request values.

    To every caller it is the plain metrics dict. ``request_values`` holds each metric's
    per-request parts for :func:`training.evaluation.bootstrap.paired_bootstrap`, which the
    report runs. A value assigned after evaluation no longer matches its parts; the report
    notices and shows no interval for it. To take metrics from another scoring of the same
    requests (a cascade's pooled AUCs from its served probabilities), use
    :meth:`with_metrics_from`, which moves their parts along. Copies (``dict(m)``, ``{**m}``)
    are plain dicts without them.

    Attributes:
        request_values: The per-request parts, or None.
    """

    def __init__(
        self,
        metrics: Mapping[str, float] | None = None,
        request_values: RequestValues | None = None,
    ) -> None:
        super().__init__(metrics or {})
        self.request_values = request_values

    def with_metrics_from(self, other: Evaluation, names: Sequence[str]) -> Evaluation:
        """A copy whose ``names`` hold ``other``'s values and per-request parts.

        The parts are what the report's bootstrap resamples: copying a value without them
        would leave the copy without an interval (its parts would describe the replaced
        value). A name whose parts ``other`` lacks loses its parts here too, so it gets no
        interval rather than one for another value.

        Args:
            other: An evaluation of the same requests, e.g. of other scores of the same
                candidates.
            names: The metrics to take from ``other``; each must be one of its metrics.

        Returns:
            A new :class:`Evaluation`; ``self`` is left as it is. Without per-request values
            of its own it has none either.

        Raises:
            ValueError: A name is not among ``other``'s metrics, or both carry per-request
                values of different requests (the parts pair requests by position).
        """
        missing = [name for name in names if name not in other]
        if missing:
            raise ValueError(f"metrics {missing} are not in the other evaluation")
        merged = Evaluation({**self, **{name: other[name] for name in names}})
        mine, theirs = self.request_values, other.request_values
        if mine is None:
            return merged
        if theirs is not None and not np.array_equal(mine.request_ids, theirs.request_ids):
            raise ValueError(
                "the evaluations cover different requests: per-request parts cannot be combined"
            )
        numerator, denominator = dict(mine.numerator), dict(mine.denominator)
        for name in names:
            if theirs is not None and name in theirs.numerator:
                numerator[name] = theirs.numerator[name]
                denominator[name] = theirs.denominator[name]
            else:
                numerator.pop(name, None)
                denominator.pop(name, None)
        merged.request_values = RequestValues(mine.request_ids, numerator, denominator)
        return merged


@dataclass
class ItemInfo:
    """Per-item side information for the diversity and long-tail metrics.

    Attributes:
        item_ids: Item ids (strings), unique; every scored item must be among them.
        embeddings: ``(n, d)`` content embeddings, one row per item, L2-normalized (rows are
            normalized again defensively; an all-zero row counts as orthogonal to everything).
        categories: Main category per item; ``''`` (or None) means unknown and is ignored.
        popularity: Popularity per item, e.g. candidate counts in the *training* log.
    """

    item_ids: npt.NDArray[np.object_]
    embeddings: npt.NDArray[np.float32]
    categories: npt.NDArray[np.object_]
    popularity: npt.NDArray[np.float64]

    def __post_init__(self) -> None:
        self.item_ids = np.asarray(self.item_ids, dtype=object)
        self.embeddings = np.asarray(self.embeddings, dtype=np.float32)
        cats = pa.array(np.asarray(self.categories, dtype=object), pa.string()).fill_null("")
        self.categories = np.asarray(cats.to_pylist(), dtype=object)
        self.popularity = np.asarray(self.popularity, dtype=np.float64)
        n = len(self.item_ids)
        problems = []
        if self.item_ids.ndim != 1:
            problems.append(f"item_ids must be 1-D, got shape {self.item_ids.shape}")
        if self.embeddings.ndim != 2 or self.embeddings.shape[0] != n:
            problems.append(f"embeddings must have shape ({n}, d), got {self.embeddings.shape}")
        if self.categories.shape != (n,):
            problems.append(f"categories must have shape ({n},), got {self.categories.shape}")
        if self.popularity.shape != (n,):
            problems.append(f"popularity must have shape ({n},), got {self.popularity.shape}")
        elif not np.isfinite(self.popularity).all():
            problems.append("popularity has NaN or infinite values")
        if not problems and len(np.unique(self.item_ids.astype(str))) != n:
            problems.append("item_ids are not unique")
        if problems:
            raise EvaluationError("ItemInfo: " + "; ".join(problems))

    def long_tail(self, head_share: float = LONG_TAIL_HEAD_SHARE) -> BoolArray:
        """:func:`long_tail_mask` of this catalog's popularity."""
        return long_tail_mask(self.popularity, head_share)


def long_tail_mask(
    popularity: npt.ArrayLike, head_share: float = LONG_TAIL_HEAD_SHARE
) -> BoolArray:
    """True for items outside the head: the ``floor(head_share * n)`` most popular items.

    Ties are resolved deterministically by position: among equally popular items, the one that
    comes first in ``popularity`` joins the head first.

    Args:
        popularity: One value per item (any non-negative or signed score; larger = more popular).
        head_share: Share of items in the head, in ``[0, 1]``.

    Returns:
        A boolean array of the same length: True for long-tail items.
    """
    pop = np.asarray(popularity, dtype=np.float64)
    if pop.ndim != 1:
        raise EvaluationError(f"popularity must be 1-D, got shape {pop.shape}")
    if not 0.0 <= head_share <= 1.0:
        raise EvaluationError(f"head_share must be in [0, 1], got {head_share}")
    n_head = math.floor(head_share * len(pop) + 1e-9)
    order = np.argsort(-pop, kind="stable")
    tail = np.ones(len(pop), dtype=bool)
    tail[order[:n_head]] = False
    return tail


def without_global_negatives(requests: pa.Table) -> tuple[pa.Table, int]:
    """The candidates a pre-ranker scores at serving: the rows that are not global negatives.

    ``global_negative`` rows are random catalog items HAP adds as easy training negatives
    (docs/data_contract.md); no retrieval stage recalled them, so the serving pre-ranker never
    sees them. Mostly unrelated, unpopular items, they are easy to rank last, and left in an
    evaluation they lift AUC (they are almost all negatives, below almost every positive) and
    move the unexposed metrics, which they enter as ``retrieved`` rows.

    Args:
        requests: A request log (or any table of candidates) with the contract's ``group``
            column; a table without one is returned whole.

    Returns:
        The rows kept, in their order, and how many global negatives were dropped.
    """
    if "group" not in requests.column_names:
        return requests, 0
    drop = pc.fill_null(pc.equal(requests.column("group"), GLOBAL_NEGATIVE), False)
    n_drop = int(pc.sum(drop).as_py() or 0)
    return (requests.filter(pc.invert(drop)), n_drop) if n_drop else (requests, 0)


def evaluate_scores(
    scored: pa.Table,
    truth: pa.Table,
    items: ItemInfo,
    ks: Sequence[int] = (10, 50),
    head_share: float = LONG_TAIL_HEAD_SHARE,
) -> Evaluation:
    """Join scores to truth and compute ranking, unexposed, diversity and long-tail metrics.

    Truth is joined on (request_id, item_id) when it has a ``request_id`` column, else on
    (user_id, item_id); a truth key listed more than once counts as positive if any of its rows
    is. Scored rows without a truth row count as label 0 (``truth_coverage`` says how many had
    one).

    Args:
        scored: Columns ``request_id``, ``user_id``, ``item_id``, ``stage`` (contract stages),
            ``score`` (numeric); unique per (request_id, item_id). Extra columns are ignored.
        truth: The contract's truth table: ``user_id``, ``item_id``, ``label`` (0/1), optional
            ``request_id``.
        items: Item embeddings, categories and popularity; must cover every scored item.
        ks: Cut-offs K for the top-K metrics (positive integers).
        head_share: Share of most popular items that are *not* long-tail.

    Returns:
        Metric name -> value (see the module docstring); NaN where a metric is undefined, e.g.
        ``unexposed_*`` when no unexposed row is positive. Its ``request_values`` hold the
        per-request parts of every quality metric (counts and ``truth_coverage`` excluded).

    Raises:
        EvaluationError: missing columns, null ids, NaN or null scores, unknown stages, duplicate
            (request_id, item_id) rows, scored items missing from ``items``, an invalid truth
            table, or no scored row matching any truth row.
    """
    ks = _check_ks(ks)
    _check_scored(scored)
    label, matched = _join_truth(scored, truth)

    req_code, req_dict = _sorted_codes(_string_column(scored, "request_id"))
    item_code, item_dict = _sorted_codes(_string_column(scored, "item_id"))
    _check_duplicates(req_code, item_code, scored)
    item_index = _item_index(item_dict, items)[item_code]
    score = pc.cast(scored.column("score"), pa.float64()).to_numpy()
    exposed = pc.equal(_string_column(scored, "stage"), "exposed").to_numpy(zero_copy_only=False)

    order = np.lexsort((item_code, -score, req_code))
    req_s, score_s, label_s = req_code[order], score[order], label[order]
    item_s, exposed_s = item_index[order], exposed[order]
    longtail = items.long_tail(head_share)

    n_requests = len(req_dict)
    everything = _Lists.build(req_s, score_s, label_s, item_s)
    metrics, parts = _ranking_metrics(everything, ks, longtail)
    per_request = everything.to_requests(parts, n_requests)
    keep = ~exposed_s
    unexposed = _Lists.build(req_s[keep], score_s[keep], label_s[keep], item_s[keep])
    unexposed_metrics, unexposed_parts = _ranking_metrics(unexposed, ks, longtail)
    metrics.update({UNEXPOSED_PREFIX + k: v for k, v in unexposed_metrics.items()})
    per_request.update(
        {
            UNEXPOSED_PREFIX + k: v
            for k, v in unexposed.to_requests(unexposed_parts, n_requests).items()
        }
    )
    unit = _normalize(items.embeddings)
    cat_code, cat_known = _category_codes(items.categories)
    diversity: Parts = {}
    for k in ks:
        metrics[f"ild@{k}"], diversity[f"ild@{k}"] = _intra_list_distance(everything, k, unit)
    for k in ks:
        key = f"category_recall@{k}"
        metrics[key], diversity[key] = _category_recall(everything, k, cat_code, cat_known)
    metrics["category_requests_evaluated"] = float(
        (diversity[f"category_recall@{ks[0]}"][1] > 0).sum()
    )
    per_request.update(everything.to_requests(diversity, n_requests))
    metrics["truth_coverage"] = float(matched.mean())
    values = RequestValues(
        request_ids=np.asarray(req_dict.to_pylist(), dtype=object),
        numerator={k: num for k, (num, _) in per_request.items()},
        denominator={k: den for k, (_, den) in per_request.items()},
    )
    return Evaluation(metrics, values)


@dataclass(frozen=True)
class _Lists:
    """Candidates sorted by (request, score desc, item_id asc), with per-request offsets."""

    group: IntArray  # request index of each row, 0..n_groups-1, non-decreasing
    request: IntArray  # the evaluation's request code of each list (lists may skip requests)
    starts: IntArray  # first row of each request
    sizes: IntArray  # rows per request
    rank: IntArray  # 0-based position within the request
    score: FloatArray
    label: BoolArray
    item: IntArray  # row index into ItemInfo

    @classmethod
    def build(cls, req: IntArray, score: FloatArray, label: BoolArray, item: IntArray) -> _Lists:
        n = len(req)
        starts = np.r_[0, np.flatnonzero(req[1:] != req[:-1]) + 1] if n else np.zeros(0, np.int64)
        sizes = np.diff(np.r_[starts, n]).astype(np.int64)
        group = np.repeat(np.arange(len(starts), dtype=np.int64), sizes)
        rank = np.arange(n, dtype=np.int64) - starts[group]
        request = req[starts].astype(np.int64)
        return cls(group, request, starts.astype(np.int64), sizes, rank, score, label, item)

    @property
    def n_groups(self) -> int:
        return len(self.starts)

    def per_group(self, weights: npt.ArrayLike) -> FloatArray:
        """Sum of ``weights`` over each request's rows."""
        sums = np.bincount(self.group, weights=weights, minlength=self.n_groups)
        return np.asarray(sums, dtype=np.float64)

    def to_requests(self, parts: Parts, n_requests: int) -> Parts:
        """Per-list parts spread over all ``n_requests`` requests (0 for requests not listed)."""
        out: Parts = {}
        for key, (num, den) in parts.items():
            full_num, full_den = np.zeros(n_requests), np.zeros(n_requests)
            full_num[self.request], full_den[self.request] = num, den
            out[key] = (full_num, full_den)
        return out


def _ranking_metrics(
    lists: _Lists, ks: list[int], longtail: BoolArray
) -> tuple[dict[str, float], Parts]:
    """AUC, GAUC, HR/Recall/NDCG@K, long-tail recall@K and counts over ``lists``.

    Returns:
        The metrics, and the per-list parts of every quality metric (not of the counts).
    """
    label = lists.label
    positives = lists.per_group(label)
    evaluated = positives > 0
    longtail_label = label & longtail[lists.item]
    longtail_positives = lists.per_group(longtail_label)
    longtail_evaluated = longtail_positives > 0
    discount = 1.0 / np.log2(lists.rank + 2.0)
    ideal = np.r_[0.0, np.cumsum(1.0 / np.log2(np.arange(max(ks)) + 2.0))]

    out: dict[str, float] = {}
    parts: Parts = {}
    out["auc"], parts["auc"] = _pooled_auc(lists)
    out["gauc"], parts["gauc"] = _grouped_auc(lists)
    some_positive = np.maximum(positives, 1.0)  # the unevaluated lists' values are masked out
    for k in ks:
        top = lists.rank < k
        hits = lists.per_group(label & top)
        dcg = lists.per_group(np.where(label & top, discount, 0.0))
        ideal_dcg = np.where(evaluated, ideal[np.minimum(positives, k).astype(np.int64)], 1.0)
        for key, values in (
            (f"hr@{k}", (hits > 0).astype(np.float64)),
            (f"recall@{k}", hits / some_positive),
            (f"ndcg@{k}", dcg / ideal_dcg),
        ):
            out[key], parts[key] = _list_mean(values, evaluated)
    for k in ks:
        hits = lists.per_group(longtail_label & (lists.rank < k))
        key = f"longtail_recall@{k}"
        out[key], parts[key] = _list_mean(
            hits / np.maximum(longtail_positives, 1.0), longtail_evaluated
        )
    out["requests_evaluated"] = float(evaluated.sum())
    out["rows"] = float(len(label))
    out["positives"] = float(label.sum())
    # Long-tail recall averages over far fewer requests than recall: say how many, so a reader
    # can judge its noise.
    out["longtail_requests_evaluated"] = float(longtail_evaluated.sum())
    out["longtail_positives"] = float(longtail_label.sum())
    return out, parts


def _list_mean(
    values: FloatArray, counted: BoolArray
) -> tuple[float, tuple[FloatArray, FloatArray]]:
    """Mean of ``values`` over the counted lists, and its parts (value or 0, counted or not)."""
    den = counted.astype(np.float64)
    return _mean(values[counted]), (np.where(counted, values, 0.0), den)


def _pooled_auc(lists: _Lists) -> tuple[float, tuple[FloatArray, FloatArray]]:
    """AUC over all rows pooled (ties count one half), and its first-order parts per list.

    The AUC of a resample that weights list r by ``w_r`` is, to first order in ``w - 1``,
    ``AUC + sum_r w_r psi_r`` with ``psi_r = S10_r / P + S01_r / N - AUC (P_r / P + N_r / N)``:
    ``S10_r`` sums the share of all negatives below each of r's positives, ``S01_r`` the share
    of all positives above each of r's negatives, and ``P_r``, ``N_r`` count r's positives and
    negatives (``P``, ``N``: all of them). The psi sum to 0, so the parts
    ``(AUC + G psi_r, 1)`` over the G lists give back the AUC and, resampled, that expansion
    with the weights normalized to their mean.
    """
    label = lists.label
    n_pos = float(label.sum())
    n_neg = float(len(label)) - n_pos
    g = lists.n_groups
    if n_pos == 0 or n_neg == 0:
        return math.nan, (np.zeros(g), np.zeros(g))
    _, at = np.unique(lists.score, return_inverse=True)
    pos_at = np.bincount(at, weights=label.astype(np.float64))
    neg_at = np.bincount(at, weights=(~label).astype(np.float64))
    neg_below = np.cumsum(neg_at) - neg_at
    pos_above = n_pos - np.cumsum(pos_at)
    share_below = ((neg_below + 0.5 * neg_at) / n_neg)[at]  # for a positive row
    share_above = ((pos_above + 0.5 * pos_at) / n_pos)[at]  # for a negative row
    value = float(share_below[label].sum() / n_pos)
    s10 = lists.per_group(np.where(label, share_below, 0.0))
    s01 = lists.per_group(np.where(label, 0.0, share_above))
    pos = lists.per_group(label)
    psi = s10 / n_pos + s01 / n_neg - value * (pos / n_pos + (lists.sizes - pos) / n_neg)
    return value, (value + g * psi, np.ones(g))


def _grouped_auc(lists: _Lists) -> tuple[float, tuple[FloatArray, FloatArray]]:
    """GAUC as :func:`training.evaluation.metrics.grouped_auc` computes it, without a loop.

    Within a request rows are sorted by descending score, so tied scores form contiguous runs;
    each row gets the average ascending rank of its run (ties count one half). The parts are
    ``(auc_r * size_r, size_r)`` over the lists with both classes.
    """
    n = len(lists.score)
    g = lists.n_groups
    if n == 0:
        return math.nan, (np.zeros(g), np.zeros(g))
    group, score, rank = lists.group, lists.score, lists.rank
    new_run = np.r_[True, (group[1:] != group[:-1]) | (score[1:] != score[:-1])]
    run_start = np.flatnonzero(new_run)
    run_end = np.r_[run_start[1:], n] - 1
    size = lists.sizes[group]
    # Ascending 1-based rank of the row at descending position p in a list of size s is s - p.
    run_rank = ((size[run_start] - rank[run_start]) + (size[run_end] - rank[run_end])) / 2.0
    avg_rank = run_rank[np.cumsum(new_run) - 1]
    pos = lists.per_group(lists.label)
    neg = lists.sizes - pos
    valid = (pos > 0) & (neg > 0)
    rank_sum = lists.per_group(np.where(lists.label, avg_rank, 0.0))
    pairs = np.where(valid, pos * neg, 1.0)
    per_auc = np.where(valid, (rank_sum - pos * (pos + 1) / 2) / pairs, 0.0)
    weights = np.where(valid, lists.sizes, 0).astype(np.float64)
    if not valid.any():
        return math.nan, (np.zeros(g), weights)
    return float((per_auc * weights).sum() / weights.sum()), (per_auc * weights, weights)


def _intra_list_distance(
    lists: _Lists, k: int, unit: npt.NDArray[np.float32]
) -> tuple[float, tuple[FloatArray, FloatArray]]:
    """Mean over lists with >= 2 items of the mean pairwise ``1 - cosine`` of the top-K items.

    Uses ``sum_{i<j} e_i.e_j = (|sum e|^2 - sum |e_i|^2) / 2``, with the per-list sums gathered
    in chunks of lists so memory stays bounded by ``_CHUNK_ROWS x dim``.
    """
    top_rows = np.flatnonzero(lists.rank < k)  # contiguous per list, lists in order
    m = np.minimum(lists.sizes, k)  # >= 1 for every list
    offsets = np.r_[0, np.cumsum(m)]
    sq_norm_sum = np.empty(lists.n_groups, np.float64)
    a = 0
    while a < lists.n_groups:
        b = max(a + 1, int(np.searchsorted(offsets, offsets[a] + _CHUNK_ROWS, side="right")) - 1)
        b = min(b, lists.n_groups)
        vectors = unit[lists.item[top_rows[offsets[a] : offsets[b]]]].astype(np.float64)
        sums = np.add.reduceat(vectors, offsets[a:b] - offsets[a], axis=0)
        sq_norm_sum[a:b] = np.einsum("ij,ij->i", sums, sums)
        a = b
    self_sim = lists.per_group(
        np.where(lists.rank < k, np.einsum("ij,ij->i", unit, unit)[lists.item], 0.0)
    )
    eligible = m >= 2
    pairs = np.where(eligible, m * (m - 1) / 2.0, 1.0)
    mean_cos = (sq_norm_sum - self_sim) / 2.0 / pairs
    return _list_mean(1.0 - mean_cos, eligible)


def _category_recall(
    lists: _Lists, k: int, cat_code: IntArray, cat_known: BoolArray
) -> tuple[float, tuple[FloatArray, FloatArray]]:
    """Share of the known categories of a list's positives that its top K shows, averaged.

    Averaged over lists with at least one positive of known category. Unlike the coverage of
    the union of all top-K lists (which any scorer saturates once requests x K exceeds the
    catalog's categories), it is per request and asks for the user's own true interests.
    """
    n_cat = int(cat_code.max()) + 1 if len(cat_code) else 1
    known = cat_known[lists.item]
    key = lists.group * n_cat + cat_code[lists.item]
    wanted = np.unique(key[lists.label & known])  # (list, category) pairs of the positives
    shown = np.unique(key[(lists.rank < k) & known])
    covered = np.isin(wanted, shown, assume_unique=True)
    owner = wanted // n_cat
    count = np.bincount(owner, minlength=lists.n_groups).astype(np.float64)
    hits = np.bincount(owner[covered], minlength=lists.n_groups).astype(np.float64)
    counted = count > 0
    return _list_mean(hits / np.maximum(count, 1.0), counted)


def _category_codes(categories: npt.NDArray[np.object_]) -> tuple[IntArray, BoolArray]:
    _, codes = np.unique(categories.astype(str), return_inverse=True)
    return codes.astype(np.int64), categories.astype(str) != ""


def _normalize(embeddings: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    return np.divide(embeddings, norms, out=np.zeros_like(embeddings), where=norms > 0).astype(
        np.float32
    )


def _mean(values: npt.ArrayLike) -> float:
    arr = np.asarray(values, np.float64)
    return float(arr.mean()) if arr.size else math.nan


def _check_ks(ks: Sequence[int]) -> list[int]:
    out = sorted({int(k) for k in ks})
    if not out or out[0] < 1:
        raise EvaluationError(f"ks must be positive integers, got {list(ks)}")
    return out


def _string_column(table: pa.Table, name: str) -> pa.Array:
    return pc.cast(table.column(name), pa.string()).combine_chunks()


def _check_scored(scored: pa.Table) -> None:
    missing = [c for c in SCORED_COLUMNS if c not in scored.column_names]
    if missing:
        raise EvaluationError(
            f"scored table is missing columns {missing}; it needs {list(SCORED_COLUMNS)}"
        )
    if scored.num_rows == 0:
        raise EvaluationError("scored table has no rows")
    problems = []
    for col in ("request_id", "user_id", "item_id", "stage"):
        typ = scored.schema.field(col).type
        if not (pa.types.is_string(typ) or pa.types.is_large_string(typ)):
            problems.append(f"column {col!r} has type {typ}, expected string")
        elif scored.column(col).null_count:
            problems.append(f"column {col!r} has {scored.column(col).null_count} null values")
    score_type = scored.schema.field("score").type
    if not (pa.types.is_floating(score_type) or pa.types.is_integer(score_type)):
        problems.append(f"column 'score' has type {score_type}, expected float")
    else:
        score = pc.cast(scored.column("score"), pa.float64())
        bad = score.null_count + (pc.sum(pc.is_nan(score)).as_py() or 0)
        if bad:
            problems.append(f"column 'score' has {bad} NaN or null values")
    if not problems:
        stage = scored.column("stage")
        unknown = pc.unique(stage.filter(pc.invert(pc.is_in(stage, pa.array(STAGES))))).to_pylist()
        if unknown:
            problems.append(
                f"column 'stage' has unknown values {unknown[:3]}; allowed: {', '.join(STAGES)}"
            )
    if problems:
        raise EvaluationError("scored table: " + "; ".join(problems))


def _join_truth(scored: pa.Table, truth: pa.Table) -> tuple[BoolArray, BoolArray]:
    """Label and has-a-truth-row flag for each scored row, in scored order."""
    problems = validate(truth, "truth")
    by_request = "request_id" in truth.column_names
    if by_request and not problems and truth.column("request_id").null_count:
        problems.append(
            f"column 'request_id' has {truth.column('request_id').null_count} null values; give "
            "every truth row a request_id, or drop the column to join on (user_id, item_id)"
        )
    if problems:
        raise EvaluationError("truth table: " + "; ".join(problems))
    keys = ["request_id", "item_id"] if by_request else ["user_id", "item_id"]
    right = pa.table(
        {k: _string_column(truth, k) for k in keys}
        | {"__label": pc.cast(truth.column("label"), pa.int8())}
    )
    right = right.group_by(keys).aggregate([("__label", "max")])
    left = pa.table(
        {k: _string_column(scored, k) for k in keys}
        | {"__row": pa.array(np.arange(scored.num_rows, dtype=np.int64))}
    )
    joined = left.join(right, keys=keys, join_type="left outer", use_threads=False)
    rows = joined.column("__row").to_numpy()
    truth_label = joined.column("__label_max")
    label = np.zeros(scored.num_rows, dtype=bool)
    matched = np.zeros(scored.num_rows, dtype=bool)
    label[rows] = pc.fill_null(truth_label, 0).to_numpy() > 0
    matched[rows] = pc.is_valid(truth_label).to_numpy(zero_copy_only=False)
    if not matched.any():
        example = ", ".join(repr(v) for v in left.slice(0, 1).to_pylist()[0].values())
        raise EvaluationError(
            f"no scored row matches any truth row on ({', '.join(keys)}), e.g. scored "
            f"({example}) has no truth; are the truth and scored tables from the same split?"
        )
    return label, matched


def _sorted_codes(values: pa.Array) -> tuple[IntArray, pa.Array]:
    """Integer codes that order like the strings, and the sorted distinct strings."""
    encoded = pc.dictionary_encode(values)
    order = pc.sort_indices(encoded.dictionary).to_numpy()
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    return rank[encoded.indices.to_numpy()], encoded.dictionary.take(pa.array(order))


def _check_duplicates(req_code: IntArray, item_code: IntArray, scored: pa.Table) -> None:
    key = req_code * (int(item_code.max()) + 1) + item_code
    order = np.argsort(key, kind="stable")
    dup = np.flatnonzero(key[order][1:] == key[order][:-1])
    if len(dup):
        row = scored.slice(int(order[dup[0]]), 1).select(["request_id", "item_id"]).to_pylist()[0]
        raise EvaluationError(
            f"scored table has {len(dup)} duplicate (request_id, item_id) rows, e.g. "
            f"({row['request_id']!r}, {row['item_id']!r}); score each candidate once"
        )


def _item_index(item_dict: pa.Array, items: ItemInfo) -> IntArray:
    index = pc.index_in(item_dict, value_set=string_array(items.item_ids))
    missing = index.null_count
    if missing:
        examples = item_dict.filter(pc.is_null(index)).slice(0, 3).to_pylist()
        raise EvaluationError(
            f"{missing} scored items are missing from ItemInfo, e.g. {examples}; pass the whole "
            "catalog"
        )
    return index.to_numpy().astype(np.int64)
