"""A collaborative prior for anchor decoding: item-to-item co-occurrence fused into beam search.

Why. The anchor LM reads a user's history as SID tokens and must compose three codes to name an
item; item-to-item co-occurrence counts, directly, which items follow which. On Amazon Scientific
a tuned co-occurrence recommender beats every anchor LM measured at next-item hits
(BENCHMARKS.md), yet fusing the two lists beats either alone: they know different things. This
module lets the beam search use both, as a product of experts ("shallow fusion", as language
models are fused into speech recognizers' decoders).

The prior. From the training sequences, ``C[a, b]`` sums ``1 / d`` over the pairs "``a``, then
``b`` ``d`` positions later" with ``d <= window`` (and "``b`` then ``a``" too when ``symmetric``:
baskets of co-purchases have no meaningful order). For a history ``h`` (oldest first), the user's
scores are ``s = sum_j decay**j * C[h_(-1-j), :]`` over the last ``history`` items, and the prior
over the catalog is::

    p(i | h) = (1 - smoothing) * s_i / sum(s) + smoothing * b_i
    b_i = (n_i + 1) / sum_k (n_k + 1)

with ``n_i`` the item's occurrences in the training sequences: add-one popularity, so that every
item keeps some mass (a user with no co-occurring item gets ``b`` alone) and no log is ``-inf``.

The fusion. At SID level ``l`` the beam's next code ``c`` after prefix ``P`` is scored::

    log_softmax_c( log p_LM(c | P, h) + w * log M(P + c) )
    M(Q) = sum of p(i | h) over the items under prefix Q

over the codes the trie allows. ``M`` is the prior's marginal mass under a prefix, so the level's
term is the prior's own next-code probability up to a constant the softmax removes, and a full path
adds ``w * log p(item | h)`` across its levels. ``w = 0`` is the LM alone. The anchors' scores stay
log-probabilities over real items (of the fused model). The prior is fitted and saved with every
model; with ``weight: auto`` the weight is chosen on its held-out users
(:func:`training.anchors.job.train_anchor_model`) from ``PriorConfig.weight_grid``, and generation
uses it.

Trained fused (``train_weight``). The LM can also be trained under the same product, so that it
learns what the prior does not already say (:class:`training.anchors.train.TrainingPrior`);
each training row then sees the prior without its own sequence's pairs from the scored item on
(:meth:`CooccurrencePrior.training_probabilities`), and generation decodes with that weight.

The content factor (``content_weight``). Co-occurrence reaches only items taken next to the
history's; the prior can also be multiplied by the history's content kernel density,
``(K_h(i) / floor_h) ** content_weight`` (:meth:`CooccurrencePrior._with_content`), so that items
like the history's get mass whether or not anyone took them together. With it, the prior fused
into training and the user's own items left out, the anchors beat co-occurrence on Amazon
Scientific (docs/anchors.md).

Off by default (``weight`` unset, ``train_weight: 0``): co-occurrence among the log's positives
carries the exposure policy that shaped them, the selection bias GPL's pseudo-labels exist to
get around. On the
synthetic catalog the chosen weight sank the pseudo-labels' relevance AUC from 0.751 to 0.703
and from 0.746 to 0.714 (two simulator seeds), while on Amazon Scientific it lifted next-item
HR@10 by 13-30% (BENCHMARKS.md).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp
from pydantic import BaseModel, ConfigDict, Field, field_validator

from training.anchors.errors import AnchorInputError

IntArray = npt.NDArray[np.int64]

PRIOR_FILE: Final = "cooccurrence_prior.npz"
"""The fitted co-occurrence matrix and item counts, in the anchor model's directory."""
PRIOR_INFO: Final = "cooccurrence_prior.json"
"""How the matrix was fitted and the fusion weight chosen on the held-out users."""


class PriorConfig(BaseModel):
    """The collaborative prior fused into anchor decoding (see :mod:`training.anchors.prior`)."""

    model_config = ConfigDict(extra="forbid")

    weight: float | Literal["auto"] | None = Field(
        default=None,
        description="Fusion weight w of the prior in beam search. Unset (default): the LM "
        "alone, or, for a model trained with the prior fused (train_weight), its training "
        "weight. 'auto': in the training config, choose a weight on the held-out users "
        "(next-item NDCG@10 over weight_grid); in the generation config, decode with it (0 for "
        "a model trained without the choice). A number: that weight (0: the LM alone). Off by "
        "default: it makes anchors better next-item predictors (Amazon Scientific HR@10 "
        "+13-30%) but carries the log's co-engagement, exposure bias included, into the anchors "
        "(on the synthetic catalog it cut the pseudo-labels' relevance AUC by 0.03-0.05 on two "
        "seeds).",
    )
    train_weight: float = Field(
        default=0.0,
        ge=0,
        allow_inf_nan=False,
        description="Fuse the prior into the training loss with this weight (0: off). The LM "
        "is then trained as the second expert of the product decoding uses, learning what "
        "co-occurrence does not already say; each training row's prior leaves out what its own "
        "sequence taught it from the target on. Generation then decodes with the same weight "
        "unless `weight` says otherwise (0 would decode the residual model alone: useless). "
        "On Amazon Scientific it ties co-occurrence at next-item hits (HR@10 1.00-1.01x); off "
        "by default like the prior (docs/anchors.md).",
    )
    weight_grid: tuple[float, ...] = Field(
        default=(0.0, 0.5, 1.0, 2.0, 4.0),
        min_length=1,
        description="Weights tried on the held-out users after training when `weight` is "
        "'auto' (one decode of them each); generation then uses the best. 0 is always among "
        "the candidates.",
    )
    window: int = Field(
        default=5, ge=1, description="Pairs of items at most this many positions apart count."
    )
    symmetric: bool = Field(
        default=True,
        description="Count each pair in both directions (co-purchases have no reliable order; "
        "on Amazon Scientific both ways beats forward-only by 10% HR@10).",
    )
    decay: float = Field(
        default=0.6,
        gt=0,
        le=1,
        description="Weight decay**j of the history item j places from the end (the latest "
        "counts 1).",
    )
    history: int = Field(
        default=20, ge=1, description="Latest history items whose co-occurrences form the prior."
    )
    smoothing: float = Field(
        default=0.1,
        gt=0,
        le=1,
        description="Share of the prior given to add-one popularity, so that every item keeps "
        "mass and the fusion never rules an item out.",
    )
    content_weight: float = Field(
        default=0.0,
        ge=0,
        allow_inf_nan=False,
        description="Exponent beta of the content factor: the prior becomes p(i | h) * "
        "K_h(i) ** beta, renormalized, with K_h the kernel density of the history's content "
        "embeddings at item i (content_temperature, content_neighbors). 0 (default): "
        "co-occurrence alone. Fixed when the prior is fitted (like window); on Amazon "
        "Scientific 0.4 (chosen on the validation targets) lifted the prior alone's next-item "
        "HR@10 by 10%, own items left out (docs/anchors.md).",
    )
    content_temperature: float = Field(
        default=0.05,
        gt=0,
        allow_inf_nan=False,
        description="Temperature tau of the content kernel exp((cos - 1) / tau). 0.05: with "
        "content_weight 0.4, the best of a 3 x 6 grid on Amazon Scientific's validation "
        "targets (benchmarks/anchors_prior_content.py).",
    )
    content_neighbors: int = Field(
        default=50,
        ge=1,
        description="Nearest items (by content cosine) each history item spreads its kernel "
        "over; beyond them the kernel is taken at its floor (the k-th neighbor's value), which "
        "keeps the prior's rows sparse.",
    )

    @field_validator("weight")
    @classmethod
    def _non_negative(cls, value: float | str | None) -> float | str | None:
        if isinstance(value, float) and not (math.isfinite(value) and value >= 0):
            raise ValueError("prior weight must be a finite number >= 0 (or 'auto')")
        return value

    @field_validator("weight_grid")
    @classmethod
    def _grid_non_negative(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if any(not (math.isfinite(w) and w >= 0) for w in value):
            raise ValueError("prior weight_grid values must be finite numbers >= 0")
        return value


def ragged_arange(lengths: IntArray) -> IntArray:
    """``0 .. lengths[k] - 1`` for every ``k``, concatenated."""
    lengths = np.asarray(lengths, dtype=np.int64)
    return np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)


def _lookup(matrix: sp.csr_matrix, rows: IntArray, cols: IntArray) -> npt.NDArray[np.float64]:
    """``matrix[rows[k], cols[k]]`` for every ``k`` (0 where absent), vectorized.

    ``matrix`` must have sorted, duplicate-free indices (``sum_duplicates``): its entries' keys
    ``row * n_cols + col`` are then sorted, and one binary search finds them all.
    """
    n_cols = matrix.shape[1]
    entry_rows = np.repeat(np.arange(matrix.shape[0]), np.diff(matrix.indptr))
    keys = entry_rows * n_cols + matrix.indices
    wanted = np.asarray(rows, dtype=np.int64) * n_cols + np.asarray(cols, dtype=np.int64)
    at = np.minimum(np.searchsorted(keys, wanted), max(len(keys) - 1, 0))
    if not len(keys):
        return np.zeros(len(wanted))
    return np.where(keys[at] == wanted, matrix.data[at], 0.0)


def pair_matrix(
    sequences: Sequence[IntArray], n_items: int, window: int, symmetric: bool
) -> sp.csr_matrix:
    """``C[a, b]``: the sum of ``1 / d`` over pairs "a, then b d positions later", ``d <= window``.

    Vectorized over all sequences at once (no per-position Python loop): for each distance the
    pairs are the concatenated items shifted by ``d``, masked where they cross a sequence boundary.
    """
    if not sequences:
        return sp.csr_matrix((n_items, n_items), dtype=np.float32)
    flat = np.concatenate([np.asarray(s, dtype=np.int64) for s in sequences])
    owner = np.repeat(np.arange(len(sequences)), [len(s) for s in sequences])
    rows, cols, vals = [], [], []
    for d in range(1, window + 1):
        if d >= len(flat):
            break
        same = owner[:-d] == owner[d:]
        rows.append(flat[:-d][same])
        cols.append(flat[d:][same])
        vals.append(np.full(int(same.sum()), 1.0 / d, dtype=np.float32))
    if not rows:
        return sp.csr_matrix((n_items, n_items), dtype=np.float32)
    r, c, v = np.concatenate(rows), np.concatenate(cols), np.concatenate(vals)
    if symmetric:
        r, c, v = np.concatenate([r, c]), np.concatenate([c, r]), np.concatenate([v, v])
    # coo -> csr sums duplicate pairs.
    return sp.csr_matrix((v, (r, c)), shape=(n_items, n_items), dtype=np.float32)


def content_neighbors(
    embeddings: npt.NDArray[np.floating], k: int, block: int = 2048
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.float32]]:
    """Each item's ``k`` nearest other items by cosine of their content embeddings.

    Exact search in blocks of ``block`` rows, ``O(n_items^2 * dim)``: 0.5 s for Amazon
    Scientific's 4,385 items and 7 s for 20,000 on the 2-core dev box, so about 3 minutes for
    100,000 and hours for a million (an approximate index would be needed there; none is built).
    Items with a zero embedding have no neighbors.

    Returns:
        ``(items, cos)``, both ``[n_items, min(k, n_items - 1)]``, nearest first; ``-1`` and
        ``-inf`` where an item has fewer neighbors.
    """
    emb = np.asarray(embeddings, dtype=np.float32)
    n = len(emb)
    k = max(0, min(k, n - 1))
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    unit = np.divide(emb, norms, out=np.zeros_like(emb), where=norms > 0)
    items = np.full((n, k), -1, dtype=np.int32)
    cos = np.full((n, k), -np.inf, dtype=np.float32)
    if k == 0:
        return items, cos
    valid = norms.ravel() > 0
    for start in range(0, n, block):
        sims = unit[start : start + block] @ unit.T
        rows = np.arange(sims.shape[0])
        sims[rows, start + rows] = -np.inf  # never one's own neighbor
        sims[:, ~valid] = -np.inf
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        top_sims = np.take_along_axis(sims, top, 1)
        order = np.argsort(-top_sims, axis=1, kind="stable")
        items[start : start + len(rows)] = np.take_along_axis(top, order, 1)
        cos[start : start + len(rows)] = np.take_along_axis(top_sims, order, 1)
    bad = ~np.isfinite(cos) | ~valid[:, None]
    items[bad], cos[bad] = -1, -np.inf
    return items, cos


@dataclass
class SparsePriorRows:
    """``p(i | h)`` for a batch of histories, kept sparse.

    Row ``u`` is ``smooth[u] * background + shares[u]``: the add-one popularity every row shares,
    and the row's few co-occurring items (their normalized scores times ``1 - smooth[u]``). A
    history reaches few items, so decoding can look up the prior's mass under a prefix from the
    background's (one vector per SID level) and the row's entries, without a dense
    ``[users, n_items]`` table (256 MB for 64 users over a million items).

    Attributes:
        shares: ``[n, n_items]`` sparse float32. Training rows
            (:meth:`CooccurrencePrior.training_probabilities`) also hold negative entries: their
            own later occurrences taken out of the background.
        smooth: ``[n]`` the background's weight in each row (``smoothing``, or 1 for a history
            that co-occurs with nothing; rescaled for training rows).
        background: ``[n_items]`` add-one popularity, summing to 1.
    """

    shares: sp.csr_matrix
    smooth: npt.NDArray[np.float32]
    background: npt.NDArray[np.float32]

    @property
    def shape(self) -> tuple[int, int]:
        """``(rows, n_items)``, as the dense table would have."""
        return (int(self.shares.shape[0]), int(self.shares.shape[1]))

    def dense(self) -> npt.NDArray[np.float32]:
        """The rows as a dense ``[n, n_items]`` float32 table."""
        # Written once as the background, then added to at the scored entries: a dense float64
        # intermediate took 9 s for 512 users x 200,000 items; this takes a fraction of a second.
        out = np.empty(self.shape, dtype=np.float32)
        np.multiply(self.smooth[:, None], self.background[None, :], out=out)
        user = np.repeat(np.arange(self.shape[0]), np.diff(self.shares.indptr))
        out[user, self.shares.indices] += self.shares.data
        return out


@dataclass
class CooccurrencePrior:
    """A fitted co-occurrence matrix, the items' counts, and the settings it was fitted with.

    Attributes:
        item_ids: The catalog's item ids, row ``i`` of ``matrix`` and ``counts`` being item ``i``
            (saved with the prior, so a later catalog with new or reordered items is aligned by
            id: :meth:`align`).
        matrix: ``C``, ``[n_items, n_items]`` sparse float32.
        counts: Occurrences of each item in the training sequences.
        window: Pair window the matrix was counted with.
        symmetric: Whether pairs were counted both ways.
        weight: The fusion weight chosen on the held-out users, or the training weight
            (None: not chosen).
        tuning: Held-out NDCG@10 / HR@10 per weight tried, for the record.
        train_weight: The weight the model was trained with the prior fused (0: trained
            alone).
        neighbors: ``[n_items, k]`` each item's nearest items by content (``-1``: none), for
            the content factor (None: no content factor).
        neighbor_cos: Their cosines (``-inf`` where ``-1``).
        content_weight: The content factor's exponent ``beta`` (0: off).
        content_temperature: The content kernel's temperature ``tau``.
    """

    item_ids: npt.NDArray[np.str_]
    matrix: sp.csr_matrix
    counts: npt.NDArray[np.float64]
    window: int
    symmetric: bool
    weight: float | None = None
    tuning: list[dict[str, float]] | None = None
    train_weight: float = 0.0
    neighbors: npt.NDArray[np.int32] | None = None
    neighbor_cos: npt.NDArray[np.float32] | None = None
    content_weight: float = 0.0
    content_temperature: float = 0.05
    _kernel_cache: tuple[sp.csr_matrix, npt.NDArray[np.float64]] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    @property
    def n_items(self) -> int:
        """Catalog rows the prior covers."""
        return int(self.matrix.shape[0])

    @classmethod
    def fit(
        cls,
        sequences: Sequence[IntArray],
        item_ids: npt.NDArray[np.str_],
        cfg: PriorConfig,
        embeddings: npt.NDArray[np.floating] | None = None,
    ) -> CooccurrencePrior:
        """Count pairs and occurrences in ``sequences`` (rows of ``item_ids``, oldest first).

        Args:
            sequences: Catalog rows per user, oldest first.
            item_ids: The catalog's item ids.
            cfg: Window, direction and the content factor's settings.
            embeddings: The items' content embeddings (rows of ``item_ids``); needed when
                ``cfg.content_weight`` is positive, for the items' nearest neighbors.

        Raises:
            AnchorInputError: when the content factor is asked for without embeddings.
        """
        n_items = len(item_ids)
        neighbors, neighbor_cos = None, None
        if cfg.content_weight > 0:
            if embeddings is None or len(embeddings) != n_items:
                raise AnchorInputError(
                    "prior.content_weight > 0 needs the items' content embeddings, one per "
                    f"catalog row ({n_items}); got "
                    f"{'none' if embeddings is None else len(embeddings)}"
                )
            neighbors, neighbor_cos = content_neighbors(embeddings, cfg.content_neighbors)
        counts = np.zeros(n_items, dtype=np.float64)
        if sequences:
            flat = np.concatenate([np.asarray(s, dtype=np.int64) for s in sequences])
            counts = np.bincount(flat, minlength=n_items).astype(np.float64)
        return cls(
            item_ids=np.asarray(item_ids, dtype=str),
            matrix=pair_matrix(sequences, n_items, cfg.window, cfg.symmetric),
            counts=counts,
            window=cfg.window,
            symmetric=cfg.symmetric,
            neighbors=neighbors,
            neighbor_cos=neighbor_cos,
            content_weight=cfg.content_weight if neighbors is not None else 0.0,
            content_temperature=cfg.content_temperature,
        )

    def align(self, item_ids: npt.NDArray[np.str_]) -> CooccurrencePrior:
        """The same prior over another catalog's rows, matched by item id.

        Items the prior never counted (added since the model was trained) get no co-occurrences
        and a count of 0 (the add-one background still gives them mass); items no longer in the
        catalog are dropped.
        """
        ids = np.asarray(item_ids, dtype=str)
        if len(ids) == len(self.item_ids) and (ids == self.item_ids).all():
            return self
        where = {item: row for row, item in enumerate(ids.tolist())}
        new_row = np.array([where.get(item, -1) for item in self.item_ids.tolist()], np.int64)
        coo = self.matrix.tocoo()
        keep = (new_row[coo.row] >= 0) & (new_row[coo.col] >= 0)
        matrix = sp.csr_matrix(
            (coo.data[keep], (new_row[coo.row[keep]], new_row[coo.col[keep]])),
            shape=(len(ids), len(ids)),
            dtype=np.float32,
        )
        counts = np.zeros(len(ids), dtype=np.float64)
        known = new_row >= 0
        counts[new_row[known]] = self.counts[known]
        neighbors, neighbor_cos = None, None
        if self.neighbors is not None and self.neighbor_cos is not None:
            # Items new to the catalog have no neighbor list (the kernel's floor alone); lists
            # keep the neighbors still in the catalog, at their new rows.
            k = self.neighbors.shape[1]
            neighbors = np.full((len(ids), k), -1, dtype=np.int32)
            neighbor_cos = np.full((len(ids), k), -np.inf, dtype=np.float32)
            mapped = np.where(self.neighbors >= 0, new_row[np.maximum(self.neighbors, 0)], -1)
            cos = np.where(mapped >= 0, self.neighbor_cos, -np.inf).astype(np.float32)
            neighbors[new_row[known]] = mapped[known]
            neighbor_cos[new_row[known]] = cos[known]
        return CooccurrencePrior(
            item_ids=ids,
            matrix=matrix,
            counts=counts,
            window=self.window,
            symmetric=self.symmetric,
            weight=self.weight,
            tuning=self.tuning,
            train_weight=self.train_weight,
            neighbors=neighbors,
            neighbor_cos=neighbor_cos,
            content_weight=self.content_weight,
            content_temperature=self.content_temperature,
        )

    def probabilities(
        self, histories: Sequence[IntArray], cfg: PriorConfig
    ) -> npt.NDArray[np.float32]:
        """``p(i | h)`` for each history: ``[len(histories), n_items]``, rows summing to 1.

        Args:
            histories: Catalog rows per user, oldest first (only the last ``cfg.history`` count).
            cfg: Decay, history length and smoothing (the window was fixed at fitting).
        """
        return self.sparse_probabilities(histories, cfg).dense()

    def rows_for(
        self, histories: Sequence[IntArray], cfg: PriorConfig, rows: IntArray
    ) -> SparsePriorRows:
        """:meth:`sparse_probabilities` of ``histories[rows]``: one search batch's prior rows."""
        return self.sparse_probabilities([histories[i] for i in rows], cfg)

    def sparse_probabilities(
        self, histories: Sequence[IntArray], cfg: PriorConfig
    ) -> SparsePriorRows:
        """:meth:`probabilities` in its sparse form, what decoding uses.

        The shared background and each history's few co-occurring items, without a
        ``[users, n_items]`` table.

        Args:
            histories: Catalog rows per user, oldest first (only the last ``cfg.history`` count).
            cfg: Decay, history length and smoothing (the window was fixed at fitting).
        """
        n = len(histories)
        lengths = [min(len(h), cfg.history) for h in histories]
        rows = np.repeat(np.arange(n), lengths)
        latest = [
            np.asarray(h, dtype=np.int64)[-k:][::-1] if k else np.zeros(0, np.int64)
            for h, k in zip(histories, lengths, strict=True)
        ]
        cols = np.concatenate(latest or [np.zeros(0, np.int64)])
        vals = np.concatenate(
            [cfg.decay ** np.arange(k, dtype=np.float64) for k in lengths] or [np.zeros(0)]
        )
        if len(cols) and (cols.min() < 0 or cols.max() >= self.n_items):
            raise AnchorInputError(
                f"history items outside the prior's {self.n_items} catalog rows: the prior was "
                "fitted on another catalog"
            )
        weights = sp.csr_matrix((vals, (rows, cols)), shape=(n, self.n_items))
        return self._with_content(
            self._sparse_rows((weights @ self.matrix).tocsr(), cfg.smoothing), weights
        )

    def training_probabilities(
        self,
        items: IntArray,
        history_start: IntArray,
        positions: IntArray,
        seq_start: IntArray,
        seq_end: IntArray,
        cfg: PriorConfig,
    ) -> SparsePriorRows:
        """``p(i | h)`` for training positions, without what their own sequence taught the prior.

        The prior fused into training (``PriorConfig.train_weight``) was counted on the training
        sequences, target items included: the pair "history item, then the target" is in ``C``
        because this very user made it. Left in, the prior would look sharper on training
        examples than it ever is on a new request, and the LM would learn to lean on it too
        much. So each row sees the prior counted on every other sequence and on its own only up
        to the scored position: the pairs its sequence made with an item at or after the
        position, and those items' occurrences in the add-one background, are taken out. That
        is what a request at that position would see at serving time. Exact when the rows'
        sequences are those the prior counted, or their reversals for a symmetric prior; for a
        downsampled copy the occurrences it dropped are not taken out (the prior counted them).

        Args:
            items: Flat catalog rows of the training sequences (``ExampleSet.items``).
            history_start: Per row, the first position of ``items`` the history may use.
            positions: Per row, the position of the scored item in ``items``.
            seq_start: Per row, the start of its sequence in ``items``.
            seq_end: Per row, the end of its sequence in ``items``.
            cfg: Decay, history length and smoothing.

        Returns:
            ``len(positions)`` rows over the catalog summing to 1, sparse (``.dense()`` for a
            table): the shared background, rescaled per row, and the row's entries, negative at
            the items whose own occurrences leave its background.
        """
        items = np.asarray(items, dtype=np.int64)
        positions = np.asarray(positions, dtype=np.int64)
        seq_start = np.asarray(seq_start, dtype=np.int64)
        n = len(positions)
        first = np.maximum(np.asarray(history_start, dtype=np.int64), positions - cfg.history)
        lengths = np.maximum(positions - first, 0)
        rows = np.repeat(np.arange(n), lengths)
        back = ragged_arange(lengths)
        cols = items[np.repeat(positions, lengths) - 1 - back]
        if len(cols) and (cols.min() < 0 or cols.max() >= self.n_items):
            raise AnchorInputError(
                f"history items outside the prior's {self.n_items} catalog rows: the prior was "
                "fitted on another catalog"
            )
        weights = sp.csr_matrix(
            (cfg.decay ** back.astype(np.float64), (rows, cols)), shape=(n, self.n_items)
        )
        weights.sum_duplicates()
        # The row's own pairs (a at i, b at j), i < j <= i + window, whose later item is at or
        # after the scored position: what C holds of them in the history items' rows is the leak.
        ahead = np.maximum(np.asarray(seq_end, dtype=np.int64) - positions, 0)
        late_row = np.repeat(np.arange(n), ahead)
        late = np.repeat(positions, ahead) + ragged_arange(ahead)
        leak_rows, leak_cols, leak_vals = [], [], []
        for d in range(1, self.window + 1):
            ok = late - d >= seq_start[late_row]
            r, j = late_row[ok], late[ok]
            a, b = items[j - d], items[j]
            directions = [(a, b), (b, a)] if self.symmetric else [(a, b)]
            for src, dst in directions:
                # C[src, dst] got 1 / d from this pair; the row weighs row src of C by its
                # history weight of src (0 when src is not in its history).
                w = _lookup(weights, r, src)
                keep = w > 0
                leak_rows.append(r[keep])
                leak_cols.append(dst[keep])
                leak_vals.append(w[keep] / d)
        leak = sp.csr_matrix(
            (
                np.concatenate(leak_vals or [np.zeros(0)]),
                (
                    np.concatenate(leak_rows or [np.zeros(0, np.int64)]),
                    np.concatenate(leak_cols or [np.zeros(0, np.int64)]),
                ),
            ),
            shape=(n, self.n_items),
        )
        scores = (weights @ self.matrix - leak).tocsr()
        # Float rounding (and sequences the prior counted otherwise, e.g. before downsampling)
        # may leave tiny negatives where a pair was only this row's own.
        np.maximum(scores.data, 0.0, out=scores.data)
        scores.eliminate_zeros()
        own = sp.csr_matrix((np.ones(len(late)), (late_row, items[late])), shape=(n, self.n_items))
        return self._with_content(self._rows(scores, cfg.smoothing, own), weights)

    def _kernel(self) -> tuple[sp.csr_matrix, npt.NDArray[np.float64]]:
        """``k(j, i) = exp((cos(j, i) - 1) / tau)`` over each item's neighbors, and its floor.

        Returns:
            ``[n_items, n_items]`` sparse kernel (row ``j``: its neighbors), and per item the
            kernel at its farthest listed neighbor (0 for an item without neighbors).
        """
        if self._kernel_cache is not None:
            return self._kernel_cache
        assert self.neighbors is not None and self.neighbor_cos is not None
        tau = self.content_temperature
        listed = self.neighbors >= 0
        rows = np.repeat(np.arange(self.n_items), listed.sum(1))
        values = np.exp((self.neighbor_cos[listed].astype(np.float64) - 1.0) / tau)
        kernel = sp.csr_matrix(
            (values, (rows, self.neighbors[listed])), shape=(self.n_items, self.n_items)
        )
        farthest = np.where(listed.any(1), self.neighbor_cos.min(axis=1, initial=np.inf), -np.inf)
        floor = np.where(np.isfinite(farthest), np.exp((farthest - 1.0) / tau), 0.0)
        self._kernel_cache = (kernel, floor)
        return kernel, floor

    def _with_content(self, rows: SparsePriorRows, history: sp.csr_matrix) -> SparsePriorRows:
        """``rows`` times the content factor ``g(i) = (K_h(i) / floor_h) ** beta``, renormalized.

        ``K_h(i)`` is the mean over the history's distinct items ``j`` of ``exp((cos(j, i) - 1)
        / tau)``, counted over ``j``'s listed neighbors only; ``floor_h``, the same mean taken at
        each ``j``'s farthest listed neighbor, stands for every item beyond the lists (an upper
        bound of their kernel), so ``g`` is 1 there and the rows stay sparse. With a row's prior
        written ``smooth * background + shares``, the product adds
        ``(g - 1) * (smooth * background + shares)`` on the few items where ``g > 1`` and
        divides by the row's new total.

        Args:
            rows: Prior rows summing to 1.
            history: ``[n, n_items]``, positive at each row's history items.
        """
        beta = self.content_weight
        if beta <= 0 or self.neighbors is None:
            return rows
        kernel, floor = self._kernel()
        n = rows.shape[0]
        seen = history.tocsr().copy()
        seen.sum_duplicates()
        seen.data = np.ones_like(seen.data, dtype=np.float64)
        size = np.asarray(seen.sum(axis=1)).ravel()
        seen = sp.diags(1.0 / np.maximum(size, 1.0)) @ seen
        density = (seen @ kernel).tocsr()
        low = seen @ floor  # [n]
        row_of = np.repeat(np.arange(n), np.diff(density.indptr))
        base_floor = low[row_of]
        ratio = np.divide(
            density.data, base_floor, out=np.ones_like(density.data), where=base_floor > 0
        )
        gain = np.maximum(ratio, 1.0) ** beta - 1.0
        boost = sp.csr_matrix((gain, density.indices, density.indptr), shape=density.shape)
        boost.eliminate_zeros()
        owner = np.repeat(np.arange(n), np.diff(boost.indptr))
        smooth = rows.smooth.astype(np.float64)
        background = rows.background.astype(np.float64)
        delta = sp.csr_matrix(
            (boost.data * smooth[owner] * background[boost.indices], boost.indices, boost.indptr),
            shape=boost.shape,
        ) + boost.multiply(rows.shares.astype(np.float64))
        delta = sp.csr_matrix(delta)
        total = 1.0 + np.asarray(delta.sum(axis=1)).ravel()
        shares = sp.diags(1.0 / total) @ (rows.shares.astype(np.float64) + delta)
        shares = sp.csr_matrix(shares)
        shares.sum_duplicates()
        return SparsePriorRows(
            shares=shares.astype(np.float32),
            smooth=(smooth / total).astype(np.float32),
            background=rows.background,
        )

    def _sparse_rows(self, scores: sp.csr_matrix, smoothing: float) -> SparsePriorRows:
        """Prior rows from sparse co-occurrence ``scores`` (``[n, n_items]``, non-negative)."""
        n = scores.shape[0]
        scores.sum_duplicates()
        total = np.asarray(scores.sum(axis=1), dtype=np.float64).ravel()
        # Users without a co-occurring item get the background alone (no division by zero).
        smooth = np.where(total > 0, smoothing, 1.0)
        user = np.repeat(np.arange(n), np.diff(scores.indptr))
        share = scores.data / np.where(total > 0, total, 1.0)[user] * (1.0 - smooth[user])
        mass = self.counts + 1.0
        return SparsePriorRows(
            shares=sp.csr_matrix(
                (share.astype(np.float32), scores.indices, scores.indptr), shape=scores.shape
            ),
            smooth=smooth.astype(np.float32),
            background=(mass / mass.sum()).astype(np.float32),
        )

    def _rows(self, scores: sp.csr_matrix, smoothing: float, own: sp.csr_matrix) -> SparsePriorRows:
        """Training rows: :meth:`_sparse_rows` with ``own`` occurrences left out per row.

        ``own`` holds, per row, the occurrences to take out of the background's counts. The
        row's background is then ``(counts + 1 - own) / norm`` with its own ``norm``: kept
        sparse as the shared background rescaled (``smooth * Z / norm``) plus negative entries
        at the row's own items (every item keeps a count of at least 1, so no mass goes
        negative).
        """
        rows = self._sparse_rows(scores, smoothing)
        n = scores.shape[0]
        mass = self.counts + 1.0
        own = own.tocsr()
        own.sum_duplicates()
        norm = mass.sum() - np.asarray(own.sum(axis=1), dtype=np.float64).ravel()
        scale = rows.smooth.astype(np.float64) / norm
        owner = np.repeat(np.arange(n), np.diff(own.indptr))
        correction = sp.csr_matrix(
            (-(scale[owner] * own.data), own.indices, own.indptr), shape=own.shape
        )
        entries = (rows.shares.astype(np.float64) + correction).tocsr()
        entries.sum_duplicates()
        return SparsePriorRows(
            shares=entries.astype(np.float32),
            smooth=(scale * mass.sum()).astype(np.float32),
            background=rows.background,
        )

    def save(self, directory: Path) -> None:
        """Write :data:`PRIOR_FILE` and :data:`PRIOR_INFO` into ``directory``."""
        directory.mkdir(parents=True, exist_ok=True)
        m = self.matrix.tocsr()
        content: dict[str, npt.NDArray[np.generic]] = {}
        if self.neighbors is not None and self.neighbor_cos is not None:
            content = {"neighbors": self.neighbors, "neighbor_cos": self.neighbor_cos}
        arrays: dict[str, npt.NDArray[np.generic]] = {
            "indptr": m.indptr,
            "indices": m.indices,
            "data": m.data,
            "counts": self.counts,
            "item_ids": self.item_ids,
            **content,
        }
        np.savez_compressed(directory / PRIOR_FILE, **arrays)  # type: ignore[arg-type]
        info = {
            "n_items": self.n_items,
            "window": self.window,
            "symmetric": self.symmetric,
            "pairs": int(m.nnz),
            "weight": self.weight,
            "tuning": self.tuning,
            "train_weight": self.train_weight,
            "content_weight": self.content_weight,
            "content_temperature": self.content_temperature,
            "content_neighbors": None if self.neighbors is None else int(self.neighbors.shape[1]),
        }
        (directory / PRIOR_INFO).write_text(json.dumps(info, indent=2) + "\n")

    @classmethod
    def load(cls, directory: Path) -> CooccurrencePrior | None:
        """The prior saved in ``directory``, or None when it holds none (a model trained before)."""
        path = directory / PRIOR_FILE
        if not path.exists():
            return None
        info = json.loads((directory / PRIOR_INFO).read_text())
        with np.load(path) as z:
            n = int(info["n_items"])
            matrix = sp.csr_matrix((z["data"], z["indices"], z["indptr"]), shape=(n, n))
            counts = z["counts"]
            item_ids = z["item_ids"]
            neighbors = z["neighbors"] if "neighbors" in z.files else None
            neighbor_cos = z["neighbor_cos"] if "neighbor_cos" in z.files else None
        return cls(
            item_ids=item_ids,
            matrix=matrix,
            counts=counts,
            window=int(info["window"]),
            symmetric=bool(info["symmetric"]),
            weight=None if info.get("weight") is None else float(info["weight"]),
            tuning=info.get("tuning"),
            train_weight=float(info.get("train_weight", 0.0)),
            neighbors=neighbors,
            neighbor_cos=neighbor_cos,
            content_weight=float(info.get("content_weight", 0.0)) if neighbors is not None else 0.0,
            content_temperature=float(info.get("content_temperature", 0.05)),
        )
