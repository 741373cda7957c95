"""Semantic IDs as codes and tokens: collision metrics, disambiguation and the token string.

A quantizer maps an item to ``L`` codes (its *prefix*). Items with near-identical content get the
same nearest codes (product variants such as "50 ml" and "250 ml" beakers sit at cosine 0.99), so
collisions are resolved in two steps:

1. :func:`unique_last_level`: items that share their first ``L - 1`` codes are matched to
   distinct last-level codes by least total squared distance (as LC-Rec's uniform semantic
   mapping does for the last level), so near-duplicates differ at level ``L``;
2. :func:`disambiguate`: like TIGER (Rajput et al., 2023) and GRID, an extra last level makes
   every SID unique whatever is left: its code is the item's index among the items sharing the
   prefix, ordered by ``item_id`` (Unicode code point order) so the result does not depend on row
   order. After step 1 it is non-zero only when a prefix group has more items than there are
   last-level codes (or, for new items, free ones).

Tokens are written ``<a_12><b_7><c_201><d_0>``: one letter per level, ``a`` first.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt
from scipy.optimize import linear_sum_assignment

LEVEL_LETTERS = string.ascii_lowercase
"""Level ``l`` of a SID is written with letter ``LEVEL_LETTERS[l]``."""

MAX_LEVELS = len(LEVEL_LETTERS)
"""Most levels a SID can have, the disambiguation level included (one letter each)."""

_TOKEN = re.compile(r"<([a-z])_(\d+)>")


def format_sid(codes: Sequence[int] | npt.NDArray[np.integer]) -> str:
    """The token string of one SID, e.g. ``[12, 7, 201, 0]`` -> ``<a_12><b_7><c_201><d_0>``.

    Raises:
        ValueError: for more than :data:`MAX_LEVELS` codes or a negative code.
    """
    if len(codes) > MAX_LEVELS:
        raise ValueError(f"a SID has at most {MAX_LEVELS} levels, got {len(codes)}")
    parts = []
    for level, code in enumerate(codes):
        if int(code) < 0:
            raise ValueError(f"SID codes are non-negative, got {int(code)} at level {level}")
        parts.append(f"<{LEVEL_LETTERS[level]}_{int(code)}>")
    return "".join(parts)


def format_sids(codes: npt.NDArray[np.integer]) -> list[str]:
    """Token strings of a ``(N, levels)`` code matrix, one per row."""
    return [format_sid(row) for row in codes.tolist()]


def parse_sid(sid: str) -> list[int]:
    """The codes of a token string written by :func:`format_sid`.

    Raises:
        ValueError: when ``sid`` is not a sequence of ``<letter_code>`` tokens with letters
            ``a, b, c, ...`` in order.
    """
    tokens = _TOKEN.findall(sid)
    if "".join(f"<{letter}_{code}>" for letter, code in tokens) != sid or not tokens:
        raise ValueError(f"not a semantic ID token string: {sid!r}")
    letters = "".join(letter for letter, _ in tokens)
    if letters != LEVEL_LETTERS[: len(tokens)]:
        raise ValueError(f"SID levels must be lettered a, b, c, ... in order: {sid!r}")
    return [int(code) for _, code in tokens]


def collision_rate(prefix_codes: npt.NDArray[np.integer]) -> float:
    """Share of items whose prefix is not unique, counted as ``1 - unique prefixes / items``.

    This is the share of items that need a non-zero disambiguation code: a group of ``m`` items
    sharing a prefix adds ``m - 1``.
    """
    if len(prefix_codes) == 0:
        return 0.0
    unique = np.unique(prefix_codes, axis=0).shape[0]
    return 1.0 - unique / len(prefix_codes)


def shared_prefix_rate(prefix_codes: npt.NDArray[np.integer]) -> float:
    """Share of items whose prefix is also the prefix of at least one other item.

    Stricter than :func:`collision_rate`: a group of ``m > 1`` items sharing a prefix adds ``m``.
    """
    if len(prefix_codes) == 0:
        return 0.0
    _, inverse, counts = np.unique(prefix_codes, axis=0, return_inverse=True, return_counts=True)
    return float(np.mean(counts[inverse.ravel()] > 1))


def taken_last_codes(sid_codes: npt.NDArray[np.integer]) -> dict[tuple[int, ...], set[int]]:
    """The last-level codes in use per group of SIDs sharing their first ``L - 1`` codes.

    Computed from the full SIDs ``(N, L + 1)`` already assigned: the codes
    :func:`unique_last_level` must not give to new items.
    """
    taken: dict[tuple[int, ...], set[int]] = {}
    for row in sid_codes.tolist():
        taken.setdefault(tuple(row[:-2]), set()).add(row[-2])
    return taken


def unique_last_level(
    codes: npt.NDArray[np.integer],
    last_residual: npt.NDArray[np.floating],
    last_codebook: npt.NDArray[np.floating],
    item_ids: Sequence[str],
    taken: Mapping[tuple[int, ...], set[int]] | None = None,
) -> npt.NDArray[np.int32]:
    """Give items that share their first ``L - 1`` codes distinct last-level codes.

    Within every group of items sharing the first ``L - 1`` codes where two items have the same
    nearest last-level code (or an item's nearest code is in ``taken``), the group's items are
    matched one-to-one to the group's free last-level codes by least total squared distance
    between each item's last-level residual and the codewords (Hungarian algorithm). Groups
    without a conflict keep their nearest codes, which are then already the optimal matching.
    Members are ordered by ``item_id``, so the result does not depend on row order. Items left
    over when a group has more items than free codes keep their nearest code (the
    disambiguation level then separates them).

    Args:
        codes: ``(N, L)`` nearest codes, ``L >= 2``.
        last_residual: ``(N, d)`` what the first ``L - 1`` levels left of each item's latent.
        last_codebook: ``(K, d)`` the last level's codewords.
        item_ids: The ``N`` item ids, unique.
        taken: For groups that already hold SIDs (new-item assignment), the last-level codes in
            use (:func:`taken_last_codes`).

    Returns:
        ``(N, L)`` int32 codes: the first ``L - 1`` unchanged, the last unique within each group
        wherever the free codes suffice.
    """
    n, levels = codes.shape
    if levels < 2:
        raise ValueError("unique_last_level needs at least two levels")
    if len(item_ids) != n or last_residual.shape[0] != n:
        raise ValueError(
            f"{n} code rows, {len(item_ids)} item ids, {last_residual.shape[0]} residuals"
        )
    result = np.asarray(codes, dtype=np.int32).copy()
    if n == 0:
        return result
    taken = taken or {}
    k = last_codebook.shape[0]
    book = np.asarray(last_codebook, dtype=np.float64)
    book_sq = (book**2).sum(1)
    _, id_rank = np.unique(np.asarray(item_ids, dtype=object).astype(str), return_inverse=True)
    _, full_inv, full_counts = np.unique(result, axis=0, return_inverse=True, return_counts=True)
    conflict = full_counts[full_inv.ravel()] > 1
    if taken:
        conflict |= np.array(
            [row[-1] in taken.get(tuple(row[:-1]), ()) for row in result.tolist()], dtype=bool
        )
    if not conflict.any():
        return result
    _, group = np.unique(result[:, :-1], axis=0, return_inverse=True)
    group = group.ravel()
    for g in np.unique(group[conflict]):
        members = np.flatnonzero(group == g)
        members = members[np.argsort(id_rank[members], kind="stable")]
        used = taken.get(tuple(int(c) for c in result[members[0], :-1]), set())
        free = np.array([c for c in range(k) if c not in used], dtype=np.int64)
        if free.size == 0:
            continue
        r = np.asarray(last_residual[members], dtype=np.float64)
        cost = (r**2).sum(1, keepdims=True) - 2.0 * r @ book[free].T + book_sq[free]
        rows, cols = linear_sum_assignment(cost)
        result[members[rows], -1] = free[cols]
    return result


def disambiguate(
    prefix_codes: npt.NDArray[np.integer],
    item_ids: Sequence[str],
    next_free: Mapping[tuple[int, ...], int] | None = None,
) -> npt.NDArray[np.int32]:
    """The disambiguation code of every item: its index among the items sharing its prefix.

    Within a prefix group, items are numbered in ``item_id`` order starting at
    ``next_free[prefix]`` (0 when the prefix is new), so items that already hold SIDs can pass
    their groups' next free indices and new items never take an index in use.

    Args:
        prefix_codes: ``(N, L)`` codes from the quantizer.
        item_ids: The ``N`` item ids, unique.
        next_free: For prefixes already in use, the first index not yet taken.

    Returns:
        An ``(N,)`` int32 array aligned with ``item_ids``.
    """
    n = len(item_ids)
    if prefix_codes.shape[0] != n:
        raise ValueError(f"{prefix_codes.shape[0]} code rows for {n} item ids")
    result = np.zeros(n, dtype=np.int32)
    if n == 0:
        return result
    # Rank of each id in code point order, then sort rows by (prefix, id rank).
    _, id_rank = np.unique(np.asarray(item_ids, dtype=object).astype(str), return_inverse=True)
    keys = [
        id_rank,
        *(prefix_codes[:, level] for level in range(prefix_codes.shape[1] - 1, -1, -1)),
    ]
    order = np.lexsort(keys)
    sorted_codes = prefix_codes[order]
    starts = np.ones(n, dtype=bool)
    starts[1:] = np.any(sorted_codes[1:] != sorted_codes[:-1], axis=1)
    group_start = np.maximum.accumulate(np.where(starts, np.arange(n), 0))
    index = np.arange(n) - group_start
    if next_free:
        offsets = np.zeros(n, dtype=np.int64)
        for pos in np.flatnonzero(starts):
            offsets[pos] = next_free.get(tuple(int(c) for c in sorted_codes[pos]), 0)
        index = index + offsets[group_start]
    result[order] = index
    return result


def next_free_indices(sid_codes: npt.NDArray[np.integer]) -> dict[tuple[int, ...], int]:
    """For the full SIDs ``(N, L + 1)`` already assigned, each prefix's first unused index."""
    free: dict[tuple[int, ...], int] = {}
    for row in sid_codes.tolist():
        prefix = tuple(row[:-1])
        free[prefix] = max(free.get(prefix, 0), row[-1] + 1)
    return free
