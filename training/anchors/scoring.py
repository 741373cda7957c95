"""The anchor LM's log-probability of given items, teacher-forced: relevance without a beam.

The beam search (:mod:`training.anchors.generate`) keeps the few items the LM likes best for a
history; this module asks the same LM about items chosen by someone else (a request's
candidates): ``log p(SID of item | history)``, the sum over SID levels of the trie-normalized
log-softmax of the item's code given the history and the item's earlier codes. That is the
score the beam search gives an item it reaches, so an item scored here and decoded there gets
the same log-probability (tested against a beam as wide as the catalog).

Cost: one prefill per history, then ``n_levels - 1`` teacher-forced tokens per candidate,
attending to a copy of its history's cache; the level-0 distribution is shared by all of a
history's candidates. So scoring ``K`` candidates costs ``K x (n_levels - 1)`` decoded tokens,
independent of the catalog's size (a catalog-wide beam costs ``n_items x n_levels``). An
ensemble costs that once per member: each keeps its own cache, and their next-code
distributions are combined at every level, as the beam search combines them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
from torch import nn
from transformers import DynamicCache, PreTrainedModel

from training.anchors.generate import (
    EnsembleCombine,
    _as_members,
    _cache_rows,
    _left_pad,
    _LevelHead,
    combine_log_probs,
)
from training.anchors.trie import SidTrie
from training.anchors.vocab import SidVocab

DEFAULT_ROWS_PER_STEP = 2048
"""Candidates decoded at once: each holds a copy of its history's KV cache."""


@dataclass
class _Scorer:
    """One ensemble member's decoder, level heads and history cache while scoring."""

    decoder: nn.Module
    head: _LevelHead
    cache: DynamicCache
    model: PreTrainedModel


@torch.no_grad()
def score_items(
    model: PreTrainedModel | Sequence[PreTrainedModel],
    vocab: SidVocab,
    trie: SidTrie,
    prompts: Sequence[Sequence[int]],
    items: Sequence[npt.NDArray[np.int64]],
    rows_per_step: int = DEFAULT_ROWS_PER_STEP,
    combine: EnsembleCombine = "arithmetic",
) -> list[npt.NDArray[np.float32]]:
    """``log p(item | prompt)`` of each prompt's items under the trie-constrained LM.

    Args:
        model: A Hugging Face causal LM over the SID vocabulary, in eval mode; or an ensemble's
            members sharing one vocabulary, whose next-code distributions are combined at every
            level by ``combine``, as the beam search combines them.
        vocab: The SID vocabulary of ``model``.
        trie: The catalog's valid SIDs (normalizes each level over the codes it allows).
        prompts: Token ids per history (:meth:`SidVocab.encode`).
        items: Per prompt, catalog rows of the items to score (any order, repeats allowed).
        rows_per_step: Most candidates decoded in one forward pass (memory: each holds a copy
            of its history's cache, per member).
        combine: How an ensemble's distributions are combined
            (:func:`training.anchors.generate.combine_log_probs`); unused with one model.

    Returns:
        Per prompt, the log-probabilities of its items, in the order given (float32, <= 0).
    """
    if len(prompts) != len(items):
        raise ValueError(f"{len(prompts)} prompts but {len(items)} item lists")
    if not prompts:
        return []
    lengths = [len(rows) for rows in items]
    owner = np.repeat(np.arange(len(items)), lengths)
    flat = np.concatenate([np.asarray(rows, dtype=np.int64) for rows in items])
    # Checked before any decoding: a bad row would otherwise fail only after the prefill.
    if len(flat) and (flat.min() < 0 or flat.max() >= trie.n_items):
        raise ValueError(f"item rows outside the catalog's {trie.n_items} items")
    models = _as_members(model)
    device = next(models[0].parameters()).device
    members = [
        _Scorer(m.get_decoder(), _LevelHead(m, vocab, device), DynamicCache(config=m.config), m)
        for m in models
    ]
    _, allowed = trie.tables(device)
    prefixes = trie.item_prefixes(device)
    level_ids = members[0].head.level_ids
    n_levels = trie.n_levels
    codes = torch.from_numpy(np.asarray(trie.codes, dtype=np.int64)).to(device)

    ids, mask = _left_pad(prompts, vocab.pad_id, device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)

    def level_log_probs(hidden: list[torch.Tensor], level: int, node: torch.Tensor) -> torch.Tensor:
        """The members' combined next-code log-probabilities over the codes ``node`` allows."""
        forbidden = ~allowed[level][node]
        return combine_log_probs(
            [
                torch.log_softmax(m.head(h, level).masked_fill(forbidden, -torch.inf), -1)
                for m, h in zip(members, hidden, strict=True)
            ],
            combine,
        )

    last = [
        m.decoder(
            input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=m.cache
        ).last_hidden_state[:, -1]
        for m in members
    ]
    # Level 0 is one distribution per prompt, shared by all its candidates.
    first = level_log_probs(last, 0, torch.zeros(len(prompts), dtype=torch.long, device=device))
    next_pos = positions[:, -1] + 1

    scores = np.zeros(len(flat), dtype=np.float32)
    for start in range(0, len(flat), rows_per_step):
        user = torch.from_numpy(owner[start : start + rows_per_step]).to(device)
        item = torch.from_numpy(flat[start : start + rows_per_step]).to(device)
        item_codes = codes[item]  # [R, L]
        total = first[user, item_codes[:, 0]]
        if n_levels > 1:
            # The item's first L - 1 code tokens, teacher-forced after its history's cache.
            tokens = torch.stack(
                [level_ids[lvl][item_codes[:, lvl]] for lvl in range(n_levels - 1)], 1
            )
            step_mask = torch.cat([mask[user], mask.new_ones((len(user), n_levels - 1))], 1)
            step_pos = next_pos[user].unsqueeze(1) + torch.arange(n_levels - 1, device=device)
            states = [
                m.decoder(
                    input_ids=tokens,
                    attention_mask=step_mask,
                    position_ids=step_pos,
                    past_key_values=_cache_rows(m.cache, user, m.model),
                ).last_hidden_state  # [R, L - 1, hidden]
                for m in members
            ]
            for lvl in range(1, n_levels):
                picked = level_log_probs(
                    [h[:, lvl - 1] for h in states], lvl, prefixes[lvl][item]
                ).gather(1, item_codes[:, lvl : lvl + 1])
                total = total + picked.squeeze(1)
        scores[start : start + len(item)] = total.float().cpu().numpy()
    return np.split(scores, np.cumsum(lengths)[:-1])
