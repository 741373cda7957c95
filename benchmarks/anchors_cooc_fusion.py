"""Can the anchor LM add to co-occurrence? Item-level fusions of the two, tuned on held-out users.

Reads the ``OUT.lists.npz`` files that ``benchmarks/anchors_quality.py --dump-lists K`` writes (the
LM's top-K items and log-probabilities for the LM's held-out validation users and for the test
users, the training sequences without the held-out items, every history, in catalog rows) and
scores, exhaustively at the item level (no beam search), co-occurrence (window 5, both ways,
decay 0.6: the baseline's tuned cell), the LM alone, and fusions of the two, each fusion's
parameter chosen on the validation users' NDCG@10 and then scored on the test users:

* ``cooc, LM backfill``: co-occurrence first, the LM's list where co-occurrence has no score;
* ``mixture``: ``l * cooc / sum(cooc) + (1 - l) * p_LM``;
* ``dirichlet``: ``(cooc + k * p_LM) / (sum(cooc) + k)`` (the LM as the prior of a Dirichlet:
  weight on co-occurrence grows with its evidence);
* ``product``: ``log p_LM + w log p_prior``, the prior smoothed as ``training/anchors/prior.py``
  does (the product's fusion without the beam search's approximation).

Items outside the LM's top K get probability 1e-7. Validation co-occurrence is counted on the
training sequences without the held-out items; test co-occurrence on every history, as the
baseline's refit.

    .venv/bin/python benchmarks/anchors_cooc_fusion.py RUN.lists.npz ... [--out FILE]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

from training.anchors.prior import pair_matrix

Arr = npt.NDArray[np.float64]
Fusion = Callable[[Arr, Arr, Arr, float], Arr]


def _split(offsets: npt.NDArray[np.int64], items: npt.NDArray[np.int64]) -> list[Any]:
    return [items[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]


def cooc_scores(histories: list[Any], matrix: sp.csr_matrix, decay: float = 0.6) -> Arr:
    """Recency-weighted co-occurrence scores of the last 20 items, ``[users, items]``."""
    rows: list[int] = []
    cols: list[int] = []
    vals: list[float] = []
    for u, h in enumerate(histories):
        latest = h[::-1][:20]
        rows += [u] * len(latest)
        cols += latest.tolist()
        vals += [decay**j for j in range(len(latest))]
    weights = sp.csr_matrix((vals, (rows, cols)), shape=(len(histories), matrix.shape[0]))
    return np.asarray((weights @ matrix).todense())


def lm_dense(items: npt.NDArray[np.int64], logp: npt.NDArray[np.float32], n: int) -> Arr:
    """The LM's top-K probabilities as a dense table, 1e-7 elsewhere."""
    out = np.full((len(items), n), 1e-7)
    rows = np.repeat(np.arange(len(items)), items.shape[1])
    ok = items.reshape(-1) >= 0
    out[rows[ok], items.reshape(-1)[ok]] = np.exp(logp.reshape(-1)[ok])
    return out


def hr_ndcg(score: Arr, targets: npt.NDArray[np.int64], k: int = 10) -> tuple[float, float]:
    """HR@k and NDCG@k of the top-k by ``score`` (ties: lower item row first)."""
    idx = np.argpartition(-score, k, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(score, idx, 1), axis=1, kind="stable")
    top = np.take_along_axis(idx, order, 1)
    hit = top == targets[:, None]
    found = hit.any(1)
    return float(found.mean()), float(np.where(found, 1 / np.log2(hit.argmax(1) + 2), 0).mean())


def _normalized(s: Arr) -> Arr:
    return s / np.maximum(s.sum(1, keepdims=True), 1e-12)


def _background(pop: Arr) -> Arr:
    return (pop + 1) / (pop + 1).sum()


FUSIONS: dict[str, tuple[Fusion, list[float]]] = {
    "co-occurrence (popular backfill)": (lambda s, p, pop, a: s + 1e-9 * _background(pop), [0]),
    "LM alone": (lambda s, p, pop, a: p, [0]),
    "cooc, LM backfill": (lambda s, p, pop, a: s + 1e-6 * p, [0]),
    "mixture l cooc + (1-l) LM": (
        lambda s, p, pop, a: a * _normalized(s) + (1 - a) * p + 1e-9 * _background(pop),
        [0.3, 0.5, 0.7, 0.8, 0.9, 0.95],
    ),
    "dirichlet (cooc + k LM)": (
        lambda s, p, pop, a: s + a * p + 1e-9 * _background(pop),
        [0.1, 0.3, 1, 3, 10],
    ),
    "product LM x prior^w (smoothing 0.1)": (
        lambda s, p, pop, a: np.log(p) + a * np.log(0.9 * _normalized(s) + 0.1 * _background(pop)),
        [1, 2, 4, 8],
    ),
    "product LM x prior^w (smoothing 0.01)": (
        lambda s, p, pop, a: (
            np.log(p) + a * np.log(0.99 * _normalized(s) + 0.01 * _background(pop))
        ),
        [0.5, 1, 2, 4],
    ),
}


def study(path: Path) -> dict[str, Any]:
    """Every fusion on one run's lists: validation table, chosen parameter, test figures."""
    z = np.load(path)
    n = len(z["catalog_item_ids"])
    train = _split(z["train_offsets"], z["train_items"])
    sets: dict[str, tuple[Arr, Arr, Arr, npt.NDArray[np.int64]]] = {}
    for name, sequences in (
        ("val", train),
        ("test", _split(z["test_offsets"], z["test_items"])),
    ):
        histories = _split(z[f"{name}_offsets"], z[f"{name}_items"])
        matrix = pair_matrix(sequences, n, 5, True)
        pop = np.bincount(np.concatenate(sequences), minlength=n).astype(float)
        lm = lm_dense(z[f"{name}_lm_items"], z[f"{name}_lm_logp"], n)
        sets[name] = (cooc_scores(histories, matrix), lm, pop, z[f"{name}_targets"])
    out: dict[str, Any] = {}
    for label, (fuse, params) in FUSIONS.items():
        val = [hr_ndcg(fuse(*sets["val"][:3], a), sets["val"][3]) for a in params]
        best = max(range(len(params)), key=lambda i: val[i][1])
        hr, ndcg = hr_ndcg(fuse(*sets["test"][:3], params[best]), sets["test"][3])
        out[label] = {
            "validation": {
                str(a): {"hr@10": v[0], "ndcg@10": v[1]} for a, v in zip(params, val, strict=True)
            },
            "chosen": params[best],
            "test_hr@10": round(hr, 5),
            "test_ndcg@10": round(ndcg, 5),
        }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("lists", type=Path, nargs="+", help="OUT.lists.npz of anchors_quality.py")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/anchors_cooc_fusion.json"))
    args = p.parse_args()
    results = {str(f): study(f) for f in args.lists}
    for f, rows in results.items():
        print(f"\n{f}")
        print(f"{'fusion':<40}{'chosen':>8}{'HR@10':>9}{'NDCG@10':>9}")
        for label, r in rows.items():
            print(f"{label:<40}{r['chosen']:>8}{r['test_hr@10']:>9.4f}{r['test_ndcg@10']:>9.4f}")
    report = {
        "benchmark": "anchors_cooc_fusion",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
