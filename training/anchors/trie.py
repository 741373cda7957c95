"""The trie of valid SIDs, stored as dense per-level tables so one decoding step is one gather.

Every distinct code prefix of length ``l`` (over the catalog's items) gets a *prefix id* at level
``l``; level 0 has a single prefix, the empty one (id 0). For each level::

    child[l][prefix_id, code] = id of prefix + (code,) at level l + 1, or -1 when no item has it
    allowed[l][prefix_id, code] = child[l][prefix_id, code] >= 0

At the last level the child id is the item's row in the catalog, so a full path of ``n_levels``
codes always ends at a real item. The tables are dense ``[n_prefixes_l, size_l]``; the number of
prefixes at a level is bounded by the item count, so memory is ``O(n_items * max size)`` per
level (int32: for 1M items and 256-code levels at most 1 GB for the widest table, far less for
typical codebooks, whose items share prefixes).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import torch

from training.anchors.catalog import ItemSemanticsError


class SidTrie:
    """Valid SID code tuples of a catalog as per-level ``child`` / ``allowed`` tables.

    Args:
        codes: The items' SID codes, shape ``[n_items, n_levels]``; row ``i`` is item ``i``.
        codebook_sizes: Codes per level (table widths).

    Raises:
        ValueError: when two items share a full code tuple (the disambiguation level must make
            every tuple unique) or a code is outside its level's size.
    """

    def __init__(self, codes: npt.NDArray[np.int64], codebook_sizes: Sequence[int]) -> None:
        codes = np.asarray(codes, dtype=np.int64)
        if codes.ndim != 2 or codes.shape[1] != len(codebook_sizes):
            raise ItemSemanticsError(
                f"codes have shape {codes.shape}, expected [n_items, {len(codebook_sizes)}]"
            )
        sizes = np.asarray(codebook_sizes, dtype=np.int64)
        if codes.size and ((codes < 0).any() or (codes >= sizes[None, :]).any()):
            raise ItemSemanticsError("SID codes outside the codebook sizes")
        self.codebook_sizes = tuple(int(s) for s in codebook_sizes)
        self.codes = codes
        n_items, n_levels = codes.shape
        children: list[npt.NDArray[np.int32]] = []
        # Each item's prefix id at depths 1 .. n_levels - 1 (depth 0 is the empty prefix, 0).
        self._item_prefix: list[npt.NDArray[np.int64]] = []
        prefix = np.zeros(n_items, dtype=np.int64)  # every item's prefix id at the current level
        n_prefix = 1
        for lvl in range(n_levels):
            key = prefix * sizes[lvl] + codes[:, lvl]
            # int32 halves the tables' memory; item and prefix counts stay far below 2**31.
            table = np.full((n_prefix, int(sizes[lvl])), -1, dtype=np.int32)
            if lvl == n_levels - 1:
                unique, counts = np.unique(key, return_counts=True)
                if (counts > 1).any():
                    dup = int(np.flatnonzero(key == unique[counts > 1][0])[0])
                    raise ItemSemanticsError(
                        f"{int((counts > 1).sum())} SID code tuples are shared by several items, "
                        f"e.g. {codes[dup].tolist()}: the last level must disambiguate them"
                    )
                table[prefix, codes[:, lvl]] = np.arange(n_items)
            else:
                unique, inverse = np.unique(key, return_inverse=True)
                table[unique // sizes[lvl], unique % sizes[lvl]] = np.arange(len(unique))
                prefix = inverse.reshape(-1)
                n_prefix = len(unique)
                self._item_prefix.append(prefix)
            children.append(table)
        self._child_np = children
        # Prefixes at depths 1 .. n_levels - 1: the child tables' row counts.
        self._n_prefixes = [int(t.shape[0]) for t in children[1:]]
        self._item_by_codes = {tuple(row): i for i, row in enumerate(codes.tolist())}
        self._device_tables: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        self._device_prefixes: dict[str, list[torch.Tensor]] = {}
        self._items_under: dict[int, npt.NDArray[np.int64]] = {}

    @property
    def n_levels(self) -> int:
        """Codes per SID."""
        return len(self.codebook_sizes)

    @property
    def n_items(self) -> int:
        """Items (full paths) in the trie."""
        return int(self.codes.shape[0])

    def tables(self, device: torch.device) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-level ``child`` (int32) and ``allowed`` (bool) tables on ``device``, cached."""
        key = str(device)
        if key not in self._device_tables:
            child = [torch.from_numpy(t).to(device) for t in self._child_np]
            self._device_tables[key] = (child, [t >= 0 for t in child])
        return self._device_tables[key]

    def child_masses(self, item_mass: torch.Tensor) -> list[torch.Tensor]:
        """Per level ``l``, the mass under each prefix of depth ``l + 1``, summed over its items.

        Args:
            item_mass: ``[rows, n_items]`` non-negative mass per item (e.g. a prior).

        Returns:
            ``n_levels`` tensors ``[rows, n_prefixes at depth l + 1]``; the last is ``item_mass``
            itself (depth ``n_levels`` prefixes are items). ``child[l][p, c]`` indexes the
            ``l``-th tensor's columns: the mass the code ``c`` after prefix ``p`` leads to.
        """
        out: list[torch.Tensor] = []
        # Depth l + 1 prefix ids are item_prefixes' level l + 1 (cached on the device: this runs
        # once per decoding or training batch).
        for nodes in self.item_prefixes(item_mass.device)[1:]:
            index = nodes.expand(item_mass.shape[0], -1)
            width = self.n_children(len(out))
            mass = item_mass.new_zeros((item_mass.shape[0], width))
            out.append(mass.scatter_add_(1, index, item_mass))
        out.append(item_mass)
        return out

    def item_prefixes(self, device: torch.device) -> list[torch.Tensor]:
        """Per level ``l``, each item's prefix id at depth ``l`` (its first ``l`` codes).

        Level 0 is the empty prefix (0 for every item); ``child[l][item_prefixes[l][i]]`` is the
        row of codes the trie allows where item ``i``'s code of level ``l`` is chosen.
        """
        key = f"prefixes:{device}"
        if key not in self._device_prefixes:
            depth0 = np.zeros(self.n_items, dtype=np.int64)
            self._device_prefixes[key] = [
                torch.from_numpy(p).to(device) for p in [depth0, *self._item_prefix]
            ]
        return self._device_prefixes[key]

    def item_children(self, level: int) -> npt.NDArray[np.int64]:
        """Each item's child prefix id at ``level``: ``child[level]``'s ids (items at the last)."""
        if level == self.n_levels - 1:
            return np.arange(self.n_items, dtype=np.int64)
        return self._item_prefix[level]

    def items_under(self, level: int) -> npt.NDArray[np.int64]:
        """How many items lie under each child prefix of ``level`` (cached)."""
        if level not in self._items_under:
            self._items_under[level] = np.bincount(
                self.item_children(level), minlength=self.n_children(level)
            )
        return self._items_under[level]

    def n_children(self, level: int) -> int:
        """Prefixes of depth ``level + 1`` (items at the last level): ``child[level]``'s ids."""
        return self.n_items if level == self.n_levels - 1 else self._n_prefixes[level]

    def allowed_codes(self, prefix_codes: Sequence[int]) -> list[int]:
        """The codes that can follow ``prefix_codes`` (walks the tables; for the reference path)."""
        node = 0
        for lvl, code in enumerate(prefix_codes):
            node = int(self._child_np[lvl][node, code])
            if node < 0:
                return []
        return np.flatnonzero(self._child_np[len(prefix_codes)][node] >= 0).tolist()

    def item_of(self, codes: Sequence[int]) -> int:
        """The item row of a full code tuple, or -1 when no item has it."""
        return self._item_by_codes.get(tuple(int(c) for c in codes), -1)
