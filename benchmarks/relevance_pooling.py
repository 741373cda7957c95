"""How the pooling of per-anchor cosines ranks unexposed truth: max (GPL's) against alternatives.

GPL's relevance is the max over the user's anchors of cos(candidate, anchor). This script
recomputes every candidate's cosine to each anchor of the set the pseudo-label job matched it
with, and scores the same rows with other poolings (mean, top-k mean, a softmax pool with
temperature tau, LM-probability weighting, the anchors' centroid), all against the funnel
simulator's truth. It reads the artifacts that ``benchmarks/pseudo_labels.py --work DIR`` keeps:

    .venv/bin/python benchmarks/pseudo_labels.py --lm-epochs 10 --sid-epochs 20 --work DIR
    .venv/bin/python benchmarks/relevance_pooling.py DIR/ml-100k DIR/synthetic --out FILE

Writes ``benchmarks/results/relevance_pooling.json`` by default.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pandas as pd
import pyarrow.parquet as pq
from pseudo_labels import labelled_rows_with_truth

from training.evaluation.metrics import auc

RESULTS = Path(__file__).parent / "results"
Matrix = npt.NDArray[np.float32]

TAUS = (0.02, 0.05, 0.1, 0.2)
"""Softmax-pool temperatures: tau * logsumexp(cos / tau) tends to the max as tau -> 0."""
TOP_K = (2, 3, 5)
LOG_PROB_WEIGHTS = (0.01, 0.03, 0.1)
"""lambda of max over anchors of (cos + lambda * log p): the LM's probability as a prior."""


def _unit(rows: Matrix) -> Matrix:
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)


def per_anchor_cosines(work: Path) -> tuple[pd.DataFrame, Matrix, Matrix, Matrix]:
    """The job's labelled rows with their truth, and each row's cosine to each of its anchors.

    Returns:
        The rows (``truth``, ``relevance``), cosines and anchor log-probabilities
        (rows x most anchors; NaN / -inf past a set's own anchors), and each row's cosine to
        its set's normalized centroid.
    """
    rows = labelled_rows_with_truth(work / "pseudo_labels" / "pseudo_labels.parquet", work)
    semantics = pq.read_table(work / "sids" / "item_semantics.parquet")
    vectors = np.stack(semantics.column("content_embedding").to_numpy(zero_copy_only=False))
    position = {item: k for k, item in enumerate(semantics.column("item_id").to_pylist())}
    candidates = _unit(vectors.astype(np.float32))[rows["item_id"].map(position).to_numpy()]
    anchors = pq.read_table(work / "anchors" / "user_interest_anchors.parquet").to_pandas()
    key = {
        k: s for s, k in enumerate(zip(anchors["user_id"], anchors["event_timestamp"], strict=True))
    }
    sets = np.array(
        [key[k] for k in zip(rows["user_id"], rows["anchor_cutoff"], strict=True)], np.int64
    )
    most = int(anchors["num_anchors"].max())
    dim = candidates.shape[1]
    cos = np.full((len(rows), most), np.nan, np.float32)
    log_p = np.full((len(rows), most), -np.inf, np.float32)
    centroid = np.zeros(len(rows), np.float32)
    for s, idx in pd.Series(sets).groupby(sets).indices.items():
        vecs = _unit(np.array(anchors["anchor_embeddings"].iloc[s], np.float32).reshape(-1, dim))
        n = len(vecs)
        cos[idx, :n] = candidates[idx] @ vecs.T
        log_p[idx, :n] = np.asarray(anchors["anchor_log_probs"].iloc[s], np.float32)
        centroid[idx] = candidates[idx] @ _unit(vecs.mean(0, keepdims=True))[0]
    return rows, cos, log_p, centroid


def poolings(cos: Matrix, log_p: Matrix, centroid: Matrix) -> dict[str, Matrix]:
    """Each pooling's score of every row."""
    valid = ~np.isnan(cos)
    low = np.where(valid, cos, -np.inf)
    ranked = -np.sort(-low, axis=1)
    prob = np.exp(log_p - log_p.max(1, keepdims=True))
    prob /= prob.sum(1, keepdims=True)
    out: dict[str, Matrix] = {"max (GPL)": low.max(1), "mean": np.nanmean(cos, 1)}
    for k in TOP_K:
        head = ranked[:, :k]
        out[f"top-{k} mean"] = np.nanmean(np.where(np.isfinite(head), head, np.nan), 1)
    for tau in TAUS:
        z = low / tau
        top = z.max(1, keepdims=True)
        out[f"softmax pool, tau {tau}"] = tau * (top[:, 0] + np.log(np.exp(z - top).sum(1)))
    out["LM-probability-weighted mean"] = (np.where(valid, cos, 0) * prob).sum(1)
    for lam in LOG_PROB_WEIGHTS:
        out[f"max of cos + {lam} log p"] = np.where(valid, cos + lam * log_p, -np.inf).max(1)
    out["centroid cosine"] = centroid
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("work", type=Path, nargs="+", help="<work>/<dataset> directories")
    parser.add_argument("--out", type=Path, default=RESULTS / "relevance_pooling.json")
    args = parser.parse_args()
    results: dict[str, dict[str, float]] = {}
    for work in args.work:
        rows, cos, log_p, centroid = per_anchor_cosines(work)
        y = rows["truth"].to_numpy()
        job = auc(y, rows["relevance"].to_numpy())
        figures = {name: auc(y, score) for name, score in poolings(cos, log_p, centroid).items()}
        if abs(figures["max (GPL)"] - job) > 1e-4:
            raise RuntimeError(
                f"{work}: recomputed max {figures['max (GPL)']:.4f} != job {job:.4f}"
            )
        results[str(work)] = {"rows": len(rows), **figures}
    names = list(next(iter(results.values())))[1:]
    print("AUC against the truth on the job's labelled unexposed rows")
    # Columns named by the last two parts of each path (e.g. seed0/ml-100k).
    labels = ["/".join(Path(w).parts[-2:]) for w in results]
    width = max(12, *(len(label) + 2 for label in labels))
    print(f"{'pooling':<30}" + "".join(f"{label:>{width}}" for label in labels))
    for name in names:
        print(f"{name:<30}" + "".join(f"{r[name]:>{width}.4f}" for r in results.values()))
    out = {
        "benchmark": "relevance_pooling",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2, default=float) + "\n")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
