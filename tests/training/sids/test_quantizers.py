"""k-means, residual k-means and the RQ-VAE on clustered gaussian vectors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.training.sids.helpers import clustered
from training.sids import metrics
from training.sids.config import SidConfig
from training.sids.kmeans import Balance, kmeans
from training.sids.rkmeans import fit_rkmeans
from training.sids.rqvae import train_rqvae
from training.sids.tokenizer import (
    CODEBOOKS_CONFIG,
    CodebookFormatError,
    SemanticIdTokenizer,
)

CFG = SidConfig(
    levels=3,
    codebook_size=16,
    code_dim=8,
    hidden_dims=(64,),
    epochs=15,
    batch_size=64,
    lr=3e-3,
    kmeans_iters=20,
    show_progress=False,
)


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    x, _ = clustered(400, clusters=16, dim=32, seed=1)
    return x


def test_kmeans_finds_separated_clusters_and_is_seeded() -> None:
    x, labels = clustered(300, clusters=6, dim=8, seed=0, spread=0.05)
    fit = kmeans(torch.tensor(x), 6, iters=30, seed=3)
    # Every true cluster maps to exactly one fitted cluster.
    pairs = {(int(a), int(b)) for a, b in zip(labels, fit.labels.tolist(), strict=True)}
    assert len(pairs) == 6
    again = kmeans(torch.tensor(x), 6, iters=30, seed=3)
    assert torch.equal(fit.centroids, again.centroids)


def test_balanced_kmeans_keeps_clusters_even() -> None:
    x, _ = clustered(320, clusters=2, dim=8, seed=0, spread=0.3)
    plain = kmeans(torch.tensor(x), 8, iters=20, seed=0)
    balanced = kmeans(torch.tensor(x), 8, iters=20, seed=0, balance=Balance(30, 0.05))
    assert torch.bincount(balanced.labels, minlength=8).min() > 0
    assert metrics.perplexity(balanced.labels.numpy()[:, None], 8)[0] >= (
        metrics.perplexity(plain.labels.numpy()[:, None], 8)[0] - 0.5
    )


@pytest.mark.parametrize("method", ["rqvae", "rkmeans"])
def test_quantizer_reconstructs_and_uses_codes(method: str, data: np.ndarray) -> None:
    cfg = CFG.model_copy(update={"method": method})
    fit = train_rqvae(data, cfg) if method == "rqvae" else fit_rkmeans(data, cfg)
    codes = fit.tokenizer.codes(data)
    assert codes.shape == (len(data), 3) and codes.dtype == np.int32
    mse, cosine = metrics.reconstruction(data, fit.reconstruction)
    assert cosine > (0.8 if method == "rqvae" else 0.9), cosine
    assert mse < 0.01
    util = metrics.utilization(codes, cfg.codebook_size)
    assert util[0] >= 0.9, util
    # The first level separates the 16 true clusters: items sharing a code are much closer.
    coh = metrics.coherence(data, codes[:, 0], pairs=2000, seed=0)
    assert coh["ratio"] > 2.0, coh


@pytest.mark.parametrize("method", ["rqvae", "rkmeans"])
def test_same_seed_same_codes(method: str, data: np.ndarray) -> None:
    def run(seed: int) -> np.ndarray:
        cfg = CFG.model_copy(update={"method": method, "seed": seed, "epochs": 3})
        fit = train_rqvae(data, cfg) if method == "rqvae" else fit_rkmeans(data, cfg)
        return fit.tokenizer.codes(data)

    first = run(0)
    assert np.array_equal(first, run(0))
    assert not np.array_equal(first, run(1))


def test_tokenizer_round_trip_and_shape_check(data: np.ndarray, tmp_path: Path) -> None:
    fit = train_rqvae(data, CFG.model_copy(update={"epochs": 2}))
    fit.tokenizer.save(tmp_path)
    loaded = SemanticIdTokenizer.load(tmp_path)
    assert np.array_equal(loaded.codes(data), fit.tokenizer.codes(data))

    config = tmp_path / CODEBOOKS_CONFIG
    original = config.read_text()
    config.write_text(original.replace('"codebook_size": 16', '"codebook_size": 32'))
    with pytest.raises(CodebookFormatError, match="codebooks"):
        SemanticIdTokenizer.load(tmp_path)
    config.write_text(original.replace('"code_dim": 8', '"code_dim": 4'))
    with pytest.raises(CodebookFormatError, match="encoder"):
        SemanticIdTokenizer.load(tmp_path)
    config.write_text("{not json")
    with pytest.raises(CodebookFormatError):
        SemanticIdTokenizer.load(tmp_path)


def test_collision_repulsion_separates_near_duplicates() -> None:
    # Half of the items get a near-duplicate (cosine ~0.99), like product variants.
    x, _ = clustered(300, clusters=16, dim=32, seed=1, spread=0.4)
    rng = np.random.default_rng(0)
    twins = x[:150] + rng.normal(0, 0.01, (150, 32)).astype(np.float32)
    twins /= np.linalg.norm(twins, axis=1, keepdims=True)
    catalog = np.vstack([x, twins]).astype(np.float32)

    def shared_prefix(cfg: SidConfig) -> tuple[float, list[int]]:
        fit = train_rqvae(catalog, cfg)
        _, inverse, counts = np.unique(
            fit.tokenizer.codes(catalog), axis=0, return_inverse=True, return_counts=True
        )
        return float(np.mean(counts[inverse.ravel()] > 1)), fit.colliding

    plain, not_logged = shared_prefix(CFG.model_copy(update={"collision_repulsion": 0.0}))
    pushed, colliding = shared_prefix(CFG.model_copy(update={"collision_repulsion": 40.0}))
    assert not_logged == []
    # One count per epoch (at its start) and one after training: the last is the final state.
    assert len(colliding) == CFG.epochs + 1
    assert colliding[-1] == round(pushed * len(catalog))
    assert pushed < plain - 0.1, (plain, pushed)
