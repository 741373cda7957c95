"""The pre-ranker stage: join, fit, save, load, score and evaluate against a truth table.

``gpl train`` fits the configured objective on requests before a cutoff and writes
``RUN_DIR/preranker/``: ``light.safetensors``, ``expressive.safetensors``,
``preprocessing.json`` (fitted on training rows only), ``config.json`` and a manifest.
``gpl evaluate`` trains every objective (the baselines and GPL/HAP) on the same training
requests for several seeds, scores the recalled candidates of the requests from the cutoff on
(their global negatives only on request), and writes a report (``RUN_DIR/evaluation/``)
against the truth table. Truth is read only by evaluation.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, NamedTuple

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import torch
from feast import FeatureStore
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from training.arrow import string_array
from training.data.labels import log_as_of
from training.evaluation.bootstrap import BootstrapSettings
from training.evaluation.ranking import (
    LONG_TAIL_HEAD_SHARE,
    POOLED_METRICS,
    Evaluation,
    EvaluationError,
    ItemInfo,
    evaluate_scores,
    without_global_negatives,
)
from training.evaluation.report import DEFAULT_BOOTSTRAP, ReportPaths, write_report
from training.features.training_set import build_training_set
from training.io import atomic_path, write_manifest
from training.preranker.config import DEBIASED_OBJECTIVES, OBJECTIVES, PrerankerConfig
from training.preranker.data import (
    ItemTable,
    Preprocessing,
    PrerankData,
    PrerankerDataError,
    check_trainable,
    encode,
    split_by_time,
)
from training.preranker.models import (
    ExpressiveModel,
    LightModel,
    build_model,
    flops_per_candidate,
)
from training.preranker.routing import (
    cascade_probabilities,
    cascade_scores,
    routed_mask,
    routing_flops,
    sigmoid,
)
from training.preranker.train import TrainedModel, score, train_model

PRERANKER_DIR: Final = "preranker"
EVALUATION_DIR: Final = "evaluation"
FEATURE_SERVICE: Final = "preranker"
LABEL_SERVICE: Final = "training_labels"
PSEUDO_OBJECTIVES: Final = ("gpl", "gpl_hap")
ROUTING_FRACTIONS: Final = (0.05, 0.1, 0.2, 0.3, 0.5, 1.0)
#: Below this share of candidates with a truth row the report warns that metrics treat the rest
#: as negatives.
TRUTH_COVERAGE_WARNING: Final = 0.5


def entity_sides() -> dict[str, str]:
    """Feature view name -> "user" or "item": which tower reads its numeric features."""
    from feature_repo.feature_views import FEATURE_VIEWS

    sides: dict[str, str] = {}
    for view in FEATURE_VIEWS:
        names = set(view.entities)
        if "request" in names:
            continue  # labels, not features
        if "user" in names:
            sides[view.name] = "user"
        elif "item" in names:
            sides[view.name] = "item"
    return sides


def join_features(store: FeatureStore, requests: pa.Table, labels: bool = True) -> pa.Table:
    """Point-in-time join of the request log with the pre-ranker's FeatureServices.

    ``preranker`` (features) and, with ``labels``, ``training_labels`` (pseudo-labels); one
    output row per request row, in order. Objectives without pseudo-labels need no
    ``labels``, nor the pseudo-label stage's output.
    """
    joined = build_training_set(store, requests, FEATURE_SERVICE).table
    if not labels:
        return joined
    pseudo = build_training_set(
        store, requests.select(["request_id", "item_id", "event_timestamp"]), LABEL_SERVICE
    ).table
    for name in pseudo.column_names:
        if name.startswith("pseudo_labels__"):
            joined = joined.append_column(name, pseudo.column(name))
    return joined


class Split(NamedTuple):
    """A request log cut in time."""

    before: pa.Table
    """Rows strictly before the cutoff, as known at the cutoff (:func:`log_as_of`)."""
    after: pa.Table
    """Rows at or after the cutoff, as they are."""
    clicks_known_later: int
    """Clicks of ``before`` known only at or after the cutoff: negatives there."""


def split_at(requests: pa.Table, cutoff: Any) -> Split:
    """Rows strictly before ``cutoff`` and the rest.

    The first part is the log as it looked at ``cutoff``: a model trained at that time could
    not have seen a click that came later.
    """
    ts = requests.column("event_timestamp")
    bound = pa.scalar(cutoff, ts.type)
    before, withheld = log_as_of(requests, cutoff)
    return Split(before, requests.filter(pc.greater_equal(ts, bound)), withheld)


def time_quantile(requests: pa.Table, q: float) -> Any:
    """The ``q`` quantile of request timestamps, as a datetime."""
    micros = pc.cast(requests.column("event_timestamp"), pa.int64()).to_numpy()
    value = int(np.quantile(micros, q))
    return pa.scalar(value, pa.int64()).cast(requests.schema.field("event_timestamp").type).as_py()


@dataclass
class Prepared:
    """Encoded training and evaluation data sharing one preprocessing."""

    prep: Preprocessing
    items: ItemTable
    train: PrerankData
    valid: PrerankData
    embeddings: torch.Tensor


def prepare(train_table: pa.Table, semantics: pa.Table, cfg: PrerankerConfig) -> Prepared:
    """Fit preprocessing on training rows and encode them (time-based validation split)."""
    items = ItemTable.from_semantics(semantics)
    prep = Preprocessing.fit(
        train_table, entity_sides(), cfg.model.category_vocab, cfg.model.history_length, items.dim
    )
    data = encode(
        train_table,
        items,
        prep,
        need_pseudo="pseudo_labels__pseudo_label" in train_table.column_names,
    )
    check_trainable(data)
    train, valid = split_by_time(data, cfg.training.validation_fraction)
    return Prepared(prep, items, train, valid, torch.from_numpy(items.embeddings))


@dataclass
class FittedPreranker:
    """A light and an expressive model trained with one objective."""

    objective: str
    light: TrainedModel
    expressive: TrainedModel
    teacher: TrainedModel | None = None
    flops: dict[str, dict[str, float]] = field(default_factory=dict)


def debiased_feature(prep: Preprocessing, cfg: PrerankerConfig, objective: str) -> int | None:
    """The item-feature column ``popularity_debias`` reads for ``objective``'s light model.

    None when debiasing is off or does not apply to the objective.
    """
    if cfg.loss.popularity_debias > 0 and objective in DEBIASED_OBJECTIVES:
        return popularity_index(prep, cfg.loss.popularity_feature)
    return None


def popularity_index(prep: Preprocessing, feature: str) -> int:
    """Column of ``feature`` among the item features, for ``popularity_debias``.

    Raises:
        PrerankerDataError: The training join has no such numeric item feature.
    """
    names = [spec.column for spec in prep.item_numeric]
    if feature not in names:
        raise PrerankerDataError(
            f"loss.popularity_feature {feature!r} is not a numeric item feature of the training "
            f"set; item features: {', '.join(names) or 'none'}"
        )
    return names.index(feature)


def fit(prepared: Prepared, cfg: PrerankerConfig, objective: str | None = None) -> FittedPreranker:
    """Train both models with ``objective`` (default: the config's)."""
    objective = objective or cfg.loss.objective
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; one of {', '.join(OBJECTIVES)}")
    if objective in PSEUDO_OBJECTIVES and not np.isfinite(prepared.train.pseudo).any():
        raise PrerankerDataError(
            f"objective {objective!r} needs pseudo-labels, but no training row has one: run "
            "`gpl pseudo-labels` and join the training_labels FeatureService"
        )
    p, emb = prepared, prepared.embeddings
    teacher_probs = None
    teacher = None
    if objective == "distill":
        teacher = train_model("expressive", "exposed", p.train, p.valid, emb, cfg)
        teacher_probs = (
            sigmoid(score(teacher.model, p.train, emb)),
            sigmoid(score(teacher.model, p.valid, emb)),
        )
    popularity = debiased_feature(p.prep, cfg, objective)
    # Only the light model is debiased: the expressive one trains on the hard groups, whose
    # candidates the funnel already matched in popularity (debiasing it too collapsed its AUC to
    # 0.43 on MovieLens-100k).
    light = train_model(
        "light", objective, p.train, p.valid, emb, cfg, None, teacher_probs, popularity
    )
    expressive = train_model(
        "expressive",
        objective,
        p.train,
        p.valid,
        emb,
        cfg,
        list(cfg.expressive_groups),
        teacher_probs,
    )
    h, a = p.prep.history_length, p.prep.num_anchors
    flops = {
        "light": flops_per_candidate(light.model, p.items.dim, h, a),  # type: ignore[arg-type]
        "expressive": flops_per_candidate(expressive.model, p.items.dim, h, a),  # type: ignore[arg-type]
    }
    return FittedPreranker(objective, light, expressive, teacher, flops)


def save_preranker(
    fitted: FittedPreranker,
    prepared: Prepared,
    cfg: PrerankerConfig,
    out_dir: Path,
    inputs: dict[str, Any],
) -> Path:
    """Write both models, the preprocessing, the config and a manifest."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, trained in (("light", fitted.light), ("expressive", fitted.expressive)):
        with atomic_path(out_dir / f"{name}.safetensors") as tmp:
            save_file({k: v.contiguous() for k, v in trained.model.state_dict().items()}, str(tmp))
    with atomic_path(out_dir / "preprocessing.json") as tmp:
        tmp.write_text(prepared.prep.model_dump_json(indent=2))
    with atomic_path(out_dir / "config.json") as tmp:
        tmp.write_text(json.dumps({"objective": fitted.objective, **cfg.model_dump()}, indent=2))
    write_manifest(
        out_dir,
        PRERANKER_DIR,
        inputs=inputs,
        outputs={
            "light": "light.safetensors",
            "expressive": "expressive.safetensors",
            "preprocessing": "preprocessing.json",
            "config": "config.json",
        },
        config={"objective": fitted.objective, **cfg.model_dump()},
        metrics=training_metrics(fitted, prepared),
    )
    return out_dir


def training_metrics(fitted: FittedPreranker, prepared: Prepared) -> dict[str, Any]:
    """What the manifest records about training."""
    return {
        "train_requests": prepared.train.n_requests,
        "train_rows": prepared.train.n_rows,
        "valid_requests": prepared.valid.n_requests,
        "pseudo_labelled_rows": int(np.isfinite(prepared.train.pseudo).sum()),
        **{
            f"{m.kind}_{k}": v
            for m in (fitted.light, fitted.expressive)
            for k, v in (
                ("epochs", m.epochs),
                ("best_epoch", m.best_epoch),
                ("seconds", round(m.seconds, 2)),
                ("samples_per_second", round(m.samples_per_second)),
                ("hap_weights", m.hap_weights),
            )
        },
        "flops": fitted.flops,
    }


@dataclass
class LoadedPreranker:
    """Models and preprocessing read back from a ``preranker`` directory."""

    objective: str
    config: PrerankerConfig
    prep: Preprocessing
    light: LightModel | ExpressiveModel
    expressive: LightModel | ExpressiveModel


def load_preranker(model_dir: Path) -> LoadedPreranker:
    """Read a directory written by :func:`save_preranker`."""
    if not (model_dir / "preprocessing.json").exists():
        raise FileNotFoundError(f"{model_dir}: no trained pre-ranker here; run `gpl train` first")
    raw = json.loads((model_dir / "config.json").read_text())
    objective = raw.pop("objective")
    cfg = PrerankerConfig.model_validate(raw)
    prep = Preprocessing.model_validate_json((model_dir / "preprocessing.json").read_text())
    models = {}
    for kind in ("light", "expressive"):
        model = build_model(
            kind, len(prep.user_numeric), len(prep.item_numeric), prep.embedding_dim, cfg.model
        )
        try:
            model.load_state_dict(load_file(str(model_dir / f"{kind}.safetensors")))
        except RuntimeError as exc:
            raise PrerankerDataError(
                f"{model_dir / f'{kind}.safetensors'} does not fit this code's {kind} model "
                f"(trained by another version?); re-run `gpl train`: {str(exc).splitlines()[-1]}"
            ) from exc
        model.eval()
        models[kind] = model
    return LoadedPreranker(objective, cfg, prep, models["light"], models["expressive"])


def scored_table(data: PrerankData, scores: npt.NDArray[np.float32]) -> pa.Table:
    """The evaluation's ``scored`` table for one dataset and one score per row."""
    return pa.table(
        {
            "request_id": data.request_ids[data.row_request],
            "user_id": data.user_ids[data.row_request],
            "item_id": data.item_ids,
            "stage": data.stage,
            "score": scores.astype(np.float64),
        }
    )


def evaluate_cascade(
    data: PrerankData,
    light: npt.NDArray[np.float32],
    expressive: npt.NDArray[np.float32],
    routed: npt.NDArray[np.bool_],
    truth: pa.Table,
    items: ItemInfo,
) -> Evaluation:
    """The metrics of the cascade that re-scores the ``routed`` rows with the expressive model.

    Per-request metrics come from the cascade's order (:func:`cascade_scores`). The pooled AUCs
    compare rows across requests, so they come from the probabilities the cascade serves
    (:func:`cascade_probabilities`): the order-carrying +1 offset would rank every request's
    routed rows above every other request's rest (it lifted the cascade above both models).
    Each metric keeps the per-request parts of the scoring it came from, so the report's
    bootstrap gives the pooled AUCs intervals of the served values too.

    Args:
        data: The evaluated candidates, grouped by request.
        light: The light model's logit for each row of ``data``.
        expressive: The expressive model's logit for each row of ``data``.
        routed: Rows the expressive model re-scores (:func:`routed_mask`).
        truth: The contract's truth table.
        items: Side information of every scored item.

    Returns:
        Every metric of :func:`evaluate_scores`, with its per-request parts.
    """
    ranked = evaluate_scores(
        scored_table(data, cascade_scores(light, expressive, routed)), truth, items
    )
    served = evaluate_scores(
        scored_table(data, cascade_probabilities(light, expressive, routed)), truth, items
    )
    return ranked.with_metrics_from(served, POOLED_METRICS)


def reference_scores(data: PrerankData, items: ItemInfo) -> dict[str, npt.NDArray[np.float32]]:
    """Untrained scorers for the report, from inputs the models have too.

    ``reference: popularity``: log(1 + the candidate's training popularity);
    ``reference: history cosine``: max cosine of the candidate's content to the user's history;
    ``reference: anchors + history cosine``: the larger of that and the max cosine to the
    user's anchors. A model below them has not learned what its inputs already hold.
    """
    rows = pc.index_in(pa.array(data.item_ids), value_set=string_array(items.item_ids))
    popularity = items.popularity[rows.to_numpy(zero_copy_only=False)]
    history = data.cross[:, 2]
    return {
        "reference: popularity": np.log1p(popularity).astype(np.float32),
        "reference: history cosine": history.astype(np.float32),
        "reference: anchors + history cosine": np.maximum(history, data.cross[:, 0]),
    }


def item_info(
    table: ItemTable, items: pa.Table, train_requests: pa.Table, scored: pa.Table | None = None
) -> ItemInfo:
    """Side information for diversity and long-tail metrics; popularity from training only.

    Items of ``train_requests`` or ``scored`` without a SID (which training and scoring map to
    the all-zero row 0) are added with that zero vector, so evaluating them does not fail.
    """
    known = table.item_ids
    logged = [train_requests.column("item_id")]
    if scored is not None:
        logged.append(scored.column("item_id"))
    seen = pc.unique(pa.chunked_array([c for col in logged for c in col.chunks], pa.string()))
    extra = np.asarray(
        pc.filter(seen, pc.invert(pc.is_in(seen, pa.array(known.astype(str))))).to_pylist(),
        dtype=object,
    )
    ids = np.concatenate([known.astype(object), extra])
    embeddings = np.concatenate(
        [table.embeddings[1:], np.repeat(table.embeddings[:1], len(extra), axis=0)]
    )
    cats = np.full(len(ids), "", dtype=object)
    if "category" in items.column_names:
        lookup = dict(
            zip(
                items.column("item_id").to_pylist(),
                items.column("category").to_pylist(),
                strict=True,
            )
        )
        cats = np.array([lookup.get(i) or "" for i in ids], dtype=object)
    counts = pc.value_counts(train_requests.column("item_id")).to_pylist()
    pop_map = {c["values"]: c["counts"] for c in counts}
    popularity = np.array([pop_map.get(i, 0) for i in ids], dtype=np.float64)
    return ItemInfo(
        item_ids=ids,
        embeddings=embeddings,
        categories=cats,
        popularity=popularity,
    )


@dataclass
class SuiteResult:
    """Per-method, per-seed metrics, routing curves and the written report.

    Attributes:
        results: Method -> one metrics dict per seed (an
            :class:`~training.evaluation.ranking.Evaluation` with per-request parts).
        routing: One row per (seed, routing fraction): the cascade's metrics and FLOPs share.
        report: The files written.
        info: Run facts (``seconds``).
        global_negatives: ``global_negative`` rows of the evaluation table: left out of every
            metric, or scored with the rest when ``include_global_negatives`` was set.
    """

    results: dict[str, list[dict[str, float]]]
    routing: list[dict[str, float]]
    report: ReportPaths
    info: dict[str, Any]
    global_negatives: int = 0


def evaluate_suite(
    train_table: pa.Table,
    eval_table: pa.Table,
    truth: pa.Table,
    semantics: pa.Table,
    items: pa.Table,
    cfg: PrerankerConfig,
    out_dir: Path,
    objectives: list[str] | None = None,
    seeds: int = 3,
    title: str = "Pre-ranker evaluation",
    warnings: Sequence[str] | None = None,
    notes: Sequence[str] | None = None,
    include_global_negatives: bool = False,
    bootstrap: BootstrapSettings | None = DEFAULT_BOOTSTRAP,
) -> SuiteResult:
    """Train every objective for ``seeds`` seeds and evaluate light, expressive and cascade.

    Methods in the report: ``<objective>`` (the light model, which scores every candidate
    online), ``<objective> routing@M`` (light on all, expressive on the top ``hard_fraction``)
    and ``<objective> expressive-all`` (the expressive model on every candidate) for GPL + HAP,
    or for the last objective listed when ``gpl_hap`` is not among them. The routing curves
    sweep ``ROUTING_FRACTIONS`` and the configured ``hard_fraction``.

    Args:
        train_table: The training requests joined with their features (and pseudo-labels).
        eval_table: The evaluation requests joined with their features.
        truth: The contract's truth table.
        semantics: Item semantics (SIDs and content embeddings).
        items: The contract's items table (categories).
        cfg: Model, training and routing settings.
        out_dir: Where the report is written.
        objectives: Objectives to train (default: every one), in the report's order.
        seeds: Seeds per objective.
        title: The report's title.
        warnings: Lines the report's notes show as ``Warning: ...``: what may invalidate the
            figures (e.g. an upstream stage fitted after the cutoff).
        notes: Further lines the report's notes show as they are.
        include_global_negatives: Score ``eval_table``'s ``global_negative`` rows too. By
            default they are left out
            (:func:`~training.evaluation.ranking.without_global_negatives`): random catalog
            negatives that only training uses, which the serving pre-ranker never scores.
            Either way the report's notes say how many there were, if any.
        bootstrap: Settings of the report's paired request bootstrap; None: no intervals.

    Returns:
        The metrics, the routing rows, the report's paths and the global negatives' count.

    Raises:
        EvaluationError: ``eval_table`` holds global negatives only and they are left out, or
            the scores cannot be evaluated against ``truth``.
    """
    began = time.perf_counter()
    # Listed twice, an objective would be trained twice per seed and its std faked.
    objectives = list(dict.fromkeys(objectives or OBJECTIVES))
    cascaded_objective = "gpl_hap" if "gpl_hap" in objectives else objectives[-1]
    fractions = sorted({*ROUTING_FRACTIONS, cfg.routing.hard_fraction})
    # Global negatives stay in training (HAP's easy group) but leave the evaluation before
    # encoding: scored, they would lift every metric with candidates serving never ranks.
    all_rows = eval_table.num_rows
    recalled, n_global = without_global_negatives(eval_table)
    if not include_global_negatives:
        if recalled.num_rows == 0 and n_global:
            raise EvaluationError(
                f"the {n_global:,} evaluation rows are all global_negative rows, which serving "
                "never scores: no recalled candidate to evaluate (evaluate other requests, or "
                "score them with include_global_negatives, --include-global-negatives)"
            )
        eval_table = recalled
    base = prepare(train_table, semantics, cfg)
    eval_data = encode(eval_table, base.items, base.prep, need_pseudo=False)
    info_items = item_info(base.items, items, train_table, eval_table)
    results: dict[str, list[dict[str, float]]] = {}
    for name, reference in reference_scores(eval_data, info_items).items():
        results[name] = [evaluate_scores(scored_table(eval_data, reference), truth, info_items)]
    routing: list[dict[str, float]] = []
    runs = [(o, s) for s in range(seeds) for o in objectives]
    for objective, seed in tqdm(runs, desc="objectives x seeds", disable=not cfg.training.progress):
        run_cfg = cfg.model_copy(
            update={"training": cfg.training.model_copy(update={"seed": cfg.training.seed + seed})}
        )
        fitted = fit(base, run_cfg, objective)
        light = score(fitted.light.model, eval_data, base.embeddings)
        metrics = evaluate_scores(scored_table(eval_data, light), truth, info_items)
        metrics["train_samples_per_second"] = fitted.light.samples_per_second
        results.setdefault(objective, []).append(metrics)
        if objective == cascaded_objective:
            expressive = score(fitted.expressive.model, eval_data, base.embeddings)
            results.setdefault(f"{objective} expressive-all", []).append(
                evaluate_scores(scored_table(eval_data, expressive), truth, info_items)
            )
            for fraction in fractions:
                routed = routed_mask(light, eval_data.offsets, fraction)
                m = evaluate_cascade(eval_data, light, expressive, routed, truth, info_items)
                fl = routing_flops(
                    int(routed.sum()),
                    eval_data.n_rows,
                    eval_data.n_requests,
                    fitted.flops["light"],
                    fitted.flops["expressive"],
                )
                routing.append(
                    {"seed": seed, "fraction": fraction, "flops_share": fl["share"], **m}
                )
                if fraction == cfg.routing.hard_fraction:
                    results.setdefault(f"{objective} routing@{fraction:g}", []).append(m)
    curves = _routing_curves(routing)
    notes = [
        f"Training requests: {base.train.n_requests + base.valid.n_requests} "
        f"({base.train.n_rows + base.valid.n_rows} rows); evaluation requests: "
        f"{eval_data.n_requests} ({eval_data.n_rows} rows); {seeds} seed(s).",
        *_global_negatives_note(n_global, all_rows, include_global_negatives),
        *(notes or []),
        "Methods are the light model unless marked: 'expressive-all' scores every candidate "
        "with the expressive model, 'routing@M' re-scores the top M share by light score.",
        "'reference:' rows are untrained scorers the models should beat: the candidate's "
        "training popularity, and its content similarity to the user's history (and anchors), "
        "two of the models' own inputs.",
        "AUC and unexposed_auc pool every request's rows; for routing@M they are computed on "
        "the probabilities the cascade serves. routing@M re-orders only each request's top "
        "ceil(M x n) rows by light score, so its HR and Recall@K equal the light model's "
        "whenever that share is at most K.",
        "unexposed_* metrics rank only the candidates that were not exposed.",
        *(f"Warning: {w}." for w in warnings or []),
    ]
    first = next(iter(results.values()), [])
    if first:
        # The same for every method: which requests have a (long-tail) positive is the truth's.
        notes.append(
            f"Recall and NDCG average over the {first[0]['requests_evaluated']:.0f} evaluation "
            f"requests with a positive; longtail_recall@K over the "
            f"{first[0]['longtail_requests_evaluated']:.0f} with a long-tail positive (items "
            f"outside the top {LONG_TAIL_HEAD_SHARE:.0%} by training popularity: how often an "
            "item was a candidate in the training requests, global negatives included)."
        )
        coverage = first[0]["truth_coverage"]
        notes.append(
            f"Truth coverage: {coverage:.1%} of the evaluated candidates have a truth row; the "
            "others count as negatives."
        )
        if coverage < TRUTH_COVERAGE_WARNING:
            notes.append(
                f"Warning: only {coverage:.1%} of the candidates have a truth row; every metric "
                "treats the rest as negatives, so they measure agreement with a sparse truth."
            )
    report = write_report(results, out_dir, title, notes=notes, curves=curves, bootstrap=bootstrap)
    info = {"seconds": round(time.perf_counter() - began, 1)}
    return SuiteResult(results, routing, report, info, n_global)


def _global_negatives_note(n_global: int, all_rows: int, included: bool) -> list[str]:
    """The report's note on the evaluation table's global negatives (none without any).

    A plain note, not a warning: leaving them out is the rule, but a reader comparing with a
    report written before 2026-12-05 (which scored them) needs the count.
    """
    if not n_global:
        return []
    share = f"{n_global:,} of the {all_rows:,} evaluation rows ({n_global / all_rows:.1%})"
    # Worded for the command line, where the reports come from; the keyword has the same name.
    if included:
        return [
            f"global_negative rows included in every metric (--include-global-negatives): "
            f"{share}, random catalog negatives that serving never scores."
        ]
    return [
        f"global_negative rows left out of every metric: {share}, random catalog negatives "
        "that only training uses (--include-global-negatives keeps them)."
    ]


def _routing_curves(routing: list[dict[str, float]]) -> dict[str, list[tuple[float, float]]]:
    by_fraction: dict[float, list[tuple[float, float]]] = {}
    for r in routing:
        by_fraction.setdefault(r["fraction"], []).append((r["flops_share"], r["ndcg@50"]))
    points = [
        (float(np.mean([p[0] for p in v])), float(np.mean([p[1] for p in v])))
        for _, v in sorted(by_fraction.items())
    ]
    return {"light + expressive on top M": points} if points else {}
