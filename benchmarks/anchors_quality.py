"""Interest-anchor quality on Amazon Scientific: next-item HR/NDCG@5/10 against two baselines.

Protocol (leave-one-out, the UniSRec split of the dataset, read directly from its files):

* items: ``Scientific.text`` (ASIN, text) with ``Scientific.item2index`` for the index used by the
  ``.inter`` files; SIDs from ``training.sids.job.train_sids`` (MiniLM text vectors, RQ-VAE or
  residual k-means, settings below).
* positives: each user's ``Scientific.test.inter`` history (training items + the validation
  item), timestamped in order. The anchor model holds out the last positive (the validation item)
  of ``--eval-users`` users for early stopping; the test target is never seen.
* test: anchors generated for every user from that history (cutoff after it); a hit is the user's
  real next item (``test.inter`` target) among the top K anchors. No filtering of consumed items
  for any method (0.6% of test targets are in the history).
* baselines, on the same users and training data: most-popular, and item-to-item co-occurrence
  (pairs within a window of the sequence, weighted 1/distance, counted forward only or both
  ways, recency-weighted over the user's last items; window, direction and decay are tuned on the
  validation targets, then refit on the full histories).
* significance: every anchor list decoded with the prior (and every ``--ensemble-models``
  decode) is also compared with the co-occurrence list user by user (``vs_cooccurrence``: the
  HR@10 and NDCG@10 differences with a 95% paired-bootstrap interval, and how many users each
  list alone hits). A list beats co-occurrence only if that interval lies above zero.

Prints a table and writes ``benchmarks/results/anchors_quality.json``.

    .venv/bin/python benchmarks/anchors_quality.py [--epochs 30] [--max-users 8442] ...
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import scipy.sparse as sp
import torch

from training.anchors.job import AnchorConfig, generate_anchors, train_anchor_model
from training.anchors.prior import CooccurrencePrior, PriorConfig

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "amazon-scientific"
T0 = datetime(2024, 1, 1, tzinfo=UTC)
TS = pa.timestamp("us", tz="UTC")
KS = (5, 10)
#: The co-occurrence baseline's tuning grid: pair window, both directions or forward only, and
#: the recency decay over the user's last items.
COOC_WINDOWS = (1, 2, 3, 5)
COOC_SYMMETRIC = (False, True)
COOC_DECAYS = (0.3, 0.6, 1.0)


def read_inter(path: Path) -> list[tuple[str, list[int], int]]:
    rows = []
    with path.open() as f:
        next(f)
        for line in f:
            user, hist, target = line.rstrip("\n").split("\t")
            rows.append((user, [int(x) for x in hist.split()], int(target)))
    return rows


def load(root: Path, max_users: int | None, seed: int) -> dict[str, Any]:
    index = {}
    with (root / "Scientific.item2index").open() as f:
        for line in f:
            asin, idx = line.rstrip("\n").split("\t")
            index[int(idx)] = asin
    texts = {}
    with (root / "Scientific.text").open() as f:
        next(f)
        for line in f:
            asin, text = line.rstrip("\n").split("\t", 1)
            texts[asin] = text.strip() or asin
    test = read_inter(root / "Scientific.test.inter")
    if max_users is not None and max_users < len(test):
        pick = np.sort(np.random.default_rng(seed).permutation(len(test))[:max_users])
        test = [test[i] for i in pick]
    asins = [index[i] for i in sorted(index)]
    items = pa.table(
        {
            "item_id": asins,
            "text": [texts.get(a, a) for a in asins],
            "event_timestamp": pa.array([T0] * len(asins), TS),
        }
    )
    return {"index": index, "items": items, "test": test}


def positives_table(test: list[tuple[str, list[int], int]], index: dict[int, str]) -> pa.Table:
    users, items, stamps = [], [], []
    for user, hist, _ in test:
        for k, item in enumerate(hist):
            users.append(f"u{user}")
            items.append(index[item])
            stamps.append(T0 + timedelta(minutes=k))
    return pa.table({"user_id": users, "item_id": items, "event_timestamp": pa.array(stamps, TS)})


def metrics(recs: list[list[int]], targets: list[int]) -> dict[str, float]:
    out: dict[str, float] = {}
    for k in KS:
        hits, gains = 0, 0.0
        for rec, target in zip(recs, targets, strict=True):
            top = rec[:k]
            if target in top:
                hits += 1
                gains += 1.0 / np.log2(top.index(target) + 2)
        out[f"hr@{k}"] = round(hits / len(targets), 5)
        out[f"ndcg@{k}"] = round(gains / len(targets), 5)
    return out


def per_user_gains(recs: list[list[int]], targets: list[int], k: int) -> np.ndarray:
    """``[users, 2]``: each user's hit and NDCG gain at ``k`` (the terms ``metrics`` averages)."""
    out = np.zeros((len(targets), 2))
    for u, (rec, target) in enumerate(zip(recs, targets, strict=True)):
        top = rec[:k]
        if target in top:
            out[u] = 1.0, 1.0 / np.log2(top.index(target) + 2)
    return out


def paired_comparison(
    recs: list[list[int]],
    baseline: list[list[int]],
    targets: list[int],
    k: int = 10,
    resamples: int = 2000,
    seed: int = 0,
) -> dict[str, float]:
    """HR@k and NDCG@k of ``recs`` minus ``baseline`` on the same users, with a paired bootstrap.

    Both lists are scored on one resample of users at a time, so what the two methods get right
    together cancels: the interval is that of the difference, far narrower than either figure's
    own standard error when the lists agree on most users. "Beats" is claimed only when the 95%
    interval of the difference lies above zero.
    """
    diff = per_user_gains(recs, targets, k) - per_user_gains(baseline, targets, k)
    rng = np.random.default_rng(seed)
    n = len(targets)
    means = np.stack([diff[rng.integers(0, n, n)].mean(0) for _ in range(resamples)])
    low, high = np.percentile(means, [2.5, 97.5], axis=0)
    hits = per_user_gains(recs, targets, k)[:, 0], per_user_gains(baseline, targets, k)[:, 0]
    return {
        f"hr@{k}_diff": round(float(diff[:, 0].mean()), 5),
        f"hr@{k}_diff_ci95": [round(float(low[0]), 5), round(float(high[0]), 5)],
        f"ndcg@{k}_diff": round(float(diff[:, 1].mean()), 5),
        f"ndcg@{k}_diff_ci95": [round(float(low[1]), 5), round(float(high[1]), 5)],
        # Users hit by one list and not the other: the only ones the difference is made of.
        "users_hit_only_by_this": int(((hits[0] > 0) & (hits[1] == 0)).sum()),
        "users_hit_only_by_baseline": int(((hits[0] == 0) & (hits[1] > 0)).sum()),
        "resamples": resamples,
    }


def popular(histories: list[list[int]], k: int) -> list[int]:
    return [i for i, _ in Counter(i for h in histories for i in h).most_common(k)]


def unseen(recs: list[list[int]], histories: list[list[int]], k: int) -> list[list[int]]:
    """Each list without the user's own history items, cut to ``k``."""
    out = []
    for rec, h in zip(recs, histories, strict=True):
        seen = set(h)
        out.append([i for i in rec if i not in seen][:k])
    return out


def history_share(recs: list[list[int]], histories: list[list[int]], k: int) -> float:
    """Share of the top-``k`` recommendations that are items of the user's own history."""
    seen = sum(len(set(rec[:k]) & set(h)) for rec, h in zip(recs, histories, strict=True))
    return round(seen / max(1, sum(len(rec[:k]) for rec in recs)), 5)


def cooc_matrix(
    histories: list[list[int]], n_items: int, window: int, symmetric: bool = False
) -> sp.csr_matrix:
    """Item-to-item counts of pairs within ``window`` positions, weighted 1 / distance.

    ``symmetric`` also counts each pair backwards ("b then a" for "a then b"): on Amazon
    Scientific the better choice (baskets have no meaningful order), picked by the tuning.
    """
    rows, cols, vals = [], [], []
    for h in histories:
        for a in range(len(h)):
            for d in range(1, window + 1):
                if a + d < len(h):
                    rows.append(h[a])
                    cols.append(h[a + d])
                    vals.append(1.0 / d)
    forward = sp.csr_matrix((vals, (rows, cols)), shape=(n_items, n_items))
    return (forward + forward.T).tocsr() if symmetric else forward


def cooc_grid(
    histories: list[list[int]], n_items: int
) -> Iterator[tuple[int, bool, float, sp.csr_matrix]]:
    """Every cell of the tuning grid: window, direction, decay and the cell's pair matrix.

    A matrix is built once per (window, direction) and shared by that pair's decays.
    """
    for window in COOC_WINDOWS:
        for symmetric in COOC_SYMMETRIC:
            matrix = cooc_matrix(histories, n_items, window, symmetric)
            for decay in COOC_DECAYS:
                yield window, symmetric, decay, matrix


def cooc_recs(
    histories: list[list[int]],
    matrix: sp.csr_matrix,
    decay: float,
    k: int,
    fill: list[int],
    exclude_history: bool = False,
) -> list[list[int]]:
    recs = []
    for h in histories:
        recent = h[::-1][:20]
        weights = np.array([decay**j for j in range(len(recent))])
        scores = np.asarray(matrix[recent].T @ weights).ravel()
        backfill = fill
        if exclude_history:
            scores[h] = 0.0
            seen = set(h)
            backfill = [i for i in fill if i not in seen]
        top = np.argsort(-scores, kind="stable")[:k]
        rec = [int(i) for i in top if scores[i] > 0]
        rec += [i for i in backfill if i not in rec][: k - len(rec)]
        recs.append(rec)
    return recs


def cooc_lists(
    histories: list[list[int]],
    n_items: int,
    tuned: dict[str, Any],
    k: int,
    exclude_history: bool = False,
) -> list[list[int]]:
    """Top-``k`` co-occurrence lists with the settings ``cooc_baseline`` tuned."""
    matrix = cooc_matrix(histories, n_items, tuned["window"], tuned["symmetric"])
    return cooc_recs(
        histories, matrix, tuned["decay"], k, popular(histories, 2 * k), exclude_history
    )


def prior_alone_lists(
    model_dir: Path,
    cfg: AnchorConfig,
    histories: list[list[int]],
    index: dict[int, str],
    exclude_history: bool,
    k: int = 10,
) -> list[list[int]]:
    """Top-``k`` items of the prior saved with the model, ``p(i | h)`` itself (no LM).

    The prior is counted on every training sequence, as co-occurrence is, so the two compare
    like for like; with ``exclude_history`` the user's own items are left out.
    """
    prior = CooccurrencePrior.load(model_dir)
    assert prior is not None, "the benchmark's model is saved with its prior"
    row_of = {item: row for row, item in enumerate(prior.item_ids.tolist())}
    catalog_index = {asin: i for i, asin in index.items()}
    rows = [np.array([row_of[index[i]] for i in h], dtype=np.int64) for h in histories]
    top = prior_top_k(prior, rows, cfg.prior, exclude_history, k)
    return [[catalog_index[prior.item_ids[j]] for j in row] for row in top]


def prior_top_k(
    prior: CooccurrencePrior,
    rows: list[npt.NDArray[np.int64]],
    cfg: PriorConfig,
    exclude_history: bool,
    k: int = 10,
) -> list[list[int]]:
    """Each history's top-``k`` prior rows, ``p(i | h)`` ranked exactly (dense, in blocks)."""
    out: list[list[int]] = []
    for start in range(0, len(rows), 1024):
        part = rows[start : start + 1024]
        dense = prior.probabilities(part, cfg)
        if exclude_history:
            for r, h in enumerate(part):
                dense[r, h] = -1.0
        out.extend(np.argsort(-dense, axis=1, kind="stable")[:, :k].tolist())
    return out


def cooc_baseline(
    test: list[tuple[str, list[int], int]], n_items: int, k: int, exclude_history: bool = False
) -> dict[str, Any]:
    # Tune on validation: the history without its last item predicts that item.
    val_hist = [h[:-1] for _, h, _ in test if len(h) >= 2]
    val_target = [h[-1] for _, h, _ in test if len(h) >= 2]
    best: tuple[float, int, bool, float] | None = None
    fill = popular(val_hist, 2 * k)
    for window, symmetric, decay, matrix in cooc_grid(val_hist, n_items):
        recs = cooc_recs(val_hist, matrix, decay, k, fill, exclude_history)
        score = metrics(recs, val_target)["ndcg@10"]
        if best is None or score > best[0]:
            best = (score, window, symmetric, decay)
    assert best is not None
    _, window, symmetric, decay = best
    histories = [h for _, h, _ in test]
    matrix = cooc_matrix(histories, n_items, window, symmetric)
    recs = cooc_recs(histories, matrix, decay, k, popular(histories, 2 * k), exclude_history)
    return {
        "window": window,
        "symmetric": symmetric,
        "decay": decay,
        "validation_ndcg@10": best[0],
        "history_share@10": history_share(recs, histories, k),
        **metrics(recs, [t for _, _, t in test]),
    }


def fused_ranking(lists: list[list[list[int]]], k: int, c: float = 60.0) -> list[list[int]]:
    """Reciprocal-rank fusion (Cormack et al., 2009) of several ranked lists per user."""
    out = []
    for per_method in zip(*lists, strict=True):
        score: dict[int, float] = {}
        for ranked in per_method:
            for r, item in enumerate(ranked):
                score[item] = score.get(item, 0.0) + 1.0 / (c + r + 1)
        out.append(sorted(score, key=lambda i: -score[i])[:k])
    return out


def anchor_lists(
    semantics: pa.Table,
    positives: pa.Table,
    model_dirs: list[Path],
    cfg: AnchorConfig,
    work_dir: Path,
    test: list[tuple[str, list[int], int]],
    index: dict[int, str],
) -> tuple[list[list[int]], dict[str, Any]]:
    """Each test user's anchors (catalog indices, best first) and the generation metrics."""
    cutoff = T0 + timedelta(days=365)
    gen = generate_anchors(semantics, positives, [cutoff], model_dirs, cfg, work_dir)
    rows = {r["user_id"]: r["anchor_item_ids"] for r in gen.table.to_pylist()}
    asin_index = {a: i for i, a in index.items()}
    return [[asin_index[a] for a in rows.get(f"u{u}", [])] for u, _, _ in test], gen.metrics


def with_prior_weight(cfg: AnchorConfig, weight: float) -> AnchorConfig:
    """``cfg`` decoding with the co-occurrence prior at ``weight`` (0: the LM alone)."""
    return cfg.model_copy(update={"prior": cfg.prior.model_copy(update={"weight": weight})})


def dump_lists(
    args: argparse.Namespace,
    cfg: AnchorConfig,
    semantics: pa.Table,
    positives: pa.Table,
    test: list[tuple[str, list[int], int]],
    asin: dict[int, str],
    k: int,
) -> None:
    """``--dump-lists``: the LM's top-``k`` per validation and test user, for offline study."""
    from functools import partial

    from training.anchors.catalog import SidCatalog
    from training.anchors.generate import (
        beam_search_fast,
        resolve_device,
        resolve_dtype,
        search_in_batches,
    )
    from training.anchors.model import load_anchor_model
    from training.anchors.sequences import holdout_split, user_sequences
    from training.anchors.trie import SidTrie

    catalog = SidCatalog.from_table(semantics)
    row_of = catalog.index()
    sc, tc = cfg.sequences, cfg.training
    seqs = user_sequences(positives, catalog.item_ids)
    train_seqs, eval_set = holdout_split(seqs, tc.eval_users, sc.max_history, sc.seed)
    device = resolve_device(args.device)
    loaded = load_anchor_model(
        args.work_dir / "model", device=device, dtype=resolve_dtype("auto", device)
    )
    vocab = loaded.vocab
    trie = SidTrie(catalog.codes, vocab.codebook_sizes)
    tokens = vocab.item_tokens(catalog.codes)
    out: dict[str, Any] = {"catalog_item_ids": catalog.item_ids}
    test_hist = [np.array([row_of[asin[i]] for i in h], dtype=np.int64) for _, h, _ in test]
    out["test_targets"] = np.array([row_of[asin[t]] for _, _, t in test], dtype=np.int64)
    out["val_targets"] = eval_set.targets
    out["train_offsets"] = np.cumsum([0] + [len(s) for s in train_seqs])
    out["train_items"] = np.concatenate(train_seqs)
    out["test_offsets"] = np.cumsum([0] + [len(h) for h in test_hist])
    out["test_items"] = np.concatenate(test_hist)
    out["val_offsets"] = np.cumsum([0] + [len(h) for h in eval_set.histories])
    out["val_items"] = np.concatenate(eval_set.histories)
    for name, hists in (("val", eval_set.histories), ("test", test_hist)):
        prompts = [vocab.encode(tokens[h[-sc.max_history :]]) for h in hists]
        beams = search_in_batches(
            partial(
                beam_search_fast, loaded.model, trie=trie, vocab=vocab, beam_width=k, num_anchors=k
            ),
            prompts,
            64,
        )
        out[f"{name}_lm_items"], out[f"{name}_lm_logp"] = beams.items, beams.log_probs
    path = args.out.with_suffix(".lists.npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **out)
    print(f"wrote {path}")


def baselines_main(test: list[tuple[str, list[int], int]], n_items: int) -> None:
    """``--baselines-only``: most popular and co-occurrence (every tuning cell), no file written."""
    targets = [t for _, _, t in test]
    histories = [h for _, h, _ in test]
    pop = popular(histories, 10)
    print(f"{'method':<40}{'HR@5':>9}{'NDCG@5':>9}{'HR@10':>9}{'NDCG@10':>9}")
    rows: dict[str, dict[str, Any]] = {"most popular": metrics([pop] * len(test), targets)}
    fill = popular(histories, 20)
    for window, symmetric, decay, matrix in cooc_grid(histories, n_items):
        name = f"co-occurrence w={window} {'both' if symmetric else 'fwd'} decay={decay}"
        rows[name] = metrics(cooc_recs(histories, matrix, decay, 10, fill), targets)
    tuned = cooc_baseline(test, n_items, 10)
    rows[
        f"co-occurrence tuned (w={tuned['window']} "
        f"{'both' if tuned['symmetric'] else 'fwd'} decay={tuned['decay']})"
    ] = tuned
    for name, r in rows.items():
        print(
            f"{name:<40}{r['hr@5']:>9.4f}{r['ndcg@5']:>9.4f}{r['hr@10']:>9.4f}{r['ndcg@10']:>9.4f}"
        )


def ensemble_main(
    args: argparse.Namespace,
    cfg: AnchorConfig,
    semantics: pa.Table,
    positives: pa.Table,
    test: list[tuple[str, list[int], int]],
    index: dict[int, str],
    codebook_sizes: list[int],
) -> None:
    """``--ensemble-models``: every prefix of the model list, decoded with both combine rules."""
    targets = [t for _, _, t in test]
    histories = [h for _, h, _ in test]
    dirs = list(args.ensemble_models)
    cooc = cooc_baseline(test, len(index), 10)
    cooc_top = cooc_lists(histories, len(index), cooc, 10)
    results: dict[str, Any] = {"cooccurrence": cooc}
    for combine in ("geometric", "arithmetic"):
        for k in range(1 if combine == "geometric" else 2, len(dirs) + 1):
            # prior.weight unset, the product's generation default: members trained with the
            # co-occurrence prior fused decode at their training weight, others with the LM alone.
            run_cfg = cfg.model_copy(
                update={
                    "generation": cfg.generation.model_copy(update={"ensemble_combine": combine}),
                    "prior": cfg.prior.model_copy(update={"weight": None}),
                }
            )
            name = f"ensemble{k}_{combine}"
            # Each decode in its own folder (anchors_fusion.py reads one by its path).
            recs, gen_metrics = anchor_lists(
                semantics,
                positives,
                dirs[:k],
                run_cfg,
                args.work_dir / "anchors" / name,
                test,
                index,
            )
            results[name] = {
                **metrics([r[:10] for r in recs], targets),
                "history_share@10": history_share(recs, histories, 10),
                "hr@10_own_items_left_out": metrics(unseen(recs, histories, 10), targets)["hr@10"],
                "members": [str(d) for d in dirs[:k]],
                "generation_users_per_second": gen_metrics["users_per_second"],
                "vs_cooccurrence": paired_comparison(recs, cooc_top, targets),
            }
            shown = {
                k2: v for k2, v in results[name].items() if k2 not in ("members", "vs_cooccurrence")
            }
            print(name, shown, flush=True)
            print("  vs co-occurrence (paired bootstrap):", results[name]["vs_cooccurrence"])
    report: dict[str, Any] = {
        "benchmark": "anchors_quality_ensemble",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "codebook_sizes": codebook_sizes,
        "results": results,
    }
    report["params"]["ensemble_models"] = [str(d) for d in dirs]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'method':<26}{'HR@5':>9}{'NDCG@5':>9}{'HR@10':>9}{'NDCG@10':>9}")
    for name, r in results.items():
        print(
            f"{name:<26}{r['hr@5']:>9.4f}{r['ndcg@5']:>9.4f}{r['hr@10']:>9.4f}{r['ndcg@10']:>9.4f}"
        )
    print(f"\nwrote {args.out}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--work-dir", type=Path, default=Path("runs/bench_anchors"))
    p.add_argument(
        "--encoder",
        type=Path,
        default=None,
        help="local text encoder directory (encoder.model_path), e.g. a float16 copy of MiniLM "
        "carried to a GPU machine; default: the bundled all-MiniLM-L6-v2",
    )
    p.add_argument("--max-users", type=int, default=None, help="subsample users (quick runs)")
    p.add_argument(
        "--subsample-seed",
        type=int,
        default=None,
        help="seed of the --max-users subsample (default --seed): fix it to compare SID seeds on "
        "the same users in quick runs",
    )
    p.add_argument("--sid-method", choices=["rqvae", "rkmeans"], default="rqvae")
    p.add_argument("--sid-levels", type=int, default=3)
    p.add_argument("--codebook-size", type=int, default=256)
    p.add_argument(
        "--sid-collision-repulsion",
        type=float,
        default=None,
        help="RQ-VAE collision repulsion weight (default: the SID stage's default)",
    )
    p.add_argument(
        "--collab-weight",
        type=float,
        default=0.0,
        help="the SID stage's collaborative block (collaborative.weight), built from the "
        "training sequences, with this weight (the text vector has weight 1; 0: content only). "
        "Until 2026-12-03 a PPMI-SVD vector fused as content_embedding (BENCHMARKS.md)",
    )
    p.add_argument("--collab-dim", type=int, default=64)
    p.add_argument("--collab-window", type=int, default=3)
    p.add_argument("--max-history", type=int, default=50, help="history items the LM reads")
    p.add_argument(
        "--reverse-augmentation",
        action="store_true",
        help="also train on every sequence backwards (sequences.reverse_augmentation)",
    )
    p.add_argument(
        "--base-model",
        type=Path,
        default=None,
        help="LoRA path: a local checkpoint directory to tune (model.base_model_path); the "
        "compact-model flags (--hidden, --layers, --heads, dropouts) are then unused",
    )
    p.add_argument(
        "--random-base",
        choices=["tiny", "qwen2.5-0.5b"],
        default=None,
        help="LoRA path on a random-weight Qwen2 checkpoint of this shape, written to "
        "WORK_DIR/base (training/anchors/base_checkpoint.py; no pretrained knowledge)",
    )
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--text-prefix", default="", help="model.text_prefix (LoRA path only)")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--attention-dropout", type=float, default=0.1)
    p.add_argument("--hidden-dropout", type=float, default=0.1)
    p.add_argument("--loss-on", choices=["target", "all"], default="all")
    p.add_argument("--downsample", type=float, default=None, help="threshold t (default: off)")
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument(
        "--ema-decay", type=float, default=0.995, help="weight averaging; 0: off (default 0.995)"
    )
    p.add_argument("--eval-users", type=int, default=2000)
    p.add_argument("--patience", type=int, default=6)
    p.add_argument("--beam-width", type=int, default=20)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0, help="seed of the SIDs, the split and the LM")
    p.add_argument(
        "--split-seed",
        type=int,
        default=None,
        help="seed of the held-out validation users (sequences.seed, which also draws the "
        "downsampling when it is on; default --seed): fixed across --seed values, the runs' "
        "validation HR@10 compare SID trainings on the same users",
    )
    p.add_argument(
        "--lm-seed",
        type=int,
        default=None,
        help="seed of the LM's initialization and batch order only (training.seed; default "
        "--seed), the SIDs and the held-out users staying those of --seed: how the members of "
        "an ensemble (training.ensemble_size) differ",
    )
    p.add_argument(
        "--ensemble-models",
        type=Path,
        nargs="+",
        default=None,
        help="skip training: decode with these trained model directories (runs of this "
        "benchmark on the same SIDs, WORK_DIR/model) as an ensemble, every prefix of the list "
        "with both --ensemble-combine rules",
    )
    p.add_argument(
        "--baselines-only",
        action="store_true",
        help="skip SIDs and the LM: print the two baselines (co-occurrence with its tuning "
        "grid) in seconds",
    )
    p.add_argument(
        "--prior-grid",
        type=float,
        nargs="+",
        default=None,
        help="co-occurrence prior weights tried on the held-out users (prior.weight_grid; "
        "default: the product's); every one is also decoded on the test users, for the record",
    )
    p.add_argument(
        "--prior-train-weight",
        type=float,
        default=0.0,
        help="prior.train_weight: fuse the co-occurrence prior into the training loss with this "
        "weight (the LM learns what co-occurrence does not say); the weight is then among the "
        "held-out candidates",
    )
    p.add_argument(
        "--prior-smoothing", type=float, default=None, help="prior.smoothing (default: product's)"
    )
    p.add_argument(
        "--prior-content-weight",
        type=float,
        default=0.0,
        help="prior.content_weight: the prior times the history's content kernel density to "
        "this power (0: co-occurrence alone)",
    )
    p.add_argument("--prior-content-temperature", type=float, default=None)
    p.add_argument("--prior-content-neighbors", type=int, default=None)
    p.add_argument(
        "--exclude-history",
        action="store_true",
        help="generation.exclude_history: no anchor is an item of the user's own history; the "
        "paired comparisons are then against co-occurrence with the user's own items left out "
        "too, and the prior alone is also scored",
    )
    p.add_argument(
        "--dump-lists",
        type=int,
        default=None,
        metavar="K",
        help="diagnostic: also write OUT.lists.npz, the LM's top-K items and log-probabilities "
        "(beam K, no prior) for the held-out validation users and the test users, in catalog "
        "rows, to study combinations with co-occurrence offline",
    )
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/anchors_quality.json"))
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    t_start = time.perf_counter()
    data = load(
        args.data, args.max_users, args.seed if args.subsample_seed is None else args.subsample_seed
    )
    test, index = data["test"], data["index"]
    n_items = len(index)
    targets = [t for _, _, t in test]
    histories = [h for _, h, _ in test]
    if args.baselines_only:
        baselines_main(test, n_items)
        return

    from training.sids.collaborative import CollaborativeConfig
    from training.sids.config import SidConfig
    from training.sids.encoder import EncoderConfig
    from training.sids.job import train_sids

    items = data["items"]
    sid_cfg = SidConfig(
        method=args.sid_method,
        encoder=EncoderConfig(model_path=None if args.encoder is None else str(args.encoder)),
        # The SID stage's collaborative block, built from the training histories (the targets
        # are never in them).
        collaborative=CollaborativeConfig(
            weight=args.collab_weight, dim=args.collab_dim, window=args.collab_window
        ),
        levels=args.sid_levels,
        codebook_size=args.codebook_size,
        seed=args.seed,
        show_progress=False,
        **(
            {}
            if args.sid_collision_repulsion is None
            else {"collision_repulsion": args.sid_collision_repulsion}
        ),
    )
    t0 = time.perf_counter()
    sids = train_sids(items, sid_cfg, args.work_dir / "sids", positives_table(test, index))
    sid_seconds = time.perf_counter() - t0
    semantics = sids.table
    print(
        f"SIDs: {sids.codebook_sizes} in {sid_seconds:.1f}s, nearest-code sharing "
        f"{sids.metrics.get('shared_prefix_rate_nearest')}, after the last-level matching "
        f"{sids.metrics.get('collision_rate')}"
    )

    positives = positives_table(test, index)
    base_model = args.base_model
    if args.random_base is not None:
        from training.anchors.base_checkpoint import save_random_checkpoint

        base_model = save_random_checkpoint(args.work_dir / "base", args.random_base)
    cfg = AnchorConfig.model_validate(
        {
            "sequences": {
                "max_history": args.max_history,
                "downsample_threshold": args.downsample,
                "reverse_augmentation": args.reverse_augmentation,
                "seed": args.seed if args.split_seed is None else args.split_seed,
            },
            "model": {
                "base_model_path": None if base_model is None else str(base_model),
                "text_prefix": args.text_prefix,
                "lora": {"rank": args.lora_rank, "alpha": 2 * args.lora_rank},
                "compact": {
                    "hidden_size": args.hidden,
                    "num_layers": args.layers,
                    "num_heads": args.heads,
                    "num_kv_heads": args.heads,
                    "intermediate_size": 3 * args.hidden,
                    "attention_dropout": args.attention_dropout,
                    "hidden_dropout": args.hidden_dropout,
                },
            },
            "training": {
                "epochs": args.epochs,
                "batch_size": args.batch_size,
                "learning_rate": args.lr,
                "weight_decay": args.weight_decay,
                "loss_on": args.loss_on,
                "label_smoothing": args.label_smoothing,
                "ema_decay": args.ema_decay or None,
                "eval_users": args.eval_users,
                "patience": args.patience,
                "seed": args.seed if args.lm_seed is None else args.lm_seed,
                "device": args.device,
                "progress": False,
            },
            "generation": {
                "beam_width": args.beam_width,
                # The whole final beam, so that the history-excluded top 10 can be read off it.
                "num_anchors": args.beam_width,
                "batch_size": 64,
                "device": args.device,
                "exclude_history": args.exclude_history,
            },
            # 'auto' at training: the weight is chosen on the held-out users (every weight of
            # the grid is then also decoded on the test users, below, with explicit weights).
            "prior": {
                "weight": "auto",
                "train_weight": args.prior_train_weight,
                **({} if args.prior_grid is None else {"weight_grid": args.prior_grid}),
                **({} if args.prior_smoothing is None else {"smoothing": args.prior_smoothing}),
                "content_weight": args.prior_content_weight,
                **(
                    {}
                    if args.prior_content_temperature is None
                    else {"content_temperature": args.prior_content_temperature}
                ),
                **(
                    {}
                    if args.prior_content_neighbors is None
                    else {"content_neighbors": args.prior_content_neighbors}
                ),
            },
        }
    )
    if args.ensemble_models:
        ensemble_main(args, cfg, semantics, positives, test, index, sids.codebook_sizes)
        return
    t0 = time.perf_counter()
    trained = train_anchor_model(
        semantics, positives, sids.codebook_sizes, cfg, args.work_dir / "model"
    )
    train_seconds = time.perf_counter() - t0
    if args.dump_lists:
        dump_lists(args, cfg, semantics, positives, test, index, args.dump_lists)
    # The LM alone (prior weight 0: every table before 2026-12-03's prior compares this), then
    # the product's default, the prior fused with the weight chosen on the held-out users.
    model_recs, gen_metrics = anchor_lists(
        semantics,
        positives,
        [args.work_dir / "model"],
        with_prior_weight(cfg, 0.0),
        args.work_dir / "anchors",
        test,
        index,
    )
    chosen = trained.metrics["prior_weight_chosen"]
    cooc = cooc_baseline(test, n_items, 10)
    # With --exclude-history every list leaves the user's own items out: so does the baseline
    # every paired comparison is against (tuned with them left out).
    compared = (
        cooc_baseline(test, n_items, 10, exclude_history=True) if args.exclude_history else cooc
    )
    cooc_top = cooc_lists(histories, n_items, compared, 10, exclude_history=args.exclude_history)
    prior_alone = prior_alone_lists(
        args.work_dir / "model", cfg, histories, index, args.exclude_history
    )
    per_weight: dict[str, Any] = {}
    for weight in sorted({0.0, *cfg.prior.weight_grid, cfg.prior.train_weight}):
        if weight == 0.0:
            recs, weight_gen = model_recs, gen_metrics
        else:
            recs, weight_gen = anchor_lists(
                semantics,
                positives,
                [args.work_dir / "model"],
                with_prior_weight(cfg, weight),
                args.work_dir / f"anchors_prior_{weight}",
                test,
                index,
            )
        per_weight[str(weight)] = {
            **metrics([r[:10] for r in recs], targets),
            "vs_cooccurrence": paired_comparison(recs, cooc_top, targets),
            "hr@10_own_items_left_out": metrics(unseen(recs, histories, 10), targets)["hr@10"],
            "history_share@10": history_share(recs, histories, 10),
            "generation_users_per_second": weight_gen["users_per_second"],
        }
        if weight == chosen:
            prior_recs = recs

    model_unseen = unseen(model_recs, histories, 10)
    pop = popular(histories, 10 + max(len(h) for h in histories))
    results: dict[str, Any] = {
        "most_popular": metrics([pop[:10]] * len(test), targets),
        "cooccurrence": cooc,
        "anchors": {
            **metrics([r[:10] for r in model_recs], targets),
            "history_share@10": history_share(model_recs, histories, 10),
            "eval_hr@10_validation": trained.metrics["eval_hr@10"],
            "best_epoch": trained.metrics["best_epoch"],
            "epochs_run": trained.metrics["epochs_run"],
            "train_seconds": round(train_seconds, 1),
            "generation_users_per_second": gen_metrics["users_per_second"],
            "parameters": trained.metrics["parameters"],
        },
        # The product's anchors: the co-occurrence prior fused with the weight the held-out
        # users chose (test users' targets never seen by the choice).
        "anchors_with_prior": {
            **metrics([r[:10] for r in prior_recs], targets),
            "prior_weight": chosen,
            "prior_tuning_on_held_out_users": trained.metrics["prior_tuning"],
        },
        "anchors_per_prior_weight": per_weight,
        # The fitted prior's own ranking (no LM): what the LM adds on top of it, when fused.
        "prior_alone": {
            **metrics(prior_alone, targets),
            "vs_cooccurrence": paired_comparison(prior_alone, cooc_top, targets),
            "content_weight": cfg.prior.content_weight,
        },
        "paired_baseline": "cooccurrence_unseen" if args.exclude_history else "cooccurrence",
        # The same three with the user's own history items left out of every list (none of
        # them is the target for 99.4% of users).
        # Does the LM know something co-occurrence does not? Reciprocal-rank fusion of the
        # two top-20 lists (a diagnostic, not the anchors the pipeline writes).
        "anchors+cooccurrence_fused": metrics(
            fused_ranking(
                [[r[:20] for r in model_recs], cooc_lists(histories, n_items, cooc, 20)], 10
            ),
            targets,
        ),
        "most_popular_unseen": metrics(unseen([pop] * len(test), histories, 10), targets),
        "cooccurrence_unseen": cooc_baseline(test, n_items, 10, exclude_history=True),
        "anchors_unseen": {
            **metrics(model_unseen, targets),
            "anchors_left_per_user": round(float(np.mean([len(r) for r in model_unseen])), 3),
        },
    }
    freq = {
        "training_sequences": trained.metrics["item_frequency_before_downsampling"],
        "after_downsampling": trained.metrics["item_frequency_after_downsampling"],
        "downsample_threshold": args.downsample,
    }
    report = {
        "benchmark": "anchors_quality",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": torch.get_num_threads(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "device": str(args.device),
        },
        "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "data": {"users": len(test), "items": n_items, "positives": positives.num_rows},
        "sids": {
            "method": args.sid_method,
            "codebook_sizes": sids.codebook_sizes,
            "collision_rate": sids.metrics.get("collision_rate"),
            "shared_prefix_rate_nearest": sids.metrics.get("shared_prefix_rate_nearest"),
            "collision_repulsion": sid_cfg.collision_repulsion,
            "collaborative_weight": args.collab_weight,
            "seconds": round(sid_seconds, 1),
        },
        "item_frequency": freq,
        "training_history": trained.history.as_dict()["epochs"],
        "results": results,
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")

    print(f"\nAmazon Scientific, {len(test)} users, {n_items} items, next-item (test split)")
    print(f"{'method':<30}{'HR@5':>9}{'NDCG@5':>9}{'HR@10':>9}{'NDCG@10':>9}")
    rows = {k: v for k, v in results.items() if isinstance(v, dict) and "hr@5" in v}
    rows.update({f"  prior weight {w}": r for w, r in per_weight.items()})
    for name, r in rows.items():
        print(
            f"{name:<30}{r['hr@5']:>9.4f}{r['ndcg@5']:>9.4f}{r['hr@10']:>9.4f}{r['ndcg@10']:>9.4f}"
        )
    print(f"\npaired against {results['paired_baseline']} (HR@10 difference, 95% CI):")
    paired = {f"prior weight {w}": r["vs_cooccurrence"] for w, r in per_weight.items()}
    paired["prior alone"] = results["prior_alone"]["vs_cooccurrence"]
    for name, c in paired.items():
        print(f"  {name:<28}{c['hr@10_diff']:+.4f} {c['hr@10_diff_ci95']}")
    print(f"\nco-occurrence prior weight chosen on the held-out users: {chosen}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
