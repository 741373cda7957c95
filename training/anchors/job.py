"""The anchor stage's jobs: train the anchor LM, then generate every user's interest anchors.

``train_anchor_model`` reads the SID stage's ``item_semantics`` and the users' positives and
writes a self-contained model directory (see :mod:`training.anchors.model`) with a manifest.
``generate_anchors`` decodes, for every (user, cutoff) whose history changed, the top-N items by
trie-constrained beam search, and writes ``RUN_DIR/anchors/user_interest_anchors.parquet``
(columns: :mod:`training.anchors.schema`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, Final

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from tqdm import tqdm

from training.anchors.catalog import SidCatalog
from training.anchors.errors import AnchorInputError
from training.anchors.generate import (
    BatchSize,
    BeamOutput,
    GenerateConfig,
    beam_search_fast,
    exclusions_of,
    make_search,
    resolve_device,
    resolve_dtype,
    search_in_batches,
)
from training.anchors.incremental import (
    Reuse,
    generation_key,
    history_hashes,
    kept_batches,
    plan_reuse,
)
from training.anchors.model import (
    LoadedAnchorModel,
    ModelConfig,
    build_model,
    check_trained_sids,
    ensemble_dirs,
    load_anchor_model,
    member_dir,
    save_anchor_model,
    save_checkpoint,
    update_info,
    write_trained_sids,
)
from training.anchors.parallel import DevicePool, WorkerSpec
from training.anchors.prior import CooccurrencePrior, PriorConfig, SparsePriorRows
from training.anchors.schema import ANCHORS_FILE, ANCHORS_SCHEMA, AnchorResult
from training.anchors.sequences import (
    AnchorRequests,
    EvalSet,
    ExampleSet,
    SequenceConfig,
    UserCutoffs,
    UserSequences,
    anchor_requests,
    downsample,
    frequency_summary,
    holdout_split,
    user_sequences,
    with_reversed,
)
from training.anchors.shards import Shard, inputs_fingerprint
from training.anchors.train import (
    EVAL_K,
    TrainConfig,
    TrainHistory,
    TrainingPrior,
    hit_rate_ndcg,
    train_loop,
)
from training.anchors.trie import SidTrie
from training.anchors.vocab import SidVocab, SidVocabularyError
from training.data.contract import TIMESTAMP
from training.io import MANIFEST_NAME, atomic_path, read_manifest, write_manifest

logger = logging.getLogger(__name__)


class AnchorConfig(BaseModel):
    """Every setting of the anchor stage (sequences, model, training, generation)."""

    model_config = ConfigDict(extra="forbid")

    sequences: SequenceConfig = Field(
        default_factory=SequenceConfig,
        description="History length, popular-item downsampling of training sequences, seed.",
    )
    model: ModelConfig = Field(
        default_factory=ModelConfig,
        description="Compact Qwen2 shape, or a local checkpoint with LoRA settings.",
    )
    training: TrainConfig = Field(
        default_factory=TrainConfig,
        description="Optimizer, loss, evaluation and early-stopping settings.",
    )
    generation: GenerateConfig = Field(
        default_factory=GenerateConfig,
        description="Beam width (20), anchors per user (10), batch size, device, implementation.",
    )
    prior: PriorConfig = Field(
        default_factory=PriorConfig,
        description="The item co-occurrence prior that can be fused into the beam search: "
        "fitted and saved with every model; off by default (weight 0); 'auto' chooses its weight "
        "on the held-out users at training and decodes with it.",
    )


@dataclass
class TrainResult:
    """Outcome of :func:`train_anchor_model`."""

    model_dir: Path
    history: TrainHistory
    metrics: dict[str, Any] = field(default_factory=dict)


def _check_codebook(catalog: SidCatalog, codebook_sizes: Sequence[int]) -> None:
    if len(codebook_sizes) != catalog.n_levels:
        raise SidVocabularyError(
            f"codebook_sizes has {len(codebook_sizes)} levels but the SIDs have {catalog.n_levels}"
        )


def _max_positions(vocab: SidVocab, max_history: int) -> int:
    """Longest sequence the model sees: prefix, <bos>, history and the target item."""
    return vocab.items_offset + (max_history + 1) * vocab.n_levels


def train_anchor_model(
    item_semantics: pa.Table,
    positives: pa.Table,
    codebook_sizes: Sequence[int],
    cfg: AnchorConfig,
    out_dir: Path,
) -> TrainResult:
    """Train the anchor LM on users' positive SID sequences and save it to ``out_dir``.

    Args:
        item_semantics: The SID stage's table (``item_id``, ``event_timestamp``, ``sid_codes``,
            ``sid``, ``content_embedding``).
        positives: ``user_id``, ``item_id``, ``event_timestamp`` of positive interactions.
        codebook_sizes: Codes per SID level (e.g. from
            :func:`training.anchors.catalog.read_codebook_sizes`).
        cfg: Stage configuration.
        out_dir: Model directory to write (e.g. ``RUN_DIR/anchors/model``).

    Raises:
        SidVocabularyError: when the SIDs do not fit ``codebook_sizes`` or a checkpoint's
            tokenizer holds another codebook.
    """
    t0 = time.perf_counter()
    catalog = SidCatalog.from_table(item_semantics)
    _check_codebook(catalog, codebook_sizes)
    tc = cfg.training
    model, vocab = build_model(cfg.model, codebook_sizes, seed=tc.seed)
    vocab.check_codes(catalog.codes)
    longest = _max_positions(vocab, cfg.sequences.max_history)
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and longest > limit:
        raise AnchorInputError(
            f"sequences of up to {longest} tokens exceed the model's max_position_embeddings "
            f"{limit}: lower sequences.max_history or raise compact.max_position_embeddings"
        )
    trie = SidTrie(catalog.codes, codebook_sizes)
    seqs = user_sequences(positives, catalog.item_ids)
    sc = cfg.sequences
    train_seqs, eval_set = holdout_split(seqs, tc.eval_users, sc.max_history, sc.seed)
    # The prior counts the sequences as they are (never downsampled or reversed: it has its own
    # `symmetric` switch), and, for choosing its weight, without the held-out items.
    prior_seqs = list(train_seqs)
    freq_before = frequency_summary(train_seqs, catalog.n_items)
    if sc.downsample_threshold is not None:
        train_seqs = downsample(
            train_seqs, catalog.n_items, sc.downsample_threshold, sc.downsample_alpha, sc.seed
        )
    freq_after = frequency_summary(train_seqs, catalog.n_items)
    if sc.reverse_augmentation:
        # After the hold-out split: a held-out item never reaches training, not even backwards.
        train_seqs = with_reversed(train_seqs)
    examples = ExampleSet.build(train_seqs, sc.max_history, tc.loss_on)
    fusion = None
    if cfg.prior.train_weight > 0:
        # Counted without the held-out items, as the evaluation must not see them; each
        # training row leaves out its own sequence's later items (TrainingPrior).
        fusion = TrainingPrior(
            CooccurrencePrior.fit(prior_seqs, catalog.item_ids, cfg.prior, catalog.embeddings),
            cfg.prior,
            cfg.prior.train_weight,
        )
    if len(examples) == 0:
        usable = int((np.diff(seqs.offsets) >= 2).sum())
        raise AnchorInputError(
            "no training examples: a user needs 2 positives left after the evaluation hold-out "
            f"(training.eval_users {tc.eval_users} held out the last item of "
            f"{len(eval_set.targets)} users; {usable} of {seqs.n_users} users have 2 or more "
            "positives). Lower training.eval_users, or give users longer histories"
        )

    out_dir.mkdir(parents=True, exist_ok=True)
    member_paths = [member_dir(out_dir, k) for k in range(tc.ensemble_size)]
    members: list[dict[str, Any]] = []
    history: TrainHistory | None = None
    for k, path in enumerate(member_paths):
        member_cfg = tc.model_copy(update={"seed": tc.seed + k})
        if k > 0:
            # Same data, SIDs and held-out users; another initialization and batch order.
            logger.info("anchor LM ensemble member %d of %d", k + 1, tc.ensemble_size)
            model, _ = build_model(cfg.model, codebook_sizes, seed=member_cfg.seed)
        member_history = train_loop(
            model,
            vocab,
            trie,
            catalog.codes,
            examples,
            eval_set,
            member_cfg,
            on_best=partial(_save_best, vocab=vocab, out_dir=path),
            label=f"member {k + 1}/{tc.ensemble_size} " if tc.ensemble_size > 1 else "",
            fusion=fusion,
            exclude_history=cfg.generation.exclude_history,
        )
        if history is None:
            history = member_history
            # Counted before saving: saving merges a LoRA adapter into the base in place.
            n_params = sum(p.numel() for p in model.parameters())
            n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        best = member_history.best
        member_metrics = {
            "seed": member_cfg.seed,
            "eval_hr@10": best.hr_at_10,
            "eval_ndcg@10": best.ndcg_at_10,
            "eval_loss": None if best.eval_loss is None else round(best.eval_loss, 5),
            "best_epoch": member_history.best_epoch,
        }
        members.append({**member_metrics, "train_loss": round(best.train_loss, 5)})
        info: dict[str, Any] = {
            "base_model_path": cfg.model.base_model_path,
            "max_history": sc.max_history,
            "metrics": {k2: member_metrics[k2] for k2 in member_metrics if k2 != "seed"},
            "history": member_history.as_dict(),
        }
        save_anchor_model(model, vocab, path, info)
        write_trained_sids(path, catalog.item_ids.tolist(), catalog.sids.tolist())
    assert history is not None
    best = history.best
    metrics: dict[str, Any] = {
        "users": seqs.n_users,
        "items": catalog.n_items,
        "positives": len(seqs.items),
        "positives_dropped_unknown_items": seqs.dropped_unknown_items,
        # What an evaluation must start after (gpl evaluate warns when it does not).
        "latest_positive": datetime.fromtimestamp(int(seqs.timestamps.max()) / 1e6, UTC).isoformat()
        if len(seqs.timestamps)
        else None,
        "train_examples": len(examples),
        "eval_users": len(eval_set.targets),
        "epochs_run": len(history.epochs),
        "best_epoch": history.best_epoch,
        "stopped_early": history.stopped_early,
        "train_loss": round(best.train_loss, 5),
        "eval_loss": None if best.eval_loss is None else round(best.eval_loss, 5),
        "eval_hr@10": best.hr_at_10,
        "eval_ndcg@10": best.ndcg_at_10,
        "item_frequency_before_downsampling": freq_before,
        "item_frequency_after_downsampling": freq_after,
        "parameters": n_params,
        "trainable_parameters": n_trainable,
        "ensemble_size": tc.ensemble_size,
    }
    if tc.ensemble_size > 1:
        # Listed only now that every member is saved: an interrupted run leaves the first member
        # a complete single model, never an ensemble with a missing or stale member.
        update_info(
            out_dir, {"ensemble_members": [str(d.relative_to(out_dir)) for d in member_paths[1:]]}
        )
        metrics["ensemble_members"] = members
        if len(eval_set.targets):
            hr, ndcg = _ensemble_eval(member_paths, catalog, trie, eval_set, cfg, fusion)
            # The whole ensemble on the same held-out users as each member.
            metrics["ensemble_eval_hr@10"], metrics["ensemble_eval_ndcg@10"] = hr, ndcg
            update_info(out_dir, {"ensemble_metrics": {"eval_hr@10": hr, "eval_ndcg@10": ndcg}})
    held_out_prior = None if fusion is None else fusion.prior
    prior = _fit_prior(member_paths, catalog, trie, prior_seqs, seqs, eval_set, cfg, held_out_prior)
    metrics["prior_weight_chosen"] = prior.weight
    metrics["prior_tuning"] = prior.tuning
    metrics["prior_pairs"] = int(prior.matrix.nnz)
    metrics["seconds"] = round(time.perf_counter() - t0, 3)
    write_manifest(
        out_dir,
        "anchors-train",
        inputs={"item_semantics": "sids/item_semantics.parquet", "positives": "positives"},
        outputs={"model": "model/", "info": "anchor_model.json"},
        config=cfg.model_dump(mode="json"),
        metrics=metrics,
    )
    return TrainResult(model_dir=out_dir, history=history, metrics=metrics)


def _save_best(model: nn.Module, _metrics: object, *, vocab: SidVocab, out_dir: Path) -> None:
    save_checkpoint(model, vocab, out_dir)


def _ensemble_eval(
    member_paths: Sequence[Path],
    catalog: SidCatalog,
    trie: SidTrie,
    eval_set: EvalSet,
    cfg: AnchorConfig,
    fusion: TrainingPrior | None,
) -> tuple[float, float]:
    """HR@10 and NDCG@10 of the saved members decoding together on the held-out users.

    Members trained with the prior fused decode with it, at their training weight.
    """
    if fusion is None:
        return _held_out_eval(member_paths, catalog, trie, eval_set, cfg, None, (0.0,))[0]
    weights = (fusion.weight,)
    return _held_out_eval(member_paths, catalog, trie, eval_set, cfg, fusion.prior, weights)[0]


def _held_out_eval(
    member_paths: Sequence[Path],
    catalog: SidCatalog,
    trie: SidTrie,
    eval_set: EvalSet,
    cfg: AnchorConfig,
    prior: CooccurrencePrior | None,
    weights: Sequence[float],
) -> list[tuple[float, float]]:
    """HR@10 and NDCG@10 on the held-out users of the saved members, per prior weight."""
    tc = cfg.training
    device = resolve_device(tc.device)
    dtype = resolve_dtype("auto", device)
    loaded = [load_anchor_model(d, device=device, dtype=dtype) for d in member_paths]
    vocab = loaded[0].vocab
    item_tokens = vocab.item_tokens(catalog.codes)
    prompts = [vocab.encode(item_tokens[h]) for h in eval_set.histories]
    prior_of = None
    if prior is not None:
        histories = eval_set.histories

        def prior_of(rows: np.ndarray) -> SparsePriorRows:
            return prior.sparse_probabilities([histories[i] for i in rows], cfg.prior)

    exclude_of = None
    if cfg.generation.exclude_history:
        exclude_of = exclusions_of(eval_set.histories, trie.n_items)
    results = []
    for weight in weights:
        out = search_in_batches(
            partial(
                beam_search_fast,
                [m.model for m in loaded],
                trie=trie,
                vocab=vocab,
                beam_width=tc.eval_beam_width,
                num_anchors=EVAL_K,
                combine=cfg.generation.ensemble_combine,
                prior_weight=weight,
            ),
            prompts,
            tc.eval_batch_size,
            prior_of=prior_of if weight > 0 else None,
            exclude_of=exclude_of,
        )
        results.append(hit_rate_ndcg(out.items, eval_set.targets))
    return results


def _fit_prior(
    member_paths: Sequence[Path],
    catalog: SidCatalog,
    trie: SidTrie,
    prior_seqs: Sequence[np.ndarray],
    seqs: UserSequences,
    eval_set: EvalSet,
    cfg: AnchorConfig,
    held_out: CooccurrencePrior | None = None,
) -> CooccurrencePrior:
    """Save the co-occurrence prior beside the model; with ``prior.weight: auto`` choose a weight.

    ``held_out``: the prior already counted on ``prior_seqs`` (fused training fits it), reused
    for the choice instead of counted again.

    A model trained with the prior fused (``prior.train_weight``) decodes with that weight
    unless ``auto`` asks for a choice, whose candidates then include it.

    Fitting costs seconds and is always done, so that a model can later decode with a given
    weight. Choosing the weight costs one decode of the held-out users per ``prior.weight_grid``
    value, so it runs only when the training config asks for ``auto`` (the same file then asks
    generation for it): each weight decodes the held-out users with the saved model, on a prior
    counted without the held-out items (the model never saw them either); the best held-out
    NDCG@10 wins (ties: the smaller weight). The prior saved then counts every sequence, held-out
    items included, as the model's users are all decoded later with their full histories.
    """
    pc = cfg.prior
    grid = sorted({0.0, *pc.weight_grid, pc.train_weight})
    tuning: list[dict[str, float]] = []
    weight: float | None = pc.train_weight if pc.train_weight > 0 else None
    if pc.weight == "auto" and len(eval_set.targets):
        if held_out is None:
            held_out = CooccurrencePrior.fit(prior_seqs, catalog.item_ids, pc, catalog.embeddings)
        scores = _held_out_eval(member_paths, catalog, trie, eval_set, cfg, held_out, grid)
        tuning = [
            {"weight": w, "eval_hr@10": round(hr, 5), "eval_ndcg@10": round(ndcg, 5)}
            for w, (hr, ndcg) in zip(grid, scores, strict=True)
        ]
        best = max(range(len(grid)), key=lambda i: (scores[i][1], -grid[i]))
        weight = grid[best]
        logger.info(
            "co-occurrence prior: held-out NDCG@10 %s; weight %s chosen",
            ", ".join(f"w={t['weight']}: {t['eval_ndcg@10']:.4f}" for t in tuning),
            weight,
        )
    elif pc.weight == "auto":
        weight = pc.train_weight
        logger.warning(
            "no held-out users (training.eval_users 0): the co-occurrence prior's weight cannot "
            "be chosen and is set to %s (prior.train_weight; 0: the LM alone); give "
            "prior.weight a number to decode with another",
            pc.train_weight,
        )
    prior = CooccurrencePrior.fit(seqs.sequences(), catalog.item_ids, pc, catalog.embeddings)
    prior.weight, prior.tuning, prior.train_weight = weight, tuning, pc.train_weight
    prior.save(member_paths[0])
    return prior


def _generation_history(
    sc: SequenceConfig, model_dirs: Sequence[Path], members: Sequence[LoadedAnchorModel]
) -> int:
    """How many history items generation feeds: by default what the model was trained with.

    ``anchor_model.json`` records the training ``max_history``. A generation config that does
    not set ``sequences.max_history`` uses it (the class default, 50, would silently feed a model
    trained on 10 items contexts five times longer than any it saw); one that sets it wins, with a
    warning when it exceeds the training length.
    """
    trained = {int(m.info["max_history"]) for m in members if "max_history" in m.info}
    if "max_history" in sc.model_fields_set or not trained:
        if trained and sc.max_history > min(trained):
            logger.warning(
                "generating from histories of up to %d items, but the anchor model %s was trained "
                "on at most %d: the model never saw contexts that long",
                sc.max_history,
                model_dirs[0],
                min(trained),
            )
        return sc.max_history
    if len(trained) > 1:
        logger.warning(
            "the ensemble's members were trained on histories of %s items; generating from %d",
            sorted(trained),
            min(trained),
        )
    return min(trained)


def _generation_prior(
    model_dir: Path, catalog: SidCatalog, pc: PriorConfig
) -> tuple[CooccurrencePrior | None, float]:
    """The model's co-occurrence prior and the fusion weight to decode with.

    ``prior.weight: auto`` takes the weight chosen at training (0 for a model saved without a
    prior, which then decodes as before); a number overrides it. Left unset, a model trained
    with the prior fused (``prior.train_weight``) decodes with its training weight, others with
    the LM alone.

    Raises:
        AnchorInputError: when a positive weight is asked of a model saved without a prior.
    """
    prior = CooccurrencePrior.load(model_dir)
    if pc.weight == "auto":
        weight = 0.0 if prior is None or prior.weight is None else prior.weight
        if prior is None:
            logger.info(
                "anchor model %s has no co-occurrence prior: decoding with the LM alone", model_dir
            )
        elif prior.weight is None:
            logger.warning(
                "prior.weight auto: no weight was chosen when anchor model %s was trained (its "
                "config did not ask for auto); decoding with the LM alone. Retrain with "
                "prior.weight auto, or give a number",
                model_dir,
            )
    elif pc.weight is None:
        # A model trained as the prior's second expert is only half a model without it: left
        # unset, the weight is the one it was trained with.
        weight = 0.0 if prior is None else prior.train_weight
        if weight > 0:
            logger.info(
                "anchor model %s was trained with the co-occurrence prior fused at weight %s: "
                "decoding with it",
                model_dir,
                weight,
            )
    else:
        weight = float(pc.weight)
        if prior is not None and prior.train_weight > 0 and weight != prior.train_weight:
            logger.warning(
                "anchor model %s was trained with the co-occurrence prior fused at weight %s "
                "(it learned what the prior does not say); decoding with weight %s",
                model_dir,
                prior.train_weight,
                weight,
            )
        if weight > 0 and prior is None:
            raise AnchorInputError(
                f"prior.weight {weight}: the anchor model {model_dir} was trained without a "
                "co-occurrence prior (before it existed); retrain it, or set prior.weight 0"
            )
    if prior is not None:
        prior = prior.align(catalog.item_ids)
    return prior, weight


#: The generation settings that shape an anchor set (the generation key covers them; batch
#: sizes, chunking, devices and the incremental switch itself do not change a set).
_SHAPING_GENERATION_SETTINGS: Final = {
    "beam_width",
    "num_anchors",
    "implementation",
    "ensemble_combine",
    "exclude_history",
}

#: Rows per record batch of the anchors table. Arrow's list and string arrays address their
#: values with int32 offsets: one array over every set overflowed past 2**31 embedding values
#: (559,241 sets of 10 anchors x 384 dimensions), after the whole decode. A million sets keep the
#: string columns far under 2 GiB; the embedding column bounds the rows further (below).
ANCHOR_ROWS_PER_BATCH = 1 << 20
_INT32_MAX = 2**31 - 1


def anchors_table(catalog: SidCatalog, requests: AnchorRequests, beams: BeamOutput) -> pa.Table:
    """The ``user_interest_anchors`` table from decoded beams (one row per request).

    Built as record batches small enough for Arrow's int32 offsets, however many sets there are.
    """
    n_rows = len(requests.user_ids)
    values_per_row = max(1, beams.items.shape[1]) * catalog.embeddings.shape[1]
    step = max(1, min(ANCHOR_ROWS_PER_BATCH, _INT32_MAX // values_per_row))
    batches = [
        _anchors_batch(catalog, requests, beams, start, min(start + step, n_rows))
        for start in range(0, n_rows, step)
    ]
    return pa.Table.from_batches(batches, schema=ANCHORS_SCHEMA)


def _anchors_batch(
    catalog: SidCatalog,
    requests: AnchorRequests,
    beams: BeamOutput,
    start: int,
    stop: int,
) -> pa.RecordBatch:
    """Rows ``start:stop`` of :func:`anchors_table`."""
    strings = catalog.arrow_strings
    items = beams.items[start:stop]
    valid = items >= 0
    counts = valid.sum(axis=1).astype(np.int32)
    flat = items[valid]  # row-major: each row's valid anchors, best first
    ends = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
    offsets = pa.array(ends.astype(np.int32))
    dim = catalog.embeddings.shape[1]
    emb = catalog.embeddings[flat].reshape(-1)
    arrays = [
        pa.array(requests.user_ids[start:stop], pa.string()),
        pa.array(requests.cutoffs[start:stop], pa.int64()).cast(TIMESTAMP),
        pa.ListArray.from_arrays(offsets, strings[0].take(pa.array(flat))),
        pa.ListArray.from_arrays(offsets, strings[1].take(pa.array(flat))),
        pa.ListArray.from_arrays(
            pa.array((ends * dim).astype(np.int32)), pa.array(emb, pa.float32())
        ),
        pa.ListArray.from_arrays(
            offsets, pa.array(beams.log_probs[start:stop][valid], pa.float32())
        ),
        pa.array(counts, pa.int32()),
        pa.array([len(h) for h in requests.histories[start:stop]], pa.int32()),
        pa.array(history_hashes(requests.histories[start:stop]), pa.int64()),
    ]
    return pa.RecordBatch.from_arrays(arrays, schema=ANCHORS_SCHEMA)


def generate_anchors(
    item_semantics: pa.Table,
    positives: pa.Table,
    cutoffs: Sequence[datetime] | UserCutoffs,
    model_dir: str | Path | Sequence[str | Path],
    cfg: AnchorConfig,
    out_dir: Path,
    *,
    users: Sequence[str] | None = None,
    shard: Shard | None = None,
) -> AnchorResult:
    """Decode each (user, cutoff)'s interest anchors and write ``out_dir/user_interest_anchors``.

    Args:
        item_semantics: The SID stage's table (the catalog anchors are drawn from).
        positives: ``user_id``, ``item_id``, ``event_timestamp`` of positive interactions.
        cutoffs: Anchor set versions shared by every user (e.g.
            :func:`training.anchors.sequences.day_cutoffs` of the request log) or each user's own
            (:func:`training.anchors.sequences.request_cutoffs`); each set uses positives
            strictly before its cutoff.
        model_dir: A directory written by :func:`train_anchor_model`, or several trained on the
            same SIDs (an ensemble: their next-code distributions are combined at every step of
            one beam search, ``generation.ensemble_combine``).
        cfg: Stage configuration (``sequences.max_history`` and ``generation`` are used).
        out_dir: Output folder, ``RUN_DIR/anchors``.
        users: Only these users (those with no positive before the first cutoff are counted as
            skipped); all users with positives when None.
        shard: Decode only this shard's users, into ``out_dir/shards/KKKKK-of-NNNNN/``, for
            :func:`training.anchors.shards.merge_anchor_shards` to merge (an incremental shard
            reuses rows of the merged ``out_dir`` file).

    Raises:
        SidVocabularyError: when the SIDs use codes the model's tokenizer does not know, have
            another number of levels, or were re-trained since the model was trained.
    """
    t0 = time.perf_counter()
    gc = cfg.generation
    catalog = SidCatalog.from_table(item_semantics)
    fingerprint = inputs_fingerprint(positives, cutoffs, users)
    write_dir = out_dir
    if shard is not None:
        positives, cutoffs, users = shard.restrict(positives, cutoffs, users)
        write_dir = shard.directory(out_dir)
    workers = gc.worker_devices()
    # With worker processes this one only checks the models, on the CPU, and writes.
    device = torch.device("cpu") if workers else resolve_device(gc.device)
    dtype = resolve_dtype(gc.dtype, device)
    # What the sets are decoded in: this process's dtype, or the workers' (bf16 on CUDA).
    decode_dtype = ", ".join(
        sorted(
            {str(resolve_dtype(gc.dtype, d)).removeprefix("torch.") for d in workers or [device]}
        )
    )
    given = [Path(model_dir)] if isinstance(model_dir, str | Path) else [Path(d) for d in model_dir]
    model_dirs = [d for g in given for d in ensemble_dirs(g)]
    if not model_dirs:
        raise AnchorInputError("generate_anchors needs at least one model directory")
    members = [load_anchor_model(d, device=device, dtype=dtype) for d in model_dirs]
    loaded = members[0]
    vocab = loaded.vocab
    for d, member in zip(model_dirs[1:], members[1:], strict=True):
        if not member.vocab.same_sequences(vocab):
            raise SidVocabularyError(
                f"anchor models {model_dirs[0]} and {d} tokenize SIDs differently (another "
                "codebook, base checkpoint or text prefix): an ensemble needs models trained on "
                "the same SIDs from the same base"
            )
    vocab.check_codes(catalog.codes)
    for d in model_dirs:
        check_trained_sids(d, catalog.item_ids.tolist(), catalog.sids.tolist())
    max_history = _generation_history(cfg.sequences, model_dirs, members)
    longest = vocab.items_offset + max_history * vocab.n_levels + vocab.n_levels
    for d, member in zip(model_dirs, members, strict=True):
        limit = getattr(member.model.config, "max_position_embeddings", None)
        if isinstance(limit, int) and longest > limit:
            raise AnchorInputError(
                f"histories of {max_history} items need {longest} positions; the "
                f"model {d} has {limit}: lower sequences.max_history"
            )
    if len(members) > 1 and gc.implementation != "fast":
        raise AnchorInputError(
            "an ensemble of anchor models decodes with generation.implementation 'fast' only "
            "(Hugging Face generate() runs one model)"
        )
    trie = SidTrie(catalog.codes, vocab.codebook_sizes)
    prior, prior_weight = _generation_prior(model_dirs[0], catalog, cfg.prior)
    with ExitStack() as stack:
        pool = None
        if workers:
            spec = WorkerSpec(model_dirs, catalog.codes, gc, prior, prior_weight, cfg.prior)
            # Started before the sequences are built, so that the workers' start-up (spawning,
            # imports, loading the models: 5-20 s) overlaps it.
            pool = stack.enter_context(DevicePool(workers, spec))
        seqs = user_sequences(positives, catalog.item_ids)
        requests = anchor_requests(seqs, cutoffs, max_history, users)
        # One holder for every chunk: a size halved on running out of memory stays halved.
        batch_size = BatchSize(gc.batch_size_on(device))
        item_tokens = vocab.item_tokens(catalog.codes)
        n_sets = len(requests.user_ids)
        key = generation_key(
            model_dirs,
            catalog,
            {
                "generation": gc.model_dump(mode="json", include=_SHAPING_GENERATION_SETTINGS),
                "dtype": decode_dtype,
                "prior_weight": prior_weight,
                "prior": cfg.prior.model_dump(mode="json", exclude={"weight", "weight_grid"}),
                "max_history": max_history,
            },
        )
        reuse: Reuse | None = None
        if gc.incremental:
            try:
                earlier = read_manifest(out_dir) if (out_dir / MANIFEST_NAME).exists() else None
            except ValueError:  # a truncated manifest: nothing to trust, decode every set
                earlier = None
            reuse = plan_reuse(
                out_dir / ANCHORS_FILE,
                earlier if isinstance(earlier, dict) else None,
                key,
                requests,
                history_hashes(requests.histories),
                ANCHORS_SCHEMA,
                gc.num_anchors,
            )
        todo = requests if reuse is None else requests.select(reuse.decode)
        n_todo = len(todo.user_ids)
        chunks = [todo.slice(s, s + gc.chunk_sets) for s in range(0, n_todo, gc.chunk_sets)]

        def prompts_of(chunk: AnchorRequests) -> list[list[int]]:
            return [vocab.encode(item_tokens[h]) for h in chunk.histories]

        fewer = 0 if reuse is None else reuse.fewer_anchors
        # Decoded and written a chunk of sets at a time: what one set holds on its way to the
        # file (prompt tokens, beams, N x D anchor vectors, Arrow buffers) is ~35 KB, so the
        # whole output in memory at once bounded the job at a few hundred thousand sets on a
        # 24 GB machine.
        with (
            tqdm(
                total=n_todo, desc="anchors", unit="user", disable=not cfg.training.progress
            ) as bar,
            atomic_path(write_dir / ANCHORS_FILE) as tmp,
            pq.ParquetWriter(tmp, ANCHORS_SCHEMA, compression="zstd") as writer,
        ):
            if reuse is not None:
                for batch in kept_batches(reuse, gc.chunk_sets):
                    writer.write_batch(batch)
            decoded: Iterator[BeamOutput]
            if pool is not None:
                inputs = ((prompts_of(c), c.histories) for c in chunks)
                decoded = pool.decode_chunks(inputs, bar.update)
            else:
                search = make_search(
                    loaded.model if len(members) == 1 else [m.model for m in members],
                    trie,
                    vocab,
                    gc,
                    prior_weight,
                )
                fused = prior if prior is not None and prior_weight > 0 else None
                decoded = (
                    search_in_batches(
                        search,
                        prompts_of(c),
                        batch_size,
                        progress=bar.update,
                        prior_of=None
                        if fused is None
                        else partial(fused.rows_for, c.histories, cfg.prior),
                        exclude_of=exclusions_of(c.histories, trie.n_items)
                        if gc.exclude_history
                        else None,
                    )
                    for c in chunks
                )
            t_gen, writing = time.perf_counter(), 0.0
            for chunk, beams in zip(chunks, decoded, strict=True):
                t_write = time.perf_counter()
                fewer += int(((beams.items >= 0).sum(axis=1) < gc.num_anchors).sum())
                writer.write_table(anchors_table(catalog, chunk, beams))
                writing += time.perf_counter() - t_write
            # In one process: decoding alone. Workers decode while this process writes, so
            # theirs is the wall time from the first chunk queued (overlapped writing and any
            # start-up the sequences did not hide included).
            gen_seconds = time.perf_counter() - t_gen - (writing if pool is None else 0.0)
        worker_start = None if pool is None else pool.start_seconds()
    path = write_dir / ANCHORS_FILE
    metrics: dict[str, Any] = {
        "users": len(set(requests.user_ids)),
        "anchor_sets": n_sets,
        "cutoffs": len({int(c) for c in requests.cutoffs}),
        "skipped_empty_history": requests.skipped_empty_history,
        "positives_dropped_unknown_items": seqs.dropped_unknown_items,
        "sets_with_fewer_anchors": fewer,
        "mean_history_length": round(float(np.mean([len(h) for h in requests.histories])), 3)
        if n_sets
        else 0.0,
        "sets_reused": 0 if reuse is None else len(reuse.old_rows),
        "sets_decoded": n_todo,
        "generation_key": key,
        "inputs_fingerprint": fingerprint,
        "shard": None if shard is None else {"index": shard.index, "count": shard.count},
        "generation_seconds": round(gen_seconds, 3),
        "users_per_second": round(n_todo / gen_seconds, 2) if gen_seconds > 0 else None,
        "device": ", ".join(str(d) for d in workers) if workers else str(device),
        # The size in use at the end (smaller than configured after running out of memory);
        # with workers, each worker's configured size (each halves its own on OOM).
        "batch_size": batch_size.size if not workers else [gc.batch_size_on(d) for d in workers],
        "worker_start_seconds": worker_start,
        "dtype": decode_dtype,
        "implementation": gc.implementation,
        "ensemble_members": len(members),
        "prior_weight": prior_weight,
        "eval_hr@10": loaded.info.get("ensemble_metrics", loaded.info.get("metrics", {})).get(
            "eval_hr@10"
        ),
    }
    metrics["seconds"] = round(time.perf_counter() - t0, 3)
    write_manifest(
        write_dir,
        "anchors",
        inputs={
            "item_semantics": "sids/item_semantics.parquet",
            "positives": "positives",
            "model_dir": ", ".join(str(d) for d in model_dirs),
        },
        outputs={"user_interest_anchors": ANCHORS_FILE},
        # The model's own settings are in its anchor_model.json: `model` here would only repeat
        # the defaults (or a training file's settings) that generation never reads.
        config=cfg.model_dump(mode="json", exclude={"model"}),
        metrics=metrics,
    )
    return AnchorResult(path=path, metrics=metrics)
