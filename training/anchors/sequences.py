"""Users' positive-item sequences: cutoff-versioned histories, downsampling, training examples.

* :func:`user_sequences`: each user's positives (contract ``interactions`` columns) as item rows of
  the catalog, chronological (ties keep their input order). Items without SIDs are dropped and
  counted.
* :func:`anchor_requests`: one history per (user, cutoff) whose history changed since the previous
  cutoff; a history at cutoff ``c`` holds only positives strictly before ``c``, truncated to the
  last ``max_history`` items. Anchor sets are stamped with their cutoff, so a point-in-time join
  gives a request at ``t`` the latest set with cutoff ``<= t``, built from history before it.
* :func:`downsample`: drops occurrences of popular items from *training* sequences, keeping an
  occurrence of item ``i`` with probability ``min(1, (t / f_i) ** alpha)``, ``f_i`` the item's
  share of all occurrences (word2vec's subsampling rule, ``alpha = 0.5`` being its square root).
* :func:`with_reversed`: optionally, every training sequence also backwards (symmetric
  co-occurrence as extra training signal).
* :func:`holdout_split` and :class:`ExampleSet`: held-out last items for evaluation, and teacher
  forcing examples as index ranges (no per-example Python objects, so millions of users fit).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field

from training.arrow import string_array
from training.data.contract import TIMESTAMP, conform

IntArray = npt.NDArray[np.int64]
LossOn = Literal["target", "all"]


class SequenceConfig(BaseModel):
    """How positive sequences become histories and training examples."""

    model_config = ConfigDict(extra="forbid")

    max_history: int = Field(
        default=50,
        ge=1,
        description="Most recent positives kept per history (older ones are dropped); bounds the "
        "prompt at max_history * n_levels tokens.",
    )
    downsample_threshold: float | None = Field(
        default=1e-3,
        gt=0,
        le=1,
        description="t of the popular-item downsampling of training sequences: an occurrence of "
        "an item with occurrence share f is kept with probability min(1, (t/f)^alpha). None "
        "disables downsampling. Histories used for generation are never downsampled.",
    )
    downsample_alpha: float = Field(
        default=0.5, gt=0, description="alpha of the downsampling rule (0.5 = square root)."
    )
    reverse_augmentation: bool = Field(
        default=False,
        description="Also train on every training sequence in reverse order. Helps where "
        "engagement is about symmetric (items bought together, whose order within a basket is "
        "arbitrary): on Amazon Scientific it lifted the anchors' HR@10 from 0.083 to 0.098 "
        "(docs/anchors.md). Doubles the training examples; generation is unchanged.",
    )
    seed: int = Field(default=0, ge=0, description="Seed of downsampling and the evaluation split.")


@dataclass(frozen=True)
class UserSequences:
    """Chronological positives of every user, stored flat (CSR-style).

    User ``u``'s items are ``items[offsets[u]:offsets[u + 1]]``, with their timestamps (microseconds
    since the epoch, UTC) in ``timestamps`` at the same positions.

    Attributes:
        user_ids: User ids, sorted.
        offsets: Start of each user's run, shape ``[n_users + 1]``.
        items: Catalog rows of the positives.
        timestamps: Positive timestamps in microseconds.
        dropped_unknown_items: Positives dropped because their item has no SID.
    """

    user_ids: npt.NDArray[np.str_]
    offsets: IntArray
    items: IntArray
    timestamps: IntArray
    dropped_unknown_items: int = 0

    @property
    def n_users(self) -> int:
        """Users with at least one positive."""
        return len(self.user_ids)

    def sequence(self, user: int) -> IntArray:
        """User row ``user``'s items, oldest first."""
        return self.items[self.offsets[user] : self.offsets[user + 1]]

    def sequences(self) -> list[IntArray]:
        """Every user's items, oldest first."""
        return np.split(self.items, self.offsets[1:-1])


def user_sequences(positives: pa.Table, catalog_item_ids: npt.NDArray[np.str_]) -> UserSequences:
    """Group positives by user, chronologically, as catalog rows.

    Args:
        positives: A table with ``user_id``, ``item_id``, ``event_timestamp`` (the contract
            ``interactions`` columns; extra columns are ignored), e.g. all interactions or the
            ``exposed_positive`` rows of the request log.
        catalog_item_ids: The catalog's item ids; row ``i`` of the result's items is this item.

    Raises:
        training.data.contract.ContractError: when the positives break the contract.
    """
    table = conform(positives.select(["user_id", "item_id", "event_timestamp"]), "interactions")
    rows = pc.index_in(table.column("item_id"), value_set=string_array(catalog_item_ids))
    known = pc.is_valid(rows)
    dropped = table.num_rows - (pc.sum(known).as_py() or 0)
    table = table.filter(known)
    items = pc.filter(rows, known).to_numpy(zero_copy_only=False).astype(np.int64)
    # Users as ranks among the distinct ids in sorted order: sorting integers instead of a
    # fixed-width string per positive (4 bytes per character of the longest id: 144 bytes a row
    # for UUIDs) keeps the job's working memory a small multiple of the positives table.
    column = table.column("user_id")
    distinct = np.sort(pc.unique(column).to_numpy(zero_copy_only=False).astype(str))
    users = pc.index_in(column, value_set=string_array(distinct)).to_numpy(zero_copy_only=False)
    users = np.asarray(users, dtype=np.int64)
    ts = table.column("event_timestamp").cast(TIMESTAMP).cast(pa.int64()).to_numpy()
    ts = np.asarray(ts, dtype=np.int64)
    order = np.lexsort((ts, users))  # stable: ties in time keep their input order
    users, items, ts = users[order], items[order], ts[order]
    starts = (
        np.flatnonzero(np.append(True, users[1:] != users[:-1]))
        if len(users)
        else np.array([], np.int64)
    )
    return UserSequences(
        user_ids=distinct[users[starts]],
        offsets=np.append(starts, len(users)).astype(np.int64),
        items=items,
        timestamps=ts,
        dropped_unknown_items=int(dropped),
    )


@dataclass(frozen=True)
class AnchorRequests:
    """The (user, cutoff) pairs to generate anchors for, each with its history.

    Attributes:
        user_ids: User of each anchor set.
        cutoffs: Cutoff of each anchor set, microseconds since the epoch (UTC); the output's
            ``event_timestamp``.
        histories: Catalog rows of the history, oldest first, at most ``max_history`` long.
        skipped_empty_history: Users with no positive before the first cutoff (including
            requested users with no positive at all): they get no anchor set until their first
            positive, and are counted rather than generated for.
    """

    user_ids: list[str]
    cutoffs: IntArray
    histories: list[IntArray]
    skipped_empty_history: int

    def slice(self, start: int, stop: int) -> AnchorRequests:
        """Sets ``start:stop`` (views, no copies); ``skipped_empty_history`` stays the whole's."""
        return AnchorRequests(
            self.user_ids[start:stop],
            self.cutoffs[start:stop],
            self.histories[start:stop],
            self.skipped_empty_history,
        )

    def select(self, rows: IntArray) -> AnchorRequests:
        """The sets at ``rows`` (ascending), in that order."""
        return AnchorRequests(
            [self.user_ids[i] for i in rows],
            self.cutoffs[rows],
            [self.histories[i] for i in rows],
            self.skipped_empty_history,
        )


def _to_micros(cutoffs: Sequence[datetime]) -> IntArray:
    arr = pa.array(list(cutoffs), type=TIMESTAMP).cast(pa.int64()).to_numpy(zero_copy_only=False)
    return np.unique(np.asarray(arr, dtype=np.int64))


@dataclass
class UserCutoffs:
    """Cutoffs of each user's own: ``cutoffs[offsets[k]:offsets[k + 1]]`` belong to ``user_ids[k]``.

    Attributes:
        user_ids: Users, sorted and distinct.
        offsets: Start of each user's cutoffs, shape ``[n_users + 1]``.
        cutoffs: Microseconds since the epoch (UTC), ascending and distinct within a user.
    """

    user_ids: npt.NDArray[np.str_]
    offsets: IntArray
    cutoffs: IntArray

    def subset(self, keep: npt.NDArray[np.bool_]) -> UserCutoffs:
        """The cutoffs of the users where ``keep`` (one flag per user) is true."""
        sizes = np.diff(self.offsets)[keep]
        rows = np.repeat(keep, np.diff(self.offsets))
        return UserCutoffs(
            self.user_ids[keep], np.r_[0, np.cumsum(sizes)].astype(np.int64), self.cutoffs[rows]
        )


def request_cutoffs(
    user_ids: pa.Array | pa.ChunkedArray, timestamps: pa.Array | pa.ChunkedArray
) -> UserCutoffs:
    """Each user's distinct request times: one anchor set per request whose history changed.

    A request at ``t`` then joins the set stamped ``t``, built from every positive strictly
    before ``t`` (same-day history included, unlike :func:`day_cutoffs`).
    """
    table = pa.table(
        {
            "user_id": pc.cast(user_ids, pa.string()),
            "ts": pc.cast(pc.cast(timestamps, TIMESTAMP), pa.int64()),
        }
    ).drop_null()
    pairs = table.group_by(["user_id", "ts"]).aggregate([])
    pairs = pairs.sort_by([("user_id", "ascending"), ("ts", "ascending")])
    users = pairs.column("user_id").to_numpy(zero_copy_only=False).astype(str)
    cuts = pairs.column("ts").to_numpy().astype(np.int64)
    if len(users) == 0:
        return UserCutoffs(np.array([], str), np.zeros(1, np.int64), cuts)
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    return UserCutoffs(users[starts], np.r_[starts, len(users)].astype(np.int64), cuts)


def anchor_requests(
    seqs: UserSequences,
    cutoffs: Sequence[datetime] | UserCutoffs,
    max_history: int,
    users: Sequence[str] | None = None,
) -> AnchorRequests:
    """One history per (user, cutoff) whose history changed, using positives strictly before it.

    For a user's sorted cutoffs ``c_0 < c_1 < ...``, user ``u`` gets an anchor set at ``c_j``
    when ``j`` is the first cutoff or ``u`` has a positive in ``[c_{j-1}, c_j)``, and its history
    is non-empty; a point-in-time join carries each set forward until the next one.

    Args:
        seqs: The users' positives.
        cutoffs: Cutoff instants (timezone-aware) shared by every user, duplicates ignored; or
            each user's own (:func:`request_cutoffs`), in which case only those users get sets.
        max_history: Most recent items kept per history.
        users: Restrict to these users (users without positives count as skipped); all users of
            ``seqs`` when None.
    """
    if isinstance(cutoffs, UserCutoffs):
        if users is not None:
            keep = np.isin(cutoffs.user_ids, np.asarray(list(users), dtype=str))
            cutoffs = cutoffs.subset(keep)
        return _per_user_requests(seqs, cutoffs, max_history)
    cuts = _to_micros(cutoffs)
    wanted = np.ones(seqs.n_users, dtype=bool)
    unknown_users = 0
    if users is not None:
        wanted_ids = np.unique(np.asarray(list(users), dtype=str))
        wanted = np.isin(seqs.user_ids, wanted_ids)
        unknown_users = len(wanted_ids) - int(wanted.sum())
    if len(cuts) == 0:
        return AnchorRequests([], np.array([], np.int64), [], 0)
    # bucket[r] = number of cutoffs <= ts[r]: positive r is visible at cutoff j iff j >= bucket[r].
    bucket = np.searchsorted(cuts, seqs.timestamps, side="right")
    n_cuts = np.where(wanted, len(cuts), 0)
    return _changed_histories(
        seqs,
        _user_of(seqs),
        bucket,
        n_cuts,
        np.zeros(seqs.n_users, np.int64),
        cuts,
        max_history,
        unknown_users,
    )


def _user_of(seqs: UserSequences) -> IntArray:
    """User row of every positive."""
    return np.repeat(np.arange(seqs.n_users), np.diff(seqs.offsets))


def _changed_histories(
    seqs: UserSequences,
    user_of: IntArray,
    bucket: IntArray,
    n_cuts: IntArray,
    cut_start: IntArray,
    cutoffs: IntArray,
    max_history: int,
    unknown_users: int,
) -> AnchorRequests:
    """One set at the end of every (user, bucket) run of positives, both cutoff flavours.

    Args:
        seqs: The users' positives.
        user_of: User row of every positive.
        bucket: Per positive, how many of its user's cutoffs are at or before it.
        n_cuts: Cutoffs per user row (0: the user gets no set).
        cut_start: Where each user row's cutoffs start in ``cutoffs``.
        cutoffs: Every user's cutoffs, flat (microseconds).
        max_history: Most recent items kept per history.
        unknown_users: Requested users without positives, counted as skipped.
    """
    n = len(seqs.items)
    run_end = np.ones(n, dtype=bool)  # last positive of a (user, bucket) run
    if n:
        run_end[:-1] = (user_of[1:] != user_of[:-1]) | (bucket[1:] != bucket[:-1])
    ends = np.flatnonzero(run_end & (bucket < n_cuts[user_of]))
    first_bucket = bucket[seqs.offsets[:-1]] if seqs.n_users else np.array([], np.int64)
    skipped = int(((first_bucket > 0) & (n_cuts > 0)).sum()) + unknown_users
    histories = [
        seqs.items[max(seqs.offsets[user_of[e]], e + 1 - max_history) : e + 1] for e in ends
    ]
    return AnchorRequests(
        user_ids=seqs.user_ids[user_of[ends]].tolist(),
        cutoffs=cutoffs[cut_start[user_of[ends]] + bucket[ends]],
        histories=histories,
        skipped_empty_history=skipped,
    )


def _per_user_requests(seqs: UserSequences, uc: UserCutoffs, max_history: int) -> AnchorRequests:
    """:func:`anchor_requests` with each user's own cutoffs, vectorized over all users.

    Times are replaced by their dense rank among all positive and cutoff times, so that one
    integer key ``user * R + rank`` orders (user, time) pairs and a single ``searchsorted``
    counts, for every positive, its user's cutoffs at or before it.
    """
    # Users with cutoffs but no positives at all: skipped, like users without early history.
    if not seqs.n_users:
        return AnchorRequests([], np.zeros(0, np.int64), [], len(uc.user_ids))
    row = np.searchsorted(seqs.user_ids, uc.user_ids)
    known = np.zeros(len(uc.user_ids), bool)
    inside = row < seqs.n_users
    known[inside] = seqs.user_ids[row[inside]] == uc.user_ids[inside]
    unknown_users = int((~known).sum())
    uc = uc.subset(known)
    row = row[known]
    n_cuts = np.zeros(seqs.n_users, np.int64)
    n_cuts[row] = np.diff(uc.offsets)
    cut_start = np.zeros(seqs.n_users, np.int64)
    cut_start[row] = uc.offsets[:-1]
    cut_user = np.repeat(row, np.diff(uc.offsets))

    times, rank = np.unique(np.r_[seqs.timestamps, uc.cutoffs], return_inverse=True)
    width = len(times) + 1
    n = len(seqs.items)
    user_of = _user_of(seqs)
    pos_key = user_of * width + rank[:n]
    # The cutoffs are sorted by user id then time, and rows are sorted like the user ids: keys
    # ascend, so a searchsorted is valid.
    cut_key = cut_user * width + rank[n:]
    # bucket[r] = this user's cutoffs <= ts[r]: positive r is visible at cutoff j iff j >= it.
    bucket = np.searchsorted(cut_key, pos_key, side="right") - cut_start[user_of]
    return _changed_histories(
        seqs, user_of, bucket, n_cuts, cut_start, uc.cutoffs, max_history, unknown_users
    )


def day_cutoffs(timestamps: pa.Array | pa.ChunkedArray) -> list[datetime]:
    """The distinct UTC midnights of the days in ``timestamps`` (e.g. the request days).

    A request at time ``t`` on day ``D`` then joins the anchor set stamped ``D 00:00``, built
    from positives before day ``D``.
    """
    days = pc.unique(pc.floor_temporal(pc.cast(timestamps, TIMESTAMP), unit="day"))
    return sorted(d for d in days.to_pylist() if d is not None)


CutoffGranularity = Literal["request", "day"]


def cutoffs_of(requests: pa.Table, granularity: CutoffGranularity) -> list[datetime] | UserCutoffs:
    """The anchor-set versions a request log needs: per user and request, or per request day."""
    if granularity == "request":
        return request_cutoffs(requests.column("user_id"), requests.column("event_timestamp"))
    return day_cutoffs(requests.column("event_timestamp"))


def keep_probabilities(
    counts: npt.NDArray[np.int64], threshold: float, alpha: float
) -> npt.NDArray[np.float64]:
    """Per-item keep probability ``min(1, (threshold / f) ** alpha)``, ``f = count / total``."""
    total = max(int(counts.sum()), 1)
    share = counts / total
    with np.errstate(divide="ignore"):
        prob = np.where(share > 0, (threshold / np.maximum(share, 1e-300)) ** alpha, 1.0)
    return np.minimum(prob, 1.0)


def downsample(
    sequences: Sequence[IntArray], n_items: int, threshold: float, alpha: float, seed: int
) -> list[IntArray]:
    """Drop occurrences of popular items: keep each with probability ``min(1, (t/f)^alpha)``.

    Shares ``f`` are computed over all occurrences of ``sequences``. Popular items dominate
    next-item targets; thinning them spends more of the training signal on the long tail (the
    measured effect on the frequency distribution is in ``docs/anchors.md``).
    """
    flat = np.concatenate(list(sequences)) if sequences else np.array([], np.int64)
    prob = keep_probabilities(np.bincount(flat, minlength=n_items), threshold, alpha)
    keep = np.random.default_rng(seed).random(len(flat)) < prob[flat]
    lengths = np.array([len(s) for s in sequences], dtype=np.int64)
    kept_per_seq = np.split(keep, np.cumsum(lengths)[:-1]) if len(lengths) else []
    return [s[k] for s, k in zip(sequences, kept_per_seq, strict=True)]


def with_reversed(sequences: Sequence[IntArray]) -> list[IntArray]:
    """The training sequences followed by each one of two or more items in reverse order.

    A reversed sequence teaches the transitions of the original backwards ("b then a" for every
    "a then b"), i.e. the symmetric part of item-to-item co-occurrence, which plain next-item
    training on short sequences sees only one way.
    """
    return [*sequences, *(s[::-1].copy() for s in sequences if len(s) >= 2)]


def frequency_summary(sequences: Sequence[IntArray], n_items: int) -> dict[str, float]:
    """Shape of the item-frequency distribution of ``sequences`` (to measure downsampling).

    Returns:
        ``occurrences``, ``distinct_items``, ``top1pct_share`` / ``top10pct_share`` (share of
        occurrences held by the 1% / 10% most frequent catalog items), ``max_item_share``,
        ``gini`` (over catalog items) and ``entropy_ratio`` (entropy / log of catalog size).
    """
    flat = np.concatenate(list(sequences)) if sequences else np.array([], np.int64)
    counts = np.sort(np.bincount(flat, minlength=n_items))[::-1].astype(np.float64)
    total = max(counts.sum(), 1.0)
    share = counts / total
    k1, k10 = max(1, n_items // 100), max(1, n_items // 10)
    asc = share[::-1]
    gini = float(1 - 2 * np.sum(np.cumsum(asc)) / n_items + 1 / n_items) if n_items else 0.0
    nz = share[share > 0]
    entropy = float(-(nz * np.log(nz)).sum())
    return {
        "occurrences": int(counts.sum()),
        "distinct_items": int((counts > 0).sum()),
        "top1pct_share": round(float(share[:k1].sum()), 4),
        "top10pct_share": round(float(share[:k10].sum()), 4),
        "max_item_share": round(float(share[0]) if n_items else 0.0, 5),
        "gini": round(gini, 4),
        "entropy_ratio": round(entropy / np.log(n_items), 4) if n_items > 1 else 0.0,
    }


@dataclass(frozen=True)
class EvalSet:
    """Held-out next items: each evaluated user's last positive and the history before it."""

    histories: list[IntArray]
    targets: IntArray


def holdout_split(
    seqs: UserSequences, eval_users: int, max_history: int, seed: int
) -> tuple[list[IntArray], EvalSet]:
    """Hold out the last positive of up to ``eval_users`` random users with 2+ positives.

    Returns:
        The training sequences (one per user; evaluated users lose their last item) and the
        evaluation set (their truncated histories and held-out items).
    """
    sequences = seqs.sequences()
    eligible = np.flatnonzero(np.diff(seqs.offsets) >= 2)
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.permutation(eligible)[: max(eval_users, 0)])
    histories: list[IntArray] = []
    targets: list[int] = []
    for u in chosen:
        s = sequences[u]
        histories.append(s[:-1][-max_history:])
        targets.append(int(s[-1]))
        sequences[u] = s[:-1]
    return sequences, EvalSet(histories, np.asarray(targets, dtype=np.int64))


@dataclass(frozen=True)
class ExampleSet:
    """Teacher-forcing examples as index ranges into one flat item array.

    Example ``e`` feeds ``items[start[e]:end[e]]`` after ``<bos>`` and puts the loss on the
    items from ``loss_start[e]`` on.
    """

    items: IntArray
    start: IntArray
    end: IntArray
    loss_start: IntArray
    seq_start: IntArray | None = None
    """Start of each example's whole sequence in ``items`` (None: ``start``)."""
    seq_end: IntArray | None = None
    """End of each example's whole sequence in ``items`` (None: ``end``). A prior fused into
    training must not have counted what the sequence holds after the scored item."""

    def __len__(self) -> int:
        return len(self.start)

    @classmethod
    def build(cls, sequences: Sequence[IntArray], max_history: int, loss_on: LossOn) -> ExampleSet:
        """Examples from training sequences.

        * ``"target"``: one example per (user, position ``t >= 1``): the ``max_history`` items
          before ``t`` as context, loss on item ``t`` only. This is exactly the generation task.
        * ``"all"``: the sequence cut into windows of ``max_history + 1`` items (from the most
          recent end), loss on every item of a window, the first predicted from ``<bos>`` alone.
          Cheaper per target item (one forward pass scores a whole window).
        """
        lengths = np.array([len(s) for s in sequences], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        items = np.concatenate(list(sequences)) if len(sequences) else np.array([], np.int64)
        starts: list[IntArray] = []
        ends: list[IntArray] = []
        losses: list[IntArray] = []
        seq_starts: list[IntArray] = []
        seq_ends: list[IntArray] = []
        if loss_on == "target":
            for o, n in zip(offsets[:-1], lengths, strict=True):
                t = np.arange(1, n, dtype=np.int64)
                starts.append(o + np.maximum(0, t - max_history))
                ends.append(o + t + 1)
                losses.append(o + t)
                seq_starts.append(np.full(len(t), o, dtype=np.int64))
                seq_ends.append(np.full(len(t), o + n, dtype=np.int64))
        else:
            window = max_history + 1
            for o, n in zip(offsets[:-1], lengths, strict=True):
                e = np.arange(o + n, o, -window, dtype=np.int64)
                s = np.maximum(o, e - window)
                starts.append(s)
                ends.append(e)
                losses.append(s)
                seq_starts.append(np.full(len(e), o, dtype=np.int64))
                seq_ends.append(np.full(len(e), o + n, dtype=np.int64))

        def cat(parts: list[IntArray]) -> IntArray:
            return np.concatenate(parts) if parts else np.array([], np.int64)

        return cls(
            items=items,
            start=cat(starts),
            end=cat(ends),
            loss_start=cat(losses),
            seq_start=cat(seq_starts),
            seq_end=cat(seq_ends),
        )
