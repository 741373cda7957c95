"""Next-item training of the anchor model with teacher forcing, evaluation and early stopping.

Loss. The model reads ``[prefix] <bos> item_1 ... item_n`` and is scored on the SID tokens of the
target item (``loss_on="target"``) or of every item (``loss_on="all"``). Each scored token's
logits are restricted to its level's SID tokens before the softmax (a ``size_l``-way
classification per token): the only thing the model is ever asked at such a position is which
code of that level comes next, and decoding normalizes over (a subset of) the same tokens. The
trie itself is *not* applied in training, so the model is not taught that codes missing from
today's catalog are impossible (tomorrow's items may use them). With a co-occurrence prior fused
into training (:class:`TrainingPrior`), each token is scored under the product decoding uses,
``log_softmax(logits + w * log M(prefix + code))``, over the codes the trie allows (a code no item
has holds no prior mass): the model learns what the prior does not already say.

Loop. AdamW (weight decay on matrices only), linear warm-up then linear decay, gradient-norm
clipping, bf16 autocast on CUDA, length-bucketed shuffled batches, a tqdm bar per epoch. After each
epoch: the held-out next item of the evaluation users is scored (mean NLL) and decoded with the
fast constrained beam search (HR@10, NDCG@10). The best epoch (HR@10, ties broken by lower loss;
or the loss alone) is kept in memory, reported through a callback (the job saves a checkpoint),
restored at the end; training stops after ``patience`` epochs without improvement. Optional:
label smoothing of the level classifications, and an exponential moving average of the weights
(``ema_decay``) that is evaluated and kept in place of the raw weights.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from tqdm import tqdm

from training.anchors.errors import AnchorInputError
from training.anchors.generate import (
    DeviceName,
    LevelLogMass,
    PriorRows,
    beam_search_fast,
    exclusions_of,
    prior_log_masses,
    resolve_device,
    search_in_batches,
)
from training.anchors.model import causal_lm
from training.anchors.prior import (
    CooccurrencePrior,
    PriorConfig,
    SparsePriorRows,
    ragged_arange,
)
from training.anchors.sequences import EvalSet, ExampleSet, LossOn
from training.anchors.trie import SidTrie
from training.anchors.vocab import SidVocab

logger = logging.getLogger(__name__)

IntArray = npt.NDArray[np.int64]
EVAL_K = 10
"""Cut-off of the per-epoch HR/NDCG (the stage's headline ``eval_hr@10``)."""


class TrainConfig(BaseModel):
    """Optimization settings of the anchor model."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(
        default=20, ge=1, description="Most epochs (early stopping may end sooner)."
    )
    batch_size: int = Field(default=64, ge=1, description="Examples per optimizer step.")
    learning_rate: float = Field(
        default=2e-3,
        gt=0,
        description="Peak AdamW learning rate (compact model; ~2e-4 suits LoRA on a checkpoint).",
    )
    weight_decay: float = Field(
        default=0.05, ge=0, description="AdamW weight decay (matrices only, not norms/biases)."
    )
    warmup_ratio: float = Field(
        default=0.05, ge=0, lt=1, description="Share of all steps spent warming the LR up linearly."
    )
    grad_clip: float = Field(default=1.0, gt=0, description="Max global gradient norm.")
    label_smoothing: float = Field(
        default=0.1,
        ge=0,
        lt=1,
        description="Label smoothing of each level's code classification (0: off).",
    )
    ema_decay: float | None = Field(
        default=0.995,
        gt=0,
        lt=1,
        description="When set, keep an exponential moving average of the trainable weights "
        "(this decay per optimizer step); evaluation, early stopping and the saved model use "
        "the average instead of the raw weights (null: off).",
    )
    loss_on: LossOn = Field(
        default="all",
        description="'all': loss on every item of a history window (one forward pass scores "
        "up to max_history + 1 targets); 'target': one example per target item, the loss on "
        "its SID tokens only (the generation task exactly, as accurate in measurement and "
        "several times slower).",
    )
    eval_users: int = Field(
        default=2000,
        ge=0,
        description="Users whose last positive is held out for per-epoch evaluation (0: none, "
        "then no early stopping and the last epoch is kept).",
    )
    eval_beam_width: int = Field(default=20, ge=EVAL_K, description="Beam width of the evaluation.")
    eval_batch_size: int = Field(default=128, ge=1, description="Users per evaluation batch.")
    early_stopping_metric: Literal["hr@10", "loss"] = Field(
        default="hr@10",
        description="'hr@10' (ties broken by lower held-out loss) or 'loss' (held-out NLL).",
    )
    patience: int = Field(
        default=3, ge=1, description="Epochs without improvement before training stops."
    )
    seed: int = Field(default=0, ge=0, description="Seed of initialization and batch order.")
    ensemble_size: int = Field(
        default=1,
        ge=1,
        le=16,
        description="Models trained, member k with seed `seed + k` (same data, SIDs and "
        "held-out users); generation decodes them together as an ensemble "
        "(generation.ensemble_combine). Costs k times the training and decoding time; on "
        "Amazon Scientific 3-4 members lifted HR@10 by 3-8% (docs/anchors.md).",
    )
    device: DeviceName = "auto"
    bf16: bool = Field(default=True, description="bf16 autocast on CUDA (ignored on CPU).")
    progress: bool = Field(default=True, description="Show a tqdm progress bar per epoch.")


@dataclass
class Batch:
    """Padded token ids and the positions whose next token is scored.

    Attributes:
        input_ids: ``[b, T]`` right-padded token ids.
        attention_mask: ``[b, T]``.
        pred_rows: Flat ``b * T`` indices of the positions that predict a scored token.
        levels: SID level of each scored token.
        codes: Code (class) of each scored token.
        items: Catalog row of the item each scored token belongs to.
        item_rows: Which scored item of the batch (0, 1, ...) each scored token belongs to: the
            row of a fused prior's masses.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pred_rows: torch.Tensor
    levels: torch.Tensor
    codes: torch.Tensor
    items: torch.Tensor
    item_rows: torch.Tensor

    def to(self, device: torch.device) -> Batch:
        """This batch on ``device``."""
        return Batch(*(getattr(self, f.name).to(device, non_blocking=True) for f in fields(self)))


def collate(
    examples: ExampleSet,
    rows: IntArray,
    item_tokens: IntArray,
    item_codes: IntArray,
    vocab: SidVocab,
) -> Batch:
    """Tokenize examples ``rows`` of ``examples`` into a right-padded :class:`Batch`."""
    n_levels = item_tokens.shape[1]
    offset = vocab.items_offset
    seqs: list[list[int]] = []
    pred: list[IntArray] = []
    levels: list[IntArray] = []
    codes: list[IntArray] = []
    items_of: list[IntArray] = []
    for r in rows:
        start, end, loss_start = examples.start[r], examples.end[r], examples.loss_start[r]
        items = examples.items[start:end]
        seqs.append(vocab.encode(item_tokens[items]))
        first = offset + int(loss_start - start) * n_levels  # first scored token position
        n_scored = int(end - loss_start) * n_levels
        pred.append(np.arange(first - 1, first - 1 + n_scored))
        levels.append(np.tile(np.arange(n_levels), int(end - loss_start)))
        codes.append(item_codes[examples.items[loss_start:end]].reshape(-1))
        items_of.append(np.repeat(examples.items[loss_start:end], n_levels))
    width = max(len(s) for s in seqs)
    ids = np.full((len(seqs), width), vocab.pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), width), dtype=np.int64)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    flat = np.concatenate([p + i * width for i, p in enumerate(pred)])
    return Batch(
        input_ids=torch.from_numpy(ids),
        attention_mask=torch.from_numpy(mask),
        pred_rows=torch.from_numpy(flat),
        levels=torch.from_numpy(np.concatenate(levels)),
        codes=torch.from_numpy(np.concatenate(codes)),
        items=torch.from_numpy(np.concatenate(items_of).astype(np.int64)),
        item_rows=torch.from_numpy(
            np.repeat(np.arange(sum(len(c) for c in items_of) // n_levels), n_levels)
        ),
    )


@dataclass
class TrainingPrior:
    """A co-occurrence prior fused into the training loss (``PriorConfig.train_weight``).

    The model is then trained as the second expert of the product that decoding uses,
    ``p(c | prefix) ~ p_LM(c | prefix) * M(prefix + c) ** weight``, so that it learns what the
    prior does not already say instead of relearning it.

    Attributes:
        prior: Counted on the training sequences only (no held-out item).
        cfg: The prior's settings (history, decay, smoothing).
        weight: Fusion weight, the same in training, evaluation and generation.
    """

    prior: CooccurrencePrior
    cfg: PriorConfig
    weight: float

    def example_rows(self, examples: ExampleSet, rows: IntArray) -> SparsePriorRows:
        """Prior rows of the scored items of examples ``rows``, in :func:`collate`'s order.

        Each leaves out what the example's own sequence contributed from its scored item on
        (:meth:`CooccurrencePrior.training_probabilities`).
        """
        starts, ends = examples.loss_start[rows], examples.end[rows]
        counts = ends - starts
        positions = np.repeat(starts, counts) + ragged_arange(counts)
        seq_start = examples.start if examples.seq_start is None else examples.seq_start
        seq_end = examples.end if examples.seq_end is None else examples.seq_end
        return self.prior.training_probabilities(
            examples.items,
            np.repeat(examples.start[rows], counts),
            positions,
            np.repeat(seq_start[rows], counts),
            np.repeat(seq_end[rows], counts),
            self.cfg,
        )


@dataclass
class FusedTerms:
    """What :func:`sid_loss` needs to score a batch under the fused prior."""

    log_masses: list[LevelLogMass]
    """Per level, the log prior mass of every child prefix, per scored item."""
    child: list[torch.Tensor]
    """The trie's per-level child tables."""
    prefixes: list[torch.Tensor]
    """Per level, each item's prefix id (:meth:`SidTrie.item_prefixes`)."""
    weight: float

    @classmethod
    def of(cls, trie: SidTrie, rows: PriorRows, weight: float, device: torch.device) -> FusedTerms:
        """The terms of prior ``rows`` (one per scored item) on ``device``."""
        child, _ = trie.tables(device)
        return cls(
            log_masses=prior_log_masses(trie, rows, device),
            child=child,
            prefixes=trie.item_prefixes(device),
            weight=weight,
        )


def sid_loss(
    model: nn.Module,
    batch: Batch,
    level_ids: list[torch.Tensor],
    label_smoothing: float = 0.0,
    fused: FusedTerms | None = None,
) -> tuple[torch.Tensor, int]:
    """Summed level-restricted cross-entropy of the scored tokens, and how many there are.

    With ``fused``, each token's distribution is the product of experts decoding uses,
    ``log_softmax(logits + weight * log M(prefix + c))`` over the codes the trie allows after the
    target's prefix (a code no item has gets no prior mass, so the trie applies here).
    """
    lm = causal_lm(model)
    hidden = lm.get_decoder()(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
    ).last_hidden_state
    picked = hidden.reshape(-1, hidden.shape[-1])[batch.pred_rows]
    head = lm.get_output_embeddings()
    assert head is not None
    # The head module itself (not its weight): a peft wrapper adds the trained SID rows.
    logits = head(picked)
    total = logits.new_zeros((), dtype=torch.float32)
    for level, ids in enumerate(level_ids):
        sel = batch.levels == level
        if sel.any() and fused is not None:
            total = total + _fused_cross_entropy(
                logits[sel][:, ids].float(), batch, sel, level, fused, label_smoothing
            )
        elif sel.any():
            level_logits = logits[sel][:, ids].float()
            total = total + nn.functional.cross_entropy(
                level_logits,
                batch.codes[sel],
                reduction="sum",
                label_smoothing=label_smoothing,
            )
    return total, int(batch.codes.numel())


def _fused_cross_entropy(
    level_logits: torch.Tensor,
    batch: Batch,
    sel: torch.Tensor,
    level: int,
    fused: FusedTerms,
    label_smoothing: float,
) -> torch.Tensor:
    """Summed cross-entropy of one level's tokens under the fused prior.

    Label smoothing spreads over the allowed codes only: a forbidden code has no probability to
    smooth towards.
    """
    items = batch.items[sel]
    kids = fused.child[level][fused.prefixes[level][items]].long()
    allowed = kids >= 0
    bonus = fused.log_masses[level].at(batch.item_rows[sel].unsqueeze(1), kids.clamp(min=0))
    scores = (level_logits + fused.weight * bonus).masked_fill(~allowed, float("-inf"))
    logp = torch.log_softmax(scores, dim=-1)
    nll = -logp.gather(1, batch.codes[sel].unsqueeze(1)).squeeze(1)
    if label_smoothing > 0:
        uniform = -logp.masked_fill(~allowed, 0.0).sum(1) / allowed.sum(1)
        nll = (1.0 - label_smoothing) * nll + label_smoothing * uniform
    return nll.sum()


class WeightAverage:
    """Exponential moving average of a model's trainable parameters (Polyak averaging).

    The average of the last few hundred steps' weights generalizes better than the final
    weights of a small, noisy model; it is what gets evaluated and kept when enabled. The
    effective decay ramps up as ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so the
    first steps' random weights do not linger in the average.
    """

    def __init__(self, params: list[torch.Tensor], decay: float) -> None:
        self.params = params
        self.decay = decay
        self.updates = 0
        self.shadow = [p.detach().clone() for p in params]

    @torch.no_grad()
    def update(self) -> None:
        """Fold the parameters' current values into the average."""
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - decay)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Within the block the parameters hold the average; afterwards their own values."""
        self._swap()
        try:
            yield
        finally:
            self._swap()

    @torch.no_grad()
    def _swap(self) -> None:
        for p, s in zip(self.params, self.shadow, strict=True):
            tmp = p.detach().clone()
            p.copy_(s)
            s.copy_(tmp)


def _batches(lengths: IntArray, batch_size: int, rng: np.random.Generator) -> list[IntArray]:
    """Shuffled batches of examples of similar length (less padding, still random)."""
    perm = rng.permutation(len(lengths))
    group = batch_size * 50
    out: list[IntArray] = []
    for g in range(0, len(perm), group):
        chunk = perm[g : g + group]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        out += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    order = rng.permutation(len(out))
    return [out[i] for i in order]


@dataclass
class EpochMetrics:
    """One epoch's numbers."""

    epoch: int
    train_loss: float
    eval_loss: float | None
    hr_at_10: float | None
    ndcg_at_10: float | None
    learning_rate: float
    seconds: float


@dataclass
class TrainHistory:
    """What training did: per-epoch metrics and the epoch that was kept."""

    epochs: list[EpochMetrics] = field(default_factory=list)
    best_epoch: int = 0
    stopped_early: bool = False

    @property
    def best(self) -> EpochMetrics:
        """Metrics of the kept epoch."""
        return self.epochs[self.best_epoch - 1]

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "best_epoch": self.best_epoch,
            "stopped_early": self.stopped_early,
            "epochs": [asdict(e) for e in self.epochs],
        }


def _autocast(device: torch.device, enabled: bool) -> torch.autocast:
    return torch.autocast(
        device_type=device.type, dtype=torch.bfloat16, enabled=enabled and device.type == "cuda"
    )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    vocab: SidVocab,
    trie: SidTrie,
    item_tokens: IntArray,
    item_codes: IntArray,
    eval_set: EvalSet,
    cfg: TrainConfig,
    device: torch.device,
    fusion: TrainingPrior | None = None,
    exclude_history: bool = False,
) -> tuple[float, float, float]:
    """Held-out next items: mean NLL (nats per item), HR@10 and NDCG@10 of constrained search.

    With ``fusion``, both under the fused prior, as generation will decode (its rows from
    ``prior.sparse_probabilities``: the held-out items were never counted, nothing to leave
    out). With ``exclude_history`` the search leaves each user's own items out, as generation
    does with ``generation.exclude_history``.
    """
    model.eval()
    lm = causal_lm(model)
    level_ids = [torch.as_tensor(ids, device=device) for ids in vocab.level_token_ids]
    seqs = [np.append(h, t) for h, t in zip(eval_set.histories, eval_set.targets, strict=True)]
    lengths = np.array([len(s) for s in seqs], dtype=np.int64)
    ends = np.cumsum(lengths)
    examples = ExampleSet(
        items=np.concatenate(seqs), start=ends - lengths, end=ends, loss_start=ends - 1
    )

    def prior_of(rows: IntArray) -> SparsePriorRows:
        assert fusion is not None
        return fusion.prior.sparse_probabilities([eval_set.histories[i] for i in rows], fusion.cfg)

    nll = 0.0
    with _autocast(device, cfg.bf16):
        for s in range(0, len(examples), cfg.eval_batch_size):
            rows = np.arange(s, min(s + cfg.eval_batch_size, len(examples)))
            batch = collate(examples, rows, item_tokens, item_codes, vocab).to(device)
            fused = None
            if fusion is not None:
                fused = FusedTerms.of(trie, prior_of(rows), fusion.weight, device)
            loss, _ = sid_loss(model, batch, level_ids, fused=fused)
            nll += float(loss)
        prompts = [vocab.encode(item_tokens[h]) for h in eval_set.histories]
        weight = 0.0 if fusion is None else fusion.weight
        out = search_in_batches(
            lambda p, prior=None, exclude=None: beam_search_fast(
                lm,
                p,
                trie,
                vocab,
                cfg.eval_beam_width,
                EVAL_K,
                prior=prior,
                prior_weight=weight,
                exclude=exclude,
            ),
            prompts,
            cfg.eval_batch_size,
            prior_of=prior_of if fusion is not None else None,
            exclude_of=exclusions_of(eval_set.histories, trie.n_items) if exclude_history else None,
        )
    hr, ndcg = hit_rate_ndcg(out.items, eval_set.targets)
    return nll / len(seqs), hr, ndcg


def hit_rate_ndcg(items: IntArray, targets: IntArray) -> tuple[float, float]:
    """HR and NDCG of ranked lists ``items`` ``[users, k]`` against one target item per user."""
    hit = items == targets[:, None]
    rank = np.argmax(hit, axis=1)
    found = hit.any(axis=1)
    hr = float(found.mean())
    ndcg = float(np.where(found, 1.0 / np.log2(rank + 2), 0.0).mean())
    return hr, ndcg


def train_loop(
    model: nn.Module,
    vocab: SidVocab,
    trie: SidTrie,
    item_codes: IntArray,
    train: ExampleSet,
    eval_set: EvalSet | None,
    cfg: TrainConfig,
    on_best: Callable[[nn.Module, EpochMetrics], None] | None = None,
    label: str = "",
    fusion: TrainingPrior | None = None,
    exclude_history: bool = False,
) -> TrainHistory:
    """Train ``model`` in place on ``train``; keep (restore) the best epoch.

    Args:
        model: Compact model or peft wrapper; its trainable parameters are optimized.
        vocab: SID vocabulary of the model.
        trie: Valid SIDs (evaluation decoding).
        item_codes: SID codes of the catalog items, ``[n_items, n_levels]``.
        train: Training examples.
        eval_set: Held-out next items, or None (no evaluation, no early stopping).
        cfg: Optimization settings.
        on_best: Called after each epoch that improves on the best so far (e.g. to save it).
        label: Put before the progress bar's text (e.g. which ensemble member this is).
        fusion: A co-occurrence prior fused into the loss and the evaluation (None: the LM
            alone).
        exclude_history: Evaluate lists without the users' own items (as generation will
            decode with ``generation.exclude_history``).
    """
    if len(train) == 0:
        raise AnchorInputError("no training examples: users need at least 2 positives")
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model.to(device)
    item_tokens = vocab.item_tokens(item_codes)
    level_ids = [torch.as_tensor(ids, device=device) for ids in vocab.level_token_ids]
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for _, p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for _, p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(0.9, 0.98))
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    warmup = max(1, int(cfg.warmup_ratio * total_steps))

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    average = (
        WeightAverage([p for _, p in params], cfg.ema_decay) if cfg.ema_decay is not None else None
    )
    lengths = (train.end - train.start).astype(np.int64)
    history = TrainHistory()
    best_key: tuple[float, float] | None = None
    best_state: dict[str, torch.Tensor] | None = None
    stale = 0
    use_eval = eval_set is not None and len(eval_set.targets) > 0
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        model.train()
        loss_sum, token_count = 0.0, 0
        bar = tqdm(
            _batches(lengths, cfg.batch_size, rng),
            desc=f"{label}anchors epoch {epoch}/{cfg.epochs}",
            unit="batch",
            disable=not cfg.progress,
            leave=False,
        )
        for rows in bar:
            batch = collate(train, rows, item_tokens, item_codes, vocab).to(device)
            fused = None
            if fusion is not None:
                fused = FusedTerms.of(trie, fusion.example_rows(train, rows), fusion.weight, device)
            with _autocast(device, cfg.bf16):
                loss, n = sid_loss(model, batch, level_ids, cfg.label_smoothing, fused)
            optimizer.zero_grad(set_to_none=True)
            (loss / n).backward()
            torch.nn.utils.clip_grad_norm_([p for _, p in params], cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            if average is not None:
                average.update()
            loss_sum += float(loss.detach())
            token_count += n
            bar.set_postfix(loss=f"{loss_sum / token_count:.3f}")
        metrics = EpochMetrics(
            epoch=epoch,
            train_loss=loss_sum / max(token_count, 1),
            eval_loss=None,
            hr_at_10=None,
            ndcg_at_10=None,
            learning_rate=float(scheduler.get_last_lr()[0]),
            seconds=0.0,
        )
        # With averaging on, the averaged weights are what is evaluated and kept.
        weights = average.applied() if average is not None else nullcontext()
        with weights:
            if use_eval:
                assert eval_set is not None
                nll, hr, ndcg = evaluate(
                    model,
                    vocab,
                    trie,
                    item_tokens,
                    item_codes,
                    eval_set,
                    cfg,
                    device,
                    fusion,
                    exclude_history,
                )
                metrics.eval_loss, metrics.hr_at_10, metrics.ndcg_at_10 = nll, hr, ndcg
            key = _score(metrics, cfg) if use_eval else (float(epoch), 0.0)
            improved = best_key is None or key > best_key
            if improved:
                best_state = {n: p.detach().to("cpu", copy=True) for n, p in params}
                if on_best is not None:
                    on_best(model, metrics)
        metrics.seconds = time.perf_counter() - t0
        history.epochs.append(metrics)
        logger.info(
            "epoch %d: train loss %.4f, eval loss %s, HR@10 %s, NDCG@10 %s, %.1fs",
            epoch,
            metrics.train_loss,
            "-" if metrics.eval_loss is None else f"{metrics.eval_loss:.4f}",
            "-" if metrics.hr_at_10 is None else f"{metrics.hr_at_10:.4f}",
            "-" if metrics.ndcg_at_10 is None else f"{metrics.ndcg_at_10:.4f}",
            metrics.seconds,
        )
        if improved:
            best_key, stale, history.best_epoch = key, 0, epoch
        else:
            stale += 1
            if stale >= cfg.patience:
                history.stopped_early = True
                break
    if best_state is not None:
        with torch.no_grad():
            for name, p in params:
                p.copy_(best_state[name].to(p.device))
    model.eval()
    return history


def _score(m: EpochMetrics, cfg: TrainConfig) -> tuple[float, float]:
    """Bigger is better: (HR@10, -loss) or (-loss, 0)."""
    loss = m.eval_loss if m.eval_loss is not None else math.inf
    if cfg.early_stopping_metric == "hr@10":
        return (m.hr_at_10 or 0.0, -loss)
    return (-loss, 0.0)
