"""Semantic IDs as codes and tokens: collision metrics, disambiguation and the token string.

A quantizer maps an item to ``L`` codes (its *prefix*). Items with near-identical content can get
the same prefix; like TIGER (Rajput et al., 2023) and GRID, an extra last level makes every SID
unique: its code is the item's index among the items sharing the prefix, ordered by ``item_id``
(Unicode code point order) so the result does not depend on row order. Tokens are written
``<a_12><b_7><c_201><d_0>``: one letter per level, ``a`` first.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt

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
