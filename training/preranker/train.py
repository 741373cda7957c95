"""The training loop of one pre-ranker model, and batched scoring."""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor, nn
from torch.nn import functional
from tqdm.auto import tqdm

from training.data.contract import GROUPS
from training.preranker.config import PrerankerConfig
from training.preranker.data import PrerankData
from training.preranker.losses import POSITIVE, HapLoss, objective_loss
from training.preranker.models import build_model

logger = logging.getLogger(__name__)

MODEL_INPUTS = (
    "user_numeric",
    "history_emb",
    "anchor_emb",
    "row_request",
    "item_numeric",
    "category",
    "item_emb",
    "cross",
)


def _gather(embeddings: Tensor, index: npt.NDArray[np.integer]) -> Tensor:
    """Rows of ``embeddings`` at ``index`` (any shape): ``index.shape + (D,)``.

    ``functional.embedding`` rather than ``embeddings[index]``: the same copy, but advanced
    indexing took ~9x longer on CPU (680 vs 76 us for a 1,600 x 384 batch), a tenth of a
    light-model step.
    """
    return functional.embedding(torch.from_numpy(index).long(), embeddings)


def make_batch(
    data: PrerankData,
    embeddings: Tensor,
    requests: npt.NDArray[np.int64],
    groups: npt.NDArray[np.int8] | None = None,
    teacher: npt.NDArray[np.float32] | None = None,
    popularity: int | None = None,
) -> tuple[dict[str, Tensor], npt.NDArray[np.int64]]:
    """Tensors of the given requests' rows (only rows whose group is in ``groups``).

    ``popularity``: index of the item feature copied to ``batch["popularity"]`` (training with
    ``popularity_debias``); None leaves it out.

    Returns:
        The batch and the dataset row index of each batch row.
    """
    rows = data.rows_of(requests)
    if groups is not None:
        rows = rows[np.isin(data.group[rows], groups)]
    local = np.full(data.n_requests, -1, dtype=np.int64)
    local[requests] = np.arange(len(requests))
    row_request = torch.from_numpy(local[data.row_request[rows]])
    batch = {
        "user_numeric": torch.from_numpy(data.user_numeric[requests]),
        "history_emb": _gather(embeddings, data.history[requests]),
        "anchor_emb": _gather(embeddings, data.anchors[requests]),
        "row_request": row_request,
        "item_numeric": torch.from_numpy(data.item_numeric[rows]),
        "category": torch.from_numpy(data.category[rows]),
        "item_emb": _gather(embeddings, data.item[rows]),
        "cross": torch.from_numpy(data.cross[rows]),
        "label": torch.from_numpy(data.label[rows]),
        "group": torch.from_numpy(data.group[rows].astype(np.int64)),
        "pseudo": torch.from_numpy(data.pseudo[rows]),
        "confidence": torch.from_numpy(data.confidence[rows]),
    }
    if teacher is not None:
        batch["teacher"] = torch.from_numpy(teacher[rows])
    if popularity is not None:
        batch["popularity"] = torch.from_numpy(data.item_numeric[rows, popularity])
    return batch, rows


def forward(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Run ``model`` on a batch."""
    out: Tensor = model(*(batch[k] for k in MODEL_INPUTS))
    return out


@dataclass
class TrainedModel:
    """A trained model and how training went."""

    kind: str
    objective: str
    model: nn.Module
    epochs: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = 0
    seconds: float = 0.0
    samples_per_second: float = 0.0
    hap_weights: dict[str, float] = field(default_factory=dict)


def _group_ids(names: list[str] | None) -> npt.NDArray[np.int8] | None:
    if names is None:
        return None
    return np.array(
        sorted({GROUPS.index(n) for n in names} | {POSITIVE, GROUPS.index("exposed_negative")}),
        dtype=np.int8,
    )


def train_model(
    kind: str,
    objective: str,
    train: PrerankData,
    valid: PrerankData,
    embeddings: Tensor,
    cfg: PrerankerConfig,
    groups: list[str] | None = None,
    teacher: tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]] | None = None,
    popularity: int | None = None,
) -> TrainedModel:
    """Train one model with early stopping on the validation objective.

    Args:
        kind: "light" or "expressive".
        objective: One of :data:`training.preranker.config.OBJECTIVES`.
        train: Training requests.
        valid: Validation requests (later in time).
        embeddings: Item content matrix, row 0 zeros.
        cfg: Stage settings.
        groups: Negative groups this model trains on (None: all); exposed rows always.
        teacher: Teacher click probabilities for (train, valid) rows (``distill`` only).
        popularity: Index of the item feature ``popularity_debias`` reads (None: no debiasing).
    """
    tc = cfg.training
    torch.manual_seed(tc.seed)
    rng = np.random.default_rng(tc.seed)
    if tc.threads:
        torch.set_num_threads(tc.threads)
    model = build_model(
        kind,
        train.user_numeric.shape[1],
        train.item_numeric.shape[1],
        int(embeddings.shape[1]),
        cfg.model,
    )
    # fused: one kernel per step for all parameters instead of a Python loop over them (the
    # loop was ~20% of a light-model step on two CPU cores).
    opt = torch.optim.AdamW(
        model.parameters(), lr=tc.learning_rate, weight_decay=tc.weight_decay, fused=True
    )
    hap = HapLoss(cfg.loss)
    allowed = _group_ids(groups)
    if objective == "distill" and teacher is None:
        raise ValueError("objective 'distill' needs teacher probabilities")
    result = TrainedModel(kind=kind, objective=objective, model=model)
    best_loss, best_state, bad = float("inf"), copy.deepcopy(model.state_dict()), 0
    began = time.perf_counter()
    train_rows, train_seconds = 0, 0.0
    for epoch in range(1, tc.epochs + 1):
        model.train()
        order = rng.permutation(train.n_requests)
        batches = [
            order[i : i + tc.batch_requests] for i in range(0, len(order), tc.batch_requests)
        ]
        t0 = time.perf_counter()
        total, seen = 0.0, 0
        bar = tqdm(
            batches, desc=f"{kind}/{objective} epoch {epoch}", disable=not tc.progress, leave=False
        )
        for req in bar:
            batch, _ = make_batch(
                train, embeddings, req, allowed, None if teacher is None else teacher[0], popularity
            )
            if len(batch["label"]) == 0:
                continue
            logits = forward(model, batch)
            loss, _ = objective_loss(objective, cfg.loss, hap, logits, batch, len(req), update=True)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            total += float(loss.detach()) * len(req)
            seen += len(req)
            train_rows += len(batch["label"])
        train_seconds += time.perf_counter() - t0
        val_loss = evaluate_loss(
            model,
            objective,
            valid,
            embeddings,
            cfg,
            hap,
            allowed,
            None if teacher is None else teacher[1],
            popularity,
        )
        record = {
            "epoch": epoch,
            "train_loss": round(total / max(seen, 1), 5),
            "valid_loss": round(val_loss, 5),
            "seconds": round(time.perf_counter() - t0, 2),
        }
        result.epochs.append(record)
        logger.info(
            "%s/%s epoch %d: train loss %.4f, validation loss %.4f, %.1fs",
            kind,
            objective,
            epoch,
            record["train_loss"],
            record["valid_loss"],
            record["seconds"],
        )
        if val_loss < best_loss - 1e-5:
            best_loss, best_state, bad = val_loss, copy.deepcopy(model.state_dict()), 0
            result.best_epoch = epoch
        else:
            bad += 1
            if bad >= tc.patience:
                break
    model.load_state_dict(best_state)
    model.eval()
    result.seconds = time.perf_counter() - began
    result.samples_per_second = train_rows / max(train_seconds, 1e-9)
    result.hap_weights = hap.weights(list(hap.running)) if hap.running else {}
    return result


@torch.no_grad()
def evaluate_loss(
    model: nn.Module,
    objective: str,
    data: PrerankData,
    embeddings: Tensor,
    cfg: PrerankerConfig,
    hap: HapLoss,
    allowed: npt.NDArray[np.int8] | None,
    teacher: npt.NDArray[np.float32] | None,
    popularity: int | None = None,
) -> float:
    """Mean objective over ``data`` (HAP weights frozen)."""
    model.eval()
    total, seen = 0.0, 0
    step = max(cfg.training.batch_requests, 64)
    for i in range(0, data.n_requests, step):
        req = np.arange(i, min(i + step, data.n_requests))
        batch, _ = make_batch(data, embeddings, req, allowed, teacher, popularity)
        if len(batch["label"]) == 0:
            continue
        logits = forward(model, batch)
        loss, _ = objective_loss(objective, cfg.loss, hap, logits, batch, len(req), update=False)
        total += float(loss) * len(req)
        seen += len(req)
    return total / max(seen, 1)


@torch.no_grad()
def score(
    model: nn.Module, data: PrerankData, embeddings: Tensor, batch_requests: int = 128
) -> npt.NDArray[np.float32]:
    """Logits of every row of ``data``, in row order."""
    model.eval()
    out = np.zeros(data.n_rows, dtype=np.float32)
    for i in range(0, data.n_requests, batch_requests):
        req = np.arange(i, min(i + batch_requests, data.n_requests))
        batch, rows = make_batch(data, embeddings, req)
        out[rows] = forward(model, batch).numpy()
    return out
