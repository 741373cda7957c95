"""Collaborative item vectors: what users take together, as a block of the item space.

The frozen content encoder places items by what they say about themselves. Two items that the
same users engage with one after the other can read nothing alike (a film and its sequel with a
different title; a lab glove and the pipette tips bought with it), and pseudo-labels measure
relevance as a cosine in this space. This module builds, from the interaction log, one vector
per item that places items by co-engagement, so that the SID stage can fuse it as a third block
next to the text and ``content_embedding`` ([docs/semantic_ids.md](../../docs/semantic_ids.md)):

1. each user's interactions before ``until``, in time order;
2. symmetric co-occurrence counts of two items within ``window`` positions, each pair weighted
   ``1 / distance`` (an item next to itself is skipped);
3. positive pointwise mutual information (PPMI) of those counts, so that popular items do not
   look similar to everything;
4. the PPMI matrix's top ``dim`` eigenvectors with a positive eigenvalue, each scaled by the
   square root of its eigenvalue: the dot product of two vectors is then the best rank-``dim``
   positive approximation of the two items' PPMI. (The word-vector recipe of Levy & Goldberg,
   2014, takes left singular vectors instead, and so measures only *shared neighbours*: two items
   always taken together but with nothing else in common would come out orthogonal. On a
   symmetric matrix this is their "word + context" vector; measured equal on MovieLens.)

Items that co-occur with nothing before ``until`` (new or unseen items) get a zero vector: the
fusion gives them a zero block, so their text alone places them.

The vectors see only interactions before ``until``: an evaluation of anything downstream
(anchors, pseudo-labels, the pre-ranker) on a later period must set it to that period's start,
or the item space would hold the co-engagements being predicted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field
from scipy.sparse.linalg import eigsh

from training.data.contract import ContractError, check_columns

_EIGEN_FLOOR: Final = 1e-9
"""Eigenvalues below this share of the largest are numerical zeros: their directions are noise."""


class CollaborativeConfig(BaseModel):
    """Settings of the collaborative block of the item space (off by default)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    weight: float = Field(
        default=0.0,
        ge=0,
        allow_inf_nan=False,
        description="Weight of the L2-normalized collaborative vector in the fusion. 0 (the "
        "default) leaves it out: the item space is the frozen content encoder's alone, as in the "
        "GPL paper. 1.0 weighs co-engagement like the text (docs/semantic_ids.md has the "
        "measured effect). Needs the interaction log.",
    )
    dim: int = Field(
        default=64, ge=1, description="Width of the collaborative vector (eigenvectors kept)."
    )
    window: int = Field(
        default=3,
        ge=1,
        description="Two interactions of a user at most this many positions apart count as a "
        "co-occurrence (weighted 1 / distance).",
    )
    until: AwareDatetime | None = Field(
        default=None,
        description="Only interactions before this time count. None: every interaction. Set it "
        "to the start of any period you will evaluate on.",
    )


@dataclass
class CollaborativeVectors:
    """One collaborative vector per catalog item and how they were built.

    Attributes:
        matrix: ``(items, dim)`` float32 aligned with the catalog order; zero rows for items
            that co-occur with nothing.
        metrics: Counts for the stage manifest (interactions used, items without a vector, ...).
    """

    matrix: npt.NDArray[np.float32]
    metrics: dict[str, Any] = field(default_factory=dict)


def collaborative_vectors(
    item_ids: list[str], interactions: pa.Table, cfg: CollaborativeConfig
) -> CollaborativeVectors:
    """Build the collaborative vector of every item in ``item_ids`` (see the module docstring).

    Args:
        item_ids: The catalog, in the order of the returned rows.
        interactions: Contract ``interactions`` table, already validated (as ``conform`` or
            ``read_table(..., "interactions")`` return it): only the schema of the three columns
            read is checked here. Interactions with items outside ``item_ids`` are ignored
            (and counted).
        cfg: Block settings; ``until`` bounds the interactions used.

    Returns:
        The vectors (``cfg.dim`` wide; trailing columns are zero when the log has fewer
        independent directions than ``cfg.dim``) and the manifest's counts.

    Raises:
        ContractError: when ``user_id``, ``item_id`` or ``event_timestamp`` is missing, mistyped
            or not a UTC timestamp.
    """
    problems = check_columns(
        interactions.schema, "interactions", ["user_id", "item_id", "event_timestamp"]
    )
    if problems:
        raise ContractError("interactions", problems)
    total_rows = interactions.num_rows
    if cfg.until is not None:
        bound = pa.scalar(cfg.until, interactions.schema.field("event_timestamp").type)
        interactions = interactions.filter(pc.less(interactions.column("event_timestamp"), bound))
    used_rows = interactions.num_rows
    index = pa.array(item_ids, pa.string())
    positions = pc.index_in(interactions.column("item_id"), value_set=index)
    known = pc.is_valid(positions)
    interactions = interactions.filter(known).append_column(
        "item_index", positions.filter(known).cast(pa.int64())
    )
    # Time order within each user; the stable sort keeps the log's order for equal times.
    ordered = interactions.sort_by([("user_id", "ascending"), ("event_timestamp", "ascending")])
    items = ordered.column("item_index").to_numpy()
    user_codes = pc.dictionary_encode(ordered.column("user_id")).combine_chunks()
    users = user_codes.indices.to_numpy()

    n = len(item_ids)
    rows: list[npt.NDArray[np.int64]] = []
    cols: list[npt.NDArray[np.int64]] = []
    vals: list[npt.NDArray[np.float64]] = []
    for distance in range(1, cfg.window + 1):
        a, b = items[:-distance], items[distance:]
        keep = (users[:-distance] == users[distance:]) & (a != b)
        rows.append(a[keep])
        cols.append(b[keep])
        vals.append(np.full(int(keep.sum()), 1.0 / distance))
    row, col, val = np.concatenate(rows), np.concatenate(cols), np.concatenate(vals)
    # Symmetric: "b then a" counts like "a then b"; duplicates are summed by the conversion.
    counts = sp.coo_matrix(
        (np.concatenate([val, val]), (np.concatenate([row, col]), np.concatenate([col, row]))),
        shape=(n, n),
    ).tocsr()

    matrix = np.zeros((n, cfg.dim), dtype=np.float32)
    with_pairs = np.asarray(counts.getnnz(axis=1) > 0)
    rank = 0
    if counts.nnz:
        coo = counts.tocoo()
        total = float(coo.data.sum())
        marginal = np.asarray(counts.sum(axis=1)).ravel()
        pmi = np.log(coo.data * total / (marginal[coo.row] * marginal[coo.col]))
        positive = pmi > 0
        ppmi = sp.csr_matrix((pmi[positive], (coo.row[positive], coo.col[positive])), shape=(n, n))
        values, vectors = _top_eigen(ppmi, with_pairs, cfg.dim)
        keep = values > _EIGEN_FLOOR * max(float(values.max(initial=0.0)), 1.0)
        rank = int(keep.sum())
        matrix[:, :rank] = (vectors[:, keep] * np.sqrt(values[keep])).astype(np.float32)
    without = int((np.abs(matrix).sum(axis=1) == 0).sum())
    metrics: dict[str, Any] = {
        "until": cfg.until.isoformat() if cfg.until is not None else None,
        "interactions_total": total_rows,
        "interactions_before_until": used_rows,
        "interactions_unknown_item": used_rows - interactions.num_rows,
        "users": len(user_codes.dictionary),
        "co_occurring_pairs": int(counts.nnz // 2),
        "rank": rank,
        "items_without_vector": without,
    }
    return CollaborativeVectors(matrix=matrix, metrics=metrics)


def _top_eigen(
    ppmi: sp.csr_matrix, rows: npt.NDArray[np.bool_], k: int
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """The ``k`` largest eigenvalues of the symmetric ``ppmi``, largest first, and eigenvectors.

    Computed on the rows that have any pair; the vectors are ``(n, k')`` columns, zero elsewhere.
    """
    keep = np.flatnonzero(rows)
    sub = ppmi[keep][:, keep]
    m = len(keep)
    if m == 0 or sub.nnz == 0:
        return np.zeros(0), np.zeros((ppmi.shape[0], 0))
    if k >= m - 1:
        # ARPACK needs k < m - 1; a matrix this small is cheap to decompose whole.
        values, vectors = np.linalg.eigh(sub.toarray())
    else:
        start = np.random.default_rng(0).uniform(0.5, 1.0, m)  # seeded: same input, same vectors
        values, vectors = eigsh(sub.astype(np.float64), k=k, which="LA", v0=start)
    order = np.argsort(values)[::-1][:k]
    full = np.zeros((ppmi.shape[0], len(order)))
    full[keep] = vectors[:, order]
    return values[order], full
