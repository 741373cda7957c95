"""Training objectives of the pre-ranker, composable by config.

Every term reads one batch of whole requests: ``logits`` (N,), ``label`` (N,, NaN on unexposed
rows), ``group`` (N,, index into :data:`training.data.contract.GROUPS`), ``row_request`` (N,).

* ``exposed``: BCE on exposed rows only (what a production pre-ranker usually does).
* ``unexposed_negative``: BCE on every row, unexposed candidates labelled 0 (negative sampling).
* ``distill``: exposed BCE + ``distill_weight`` x BCE against a teacher's click probability on
  unexposed rows; the teacher is an expressive model trained on exposed rows only.
* ``gpl`` (dual-label fusion): exposed BCE + ``gpl_lambda`` x mean over unexposed rows that
  have a pseudo-label of ``confidence x BCE(logit, pseudo_label)``.
* ``hap``: ``hap_bce_weight`` x exposed BCE + the per-group contrastive loss of
  :class:`HapLoss`.
* ``gpl_hap``: both.

``popularity_debias`` (PD) adds ``gamma x batch["popularity"]`` to the logits of every term when
the batch carries that column: :func:`training.preranker.job.fit` decides which batches do (the
light model's, under :data:`training.preranker.config.DEBIASED_OBJECTIVES` only).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.nn import functional

from training.data.contract import GROUPS
from training.preranker.config import LossSettings

POSITIVE = GROUPS.index("exposed_positive")
NEGATIVE_GROUPS = ("exposed_negative", "rank_negative", "prerank_negative", "global_negative")
UNEXPOSED = torch.tensor(
    [GROUPS.index(g) for g in ("global_negative", "prerank_negative", "rank_negative")]
)


def _mean(values: Tensor, mask: Tensor) -> Tensor:
    n = mask.sum()
    return (values * mask).sum() / n.clamp_min(1)


def exposed_bce(logits: Tensor, label: Tensor) -> Tensor:
    """BCE on rows with a real label."""
    mask = torch.isfinite(label)
    target = torch.nan_to_num(label, nan=0.0)
    return _mean(
        functional.binary_cross_entropy_with_logits(logits, target, reduction="none"), mask
    )


def unexposed_mask(group: Tensor) -> Tensor:
    """Rows of unexposed groups."""
    return torch.isin(group, UNEXPOSED.to(group.device))


def all_rows_bce(logits: Tensor, label: Tensor) -> Tensor:
    """BCE on every row, unlabelled (unexposed) rows as negatives."""
    target = torch.nan_to_num(label, nan=0.0)
    return functional.binary_cross_entropy_with_logits(logits, target)


def soft_bce(logits: Tensor, target: Tensor, weight: Tensor, mask: Tensor) -> Tensor:
    """Mean over ``mask`` rows of ``weight x BCE(logits, target)`` (soft targets allowed)."""
    target = torch.nan_to_num(target, nan=0.0).clamp(0.0, 1.0)
    per_row = functional.binary_cross_entropy_with_logits(logits, target, reduction="none") * weight
    return _mean(per_row, mask.to(per_row.dtype))


@dataclass
class HapLoss:
    """Per-group contrastive losses with harmonized gradient magnitudes.

    For each request, each exposed positive ``p`` and each negative group ``g`` with candidates
    in that request, the term is a softmax cross-entropy of ``p`` against the group's negatives
    ``N_g`` at temperature ``tau``::

        l_{p,g} = -log( e^{s_p/tau} / (e^{s_p/tau} + sum_{n in N_g} e^{s_n/tau}) )
                = softplus( logsumexp_{n in N_g}(s_n/tau) - s_p/tau )

    so easy negatives (global random) never share a softmax with hard ones (rank, exposed) and
    cannot drown their gradient. ``L_g`` is the mean of ``l_{p,g}`` over terms.

    Weighting ("harmonized"): the L1 norm of ``dl_{p,g}/ds`` over the term's logits is exactly
    ``2 (1 - q_{p,g}) / tau`` with ``q`` the positive's softmax probability, so each group's mean
    gradient magnitude ``G_g`` costs nothing extra. A running mean ``m_g`` (momentum ``beta``)
    sets ``w_g = mean_h(m_h) / m_g``: every group contributes the same gradient mass, so the
    many easy negatives neither dominate nor vanish. Weights are detached; the loss is
    ``sum_g w_g L_g / sum_g w_g`` over the groups present in the batch.
    """

    settings: LossSettings
    groups: tuple[str, ...] = NEGATIVE_GROUPS
    running: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # GROUPS index -> position in self.groups (-1: not a negative group of this loss).
        self._slot = torch.full((len(GROUPS),), -1, dtype=torch.long)
        for i, name in enumerate(self.groups):
            self._slot[GROUPS.index(name)] = i

    def __call__(
        self, logits: Tensor, group: Tensor, row_request: Tensor, n_requests: int, update: bool
    ) -> tuple[Tensor, dict[str, float]]:
        """The combined loss and each group's current weight.

        All groups at once: each (request, group) cell gets its own logsumexp through one
        scatter over ``n_requests x len(groups)`` cells, instead of a pass per group (the
        per-group passes were a fifth of a light-model training step on CPU).
        """
        tau = self.settings.hap_temperature
        s = logits / tau
        n_groups = len(self.groups)
        slot = self._slot.to(group.device)[group]
        neg = slot >= 0
        pos = group == POSITIVE
        if not bool(neg.any()) or not bool(pos.any()):
            return logits.sum() * 0.0, {}
        cell = row_request[neg] * n_groups + slot[neg]
        s_neg = s[neg]
        cells = n_requests * n_groups
        # logsumexp per cell over its negatives, stably via a per-cell max.
        peak = torch.full((cells,), -torch.inf, dtype=s.dtype, device=s.device)
        peak = peak.scatter_reduce(0, cell, s_neg.detach(), reduce="amax")
        total = torch.zeros(cells, dtype=s.dtype, device=s.device)
        total = total.index_add(0, cell, torch.exp(s_neg - peak[cell]))
        present = (total > 0).view(n_requests, n_groups)
        lse = torch.where(total > 0, torch.log(total.clamp_min(1e-30)) + peak, peak)
        pos_req = row_request[pos]
        valid = present[pos_req]  # (positives, groups): the group has negatives in p's request
        diff = lse.view(n_requests, n_groups)[pos_req] - s[pos].unsqueeze(1)
        margin = torch.where(valid, diff, torch.zeros_like(diff))
        weight = valid.to(s.dtype)
        counts = weight.sum(0)
        per_group = (functional.softplus(margin) * weight).sum(0) / counts.clamp_min(1.0)
        grad_mass = (2.0 * torch.sigmoid(margin.detach()) / tau * weight).sum(0)
        mean_mass = (grad_mass / counts.clamp_min(1.0)).tolist()
        losses: dict[str, Tensor] = {}
        magnitudes: dict[str, float] = {}
        for i, n_terms in enumerate(counts.tolist()):
            if n_terms > 0:
                losses[self.groups[i]] = per_group[i]
                magnitudes[self.groups[i]] = mean_mass[i]
        if not losses:
            return logits.sum() * 0.0, {}
        if update:
            beta = self.settings.hap_momentum
            for name, g in magnitudes.items():
                old = self.running.get(name)
                self.running[name] = g if old is None else beta * old + (1 - beta) * g
        weights = self.weights(list(losses))
        total_w = sum(weights.values())
        loss = sum(weights[n] * losses[n] for n in losses) / total_w
        assert isinstance(loss, Tensor)
        return loss, weights

    def weights(self, names: list[str]) -> dict[str, float]:
        """Current weight of each named group."""
        if self.settings.hap_weighting == "uniform" or not self.running:
            return dict.fromkeys(names, 1.0)
        known = [self.running[n] for n in names if n in self.running]
        mean = sum(known) / len(known) if known else 1.0
        return {n: mean / max(self.running.get(n, mean), 1e-8) for n in names}


def objective_loss(
    objective: str,
    settings: LossSettings,
    hap: HapLoss,
    logits: Tensor,
    batch: dict[str, Tensor],
    n_requests: int,
    update: bool,
) -> tuple[Tensor, dict[str, float]]:
    """The configured objective on one batch, and named parts for logging."""
    label, group, row_request = batch["label"], batch["group"], batch["row_request"]
    parts: dict[str, float] = {}
    if "popularity" in batch:
        # PD: a fixed popularity term explains the popularity part of every training target, so
        # the model's own logit (what is served) need not learn "popular = relevant" from the
        # exposed positives contrasted with random (mostly long-tail) negatives.
        logits = logits + settings.popularity_debias * batch["popularity"]
    if objective == "exposed":
        loss = exposed_bce(logits, label)
    elif objective == "unexposed_negative":
        loss = all_rows_bce(logits, label)
    elif objective == "distill":
        unexposed = unexposed_mask(group)
        kd = soft_bce(logits, batch["teacher"], torch.ones_like(logits), unexposed)
        loss = exposed_bce(logits, label) + settings.distill_weight * kd
        parts["distill"] = float(kd.detach())
    elif objective in ("gpl", "hap", "gpl_hap"):
        bce = exposed_bce(logits, label)
        loss = bce if objective == "gpl" else settings.hap_bce_weight * bce
        if objective in ("gpl", "gpl_hap"):
            has_pseudo = unexposed_mask(group) & torch.isfinite(batch["pseudo"])
            pseudo = soft_bce(logits, batch["pseudo"], batch["confidence"], has_pseudo)
            loss = loss + settings.gpl_lambda * pseudo
            parts["pseudo"] = float(pseudo.detach())
        if objective in ("hap", "gpl_hap"):
            contrastive, weights = hap(logits, group, row_request, n_requests, update)
            loss = loss + contrastive
            parts["hap"] = float(contrastive.detach())
            parts.update({f"w_{k}": v for k, v in weights.items()})
    else:
        raise ValueError(f"unknown objective {objective!r}")
    return loss, parts
