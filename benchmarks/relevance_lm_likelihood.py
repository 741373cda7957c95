"""The anchor LM's own probability of each candidate as relevance, against GPL's anchor cosine.

GPL's relevance is the max over the user's 10 anchors of cos(candidate, anchor) in the frozen
content space: what the LM says about a candidate reaches the pseudo-label only through the
content vectors of its 10 best items. This diagnostic asks the same LM directly: the sequence
log-probability ``log p(SID of the candidate | the set's history)`` under the trie-constrained
model, exactly as the beam search scores an anchor (each level's log-softmax over the codes the
catalog allows after the prefix). It is computed for the whole catalog at once, by the job's own
beam search with a beam as wide as the catalog (nothing is pruned, so every item's score is
exact; an ensemble's members combined by the anchors' ``generation.ensemble_combine``), for
every anchor set the pseudo-label job matched, and read off at each labelled
unexposed row. It reads the artifacts that ``benchmarks/pseudo_labels.py --work DIR`` keeps:

    .venv/bin/python benchmarks/pseudo_labels.py --lm-epochs 10 --sid-epochs 20 --work DIR
    .venv/bin/python benchmarks/relevance_lm_likelihood.py DIR/ml-100k DIR/synthetic --out FILE

Every figure is an AUC against the funnel simulator's truth on the job's labelled unexposed rows
(the rows of ``auc_gpl_relevance`` in the benchmark's JSON, whose distillation baseline
``auc_distillation`` is on the same rows). Also: the LM score's AUC within the job's
top-confidence half (the confidence weights any relevance; ties at the median broken with seed
0). Popularity alone is the benchmark's ``auc_popularity``, on the same rows.
Whole-catalog scoring costs ``catalog size x SID levels`` decoded tokens per set: ~0.6 s per set
for MovieLens' 1,682 items on one contended CPU thread. Writes
``benchmarks/results/relevance_lm_likelihood.json`` by default.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
import pyarrow.parquet as pq
import torch
from pseudo_labels import (
    labelled_rows_with_truth,
    load_dataset,
    parse_work_folders,
    report_row_aucs,
)

from training.anchors.catalog import SidCatalog
from training.anchors.generate import beam_search_fast, search_in_batches
from training.anchors.model import ensemble_dirs, load_anchor_model
from training.anchors.sequences import anchor_requests, cutoffs_of, user_sequences
from training.anchors.trie import SidTrie
from training.evaluation.metrics import auc, upper_half

BATCH_SETS = 8
"""Sets decoded at once: ``8 x catalog`` beams."""


def catalog_log_probs(
    work: Path, dataset: str, ml100k: Path
) -> tuple[Any, SidCatalog, npt.NDArray[Any]]:
    """Every anchor set's log-probability of every catalog item, ``(sets, catalog rows)``.

    Rebuilds the anchor job's sets (same positives, cutoffs and history length, read from its
    manifest) and decodes each with a beam as wide as the catalog. Cached in
    ``work/lm_log_probs.npz``.
    """
    cache = work / "lm_log_probs.npz"
    manifest = json.loads((work / "anchors" / "manifest.json").read_text())
    semantics = pq.read_table(work / "sids" / "item_semantics.parquet")
    catalog = SidCatalog.from_table(semantics)
    eval_requests = pq.read_table(work / "eval_requests.parquet")
    data = load_dataset(dataset, ml100k)
    generation = manifest["config"]["generation"]
    seqs = user_sequences(data.interactions, catalog.item_ids)
    users = sorted(set(eval_requests.column("user_id").to_pylist()))
    sets = anchor_requests(
        seqs,
        cutoffs_of(eval_requests, generation["cutoffs"]),
        manifest["config"]["sequences"]["max_history"],
        users,
    )
    if cache.exists():
        return sets, catalog, np.load(cache)["log_probs"]
    # Every ensemble member, combined as the anchors were generated (and as the job scores).
    members = [
        load_anchor_model(d, device=torch.device("cpu"), dtype=torch.float32)
        for d in ensemble_dirs(work / "anchors" / "model")
    ]
    models = [m.model for m in members]
    vocab, n_items = members[0].vocab, len(catalog.item_ids)
    trie = SidTrie(catalog.codes, vocab.codebook_sizes)
    tokens = vocab.item_tokens(catalog.codes)
    prompts = [vocab.encode(tokens[h]) for h in sets.histories]
    began = time.perf_counter()
    with torch.inference_mode():
        out = search_in_batches(
            lambda batch: beam_search_fast(
                models,
                batch,
                trie,
                vocab,
                n_items,
                n_items,
                combine=generation.get("ensemble_combine", "arithmetic"),
            ),
            prompts,
            BATCH_SETS,
        )
    print(f"  {work}: {len(prompts)} sets x {n_items} items in {time.perf_counter() - began:.0f}s")
    log_probs = np.full((len(prompts), n_items), -np.inf, dtype=np.float32)
    rows = np.repeat(np.arange(len(prompts)), out.items.shape[1])
    valid = out.items.reshape(-1) >= 0
    log_probs[rows[valid], out.items.reshape(-1)[valid]] = out.log_probs.reshape(-1)[valid]
    if not np.isfinite(log_probs).all():
        raise RuntimeError(f"{work}: some items got no score (a beam narrower than the trie?)")
    np.savez_compressed(cache, log_probs=log_probs)
    return sets, catalog, log_probs


def figures(work: Path, dataset: str, ml100k: Path) -> dict[str, float]:
    """The AUCs of one work folder (see the module docstring)."""
    sets, catalog, log_probs = catalog_log_probs(work, dataset, ml100k)
    rows = labelled_rows_with_truth(work / "pseudo_labels" / "pseudo_labels.parquet", work)
    cutoffs = pd.to_datetime(rows["anchor_cutoff"], utc=True).astype("datetime64[us, UTC]")
    micros = cutoffs.astype("int64").to_numpy()
    keys = zip(sets.user_ids, sets.cutoffs.tolist(), strict=True)
    index = {key: i for i, key in enumerate(keys)}
    wanted = zip(rows["user_id"], micros.tolist(), strict=True)
    set_row = np.array([index.get(key, -1) for key in wanted])
    if (set_row < 0).any():
        raise RuntimeError(f"{work}: {int((set_row < 0).sum())} rows match no rebuilt anchor set")
    # The catalog's row order (the log-probabilities' columns), not the SID table's.
    position = {item: k for k, item in enumerate(catalog.item_ids.tolist())}
    item_row = rows["item_id"].map(position).to_numpy()
    y = rows["truth"].to_numpy()
    score = log_probs[set_row, item_row]
    # Ties at the median broken with seed 0 (the benchmark breaks them with its run's seed).
    top = upper_half(rows["confidence"].to_numpy(), 0)
    result = {
        "rows": float(len(rows)),
        "auc_gpl_relevance": auc(y, rows["relevance"].to_numpy()),
        "auc_lm_log_prob": auc(y, score),
        "auc_lm_log_prob_top_confidence_half": auc(y[top], score[top]),
        "auc_lm_log_prob_bottom_confidence_half": auc(y[~top], score[~top]),
    }
    return result


def main() -> None:
    args = parse_work_folders(__doc__ or "", "relevance_lm_likelihood.json")
    results: dict[str, dict[str, float]] = {}
    for work in args.work:
        dataset = "ml-100k" if work.name == "ml-100k" else "synthetic"
        results[str(work)] = figures(work, dataset, args.ml100k)
    report_row_aucs("relevance_lm_likelihood", results, args.out)


if __name__ == "__main__":
    main()
