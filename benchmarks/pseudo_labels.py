"""Pseudo-label quality against the funnel simulator's truth on unexposed candidates.

For each dataset (MovieLens-100k from ``../shared/datasets`` and the synthetic catalog), one run:

1. simulate the funnel (requests + truth); split time at the ``--train-fraction`` quantile of
   request times: the anchor LM and the distillation teacher learn only from before the split,
   and every figure is measured on the unexposed candidates of requests after it;
2. SIDs (MiniLM + RQ-VAE; with ``--collaborative-weight`` the item space also holds a
   collaborative block built from the interactions before the split), the anchor LM (compact
   Qwen2) trained on positives before the split,
   anchors generated for every request day after it, then the pseudo-label job;
3. baselines on the same rows: "unexposed = negative" (a constant 0), the distillation teacher (a
   model trained on exposed rows only, with the Feast statistics features plus the candidate's
   content similarity to the user's history, scoring the unexposed rows), and raw popularity.
   The teacher learns from the log as it stood at the split (clicks known by then), in several
   variants of which rows it trusts (all; rows, or only negatives, older than 7 / 14 / 28
   days); the strongest of them on the evaluation rows is the baseline (optimistic for the
   teacher). One trained with the clicks of the future too is reported as a reference only;
4. AUCs against the truth, confidence-weighted AUC, AUC within the top- and bottom-confidence
   halves, calibration error, and a reliability diagram (PNG).

    .venv/bin/python benchmarks/pseudo_labels.py [--datasets ml-100k synthetic] [--quick]

Writes ``benchmarks/results/pseudo_labels.json`` and ``benchmarks/results/pseudo_labels_*.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from preranker import ANCHORS as PRERANKER_ANCHORS

from training.anchors.job import AnchorConfig, generate_anchors, train_anchor_model
from training.anchors.recipes import with_likelihood_recipe
from training.anchors.sequences import cutoffs_of
from training.data.dataset import LoadedDataset
from training.data.movielens import load_movielens_100k
from training.data.simulator import SimulatorConfig, simulate_funnel
from training.data.synthetic import SynthConfig, generate_synthetic
from training.evaluation.metrics import auc, reliability_curve, upper_half
from training.features.stats import StatsConfig, compute_feature_tables
from training.features.store import StoreSettings, apply_definitions, open_store
from training.features.training_set import build_training_set
from training.preranker.job import split_at
from training.pseudo_labels.job import PseudoLabelConfig, generate_pseudo_labels
from training.pseudo_labels.lm_relevance import LmRelevance
from training.sids.config import SidConfig
from training.sids.job import read_codebook_sizes, train_sids

RESULTS = Path(__file__).parent / "results"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"


FACTORS = ("dispersion", "history_consistency", "lm_confidence", "confidence")
"""The confidence's three factors and their combination, as the job writes them."""
TEACHER_SEEDS = 5
"""Distillation teachers trained per run (different initializations); their mean AUC is reported."""
TEACHER_MATURITY_DAYS = (7, 14, 28)
"""Teachers trained only on rows (or negatives) older than this many days at the split, whose
labels are more final."""
ORACLE_TEACHER = "labels of the future (reference, not a baseline)"
LM_RECIPES = ("anchors", "likelihood")
"""Anchor-LM training (``--lm-recipe``): the anchors' settings, or ``gpl anchors train
--for-likelihood``'s (:data:`training.anchors.recipes.LIKELIHOOD_RECIPE`)."""
"""The teacher trained with every click, also those known only after the split."""


def load_dataset(name: str, ml100k: Path) -> LoadedDataset:
    """The benchmark's dataset by name: ``ml-100k`` from ``ml100k``, else the synthetic catalog."""
    return load_movielens_100k(ml100k) if name == "ml-100k" else generate_synthetic(SynthConfig())


def parse_work_folders(
    description: str,
    out_name: str,
    extra: Callable[[argparse.ArgumentParser], None] | None = None,
) -> argparse.Namespace:
    """Arguments of a diagnostic over kept work folders: the folders, ``--ml100k``, ``--out``.

    ``extra`` adds the diagnostic's own options to the parser.
    """
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("work", type=Path, nargs="+", help="<work>/<dataset> directories")
    parser.add_argument("--ml100k", type=Path, default=SHARED / "ml-100k")
    parser.add_argument("--out", type=Path, default=RESULTS / out_name)
    if extra is not None:
        extra(parser)
    return parser.parse_args()


def print_by_folder(
    title: str, head: str, rows: dict[str, list[float]], folders: list[str], cell: str
) -> None:
    """A diagnostic's table: one row per name, one column per work folder (its last two parts).

    ``head`` is the first column's title and its width (``"{:<50}"``-style padding is taken from
    its length); ``cell`` formats a value (e.g. ``".4f"``, ``"+.4f"``).
    """
    labels = ["/".join(Path(w).parts[-2:]) for w in folders]
    width = max(12, *(len(label) + 2 for label in labels))
    print(title)
    print(head + "".join(f"{label:>{width}}" for label in labels))
    for name, values in rows.items():
        print(f"{name:<{len(head)}}" + "".join(f"{format(v, cell):>{width}}" for v in values))


def labelled_rows_with_truth(labels: Path, work: Path) -> pd.DataFrame:
    """A pseudo-label output's ``ok`` rows with the simulator's truth of ``work`` (``truth``)."""
    rows = pq.read_table(labels).to_pandas()
    rows = rows[rows["status"] == "ok"].reset_index(drop=True)
    truth = pq.read_table(work / "truth.parquet").to_pandas()
    truth = truth[["request_id", "item_id", "label"]].rename(columns={"label": "truth"})
    rows = rows.merge(truth, on=["request_id", "item_id"], how="left", validate="one_to_one")
    if rows["truth"].isna().any():
        raise RuntimeError(f"{work}: the truth table misses some labelled rows")
    return rows


def report_row_aucs(benchmark: str, results: dict[str, dict[str, float]], out: Path) -> None:
    """Print per-folder AUCs on the job's labelled unexposed rows, then :func:`write_diagnostic`."""
    names = list(next(iter(results.values())))
    print_by_folder(
        "AUC against the truth on the job's labelled unexposed rows",
        f"{'score':<50}",
        {name: [r[name] for r in results.values()] for name in names},
        list(results),
        ".4f",
    )
    write_diagnostic(benchmark, results, out)


def write_diagnostic(benchmark: str, results: dict[str, Any], out: Path) -> None:
    """Write a diagnostic's results over kept work folders (``--work``) as JSON to ``out``."""
    document = {
        "benchmark": benchmark,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "results": results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(document, indent=2, default=float) + "\n")
    print(f"written {out}")


def history_similarity(
    rows: pd.DataFrame, interactions: pd.DataFrame, emb: dict[str, np.ndarray], history: int
) -> np.ndarray:
    """cos(candidate, mean of the user's last ``history`` positives before the request)."""
    inter = interactions.sort_values(["user_id", "event_timestamp"])
    by_user = {u: g for u, g in inter.groupby("user_id", sort=False)}
    out = np.zeros(len(rows), np.float32)
    dim = len(next(iter(emb.values())))
    for (user, ts), idx in rows.groupby(["user_id", "event_timestamp"], sort=False).indices.items():
        g = by_user.get(user)
        profile = np.zeros(dim, np.float32)
        if g is not None:
            before = g[g["event_timestamp"] < ts]["item_id"].tail(history)
            vecs = [emb[i] for i in before if i in emb]
            if vecs:
                profile = np.mean(vecs, axis=0)
                profile /= max(float(np.linalg.norm(profile)), 1e-12)
        cand = np.stack([emb.get(i, np.zeros(dim, np.float32)) for i in rows["item_id"].iloc[idx]])
        out[idx] = cand @ profile
    return out


def _teacher_scores(
    train: pd.DataFrame, score: pd.DataFrame, features: list[str], seed: int
) -> np.ndarray:
    """An MLP ranker trained on exposed rows (label = click); its scores on ``score``."""
    torch.manual_seed(seed)
    x_train = train[features].to_numpy(np.float32)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    xt = torch.from_numpy((x_train - mean) / std)
    yt = torch.from_numpy(train["label"].to_numpy(np.float32))
    model = torch.nn.Sequential(
        torch.nn.Linear(len(features), 64), torch.nn.ReLU(), torch.nn.Linear(64, 1)
    )
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    for _ in range(30):
        perm = torch.randperm(len(xt))
        for start in range(0, len(xt), 1024):
            b = perm[start : start + 1024]
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                model(xt[b]).squeeze(1), yt[b]
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        xs = torch.from_numpy((score[features].to_numpy(np.float32) - mean) / std)
        return torch.sigmoid(model(xs).squeeze(1)).numpy()


def run_dataset(
    name: str, data: LoadedDataset, work: Path, args: argparse.Namespace
) -> dict[str, Any]:
    timings: dict[str, float] = {}

    def tick(label: str, began: float) -> None:
        timings[label] = round(time.perf_counter() - began, 2)
        print(f"  [{name}] {label}: {timings[label]:.1f}s", flush=True)

    t = time.perf_counter()
    sim_cfg = SimulatorConfig(
        seed=args.seed, progress=False, requests_per_user=args.requests_per_user
    )
    funnel = simulate_funnel(data.items, data.interactions, sim_cfg)
    requests, truth = funnel.requests, funnel.truth
    tick("simulate", t)

    ts = requests.column("event_timestamp")
    split = pc.quantile(ts.cast(pa.int64()), q=args.train_fraction).to_pylist()[0]
    split_ts = pa.scalar(int(split), pa.int64()).cast(ts.type)
    # The teacher learns from the log as it stood at the split: a click known only after it
    # (label_timestamp) was still a negative then, and counting it would hand the teacher an
    # engagement from the very period it is scored on.
    train_requests, eval_requests, clicks_known_later = split_at(requests, split_ts.as_py())
    if args.work is not None:
        pq.write_table(eval_requests, work / "eval_requests.parquet")
        pq.write_table(truth, work / "truth.parquet")

    t = time.perf_counter()
    # With a collaborative block, the item space also holds co-engagement: built from the
    # interactions before the split only, so it never holds the period being scored.
    sid_cfg = SidConfig.model_validate(
        {
            "epochs": args.sid_epochs,
            "collaborative": {"weight": args.collaborative_weight, "until": split_ts.as_py()},
        }
    )
    train_sids(data.items, sid_cfg, work / "sids", data.interactions)
    item_semantics = pq.read_table(work / "sids" / "item_semantics.parquet")
    tick("sids", t)

    inter_ts = data.interactions.column("event_timestamp")
    positives_train = data.interactions.filter(pc.less(inter_ts, split_ts))
    raw_anchor_cfg: dict[str, Any] = {
        # The compact LM of benchmarks/preranker.py (pinned there): whole-window loss, 2
        # layers of 128.
        "model": PRERANKER_ANCHORS["model"],
        "sequences": {
            "max_history": 30,
            "reverse_augmentation": args.reverse_augmentation,
            "downsample_threshold": args.downsample or None,
        },
        "training": {
            "epochs": args.lm_epochs,
            "loss_on": "all",
            "eval_users": 200,
            "patience": 2,
            "progress": False,
            "ensemble_size": args.lm_ensemble,
        },
        "generation": {
            "beam_width": args.beam_width,
            "num_anchors": args.num_anchors,
            "exclude_history": args.exclude_history,
        },
        "prior": {
            "train_weight": args.prior_train_weight,
            "content_weight": args.prior_content_weight,
            # Unset, generation decodes with the LM alone, or for a model trained with the
            # prior fused with its training weight (the product's rule).
            **({} if args.prior_weight is None else {"weight": args.prior_weight}),
        },
    }
    if args.lm_recipe == "likelihood":
        raw_anchor_cfg = with_likelihood_recipe(raw_anchor_cfg)
        if args.quick:
            raw_anchor_cfg["training"]["epochs"] = args.lm_epochs
    anchor_cfg = AnchorConfig.model_validate(raw_anchor_cfg)
    t = time.perf_counter()
    train_anchor_model(
        item_semantics,
        positives_train,
        read_codebook_sizes(work / "sids"),
        anchor_cfg,
        work / "anchors" / "model",
    )
    tick("anchor LM training", t)
    t = time.perf_counter()
    anchor_run = generate_anchors(
        item_semantics,
        data.interactions,
        cutoffs_of(eval_requests, anchor_cfg.generation.cutoffs),
        work / "anchors" / "model",
        anchor_cfg,
        work / "anchors",
        users=sorted(set(eval_requests.column("user_id").to_pylist())),
    )
    anchors = anchor_run.table
    tick("anchor generation", t)

    t = time.perf_counter()
    lm = None
    if args.relevance == "lm_likelihood":
        lm = LmRelevance.load(
            work / "anchors" / "model",
            item_semantics,
            combine=anchor_cfg.generation.ensemble_combine,
        )
    result = generate_pseudo_labels(
        eval_requests,
        item_semantics,
        anchors,
        data.interactions,
        PseudoLabelConfig(
            progress=False,
            relevance=args.relevance,
            history_density_weight=args.history_density_weight,
        ),
        work / "pseudo_labels",
        lm=lm,
    )
    tick("pseudo-labels", t)
    labels = pq.read_table(result.path).to_pandas()

    # Feast statistics features for the teacher and the popularity reference (point-in-time).
    t = time.perf_counter()
    compute_feature_tables(data.items, requests).write(work, StatsConfig())
    store = open_store(work, StoreSettings(project=f"bench_{name.replace('-', '_')}"))
    apply_definitions(store)
    log_as_known = pa.concat_tables([train_requests, eval_requests])
    joined = build_training_set(store, log_as_known).table.to_pandas()
    # The teacher learns from exposed rows before the split, where no request has anchors yet
    # (they are generated for the later requests only): anchor columns would only tell it "this
    # row is after the split". Until 2026-12-03 `user_interest_anchors__missing` was among its
    # features, constant in training and scaled to -1e6 on every scored row; its AUC swung by
    # up to 0.05 with the seed, down to 0.500 (benchmarks review, BENCHMARKS.md).
    numeric = [
        c
        for c in joined.columns
        if ("__" in c)
        and joined[c].dtype.kind in "fiu"
        and not c.startswith("item_content__cat")
        and not c.startswith("user_interest_anchors__")
    ]
    emb = dict(
        zip(
            item_semantics.column("item_id").to_pylist(),
            np.stack(item_semantics.column("content_embedding").to_numpy(zero_copy_only=False)),
            strict=True,
        )
    )
    inter_df = data.interactions.select(["user_id", "item_id", "event_timestamp"]).to_pandas()
    joined["history_similarity"] = history_similarity(joined, inter_df, emb, 50)
    train_rows = joined[
        (joined["stage"] == "exposed")
        & joined["request_id"].isin(set(train_requests.column("request_id").to_pylist()))
    ]
    # Which labels may the teacher learn from? Trained at the split, it has the clicks known
    # then (a click known later is the negative the log showed); a team aware of delayed clicks
    # would rather drop the rows whose labels are not final yet. Each is measured; the
    # strongest is the baseline. The labels of the future are measured too, as a reference.
    oracle = requests.select(["request_id", "item_id", "label"]).to_pandas()
    train_rows = train_rows.merge(
        oracle.rename(columns={"label": "label_oracle"}),
        on=["request_id", "item_id"],
        how="left",
        validate="one_to_one",
    )
    split_at_ts = pd.Timestamp(split_ts.as_py())
    variants = {"labels known at the split": train_rows}
    for days in TEACHER_MATURITY_DAYS:
        old_enough = train_rows["event_timestamp"] < split_at_ts - pd.Timedelta(days=days)
        variants[f"rows older than {days} days"] = train_rows[old_enough]
        # A known click is final; only a recent negative may still turn into one.
        final = old_enough | (train_rows["label"] == 1)
        variants[f"clicks, and negatives older than {days} days"] = train_rows[final]
    variants[ORACLE_TEACHER] = train_rows.assign(label=train_rows["label_oracle"])
    candidates = [*numeric, "history_similarity"]
    # A feature constant on the teacher's rows carries nothing it could learn from.
    variant_features = {
        variant: [c for c in candidates if rows[c].std() > 0] for variant, rows in variants.items()
    }
    features = sorted({c for names in variant_features.values() for c in names})
    tick("teacher features", t)

    truth_df = truth.to_pandas()[["request_id", "item_id", "label"]].rename(
        columns={"label": "truth"}
    )
    ev = labels.merge(truth_df, on=["request_id", "item_id"], how="left")
    if ev["truth"].isna().any():
        raise RuntimeError("truth is missing rows for some unexposed candidates")
    ev = ev.merge(
        joined[["request_id", "item_id", *features]], on=["request_id", "item_id"], how="left"
    )
    t = time.perf_counter()
    ok_rows = (ev["status"] == "ok").to_numpy()
    y = ev.loc[ok_rows, "truth"].to_numpy()
    # The teacher's AUC moves by ~0.01-0.04 with its initialization alone, as much as the gaps
    # it is compared with: each is trained TEACHER_SEEDS times and its mean AUC reported.
    teacher_seeds = [args.seed * TEACHER_SEEDS + k for k in range(TEACHER_SEEDS)]
    by_variant: dict[str, dict[str, Any]] = {}
    first_scores: dict[str, np.ndarray] = {}
    for variant, rows in variants.items():
        cols = variant_features[variant]
        scores = [_teacher_scores(rows, ev, cols, s) for s in teacher_seeds]
        aucs = [auc(y, sc[ok_rows]) for sc in scores]
        first_scores[variant] = scores[0]
        by_variant[variant] = {
            "auc": float(np.mean(aucs)),
            "auc_per_seed": [round(a, 5) for a in aucs],
            "train_rows": len(rows),
            "train_clicks": int((rows["label"] == 1).sum()),
        }
    honest = {k: v for k, v in by_variant.items() if k != ORACLE_TEACHER}
    teacher = max(honest, key=lambda k: honest[k]["auc"])
    ev["teacher"] = first_scores[teacher]
    teacher_aucs = by_variant[teacher]["auc_per_seed"]
    tick("distillation teacher", t)

    ok = ev[ok_rows].copy()
    conf = ok["confidence"].to_numpy()
    # Exactly half each (ties at the median broken at random): confidence is shared by all of a
    # request's rows, so ">= median" could move whole requests to one side.
    top = upper_half(conf, args.seed)
    bottom = ~top
    curve = reliability_curve(y, ok["pseudo_label"].to_numpy(), bins=10)
    figures = {
        "eval_unexposed_rows": len(ev),
        "labelled_rows": len(ok),
        "no_anchors_rows": int((ev["status"] == "no_anchors").sum()),
        "truth_positive_rate": round(float(y.mean()), 5),
        "auc_gpl_relevance": auc(y, ok["relevance"]),
        "auc_gpl_pseudo_label": auc(y, ok["pseudo_label"]),
        "auc_gpl_confidence_weighted": auc(y, ok["pseudo_label"], conf),
        "auc_gpl_top_confidence_half": auc(y[top], ok["pseudo_label"].to_numpy()[top]),
        "auc_gpl_bottom_confidence_half": auc(y[bottom], ok["pseudo_label"].to_numpy()[bottom]),
        "auc_unexposed_as_negative": auc(y, np.zeros(len(y))),
        "auc_distillation": by_variant[teacher]["auc"],
        "auc_distillation_per_teacher_seed": teacher_aucs,
        "distillation_teacher": teacher,
        "distillation_by_training_labels": by_variant,
        "teacher_features": variant_features[teacher],
        "teacher_clicks_known_after_split": clicks_known_later,
        "auc_popularity": auc(y, ok["item_popularity__log_candidate_count"]),
        # Diagnostic: the teacher's content feature alone (cosine to the mean of the user's
        # history), i.e. what the content space gives without the LM's anchors.
        "auc_history_similarity": auc(y, ok["history_similarity"]),
        "ece_pseudo_label": curve.expected_calibration_error,
        "calibration": result.metrics["calibration"],
        "history_density": result.metrics["history_density"],
        "anchor_prior_weight": anchor_run.metrics["prior_weight"],
        "anchor_prior_train_weight": args.prior_train_weight,
        "anchor_prior_content_weight": args.prior_content_weight,
        "anchor_exclude_history": args.exclude_history,
        "timings_s": timings,
    }
    figures["gpl_minus_distillation"] = (
        figures["auc_gpl_pseudo_label"] - figures["auc_distillation"]
    )
    if args.save_rows is not None:
        args.save_rows.mkdir(parents=True, exist_ok=True)
        columns = ["truth", "relevance", "pseudo_label", "teacher", *FACTORS]
        ok[columns].to_parquet(args.save_rows / f"{name}_seed{args.seed}.parquet", index=False)
    # Diagnostic: which factor carries the confidence's selection? The AUC of the top half of
    # rows ranked by each factor alone.
    for factor in FACTORS:
        upper = upper_half(ok[factor].to_numpy(), args.seed)
        figures[f"auc_top_half_by_{factor}"] = auc(y[upper], ok["pseudo_label"].to_numpy()[upper])

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1, label="perfect calibration")
    ax.plot(curve.mean_predicted, curve.observed_rate, "o-", label="GPL pseudo-label")
    tc = reliability_curve(y, ok["teacher"].to_numpy(), bins=10)
    ax.plot(tc.mean_predicted, tc.observed_rate, "s-", label="distillation teacher")
    top_max = max(
        curve.mean_predicted.max(),
        curve.observed_rate.max(),
        tc.mean_predicted.max(),
        tc.observed_rate.max(),
    )
    ax.set_xlim(0, min(1, top_max * 1.1))
    ax.set_ylim(0, min(1, top_max * 1.1))
    ax.set_xlabel("predicted click probability (bin mean)")
    ax.set_ylabel("true engagement rate of unexposed candidates")
    ax.set_title(f"{name}: reliability on unexposed truth")
    ax.legend(fontsize=8)
    fig.tight_layout()
    # Named after the results file, so that runs with other settings keep their own plots.
    png = args.out.parent / f"{args.out.stem}_{name}.png"
    fig.savefig(png, dpi=120)
    plt.close(fig)
    root = RESULTS.parent.parent
    figures["reliability_png"] = str(png.relative_to(root) if png.is_relative_to(root) else png)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--datasets", nargs="+", default=["ml-100k", "synthetic"])
    parser.add_argument("--ml100k", type=Path, default=SHARED / "ml-100k")
    parser.add_argument("--train-fraction", type=float, default=0.6)
    parser.add_argument("--requests-per-user", type=int, default=4)
    parser.add_argument("--sid-epochs", type=int, default=100)
    parser.add_argument("--lm-epochs", type=int, default=20)
    parser.add_argument("--beam-width", type=int, default=10, help="anchor beam search width")
    parser.add_argument("--num-anchors", type=int, default=10, help="anchors per user (<= beam)")
    parser.add_argument(
        "--reverse-augmentation", action="store_true", help="anchor LM also trains backwards"
    )
    parser.add_argument(
        "--downsample",
        type=float,
        default=1e-3,
        help="the anchor LM's popular-item downsampling threshold t (docs/anchors.md; the "
        "product's default 1e-3); 0 turns it off",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--relevance",
        choices=["anchor_cosine", "lm_likelihood"],
        default="anchor_cosine",
        help="the job's relevance (PseudoLabelConfig.relevance): GPL's max cosine to the anchors "
        "(default), or the anchor LM's log-probability of the candidate",
    )
    parser.add_argument(
        "--history-density-weight",
        type=lambda v: v if v == "fitted" else float(v),
        default=None,
        help="the job's history_density_weight: the weight of the user's history density in the "
        "relevance, a number or 'fitted' (on the exposed clicks); default unset, the product's: "
        "'fitted' with --relevance lm_likelihood, 0 with anchor_cosine",
    )
    parser.add_argument(
        "--lm-recipe",
        choices=LM_RECIPES,
        default="anchors",
        help="how the anchor LM is trained: 'anchors' (the anchors' recipe: --downsample, label "
        "smoothing 0.1, early stopping on held-out HR@10 after --lm-epochs at most) or "
        "'likelihood' (a calibrated next-item model for --relevance lm_likelihood: no "
        "downsampling, no label smoothing, up to 60 epochs stopped on held-out loss, learning "
        "rate 5e-3; docs/pseudo_labels.md)",
    )
    parser.add_argument(
        "--lm-ensemble",
        type=int,
        default=1,
        help="anchor LMs trained with other seeds (training.ensemble_size), combined at every "
        "SID level by generation.ensemble_combine in the beam search and in lm_likelihood",
    )
    parser.add_argument(
        "--prior-weight",
        type=lambda v: v if v == "auto" else float(v),
        default=None,
        help="the anchors' co-occurrence prior weight (prior.weight; default unset, the "
        "product's: the LM alone, or the training weight with --prior-train-weight; 'auto': the "
        "weight chosen on the anchor LM's held-out users)",
    )
    parser.add_argument(
        "--prior-train-weight",
        type=float,
        default=0.0,
        help="fuse the co-occurrence prior into the anchor LM's training loss with this weight "
        "(prior.train_weight; default 0: off)",
    )
    parser.add_argument(
        "--prior-content-weight",
        type=float,
        default=0.0,
        help="the anchors' prior times the history's content density to this power "
        "(prior.content_weight; default 0: off)",
    )
    parser.add_argument(
        "--exclude-history",
        action="store_true",
        help="anchors never repeat an item of the user's history (generation.exclude_history)",
    )
    parser.add_argument(
        "--collaborative-weight",
        type=float,
        default=0.0,
        help="fuse a collaborative block (co-engagement before the split) into the item space "
        "with this weight; 0: content only",
    )
    parser.add_argument(
        "--save-rows",
        type=Path,
        default=None,
        help="directory: also write each dataset's labelled evaluation rows (truth, relevance, "
        "pseudo-label, distillation teacher's score, factors, confidence) as parquet, for "
        "offline analysis (benchmarks/confidence_weights.py reads them)",
    )
    parser.add_argument(
        "--work",
        type=Path,
        default=None,
        help="directory: keep each dataset's artifacts there (SIDs, anchors, pseudo-labels, the "
        "evaluation requests and the simulator's truth, under <work>/<dataset>) instead of a "
        "temporary directory, for offline analysis",
    )
    parser.add_argument("--quick", action="store_true", help="few epochs: a smoke run, not figures")
    parser.add_argument("--out", type=Path, default=RESULTS / "pseudo_labels.json")
    args = parser.parse_args()
    if args.quick:
        args.sid_epochs, args.lm_epochs = 5, 2

    RESULTS.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    for name in args.datasets:
        data = load_dataset(name, args.ml100k)
        if args.work is not None:
            (args.work / name).mkdir(parents=True, exist_ok=True)
            results[name] = run_dataset(name, data, args.work / name, args)
            continue
        with tempfile.TemporaryDirectory() as tmp:
            results[name] = run_dataset(name, data, Path(tmp), args)

    cols = [
        ("auc_gpl_pseudo_label", "GPL"),
        ("auc_gpl_confidence_weighted", "GPL conf-w"),
        ("auc_gpl_top_confidence_half", "GPL top-conf"),
        ("auc_gpl_bottom_confidence_half", "GPL low-conf"),
        ("auc_distillation", "distill"),
        ("auc_unexposed_as_negative", "unexp=neg"),
        ("auc_popularity", "popularity"),
        ("auc_history_similarity", "history cos"),
        ("ece_pseudo_label", "ECE"),
    ]
    print("\nAUC against the truth on unexposed candidates (requests after the time split)")
    print(f"{'dataset':<11}" + "".join(f"{label:>13}" for _, label in cols))
    for name, r in results.items():
        print(f"{name:<11}" + "".join(f"{r[key]:>13.4f}" for key, _ in cols))
    for name, r in results.items():
        gap = r["gpl_minus_distillation"]
        print(
            f"{name}: GPL - distillation = {gap:+.4f} (target >= +0.05); top-confidence half "
            f"{r['auc_gpl_top_confidence_half']:.4f} vs all {r['auc_gpl_pseudo_label']:.4f}"
        )
        print(
            f"{name}: relevance AUC on the exposed clicks it is calibrated on "
            f"{r['calibration'].get('relevance_auc')} (no truth needed)"
        )
        if r["history_density"]:
            d = r["history_density"]
            print(
                f"{name}: history density weight {d['weight']:.3f} "
                f"({'fitted' if d['fitted'] else 'given'}); on the exposed clicks the relevance "
                f"alone {d['base_relevance_auc']}, the density alone {d['density_auc']}"
            )
        halves = ", ".join(f"{f} {r[f'auc_top_half_by_{f}']:.4f}" for f in FACTORS)
        print(f"{name}: top half by each factor alone: {halves}")
        teachers = ", ".join(
            f"{k} {v['auc']:.4f}" for k, v in r["distillation_by_training_labels"].items()
        )
        print(f"{name}: distillation teacher by training labels: {teachers}")
    out = {
        "benchmark": "pseudo_labels",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "params": {k: str(v) for k, v in vars(args).items()},
        "results": results,
    }
    args.out.write_text(json.dumps(out, indent=2, default=float) + "\n")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
