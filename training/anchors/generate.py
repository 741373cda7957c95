"""Trie-constrained beam search over SIDs: a Hugging Face reference and a fast batched path.

Why constrained: an unconstrained decoder can emit code tuples that no item has (or stop midway);
restricting every step to the children of the current prefix in the trie of real SIDs makes each
of the ``n_levels``-token outputs a real item, so anchors always map to an item and its content
embedding.

Scores. Each step's log-probabilities are normalized over the tokens the trie allows after the
beam's prefix, so an anchor's score, the sum of its ``n_levels`` token log-probs, is
``log P(item | history)`` under the model restricted to real items (these sum to 1 over the
catalog). Both implementations compute exactly this; they return the same anchors.

* :func:`beam_search_reference`: ``model.generate(num_beams=B, num_return_sequences=N,
  prefix_allowed_tokens_fn=..., max_new_tokens=n_levels, renormalize_logits=True,
  length_penalty=0)``; ``renormalize_logits`` re-applies log-softmax after the trie mask.
* :func:`beam_search_fast`: one prefill over the left-padded histories (not B copies of each, as
  ``generate`` does); then each level feeds a user's B beams as one block of B tokens that
  attend, through a tree attention mask, to the one copy of the user's history in the KV cache
  and to their own ancestors' tokens (:class:`_SharedHistory`): the cache is never copied B-fold
  nor reordered by beam. The trie mask of all beams is gathered in one indexing op from the
  dense per-level tables (:class:`~training.anchors.trie.SidTrie`), and the LM head is applied
  only to the current level's SID rows (``[beams, size_l]`` logits instead of ``[beams,
  vocab]``: for Qwen2.5's 151k vocabulary that is most of the decode FLOPs saved). Attention
  implementations that take no custom mask (flash attention) get the earlier search: the cache
  expanded B-fold after the prefill and reordered by beam index each step.

Ensembles. :func:`beam_search_fast` also takes several models trained on the same SIDs: each keeps
its own KV cache and the members' per-step distributions are combined (:func:`combine_log_probs`)
before the top-B selection, so the scores stay log-probabilities over real items.

Collaborative prior. Both implementations also take a per-user prior over the catalog
(:mod:`training.anchors.prior`) and a weight ``w``: every step's distribution becomes
``log_softmax(log p(c | prefix) + w * log M(prefix + c))``, ``M`` the prior's mass under a prefix
(shallow fusion). ``w = 0`` or no prior is the LM alone, bit for bit.

:func:`search_in_batches` runs either over many users, sorting them by history length to cut
padding, and halves the batch on CUDA out-of-memory errors.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Annotated, Any, Literal, Protocol, cast

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp
import torch
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)
from torch import nn
from transformers import DynamicCache, LogitsProcessor, PreTrainedModel

from training.anchors.errors import AnchorInputError
from training.anchors.model import causal_lm
from training.anchors.prior import SparsePriorRows
from training.anchors.sequences import CutoffGranularity
from training.anchors.trie import SidTrie
from training.anchors.vocab import SidVocab

logger = logging.getLogger(__name__)

INVALID_SCORE = -1e8
"""Scores at or below this mark padding beams (not enough valid items), never real anchors."""


CPU_BATCH_SIZE = 64
"""Default users per generation batch on a CPU (``GenerateConfig.batch_size_on``)."""
CUDA_BATCH_SIZE = 512
"""Default users per generation batch on a CUDA GPU (``GenerateConfig.batch_size_on``)."""

EnsembleCombine = Literal["geometric", "arithmetic"]
"""How an ensemble's members' next-code distributions become one (see :func:`combine_log_probs`)."""


class GenerateConfig(BaseModel):
    """How anchors are decoded."""

    model_config = ConfigDict(extra="forbid")

    beam_width: int = Field(default=20, ge=1, description="Beams kept per user at every level.")
    num_anchors: int = Field(
        default=10, ge=1, description="Anchors returned per user (the best-scoring final beams)."
    )
    batch_size: int | None = Field(
        default=None,
        ge=1,
        description="Users per batch; null: 64 on a CPU, 512 on CUDA (each measured the fastest "
        "there, docs/anchors.md). Halved automatically on a CUDA out-of-memory error.",
    )
    chunk_sets: int = Field(
        default=8_192,
        ge=1,
        description="Anchor sets decoded and written to the output file at a time: the job's "
        "memory grows with this, not with the number of sets (about 35 KB a set with 384-d "
        "embeddings: all at once, a million sets needed ~35 GB). Several batches each.",
    )
    incremental: bool = Field(
        default=False,
        description="Keep the rows of the earlier output whose set (user, cutoff and history) "
        "is requested again, when the model, catalog and these settings are unchanged (the "
        "manifest's generation_key); decode only the rest. The file equals a full run's up to "
        "row order (docs/anchors.md).",
    )
    implementation: Literal["fast", "reference"] = Field(
        default="fast",
        description="'fast' (batched, KV-cache reuse, dense trie masks) or 'reference' "
        "(Hugging Face generate with prefix_allowed_tokens_fn); both return the same anchors.",
    )
    cutoffs: CutoffGranularity = Field(
        default="request",
        description="Anchor-set versions `gpl anchors generate` makes from the request log. "
        "'request': one per user and own request time whose history changed, from every "
        "positive strictly before it (exact point in time). 'day': every day with requests is "
        "a version for every user, from positives before that day's UTC midnight; history from "
        "earlier the same day is not seen (on MovieLens-100k, where users rate in one sitting, "
        "79% of the later unexposed candidates then got no anchors).",
    )
    ensemble_combine: EnsembleCombine = Field(
        default="arithmetic",
        description="With several anchor models (an ensemble), how their next-code "
        "distributions are combined at each step: 'arithmetic' (their mean, a mixture: a code "
        "likely under any member is kept) or 'geometric' (renormalized geometric mean: a code "
        "must be likely under every member). On Amazon Scientific the two are within 0.002 "
        "HR@10 of each other, 'arithmetic' ahead with 3-4 members.",
    )
    exclude_history: bool = Field(
        default=False,
        description="Never make an item of the user's own history one of its anchors (the "
        "history the LM reads: the last sequences.max_history positives before the cutoff): "
        "its path is pruned from the trie for that user (with every prefix left "
        "without items), so each level renormalizes over what is left. "
        "Anchors then describe what the user may like beyond what it has; without it 7-12% of "
        "a top 10 repeats history items (Amazon Scientific, where 0.6% of next items are "
        "repeats). Off by default, as the pseudo-label figures were measured without it.",
    )
    device: DeviceName = "auto"
    devices: list[str] | Literal["all"] | None = Field(
        default=None,
        description="Decode on several GPUs at once: one worker process per entry, each "
        "loading the model (17-20 s on an H200 host) and taking the next few batches of users "
        "as it frees up; the anchors are those of one device. E.g. [cuda:0, cuda:1], or 'all' "
        "for every visible GPU. One entry per GPU: two workers sharing a GPU took 1.4-1.6x the "
        "time of one, and [cpu, cpu] (each with half the threads) twice that of one process on "
        "a 2-core machine. Unset: `device`, in this process.",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="Model dtype; 'auto' = bfloat16 on CUDA, float32 on CPU."
    )

    @field_validator("devices")
    @classmethod
    def _devices_named(cls, value: list[str] | str | None) -> list[str] | str | None:
        if isinstance(value, list):
            if not value:
                raise ValueError("devices: give at least one device, or leave it unset")
            for name in value:
                if name == "auto":
                    raise ValueError("devices: name each device ('cuda:0', 'cpu'), not 'auto'")
                _check_device(name)
        return value

    def worker_devices(self) -> list[torch.device] | None:
        """The devices of ``devices`` (``all``: every visible GPU); None when unset.

        Raises:
            AnchorInputError: for ``all`` without a visible GPU, or a GPU index not visible.
        """
        if self.devices is None:
            return None
        if self.devices == "all":
            count = torch.cuda.device_count()
            if count == 0:
                raise AnchorInputError(
                    "generation.devices 'all': no CUDA device is visible here; name the "
                    "devices (e.g. [cpu, cpu]) or leave devices unset"
                )
            return [torch.device("cuda", k) for k in range(count)]
        out = [torch.device(name) for name in self.devices]
        for d in out:
            if d.type == "cuda" and (d.index or 0) >= torch.cuda.device_count():
                raise AnchorInputError(
                    f"generation.devices: {d} is not visible here "
                    f"({torch.cuda.device_count()} CUDA devices)"
                )
        return out

    def batch_size_on(self, device: torch.device) -> int:
        """Users per batch on ``device``: ``batch_size``, or the device's default when unset.

        On the dev box's CPU a MovieLens generation ran at 416 / 428-469 / 422 / 371 / 212-240
        users/s with batches of 32 / 64 / 128 / 256 / 512 (bigger batches leave the caches);
        on an H200 the Qwen2.5-0.5B-shaped model at 755 / 1,168-1,224 / 1,225-1,249 users/s
        with 64 / 256 / 512 (5.7 GB of GPU memory at 512, as the history is not copied per beam).
        """
        if self.batch_size is not None:
            return self.batch_size
        return CUDA_BATCH_SIZE if device.type == "cuda" else CPU_BATCH_SIZE

    @model_validator(mode="after")
    def _anchors_fit_beams(self) -> GenerateConfig:
        if self.num_anchors > self.beam_width:
            raise ValueError("num_anchors must be <= beam_width (anchors are the final beams)")
        return self


def _check_device(name: str) -> str:
    if name != "auto":
        try:
            torch.device(name)
        except RuntimeError:
            raise ValueError(
                f"device {name!r}: expected 'auto' or a torch device such as 'cpu', 'cuda' or "
                "'cuda:1'"
            ) from None
    return name


DeviceName = Annotated[
    str,
    AfterValidator(_check_device),
    Field(description="'auto' (cuda when available), 'cpu', 'cuda' or 'cuda:N'."),
]
"""A torch device name or ``auto``, checked when the configuration is loaded."""


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available else cpu; anything else as given.

    Raises:
        AnchorInputError: for a CUDA device that is not visible here (one line from the CLI,
            rather than torch's assertion deep inside the first transfer).
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise AnchorInputError(
            f"device {name!r}: {torch.cuda.device_count()} CUDA devices are visible here; use "
            "'auto', 'cpu' or a visible 'cuda:N'"
        )
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` -> bfloat16 on CUDA, float32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


@dataclass
class BeamOutput:
    """Top anchors per prompt.

    Attributes:
        items: Catalog rows, shape ``[n_prompts, num_anchors]``; -1 where fewer valid items exist.
        log_probs: Sequence log-probabilities, same shape, descending per row; -inf where -1.
    """

    items: npt.NDArray[np.int64]
    log_probs: npt.NDArray[np.float32]

    @classmethod
    def concat(cls, parts: Sequence[BeamOutput]) -> BeamOutput:
        """Rows of ``parts`` stacked in order."""
        return cls(
            items=np.concatenate([p.items for p in parts]),
            log_probs=np.concatenate([p.log_probs for p in parts]),
        )


def _left_pad(
    prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad prompts (the last token of every row lines up for the next-token logits)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.as_tensor(list(prompt), dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    return ids.to(device), mask.to(device)


def _finish(scores: torch.Tensor, items: torch.Tensor, num_anchors: int) -> BeamOutput:
    """Keep the best ``num_anchors`` per row, best first, marking padding beams invalid."""
    scores, rank = scores.float().sort(dim=-1, descending=True, stable=True)
    scores = scores[:, :num_anchors]
    items = items.long().gather(1, rank)[:, :num_anchors]
    bad = (scores <= INVALID_SCORE) | (items < 0)
    scores = scores.masked_fill(bad, float("-inf"))
    items = items.masked_fill(bad, -1)
    return BeamOutput(items=items.cpu().numpy(), log_probs=scores.cpu().numpy().astype(np.float32))


class _LevelHead:
    """The LM head restricted to one SID level's token rows."""

    def __init__(self, model: PreTrainedModel, vocab: SidVocab, device: torch.device) -> None:
        head = model.get_output_embeddings()
        self.level_ids = [torch.as_tensor(ids, device=device) for ids in vocab.level_token_ids]
        self.head = head
        # A plain Linear head: slice its rows once. Anything else (a peft wrapper during training
        # evaluation): run it and pick the columns.
        self.rows: list[tuple[torch.Tensor, torch.Tensor | None]] | None = None
        if type(head) is nn.Linear:
            self.rows = [
                (head.weight[ids].detach(), None if head.bias is None else head.bias[ids].detach())
                for ids in self.level_ids
            ]

    def __call__(self, hidden: torch.Tensor, level: int) -> torch.Tensor:
        if self.rows is not None:
            weight, bias = self.rows[level]
            logits = torch.nn.functional.linear(hidden, weight, bias)
        else:
            assert self.head is not None
            logits = self.head(hidden)[:, self.level_ids[level]]
        return logits.float()


def _kv(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Per layer (keys, values), each (rows, kv heads, positions, head dim).

    None when the cache has another layout; the search then takes no shortcut.
    """
    out: list[tuple[torch.Tensor, torch.Tensor]] = []
    for layer in getattr(cache, "layers", None) or []:
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not (isinstance(keys, torch.Tensor) and isinstance(values, torch.Tensor)):
            return None
        if keys.dim() != 4 or values.dim() != 4:
            return None
        out.append((keys, values))
    return out or None


def _cache_rows(cache: DynamicCache, rows: torch.Tensor, model: PreTrainedModel) -> DynamicCache:
    """A new cache holding copies of ``rows`` of every layer's keys and values."""
    sub = DynamicCache(config=model.config)
    # No reference to the layers' tensors may outlive this call: a decoder step replaces them,
    # and a stale reference would keep a whole copy of the cache alive.
    for layer, (keys, values) in enumerate(_kv(cache) or []):
        sub.update(keys.index_select(0, rows), values.index_select(0, rows), layer)
    return sub


def _reorder_generated(cache: DynamicCache, order: torch.Tensor, prompt_len: int) -> None:
    """``cache.reorder_cache(order)``, moving only the generated positions.

    ``order`` only ever picks a parent among the same user's beams, whose first ``prompt_len``
    positions (the history) are identical copies; permuting them is a no-op, and skipping it
    saves copying the whole history cache once per level.
    """
    for keys, values in _kv(cache) or []:
        for tensor in (keys, values):
            tail = tensor[:, :, prompt_len:]
            tail.copy_(tail.index_select(0, order))


PriorRows = torch.Tensor | npt.NDArray[np.float32] | SparsePriorRows
"""A prior over the catalog per prompt, ``[n_prompts, n_items]``, positive, rows summing to 1:
dense, or sparse (:class:`training.anchors.prior.SparsePriorRows`, what generation uses)."""


class LevelLogMass(Protocol):
    """The log of a prior's mass under every child prefix of one SID level, per prompt."""

    n_users: int

    def at(self, users: torch.Tensor, kids: torch.Tensor) -> torch.Tensor:
        """``log M`` of child prefixes ``kids`` (ids >= 0) of prompts ``users`` (broadcast)."""
        ...


class DenseLogMass:
    """From a dense ``[users, n_children]`` table of masses."""

    def __init__(self, mass: torch.Tensor) -> None:
        # The prior is positive by construction (smoothed); the floor only guards rounding.
        self.table = mass.clamp_min(1e-30).log()
        self.n_users = int(mass.shape[0])

    def at(self, users: torch.Tensor, kids: torch.Tensor) -> torch.Tensor:
        """A gather from the table."""
        return self.table[users, kids]


class SparseLogMass:
    """From the background's mass per child prefix and each prompt's sorted sparse entries.

    ``M(u, c) = smooth[u] * background[c] + shares(u, c)``; the shares are found by a binary
    search of ``u * n_children + c`` among the prompt-and-prefix keys that hold any.
    """

    def __init__(
        self,
        background: torch.Tensor,
        smooth: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        n_children: int,
    ) -> None:
        self.background, self.smooth, self.keys, self.values = background, smooth, keys, values
        self.n_children = n_children
        self.n_users = int(smooth.shape[0])

    def at(self, users: torch.Tensor, kids: torch.Tensor) -> torch.Tensor:
        """The background's mass plus the entries found, logged."""
        mass = self.smooth[users] * self.background[kids]
        if len(self.keys):
            query = (users * self.n_children + kids).contiguous()
            at = torch.searchsorted(self.keys, query).clamp(max=len(self.keys) - 1)
            mass = mass + torch.where(self.keys[at] == query, self.values[at], 0.0)
        return mass.clamp_min(1e-30).log()


def prior_log_masses(trie: SidTrie, prior: PriorRows, device: torch.device) -> list[LevelLogMass]:
    """Per level, the log of the prior's mass under every prefix a code of that level leads to."""
    if isinstance(prior, SparsePriorRows):
        return _sparse_log_masses(trie, prior, device)
    mass = torch.as_tensor(prior, dtype=torch.float32, device=device)
    if mass.dim() != 2 or mass.shape[1] != trie.n_items:
        raise ValueError(
            f"prior has shape {tuple(mass.shape)}, expected [prompts, {trie.n_items} items]"
        )
    return [DenseLogMass(m) for m in trie.child_masses(mass)]


def _sparse_log_masses(
    trie: SidTrie, prior: SparsePriorRows, device: torch.device
) -> list[LevelLogMass]:
    n_users, n_items = prior.shape
    if n_items != trie.n_items:
        raise ValueError(f"prior has shape {prior.shape}, expected [prompts, {trie.n_items} items]")
    background = torch.as_tensor(prior.background, device=device).unsqueeze(0)
    smooth = torch.as_tensor(prior.smooth, device=device)
    shares = prior.shares
    users = torch.as_tensor(np.repeat(np.arange(n_users), np.diff(shares.indptr)), device=device)
    items = torch.as_tensor(shares.indices.astype(np.int64), device=device)
    values = torch.as_tensor(shares.data, dtype=torch.float32, device=device)
    prefixes = trie.item_prefixes(device)
    out: list[LevelLogMass] = []
    for level, bg in enumerate(trie.child_masses(background)):
        width = trie.n_children(level)
        kids = items if level == trie.n_levels - 1 else prefixes[level + 1][items]
        keys, where = torch.unique(users * width + kids, return_inverse=True)
        summed = values.new_zeros(len(keys)).scatter_add_(0, where, values)
        out.append(SparseLogMass(bg[0], smooth, keys, summed, width))
    return out


class ExcludedItems:
    """Items a prompt's anchors may not be (its user's own history), as a per-user trie pruning.

    An excluded item's path is cut from the trie for that prompt, and so is every prefix all of
    whose items are excluded: each level's distribution is renormalized over what is left, as
    the trie does for codes no item has, and no beam walks into a dead end (``generate()``'s
    ``prefix_allowed_tokens_fn`` does the same: :func:`beam_search_reference`). The pruned
    ``(prompt, child prefix)`` pairs are kept per level as sorted keys and looked up on the
    device.
    """

    def __init__(self, items: sp.csr_matrix, trie: SidTrie, device: torch.device) -> None:
        items = sp.csr_matrix(items)
        items.sum_duplicates()
        users = np.repeat(np.arange(items.shape[0], dtype=np.int64), np.diff(items.indptr))
        rows = items.indices.astype(np.int64)
        self.keys: list[torch.Tensor] = []
        self.widths: list[int] = []
        for level in range(trie.n_levels):
            width = trie.n_children(level)
            # A (prompt, child prefix) pair is cut when every item under the prefix is excluded.
            keys, count = np.unique(
                users * width + trie.item_children(level)[rows], return_counts=True
            )
            dead = keys[count >= trie.items_under(level)[keys % width]]
            self.keys.append(torch.as_tensor(dead, device=device))
            self.widths.append(width)

    def pruned(self, level: int, users: torch.Tensor, kids: torch.Tensor) -> torch.Tensor:
        """Whether child prefixes ``kids`` (``>= 0``) of ``level`` are cut for ``users``."""
        keys = self.keys[level]
        if not len(keys):
            return torch.zeros(
                torch.broadcast_shapes(users.shape, kids.shape),
                dtype=torch.bool,
                device=kids.device,
            )
        query = (users * self.widths[level] + kids).contiguous()
        at = torch.searchsorted(keys, query).clamp(max=len(keys) - 1)
        return keys[at] == query


def prior_without(prior: PriorRows, exclude: sp.csr_matrix) -> PriorRows:
    """``prior`` with no mass on each row's excluded items (not renormalized).

    With the user's own items pruned from the trie, their prior mass would still count in the
    masses of the prefixes above them: a history's items co-occur with each other, so those
    prefixes looked heavy and drew beams into subtrees whose best items were cut (on Amazon
    Scientific an untrained, uniform LM fused with the prior found HR@10 0.1372 with beam 20
    against the prior's own exact ranking, 0.1418; 0.1406 with the mass zeroed). Zeroed here,
    every prefix's mass is that of the items still allowed; the softmax over the allowed codes
    renormalizes.
    """
    ex = sp.csr_matrix(exclude, dtype=np.float64)
    ex.sum_duplicates()
    ex.data = np.ones_like(ex.data)
    if isinstance(prior, SparsePriorRows):
        owner = np.repeat(np.arange(ex.shape[0]), np.diff(ex.indptr))
        background = prior.background.astype(np.float64)
        smooth = prior.smooth.astype(np.float64)
        shares = prior.shares.astype(np.float64)
        cut = sp.csr_matrix(
            (smooth[owner] * background[ex.indices], ex.indices, ex.indptr), shape=ex.shape
        )
        cut = cut + shares.multiply(ex)
        entries = sp.csr_matrix(shares - cut)
        entries.sum_duplicates()
        return SparsePriorRows(
            shares=entries.astype(np.float32), smooth=prior.smooth, background=prior.background
        )
    keep = 1.0 - ex.toarray()
    if isinstance(prior, torch.Tensor):
        return prior * torch.as_tensor(keep, dtype=prior.dtype, device=prior.device)
    return (np.asarray(prior) * keep).astype(np.float32)


def history_items(histories: Sequence[npt.ArrayLike], n_items: int) -> sp.csr_matrix:
    """``[len(histories), n_items]`` indicator of each history's items (for ``exclude=``)."""
    lengths = [len(np.asarray(h)) for h in histories]
    cols = np.concatenate(
        [np.asarray(h, dtype=np.int64) for h in histories] or [np.zeros(0, np.int64)]
    )
    rows = np.repeat(np.arange(len(histories)), lengths)
    return sp.csr_matrix(
        (np.ones(len(cols), np.float32), (rows, cols)), shape=(len(histories), n_items)
    )


def _fuse(
    logp: torch.Tensor,
    kids: torch.Tensor,
    log_mass: LevelLogMass,
    user: torch.Tensor,
    weight: float,
) -> torch.Tensor:
    """``log_softmax(logp + weight * log M(child))`` over the allowed codes of each row.

    Args:
        logp: ``[rows, size_l]`` trie-normalized next-code log-probs (``-inf`` where forbidden).
        kids: ``[rows, size_l]`` child prefix ids (``-1`` where forbidden).
        log_mass: Log prior mass of this level's child prefixes, per user.
        user: ``[rows]`` the user (row of ``log_mass``) each row belongs to.
        weight: Fusion weight.
    """
    bonus = log_mass.at(user.unsqueeze(1), kids.clamp(min=0).long())
    # Forbidden codes stay -inf through logp; the bonus is zeroed there only to keep it finite.
    return torch.log_softmax(logp + weight * bonus.masked_fill(kids < 0, 0.0), dim=-1)


def combine_log_probs(log_probs: Sequence[torch.Tensor], how: EnsembleCombine) -> torch.Tensor:
    """One next-code distribution from each ensemble member's log-probabilities.

    Args:
        log_probs: Per member, log-probabilities over the same allowed codes (``-inf`` where the
            trie forbids a code), each row summing to 1.
        how: ``"geometric"``: the renormalized geometric mean, ``log_softmax(mean_m log p_m)``
            (a product of experts: a code must be likely under every member); ``"arithmetic"``:
            the mixture ``log(mean_m p_m)`` (a code likely under one member is kept).

    Returns:
        Log-probabilities of the same shape, each row summing to 1 over the allowed codes.
    """
    if len(log_probs) == 1:
        return log_probs[0]
    stacked = torch.stack(list(log_probs))
    if how == "geometric":
        return torch.log_softmax(stacked.mean(0), dim=-1)
    return torch.logsumexp(stacked, 0) - math.log(len(log_probs))


@dataclass
class _Member:
    """One ensemble member's decoder, level heads and KV cache during a search."""

    model: PreTrainedModel
    decoder: nn.Module
    head: _LevelHead
    cache: DynamicCache

    def next_log_probs(
        self,
        level: int,
        allowed: torch.Tensor,
        rows: torch.Tensor | None = None,
        every_position: bool = False,
        **inputs: torch.Tensor | None,
    ) -> torch.Tensor:
        """Decode ``inputs`` and return the trie-normalized log-probs of the next ``level`` code.

        Args:
            level: SID level of the next code.
            allowed: Which codes the trie allows, ``[rows, size_l]`` (or ``[size_l]``).
            rows: Decode on copies of only these rows of the cache (the cache itself when None).
            every_position: Score every input position (``[rows * positions, size_l]``: the
                beams of a shared-history step), not only the last one.
            inputs: ``input_ids``, ``attention_mask``, ``position_ids`` for the decoder.
        """
        cache = self.cache if rows is None else _cache_rows(self.cache, rows, self.model)
        hidden = self.decoder(**inputs, past_key_values=cache, use_cache=True).last_hidden_state
        hidden = hidden.flatten(0, 1) if every_position else hidden[:, -1]
        logits = self.head(hidden, level).masked_fill(~allowed, float("-inf"))
        return torch.log_softmax(logits, dim=-1)


class _SharedHistory:
    """Beams attend to one copy of their user's history, through a tree attention mask.

    The expanded search copies each user's history cache B times, appends to (re-concatenates)
    all B copies every level and reorders them by beam; with a small model the decode steps are
    then nearly all memory copies (85% of a CPU search's time, on 50-item histories). Here the
    cache keeps ``[users, ...]`` rows: the history once, then per decoded level one block of B
    positions, the tokens the user's B beams fed at that level. A beam attends its user's
    history, its ancestors' slots in the earlier blocks and its own slot (the mask below), with
    the positions it would have had alone, so every beam computes what it would in a cache of
    its own. Reordering beams rewrites which slots they point at; the cache never moves.
    """

    def __init__(self, history_mask: torch.Tensor, width: int, dtype: torch.dtype) -> None:
        self.history = history_mask.bool()[:, None, None, :]  # [U, 1, 1, T]
        self.width, self.dtype = width, dtype
        self.own = torch.eye(width, dtype=torch.bool, device=history_mask.device)
        # Per fed block: [U, B], the slot of each current beam's ancestor in that block.
        self.ancestors: list[torch.Tensor] = []

    @staticmethod
    def mask_dtype(models: Sequence[PreTrainedModel]) -> torch.dtype | None:
        """The custom 4D mask's dtype for the models' attention; None: no such mask taken.

        SDPA takes a boolean mask (True: attend), eager attention an additive float one; other
        implementations (flash attention) take no custom mask, and the search expands the cache.
        So does a model with sliding-window layers: a custom mask replaces the window's.
        """
        kinds: set[torch.dtype] = set()
        for m in models:
            if "sliding_attention" in (getattr(m.config, "layer_types", None) or ()):
                return None
            impl = getattr(m.config, "_attn_implementation", None)
            if impl == "sdpa":
                kinds.add(torch.bool)
            elif impl == "eager":
                kinds.add(next(m.parameters()).dtype)
            else:
                return None
        return kinds.pop() if len(kinds) == 1 else None

    def mask(self) -> torch.Tensor:
        """The ``[U, 1, B, T + blocks * B]`` mask of the block being fed."""
        users, width = self.history.shape[0], self.width
        blocks = [self.history.expand(-1, -1, width, -1)]
        blocks += [
            torch.nn.functional.one_hot(a, width).bool().unsqueeze(1) for a in self.ancestors
        ]
        blocks.append(self.own.expand(users, 1, width, width))
        attend = torch.cat(blocks, dim=-1)
        if self.dtype == torch.bool:
            return attend
        blocked = torch.zeros(attend.shape, dtype=self.dtype, device=attend.device)
        return blocked.masked_fill(~attend, torch.finfo(self.dtype).min)

    def advance(self, parent: torch.Tensor) -> None:
        """After a top-B selection: beam b's parent was beam ``parent[u, b]`` of the fed block."""
        self.ancestors = [a.gather(1, parent) for a in self.ancestors] + [parent]


def _shared_history_step(
    step: Callable[..., torch.Tensor],
    tree: _SharedHistory,
    level: int,
    allowed_rows: torch.Tensor,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    decode: torch.Tensor | None,
) -> torch.Tensor:
    """One level of the shared-history search: every user's B beams fed as one block.

    Args:
        step: The members' combined next-code distribution (``beam_search_fast``'s ``step``).
        tree: The users' shared-history masks.
        level: SID level of the codes being scored.
        allowed_rows: Codes the trie allows per beam, ``[U * B, size_l]``.
        tokens: The token each beam feeds (its last code), ``[U, B]``.
        positions: Their positions, ``[U, B]``.
        decode: Which users to decode (None: all). Every beam of the others has one allowed
            code, whose log-softmax is 0 whatever the model says.

    Returns:
        Log-probabilities ``[U * B, size_l]``.
    """
    inputs = {"input_ids": tokens, "attention_mask": tree.mask(), "position_ids": positions}
    if decode is None or bool(decode.all()):
        return step(level, allowed_rows, every_position=True, **inputs)
    users, width = tokens.shape
    logp = torch.zeros(allowed_rows.shape, device=allowed_rows.device)
    logp = logp.masked_fill(~allowed_rows, float("-inf"))
    pick = decode.nonzero().squeeze(1)
    if len(pick):
        picked = step(
            level,
            allowed_rows.view(users, width, -1)[pick].flatten(0, 1),
            rows=pick,
            every_position=True,
            **{name: value[pick] for name, value in inputs.items()},
        )
        logp.view(users, width, -1)[pick] = picked.view(len(pick), width, -1)
    return logp


def _as_members(model: PreTrainedModel | Sequence[PreTrainedModel]) -> list[PreTrainedModel]:
    models = list(model) if isinstance(model, Sequence) else [model]
    if not models:
        raise ValueError("beam search needs at least one model")
    return models


@torch.no_grad()
def beam_search_fast(
    model: PreTrainedModel | Sequence[PreTrainedModel],
    prompts: Sequence[Sequence[int]],
    trie: SidTrie,
    vocab: SidVocab,
    beam_width: int,
    num_anchors: int,
    mask_free: bool = True,
    shortcuts: bool = True,
    combine: EnsembleCombine = "arithmetic",
    prior: PriorRows | None = None,
    prior_weight: float = 0.0,
    shared_history: bool = True,
    exclude: sp.csr_matrix | None = None,
) -> BeamOutput:
    """Trie-constrained beam search, batched over prompts, one prefill and a reused KV cache.

    Args:
        model: A Hugging Face causal LM (decoder + LM head), in eval mode; or several sharing one
            SID vocabulary (an ensemble, e.g. the same model trained with different seeds): each
            keeps its own KV cache, and every step scores the beams with their members' next-code
            distributions combined by ``combine``.
        prompts: Token ids per user (:meth:`SidVocab.encode` of the history).
        trie: Valid SIDs.
        vocab: The SID vocabulary of ``model``.
        beam_width: Beams kept per user.
        num_anchors: Anchors returned per user (``<= beam_width``).
        mask_free: When no prompt of the batch is padded, pass no attention mask, so the
            attention kernels take their fused causal path (``search_in_batches`` groups
            prompts by length, so most batches qualify). False always passes the mask.
        shortcuts: Two exact shortcuts: between levels only the generated positions of the
            KV cache are reordered (a user's beams share identical history rows), and at the
            last level only beams with more than one allowed code are decoded (a log-softmax
            over one allowed code is 0, whatever the model says; the disambiguation level is
            nearly all such). False runs the search like ``generate()`` does (kept for the
            throughput benchmark's comparison). Same anchors; log-probabilities equal up to
            the rounding of a smaller batch.
        combine: How an ensemble's distributions are combined (:func:`combine_log_probs`);
            unused with one model.
        prior: A prior over the catalog per prompt (:class:`training.anchors.prior.
            CooccurrencePrior`), fused into every step with ``prior_weight``; None: the LM alone.
        prior_weight: Fusion weight ``w`` (0 ignores the prior).
        shared_history: A user's beams attend to one copy of its history cache through a tree
            attention mask (:class:`_SharedHistory`) instead of B copies of it, when the models'
            attention takes a custom mask (SDPA, eager). Same anchors; log-probabilities equal up
            to rounding. False: the cache is expanded B-fold after the prefill (the search
            before 2026-12-04, kept for the throughput benchmark's comparison).
        exclude: ``[n_prompts, n_items]``, nonzero at items a prompt's anchors may not be (its
            user's own history, :func:`history_items`): pruned from the trie for that prompt,
            with every prefix left without items (:class:`ExcludedItems`). None: every item is
            allowed.

    Returns:
        The top ``num_anchors`` items per prompt and their sequence log-probabilities.
    """
    models = _as_members(model)
    device = next(models[0].parameters()).device
    n_users, width = len(prompts), beam_width
    child, allowed = trie.tables(device)
    members = [
        _Member(
            model=m,
            decoder=m.get_decoder(),
            head=_LevelHead(m, vocab, device),
            cache=DynamicCache(config=m.config),
        )
        for m in models
    ]
    level_ids = members[0].head.level_ids
    fuse = prior is not None and prior_weight > 0
    if fuse and prior is not None and exclude is not None:
        prior = prior_without(prior, exclude)
    log_masses = prior_log_masses(trie, prior, device) if fuse and prior is not None else []
    users = torch.arange(n_users, device=device)
    excluded = None if exclude is None else ExcludedItems(exclude, trie, device)

    def step(
        level: int,
        allowed_rows: torch.Tensor,
        rows: torch.Tensor | None = None,
        every_position: bool = False,
        **inputs: torch.Tensor | None,
    ) -> torch.Tensor:
        """Every member's next-code distribution, combined into one."""
        return combine_log_probs(
            [
                member.next_log_probs(level, allowed_rows, rows, every_position, **inputs)
                for member in members
            ],
            combine,
        )

    ids, mask = _left_pad(prompts, vocab.pad_id, device)
    unpadded = mask_free and len({len(p) for p in prompts}) == 1
    # Position ids count real tokens only, so a left-padded row sees the same positions as alone.
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    # Level 0: one distribution per user (the empty prefix, id 0), top-B codes start the beams.
    allowed_0 = allowed[0][0]
    if excluded is not None:
        kids_0 = child[0][0].long().expand(n_users, -1)
        allowed_0 = allowed_0 & ~excluded.pruned(0, users.unsqueeze(1), kids_0.clamp(min=0))
    logp = step(
        0,
        allowed_0,
        input_ids=ids,
        attention_mask=None if unpadded else mask,
        position_ids=positions,
    )
    if fuse:
        logp = _fuse(logp, child[0][0].expand(n_users, -1), log_masses[0], users, prior_weight)
    if excluded is not None:
        logp = logp.nan_to_num(nan=float("-inf"))  # a user whose every item is excluded
    k = min(width, logp.shape[1])
    scores, codes = logp.topk(k, dim=-1)
    if k < width:  # fewer codes than beams: pad with dead beams
        scores = torch.cat([scores, scores.new_full((n_users, width - k), float("-inf"))], 1)
        codes = torch.cat([codes, codes.new_zeros((n_users, width - k))], 1)
    node = child[0][0][codes].long()  # [U, B] prefix ids at level 1 (item rows if one level)
    n_levels = trie.n_levels
    if n_levels == 1:
        return _finish(scores, node, num_anchors)

    known_layout = all(_kv(member.cache) is not None for member in members)
    mask_dtype = _SharedHistory.mask_dtype(models) if shared_history else None
    tree = None if mask_dtype is None else _SharedHistory(mask, width, mask_dtype)
    user_pos = positions[:, -1] + 1  # the first generated token's position, per user
    if tree is None:
        # Expand the prefill caches B-fold only now: B beams share one history.
        for member in members:
            member.cache.batch_repeat_interleave(width)
        mask = mask.repeat_interleave(width, dim=0)
        next_pos = user_pos.repeat_interleave(width)
        ones = mask.new_ones((n_users * width, 1))
    base = (torch.arange(n_users, device=device) * width).unsqueeze(1)
    for level in range(1, n_levels):
        # Dead beams may sit on a non-existent prefix (-1): park them on prefix 0, keep -inf.
        node = node.clamp(min=0)
        flat_node = node.reshape(-1)
        allowed_rows = allowed[level][flat_node]  # [U*B, size_l]
        last = level == n_levels - 1
        if excluded is not None:
            kids = child[level][flat_node].long()
            cut = excluded.pruned(
                level, users.repeat_interleave(width).unsqueeze(1), kids.clamp(min=0)
            )
            allowed_rows = allowed_rows & ~cut
        choice = allowed_rows.sum(-1) > 1  # beams with more than one way on
        if tree is not None:
            logp = _shared_history_step(
                step,
                tree,
                level,
                allowed_rows,
                level_ids[level - 1][codes],
                (user_pos + level - 1).unsqueeze(1).expand(-1, width),
                # Last level: only users with a beam that has a choice are decoded (exact, as
                # below); their own rows of the cache.
                choice.view(n_users, width).any(1) if shortcuts and last and known_layout else None,
            )
        else:
            tokens = level_ids[level - 1][codes].reshape(-1, 1)
            mask = torch.cat([mask, ones], dim=1)
            if shortcuts and last and known_layout and 2 * int(choice.sum()) < len(choice):
                # Last level, most beams forced: a log-softmax over one allowed code is 0
                # whatever the model says, so only the beams with a choice are decoded (their
                # own rows of the cache: every row attends to its own history only).
                logp = torch.zeros(allowed_rows.shape, device=device).masked_fill(
                    ~allowed_rows, float("-inf")
                )
                pick = choice.nonzero().squeeze(1)
                if len(pick):
                    logp[pick] = step(
                        level,
                        allowed_rows[pick],
                        rows=pick,
                        input_ids=tokens[pick],
                        attention_mask=None if unpadded else mask[pick],
                        position_ids=next_pos[pick].unsqueeze(1),
                    )
            else:
                logp = step(  # [U*B, size_l]
                    level,
                    allowed_rows,
                    input_ids=tokens,
                    attention_mask=None if unpadded else mask,
                    position_ids=next_pos.unsqueeze(1),
                )
                next_pos = next_pos + 1
        if fuse:
            # After the last-level shortcut too: a row with one allowed code stays at 0.
            logp = _fuse(
                logp,
                child[level][flat_node],
                log_masses[level],
                users.repeat_interleave(width),
                prior_weight,
            )
        if excluded is not None:
            # A dead beam (parked on prefix 0, or a user with every item excluded) may have no
            # code left: a log-softmax over nothing is NaN; the beam stays dead instead.
            logp = logp.nan_to_num(nan=float("-inf"))
        size = logp.shape[1]
        total = (scores.reshape(-1, 1) + logp).reshape(n_users, width * size)
        scores, flat_idx = total.topk(width, dim=-1)
        beam, codes = flat_idx // size, flat_idx % size
        order = (base + beam).reshape(-1)  # rows of the surviving beams' parents
        node = child[level][flat_node[order], codes.reshape(-1)].long().reshape(n_users, width)
        if last:
            break
        if tree is not None:
            tree.advance(beam)
        else:
            for member in members:
                if shortcuts and known_layout:
                    _reorder_generated(member.cache, order, ids.shape[1])
                else:
                    member.cache.reorder_cache(cast(torch.LongTensor, order))
    return _finish(scores, node, num_anchors)


@torch.no_grad()
def beam_search_reference(
    model: PreTrainedModel,
    prompts: Sequence[Sequence[int]],
    trie: SidTrie,
    vocab: SidVocab,
    beam_width: int,
    num_anchors: int,
    prior: PriorRows | None = None,
    prior_weight: float = 0.0,
    exclude: sp.csr_matrix | None = None,
) -> BeamOutput:
    """The same search through Hugging Face ``generate`` (slow: B-fold prefill, full-vocab head).

    Arguments and result as in :func:`beam_search_fast`; the prior is added to the scores by a
    logits processor, before ``renormalize_logits`` applies the log-softmax; the codes leading
    only to excluded items are left out of ``prefix_allowed_tokens_fn``'s list for their prompt
    (``generate()`` refuses an empty list: a prompt whose every item is excluded is for the fast
    path only).
    """
    from transformers import GenerationConfig, LogitsProcessorList

    device = next(model.parameters()).device
    ids, mask = _left_pad(prompts, vocab.pad_id, device)
    prompt_len = ids.shape[1]
    token_code = {
        int(tok): (lvl, code)
        for lvl, level_ids in enumerate(vocab.level_token_ids)
        for code, tok in enumerate(level_ids.tolist())
    }
    allowed_cache: dict[tuple[int, ...], list[int]] = {}
    # The same per-prompt pruning as the fast path: a code is left out of the allowed tokens
    # when the child prefix it leads to is cut for that prompt.
    cpu = torch.device("cpu")
    excluded = None if exclude is None else ExcludedItems(exclude, trie, cpu)
    child_cpu = trie.tables(cpu)[0]

    def allowed_tokens(batch_id: int, sequence: torch.Tensor) -> list[int]:
        prefix = tuple(token_code[int(t)][1] for t in sequence[prompt_len:].tolist())
        if prefix not in allowed_cache:
            codes = trie.allowed_codes(prefix)
            allowed_cache[prefix] = [int(vocab.level_token_ids[len(prefix)][c]) for c in codes]
        if excluded is None:
            return allowed_cache[prefix]
        level, node = len(prefix), 0
        for lvl, code in enumerate(prefix):
            node = int(child_cpu[lvl][node, code])
        codes = trie.allowed_codes(prefix)
        kids = child_cpu[level][node, codes].long()
        cut = excluded.pruned(level, torch.tensor(batch_id), kids).tolist()
        level_ids = vocab.level_token_ids[level]
        return [int(level_ids[c]) for c, dead in zip(codes, cut, strict=True) if not dead]

    # A fresh config: a checkpoint's own generation_config (sampling, repetition penalty) must
    # not leak into the search. Passing one is not enough: generate() fills every field left
    # unset from the model's own config (an instruct checkpoint's repetition_penalty 1.1 moved
    # every log-probability), so that one is swapped for the library defaults during the call.
    gen_config = GenerationConfig(
        num_beams=beam_width,
        num_return_sequences=num_anchors,
        max_new_tokens=trie.n_levels,
        do_sample=False,
        renormalize_logits=True,
        # Beams all end after n_levels tokens; no length normalization of their scores.
        **({"length_penalty": 0.0} if beam_width > 1 else {}),
        output_scores=True,
        return_dict_in_generate=True,
        pad_token_id=vocab.pad_id,
        bos_token_id=vocab.bos_id,
        eos_token_id=vocab.tokenizer.eos_token_id,
    )
    processors = LogitsProcessorList()
    if prior is not None and prior_weight > 0:
        if exclude is not None:
            prior = prior_without(prior, exclude)
        processors.append(
            _PriorLogits(
                trie, vocab, prior_log_masses(trie, prior, device), prompt_len, prior_weight, device
            )
        )
    lm = causal_lm(model)
    own_config = lm.generation_config
    lm.generation_config = GenerationConfig()
    try:
        out = model.generate(  # type: ignore[operator]
            input_ids=ids,
            attention_mask=mask,
            generation_config=gen_config,
            prefix_allowed_tokens_fn=allowed_tokens,
            logits_processor=processors,
        )
    finally:
        lm.generation_config = own_config
    generated = out.sequences[:, prompt_len:].reshape(len(prompts), num_anchors, -1).cpu()
    items = torch.tensor(
        [
            [trie.item_of([token_code.get(int(t), (0, -1))[1] for t in seq]) for seq in row]
            for row in generated.tolist()
        ]
    )
    if beam_width == 1:
        # generate() falls back to greedy search, which reports per-step scores only; with
        # renormalize_logits they are the trie-normalized log-probs of the chosen tokens.
        steps = torch.stack(out.scores, dim=1).float()  # [U, n_levels, vocab]
        chosen = out.sequences[:, prompt_len:].unsqueeze(-1)
        scores = steps.gather(2, chosen).squeeze(-1).sum(-1).reshape(len(prompts), 1).cpu()
    else:
        scores = out.sequences_scores.reshape(len(prompts), num_anchors).cpu()
    return _finish(scores, items, num_anchors)


class _PriorLogits(LogitsProcessor):
    """A ``generate()`` logits processor adding ``w * log M(prefix + code)`` to the SID tokens.

    Rows are ``users x beams`` (``generate`` expands each prompt ``num_beams`` times, in order);
    the beam's prefix codes are read back from its generated tokens and walked down the trie.
    """

    def __init__(
        self,
        trie: SidTrie,
        vocab: SidVocab,
        log_masses: list[LevelLogMass],
        prompt_len: int,
        weight: float,
        device: torch.device,
    ) -> None:
        self.child, _ = trie.tables(device)
        self.level_ids = [torch.as_tensor(ids, device=device) for ids in vocab.level_token_ids]
        size = max(int(ids.max()) for ids in self.level_ids) + 1
        self.code_of = torch.zeros(size, dtype=torch.long, device=device)
        for ids in self.level_ids:
            self.code_of[ids] = torch.arange(len(ids), device=device)
        self.log_masses, self.prompt_len, self.weight = log_masses, prompt_len, weight

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        level = input_ids.shape[1] - self.prompt_len
        rows, users = input_ids.shape[0], self.log_masses[0].n_users
        node = torch.zeros(rows, dtype=torch.long, device=input_ids.device)
        for lvl in range(level):
            code = self.code_of[input_ids[:, self.prompt_len + lvl]]
            node = self.child[lvl][node, code].long().clamp(min=0)
        kids = self.child[level][node]
        user = torch.arange(rows, device=input_ids.device) // (rows // users)
        bonus = self.log_masses[level].at(user.unsqueeze(1), kids.clamp(min=0).long())
        out = scores.clone()
        columns = self.level_ids[level]
        out[:, columns] += self.weight * bonus.masked_fill(kids < 0, 0.0).to(out.dtype)
        return cast(torch.FloatTensor, out)


SearchFn = Callable[..., BeamOutput]
"""A beam search over one batch of prompts; takes ``prior=`` rows when the search fuses one."""


def make_search(
    models: nn.Module | Sequence[nn.Module],
    trie: SidTrie,
    vocab: SidVocab,
    gc: GenerateConfig,
    prior_weight: float,
) -> SearchFn:
    """The beam search ``gc`` names, every setting bound but the batch of prompts.

    Args:
        models: The anchor LM, or an ensemble's members (``implementation: fast`` only).
        trie: The valid SIDs.
        vocab: The models' SID tokens.
        gc: Beam width, anchors, implementation and ensemble rule.
        prior_weight: Weight of the co-occurrence prior rows passed as ``prior=`` (0: none).
    """
    impl: Any = (
        partial(beam_search_fast, combine=gc.ensemble_combine)
        if gc.implementation == "fast"
        else beam_search_reference
    )
    return cast(
        SearchFn,
        partial(
            impl,
            models,
            trie=trie,
            vocab=vocab,
            beam_width=gc.beam_width,
            num_anchors=gc.num_anchors,
            prior_weight=prior_weight,
        ),
    )


PriorFn = Callable[[npt.NDArray[np.int64]], PriorRows]
"""The prior rows of the prompts at these indices (of the full prompt list)."""
ExcludeFn = Callable[[npt.NDArray[np.int64]], sp.csr_matrix]
"""The excluded items of the prompts at these indices (:func:`history_items` of their users)."""


def exclusions_of(histories: Sequence[npt.ArrayLike], n_items: int) -> ExcludeFn:
    """The :data:`ExcludeFn` of ``histories``: a batch's :func:`history_items`."""

    def of(rows: npt.NDArray[np.int64]) -> sp.csr_matrix:
        return history_items([histories[i] for i in rows], n_items)

    return of


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an accelerator out-of-memory error."""
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
    )


@dataclass
class BatchSize:
    """Users per batch, shared by every call of one run: an out-of-memory halving lasts."""

    size: int


def search_in_batches(
    search: SearchFn,
    prompts: Sequence[Sequence[int]],
    batch_size: int | BatchSize,
    progress: Callable[[int], object] | None = None,
    prior_of: PriorFn | None = None,
    exclude_of: ExcludeFn | None = None,
) -> BeamOutput:
    """Run ``search`` over ``prompts`` in batches of similar length; halve batches on OOM.

    Prompts are sorted by length so a batch pads little; results come back in input order. On an
    out-of-memory error the failing batch is split in half and retried, and the smaller size is
    kept for the rest of the call, and of the run when ``batch_size`` is a :class:`BatchSize`
    shared by its calls (the next batch of the same size would fail the same way).

    Args:
        search: Beam search over one batch of prompts.
        prompts: Token ids per user.
        batch_size: Prompts per batch to start with; a :class:`BatchSize` is updated in place.
        progress: Called with the number of prompts finished after each batch.
        prior_of: When given, each batch's prior rows (``prior_of(indices)``) are passed to
            ``search`` as ``prior=``; computed per batch, so memory stays ``batch x n_items``.
        exclude_of: When given, each batch's excluded items (``exclude_of(indices)``) are
            passed to ``search`` as ``exclude=``.

    Raises:
        torch.OutOfMemoryError: when a single prompt does not fit.
    """
    if not prompts:
        return BeamOutput(np.zeros((0, 0), np.int64), np.zeros((0, 0), np.float32))
    order = np.argsort([len(p) for p in prompts], kind="stable")
    parts: list[BeamOutput] = []
    held = batch_size if isinstance(batch_size, BatchSize) else BatchSize(batch_size)
    done, size = 0, held.size
    while done < len(order):
        chunk = order[done : done + size]
        out_of_memory = False
        try:
            batch = [prompts[i] for i in chunk]
            extra: dict[str, Any] = {}
            if prior_of is not None:
                extra["prior"] = prior_of(chunk)
            if exclude_of is not None:
                extra["exclude"] = exclude_of(chunk)
            parts.append(search(batch, **extra))
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            if not is_out_of_memory(exc) or len(chunk) == 1:
                raise
            out_of_memory = True
        if out_of_memory:
            size = (len(chunk) + 1) // 2  # the first half; the rest follows at the same size
            held.size = min(held.size, size)
            logger.warning(
                "out of memory on a batch of %d users; splitting in half and retrying with %d",
                len(chunk),
                size,
            )
            # Only here, after the except clause: until then the exception's traceback holds the
            # failed batch's tensors, and the cache could not give their memory back.
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            continue
        done += len(chunk)
        if progress is not None:
            progress(len(chunk))
    merged = BeamOutput.concat(parts)
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    return BeamOutput(items=merged.items[inverse], log_probs=merged.log_probs[inverse])
