"""HAP's vectorized per-group contrastive loss against a direct per-request reference."""

from __future__ import annotations

import math

import pytest
import torch

from training.data.contract import GROUPS
from training.preranker.config import LossSettings
from training.preranker.losses import NEGATIVE_GROUPS, POSITIVE, HapLoss


def reference(
    logits: torch.Tensor, group: torch.Tensor, row_request: torch.Tensor, tau: float
) -> dict[str, tuple[float, float]]:
    """Per group: (mean of softplus(lse_g - s_p), mean 2 sigmoid(.) / tau), term by term."""
    out: dict[str, tuple[float, float]] = {}
    s = (logits / tau).tolist()
    for name in NEGATIVE_GROUPS:
        g = GROUPS.index(name)
        terms = []
        for p in range(len(s)):
            if int(group[p]) != POSITIVE:
                continue
            negs = [
                s[n]
                for n in range(len(s))
                if int(group[n]) == g and int(row_request[n]) == int(row_request[p])
            ]
            if negs:
                peak = max(negs)
                lse = peak + math.log(sum(math.exp(v - peak) for v in negs))
                terms.append(lse - s[p])
        if terms:
            loss = sum(math.log1p(math.exp(m)) for m in terms) / len(terms)
            mass = sum(2.0 / (1.0 + math.exp(-m)) / tau for m in terms) / len(terms)
            out[name] = (loss, mass)
    return out


@pytest.mark.parametrize("seed", range(6))
def test_hap_loss_matches_the_per_request_reference(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    n_requests = 5
    n = 120
    row_request = torch.randint(0, n_requests, (n,), generator=gen)
    # Seed 0-2: every group; 3-5: only the hard groups (what the expressive model sees), so some
    # groups are absent and some requests lack a group.
    names = GROUPS if seed < 3 else ("exposed_positive", "exposed_negative", "rank_negative")
    choices = torch.tensor([GROUPS.index(g) for g in names])
    group = choices[torch.randint(0, len(choices), (n,), generator=gen)]
    logits = torch.randn(n, generator=gen) * 2
    settings = LossSettings()
    hap = HapLoss(settings)
    loss, weights = hap(logits, group, row_request, n_requests, update=True)

    expected = reference(logits, group, row_request, settings.hap_temperature)
    assert set(weights) == set(expected) == set(hap.running)
    for name, (_, mass) in expected.items():
        # The first update sets each running magnitude to the batch's own.
        assert hap.running[name] == pytest.approx(mass, rel=1e-5)
    w = hap.weights(list(expected))
    combined = sum(w[k] * expected[k][0] for k in expected) / sum(w.values())
    assert float(loss) == pytest.approx(combined, rel=1e-5)


def test_hap_loss_gradients_are_finite_when_requests_lack_groups() -> None:
    # Request 1 has a positive but no negatives of any group: its cells stay at -inf.
    group = torch.tensor(
        [POSITIVE, GROUPS.index("rank_negative"), GROUPS.index("rank_negative"), POSITIVE]
    )
    row_request = torch.tensor([0, 0, 0, 1])
    logits = torch.tensor([0.5, 1.0, -1.0, 2.0], requires_grad=True)
    loss, weights = HapLoss(LossSettings())(logits, group, row_request, 2, update=True)
    loss.backward()
    assert set(weights) == {"rank_negative"}
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    assert float(logits.grad[3]) == 0.0  # the lone positive has nothing to contrast with


def test_hap_loss_without_positives_is_zero() -> None:
    group = torch.tensor([GROUPS.index("rank_negative")] * 3)
    logits = torch.randn(3, requires_grad=True)
    loss, weights = HapLoss(LossSettings())(
        logits, group, torch.zeros(3, dtype=torch.long), 1, update=True
    )
    assert float(loss.detach()) == 0.0 and weights == {}
