"""The pseudo-label job: unexposed candidates x interest anchors -> confidence-weighted labels.

For each unexposed candidate (groups ``prerank_negative`` and ``rank_negative``, optionally
``global_negative``) the user's anchor set valid at the request time (the latest one whose cutoff
is ``<=`` the request time) gives:

* ``relevance`` = max over anchors of cos(candidate content embedding, anchor embedding), or
  with ``relevance: lm_likelihood`` the anchor LM's log-probability of the candidate's SID given
  the set's history (:mod:`training.pseudo_labels.lm_relevance`; an item without a SID then
  counts as having no embedding), plus, by default with ``lm_likelihood``, ``w`` times the
  user's history density at the candidate (:mod:`training.pseudo_labels.history_density`, ``w``
  fitted on the exposed clicks);
* three confidence factors and their combination (see :mod:`training.pseudo_labels.confidence`);
* ``pseudo_label`` = relevance mapped to the click scale by Platt scaling fitted on exposed rows.

The requests are streamed in batches, so memory is bounded by the batch size, the catalog's
embeddings and the anchor sets, not by the number of requests. Every unexposed input row appears
exactly once in the output; a row whose item has no embedding (missing from ``item_semantics``, or
with NaN/infinite values there, which are counted and logged) or whose user has no anchor set yet
keeps a null ``pseudo_label`` and says why in ``status`` (never a silent zero).

Output ``RUN_DIR/pseudo_labels/pseudo_labels.parquet``:

=====================  ======================  ==================================================
column                 type                    meaning
=====================  ======================  ==================================================
request_id             string                  request
user_id                string                  user
item_id                string                  unexposed candidate
event_timestamp        timestamp[us, UTC]      the request's time (Feast joins on it)
group                  string                  HAP group of the candidate
anchor_cutoff          timestamp[us, UTC]      cutoff of the anchor set used (null: none)
relevance              float32                 max cosine to the anchors (or the LM's
                                               log-probability of the candidate, plus the
                                               weighted history density)
dispersion             float32                 semantic-dispersion factor of the anchor set
history_consistency    float32                 historical consistency: the set's coverage of the
                                               user's history (or the matched anchor's, per
                                               ``history_form``)
lm_confidence          float32                 LM-intrinsic factor of the matched anchor
confidence             float32                 combined confidence in [0, 1]
pseudo_label           float32                 calibrated click probability (or hard 0/1)
status                 string                  ``ok``, ``no_anchors`` or ``no_item_embedding``
=====================  ======================  ==================================================
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator
from tqdm import tqdm

from training.data.contract import TIMESTAMP, ContractError, check_columns
from training.data.labels import log_as_of
from training.evaluation.metrics import auc
from training.io import atomic_path, write_manifest
from training.pseudo_labels.calibration import PlattScaler, fit_platt
from training.pseudo_labels.confidence import (
    AnchorVectors,
    HistoryForm,
    combine,
    dispersion_factors,
    history_factors,
    lm_factor,
)
from training.pseudo_labels.history_density import (
    DensityWeight,
    fit_density_weight,
    history_log_density,
)
from training.pseudo_labels.lookup import (
    AnchorSetLookup,
    DictionaryCache,
    latest_before,
    positions_in,
)
from training.pseudo_labels.relevance import max_cosine_rows, warm_up
from training.vectors import as_unit

if TYPE_CHECKING:  # the LM (torch, transformers) is imported only by jobs that score with it
    from training.pseudo_labels.lm_relevance import LmRelevance

logger = logging.getLogger(__name__)

RelevanceSource = Literal["anchor_cosine", "lm_likelihood"]
"""How a candidate's relevance is scored (``PseudoLabelConfig.relevance``)."""

PSEUDO_LABELS_DIR = "pseudo_labels"
OUTPUT_NAME = "pseudo_labels.parquet"

OUTPUT_SCHEMA = pa.schema(
    [
        pa.field("request_id", pa.string(), nullable=False),
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("event_timestamp", TIMESTAMP, nullable=False),
        pa.field("group", pa.string(), nullable=False),
        pa.field("anchor_cutoff", TIMESTAMP),
        pa.field("relevance", pa.float32()),
        pa.field("dispersion", pa.float32()),
        pa.field("history_consistency", pa.float32()),
        pa.field("lm_confidence", pa.float32()),
        pa.field("confidence", pa.float32()),
        pa.field("pseudo_label", pa.float32()),
        pa.field("status", pa.string(), nullable=False),
    ]
)
_FACTOR_OUTPUTS = ("dispersion", "history_consistency", "lm_confidence", "confidence")
_FLOAT_OUTPUTS = ("relevance", *_FACTOR_OUTPUTS, "pseudo_label")
_STATUS_VALUES = pa.array(["ok", "no_anchors", "no_item_embedding"])
#: String columns read dictionary-encoded: ids repeat across a batch's rows (a request's
#: candidates, a user's requests, popular items), so lookups and filters hash each distinct value
#: once and parquet skips materializing a string per row (reading, filtering and the item lookup
#: went from 0.36-0.48 s to 0.14-0.2 s per 2M rows, measured).
_DICTIONARY_COLUMNS = ("request_id", "user_id", "item_id", "stage", "group")
_ID_OUTPUTS = ("request_id", "user_id", "item_id", "group", "status")
#: What is handed to the parquet writer: the id columns stay dictionary-encoded (written as
#: parquet dictionary pages without being decoded first). The file itself is written without
#: Arrow's schema metadata, so readers see the plain strings of ``OUTPUT_SCHEMA``.
_WRITE_SCHEMA = pa.schema(
    [
        f.with_type(pa.dictionary(pa.int32(), pa.string())) if f.name in _ID_OUTPUTS else f
        for f in OUTPUT_SCHEMA
    ]
)
#: Columns written with parquet min/max statistics: all but the id strings. Ids are not sorted,
#: so every row group spans nearly their whole range and their min/max would prune nothing, while
#: computing them took 27% of writing the output (130 of 490 ms for 2M rows, measured).
_STATISTICS_COLUMNS = [
    f.name for f in OUTPUT_SCHEMA if f.name not in ("request_id", "user_id", "item_id")
]
#: What the calibration pass reads (no request ids: strings it would decode for nothing).
_EXPOSED_PASS_COLUMNS = ["user_id", "item_id", "event_timestamp", "stage", "label"]
#: What the labelling pass reads (the group says which rows it labels; stage and label are the
#: calibration pass's business).
_REQUEST_COLUMNS = ["request_id", "user_id", "item_id", "event_timestamp", "group"]


class ConfidenceWeights(BaseModel):
    """Weights of the three confidence factors in their combination (reported in the manifest).

    The defaults are measured, not equal: historical consistency in its ``coverage`` form (how
    much of the user's recent history the anchor set accounts for) alone is the one confidence
    that put the pseudo-labels agreeing best with the truth in the top half on both simulators,
    on every seed measured (top-half AUC over all rows: MovieLens +0.030 to +0.062, synthetic
    +0.021 to +0.033); semantic dispersion does as well on MovieLens but not on the synthetic
    catalog, and the LM factor moves it the wrong way (docs/pseudo_labels.md). These are the
    defaults of the paper's cosine relevance; ``relevance: lm_likelihood`` defaults to
    :data:`LIKELIHOOD_CONFIDENCE_WEIGHTS` instead. All three factors are still computed and
    written for every row; set the weights to 1 each for the paper's equal combination.
    """

    # An infinite weight would pass ``ge=0`` and turn every confidence into NaN.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    dispersion: float = Field(
        default=0.0,
        ge=0,
        description="Weight of semantic dispersion (0: reported, not used; see the docs).",
    )
    history: float = Field(
        default=1.0,
        ge=0,
        description="Weight of historical consistency (its form: history_form).",
    )
    lm: float = Field(
        default=0.0,
        ge=0,
        description="Weight of LM-intrinsic confidence (0: reported, not used; see the docs).",
    )

    @model_validator(mode="after")
    def _some_weight(self) -> ConfidenceWeights:
        if self.dispersion + self.history + self.lm <= 0:
            raise ValueError("confidence weights: at least one must be positive")
        return self


LIKELIHOOD_CONFIDENCE_WEIGHTS = ConfidenceWeights(dispersion=1.0, history=0.0, lm=0.0)
"""The confidence's default with ``relevance: lm_likelihood``: semantic dispersion alone, the one
factor that lifted the top half on every run of both simulators there (docs/pseudo_labels.md)."""


class PseudoLabelConfig(BaseModel):
    """Settings of the pseudo-label job."""

    model_config = ConfigDict(extra="forbid")

    include_global_negatives: bool = Field(
        default=False,
        description="Also pseudo-label global random negatives (never in the funnel).",
    )
    weights: ConfidenceWeights | None = Field(
        default=None,
        description="Weights of the three confidence factors. None (default): historical "
        "consistency (coverage) alone with relevance 'anchor_cosine', semantic dispersion alone "
        "with 'lm_likelihood' (measured for each, docs/pseudo_labels.md); the manifest records "
        "the weights used.",
    )
    combination: Literal["geometric", "arithmetic"] = Field(
        default="geometric", description="How the three factors combine into one confidence."
    )
    calibration: Literal["platt", "none"] = Field(
        default="platt",
        description="'platt': relevance -> click probability fitted on exposed rows; "
        "'none': pseudo_label = relevance clipped to [0, 1].",
    )
    calibrate_until: AwareDatetime | None = Field(
        default=None,
        description="Fit the calibration only on exposed rows before this time, with the clicks "
        "known then (label_timestamp): the training cutoff of an offline evaluation, whose "
        "period's clicks must not shape the labels of the rows trained on. None: every exposed "
        "row of the log, as a production job labelling yesterday's traffic would.",
    )
    relevance: RelevanceSource = Field(
        default="anchor_cosine",
        description="'anchor_cosine' (GPL's): the max cosine between the candidate and the "
        "user's anchors in the content space. 'lm_likelihood': the anchor LM's own "
        "log-probability of the candidate's SID given the anchor set's history, teacher-forced "
        "under the trie (needs the anchor model, best trained with `gpl anchors train "
        "--for-likelihood`; Platt calibration only). It ranked the simulators' unexposed truth "
        "far better (docs/pseudo_labels.md).",
    )
    history_density_weight: float | Literal["fitted"] | None = Field(
        default=None,
        description="Weight w of the user's history density in the relevance: relevance = the "
        "base score + w * log(mean over the anchor set's history of exp(cos / "
        "history_density_temperature)), a kernel density of the user's positives at the "
        "candidate in the content space (training/pseudo_labels/history_density.py). "
        "'fitted': w from a logistic regression of the exposed clicks on both (kept >= 0). "
        "None (default): 'fitted' with relevance 'lm_likelihood', where it raised the AUC on "
        "both simulators' unexposed truth, and 0 (off) with 'anchor_cosine', the paper's "
        "relevance. 0 turns it off.",
    )
    history_density_temperature: float = Field(
        default=0.1,
        gt=0,
        description="The history density's kernel temperature tau: small follows the nearest "
        "history item, large the mean cosine (0.05-0.2 scored within 0.010 of each other "
        "on both simulators at their best weights; BENCHMARKS.md).",
    )
    hard_threshold: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="When set, pseudo_label = 1 if the calibrated value >= this, else 0.",
    )
    history_form: HistoryForm = Field(
        default="coverage",
        description="Historical consistency as 'coverage' (how much of the user's recent "
        "history the anchor set accounts for: the mean over those positives of their best "
        "cosine to an anchor, one value per set) or 'matched' (the matched anchor's best "
        "cosine to the history). Coverage is the one factor measured to lift the top-confidence "
        "half on both simulators (docs/pseudo_labels.md).",
    )
    history_items: int = Field(
        default=50,
        ge=1,
        description="Most recent positives per user used for historical consistency.",
    )
    batch_rows: int = Field(
        default=524_288,
        ge=1024,
        description="Request rows per streamed batch (bounds memory: about three batches are in "
        "memory at once). Each batch hashes its distinct ids against the catalog once, so "
        "larger batches spread that over more rows: 524,288 measured 7-8% faster than 262,144 "
        "on 2M rows, with no higher peak memory there.",
    )
    progress: bool = Field(default=True, description="Show a progress bar.")

    @model_validator(mode="after")
    def _likelihood_is_calibrated(self) -> PseudoLabelConfig:
        if self.relevance == "lm_likelihood" and self.calibration != "platt":
            # A log-probability is not on the click scale: only a fitted mapping puts it there.
            raise ValueError("relevance 'lm_likelihood' needs calibration 'platt'")
        if self.density_weight != 0 and self.calibration != "platt":
            # The density is a log-density, not a click probability either.
            raise ValueError(
                "history_density_weight needs calibration 'platt' (set it to 0 without)"
            )
        if isinstance(self.history_density_weight, float) and self.history_density_weight < 0:
            raise ValueError("history_density_weight must be >= 0 or 'fitted'")
        return self

    @property
    def confidence_weights(self) -> ConfidenceWeights:
        """``weights`` with its default resolved for the relevance."""
        if self.weights is not None:
            return self.weights
        if self.relevance == "lm_likelihood":
            # The LM's relevance does not read the anchors, so how well they cover the history
            # no longer says how far it can be trusted; how focused they are still does.
            return LIKELIHOOD_CONFIDENCE_WEIGHTS
        return ConfidenceWeights()

    @property
    def density_weight(self) -> float | Literal["fitted"]:
        """``history_density_weight`` with its default resolved for the relevance."""
        if self.history_density_weight is not None:
            return self.history_density_weight
        if self.relevance == "lm_likelihood" and self.calibration == "platt":
            return "fitted"
        return 0.0


class PseudoLabelInputError(ValueError):
    """The inputs cannot produce pseudo-labels (listed problems)."""


@dataclass
class AnchorBank:
    """Every anchor set, loaded once: embeddings, masks and per-anchor confidence factors."""

    keys: pa.Table
    """user_id and event_timestamp (cutoff) of each set, for the point-in-time lookup."""
    lookup: AnchorSetLookup
    """Each request row's set: latest cutoff <= its time (built from ``keys``)."""
    anchors: AnchorVectors
    """Each set's anchor vectors: rows of the catalog's table, or of the anchors' own vectors."""
    source: Literal["catalog", "anchor_embeddings"]
    """Where the anchor vectors come from (see :func:`load_anchor_bank`)."""
    mask: npt.NDArray[np.bool_]
    dispersion: npt.NDArray[np.float32]
    history: npt.NDArray[np.float32]
    lm: npt.NDArray[np.float32]
    history_rows: npt.NDArray[np.int32] | None
    """``(S, history_items)`` each set's history: rows of the catalog's embeddings, -1 padded.
    Kept only for the history density (``keep_history_rows``); None otherwise."""
    empty: npt.NDArray[np.bool_]
    """Sets that hold no anchor (every beam of that cutoff was invalid). They stay in the lookup,
    so a request whose latest set is empty is not matched to an older one, and its rows get
    status ``no_anchors``."""

    @property
    def num_sets(self) -> int:
        """Number of anchor sets (user x cutoff)."""
        return int(self.mask.shape[0])

    def sets_of(
        self, user_ids: pa.Array | pa.ChunkedArray, timestamps: pa.Array | pa.ChunkedArray
    ) -> npt.NDArray[np.int64]:
        """Each row's anchor set (latest cutoff <= its time), -1 when none or an empty one."""
        set_idx = self.lookup(user_ids, timestamps)
        if self.empty.any():
            set_idx = np.where(self.empty.take(np.maximum(set_idx, 0)), -1, set_idx)
        return set_idx


@dataclass
class ItemIndex:
    """Normalized content embeddings of the catalog and the id -> row mapping."""

    item_ids: pa.Array
    embeddings: npt.NDArray[np.float32]
    #: Items left out because their embedding is null, holds NaN or infinite values, or is all
    #: zeros (their candidates get status ``no_item_embedding``, like items missing from the table).
    unusable: list[str] = field(default_factory=list)
    #: Positions of recently looked-up id dictionaries (each parquet row group brings one).
    cache: DictionaryCache = field(default_factory=DictionaryCache, compare=False, repr=False)

    @classmethod
    def from_item_semantics(cls, table: pa.Table) -> ItemIndex:
        """Build from an ``item_semantics`` table (item_id, content_embedding)."""
        for col in ("item_id", "content_embedding"):
            if col not in table.column_names:
                raise PseudoLabelInputError(f"item_semantics lacks column {col!r}")
        emb = table.column("content_embedding").combine_chunks()
        item_ids = table.column("item_id").combine_chunks()
        if emb.null_count:
            present = emb.is_valid()
            # A null list has no values: dropped before the flat values are cut into rows.
            null_ids = item_ids.filter(pc.invert(present))
            emb, item_ids = emb.filter(present), item_ids.filter(present)
        else:
            null_ids = item_ids.slice(0, 0)
        lengths = pc.unique(pc.list_value_length(emb)).to_pylist()
        if len(lengths) > 1:
            raise PseudoLabelInputError(f"item_semantics embeddings have mixed lengths {lengths}")
        dim = int(lengths[0]) if lengths else 0
        if dim == 0:
            raise PseudoLabelInputError("item_semantics holds no usable content embedding")
        flat = emb.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
        vectors = flat.reshape(-1, dim)
        # A NaN would make every cosine with it NaN, which the relevance kernel's maximum skips,
        # and a zero vector has no direction (its "cosine" would be a silent 0): such items are
        # treated as having no embedding rather than scored as garbage. Found from one squared
        # length per item, not a table-sized temporary: NaN or inf for a row holding NaN or inf
        # (or too large to normalize), 0 for an all-zero row.
        squared = np.einsum("ij,ij->i", vectors, vectors)
        usable = np.isfinite(squared) & (squared > 0)
        if usable.all() and not len(null_ids):
            return cls(item_ids=item_ids, embeddings=as_unit(vectors))
        keep = pa.array(usable)
        bad = null_ids.to_pylist() + item_ids.filter(pc.invert(keep)).to_pylist()
        logger.warning(
            "%d item(s) have a null, NaN, infinite or all-zero content embedding and get no "
            "pseudo-labels (status no_item_embedding), e.g. %s",
            len(bad),
            bad[:5],
        )
        return cls(
            item_ids=item_ids.filter(keep),
            embeddings=as_unit(vectors[usable]),
            unusable=[str(i) for i in bad],
        )

    def lookup(self, item_ids: pa.Array | pa.ChunkedArray) -> npt.NDArray[np.int64]:
        """Row of each id in the embedding matrix, -1 when unknown (plain or dictionary ids)."""
        return positions_in(item_ids, self.item_ids, self.cache)


def load_anchor_bank(
    anchors: pa.Table,
    items: ItemIndex,
    positives: pa.Table,
    history_items: int,
    read_embeddings: Callable[[], pa.ChunkedArray] | None = None,
    history_form: HistoryForm = "coverage",
    keep_history_rows: bool = False,
) -> AnchorBank:
    """Load every anchor set once and precompute its confidence factors.

    Anchors are catalog items: when the table names them (``anchor_item_ids``) and every one is
    in the catalog, a set keeps only their catalog rows (``N`` integers instead of ``N x D``
    floats: 80 bytes against 15 KB for 10 anchors of 384 dimensions) and the vectors are the
    catalog's. Otherwise the anchors' own ``anchor_embeddings`` are used.

    Args:
        anchors: ``user_interest_anchors`` table (user_id, event_timestamp, anchor_item_ids
            and/or anchor_embeddings flattened N*D, anchor_log_probs, num_anchors).
        items: The catalog's embeddings (for the anchors and the users' history positives).
        positives: The users' positive interactions (user_id, item_id, event_timestamp).
        history_items: How many of the latest positives before a cutoff to compare against.
        read_embeddings: Reads ``anchor_embeddings`` when ``anchors`` was read without them
            and they turn out to be needed.
        keep_history_rows: Keep each set's history items (``AnchorBank.history_rows``, 4 bytes
            per item and set) for the history density; without it they are dropped once the
            historical-consistency factor is computed.
        history_form: The historical-consistency factor's form (:data:`HistoryForm`).
    """
    needed = ["user_id", "event_timestamp", "anchor_log_probs", "num_anchors"]
    missing = [c for c in needed if c not in anchors.column_names]
    if not {"anchor_item_ids", "anchor_embeddings"} & set(anchors.column_names):
        missing.append("anchor_item_ids or anchor_embeddings")
    if missing:
        raise PseudoLabelInputError(f"user_interest_anchors lacks columns {missing}")
    counts = anchors.column("num_anchors").to_numpy(zero_copy_only=False).astype(np.int64)
    if (counts < 0).any():
        raise PseudoLabelInputError(
            f"user_interest_anchors: {int((counts < 0).sum())} sets have a negative num_anchors"
        )
    num_sets = anchors.num_rows
    lp_flat = _log_probs(anchors.column("anchor_log_probs"), counts)
    rows = _catalog_rows(anchors, items, counts)
    flat: npt.NDArray[np.float32] | None = None
    source: Literal["catalog", "anchor_embeddings"] = "catalog"
    if rows is None:
        if "anchor_embeddings" in anchors.column_names:
            column = anchors.column("anchor_embeddings")
        elif read_embeddings is not None:
            column = read_embeddings()
        else:
            raise PseudoLabelInputError(
                "user_interest_anchors: anchor_item_ids name items missing from item_semantics "
                "and there are no anchor_embeddings to fall back on"
            )
        flat, usable = _own_vectors(column, counts, items.embeddings.shape[1])
        source = "anchor_embeddings"
        if not usable.all():
            # A zero-length vector has no direction: as an anchor it would score every candidate
            # 0 and pass for a match. It is left out of its set, like a missing anchor.
            logger.warning(
                "%d anchor(s) have zero-length embeddings (an item without content?); left out "
                "of their sets",
                int((~usable).sum()),
            )
            owner = np.repeat(np.arange(num_sets), counts)
            counts = np.bincount(owner[usable], minlength=num_sets).astype(np.int64)
            flat, lp_flat = flat[usable], lp_flat[usable]
    n_max = int(counts.max()) if len(counts) else 0
    # Ragged sets are scattered into the padded (S, N) layout in one step: anchor j overall is
    # set ``set_of[j]``'s slot ``slot[j]``.
    set_of = np.repeat(np.arange(num_sets), counts)
    slot = np.arange(len(set_of)) - np.repeat(np.cumsum(counts) - counts, counts)
    mask = np.zeros((num_sets, n_max), bool)
    mask[set_of, slot] = True
    logp = np.full((num_sets, n_max), -np.inf, np.float32)
    logp[set_of, slot] = lp_flat
    if flat is None:
        assert rows is not None
        slots = np.zeros((num_sets, n_max), np.int64)
        slots[set_of, slot] = rows
        vectors = AnchorVectors(vectors=items.embeddings, rows=slots)
    elif (counts == n_max).all():
        # Every set full (the usual case): the flat rows already are the (S, N, D) layout.
        vectors = AnchorVectors.of(as_unit(flat.reshape(num_sets, n_max, flat.shape[1])))
    else:
        emb = np.zeros((num_sets, n_max, flat.shape[1]), np.float32)
        emb[set_of, slot] = flat
        vectors = AnchorVectors.of(as_unit(emb))

    # Historical consistency needs each set's history: the user's latest positives before the
    # cutoff, found for all sets at once.
    events = latest_before(
        positives.column("user_id"),
        pc.cast(positives.column("event_timestamp"), TIMESTAMP, safe=False)
        .cast(pa.int64())
        .to_numpy(),
        anchors.column("user_id"),
        pc.cast(anchors.column("event_timestamp"), TIMESTAMP, safe=False)
        .cast(pa.int64())
        .to_numpy(),
        history_items,
    )
    pos_items = items.lookup(positives.column("item_id"))
    # No positives at all: every set's history is empty (the factor is then 0, as documented).
    history = (
        np.where(events >= 0, pos_items[np.maximum(events, 0)], -1)
        if len(pos_items)
        else np.full(events.shape, -1, np.int64)
    )
    hist = history_factors(vectors, mask, items.embeddings, history, form=history_form)
    keys = pa.table(
        {
            "user_id": anchors.column("user_id"),
            "event_timestamp": anchors.column("event_timestamp").cast(TIMESTAMP),
        }
    )
    return AnchorBank(
        keys=keys,
        lookup=AnchorSetLookup.of(keys),
        anchors=vectors,
        source=source,
        mask=mask,
        dispersion=dispersion_factors(vectors, mask, logp),
        history=hist,
        lm=lm_factor(logp, mask),
        history_rows=history.astype(np.int32) if keep_history_rows else None,
        empty=counts == 0,
    )


def _log_probs(column: pa.ChunkedArray, counts: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
    """The anchors' log-probabilities, flat set by set, checked against ``num_anchors``.

    ``-inf`` (a beam the model found impossible) is a probability of 0 and is kept; NaN and
    ``+inf`` are not probabilities and would turn every factor of their set into NaN.
    """
    lists = _check_lengths(column, counts, "anchor_log_probs")
    flat = np.asarray(lists.flatten().to_numpy(zero_copy_only=False), np.float32)
    bad = np.isnan(flat) | (flat == np.inf)
    if bad.any():
        raise PseudoLabelInputError(
            f"user_interest_anchors: {int(bad.sum())} anchor_log_probs are NaN or +inf (log "
            "probabilities are <= 0); regenerate the anchors (`gpl anchors generate`)"
        )
    return flat


def _check_lengths(
    column: pa.ChunkedArray, counts: npt.NDArray[np.int64], name: str
) -> pa.ListArray:
    """``column`` as one list array whose every list holds its set's ``num_anchors`` values."""
    lists = column.combine_chunks()
    lengths = pc.list_value_length(lists).to_numpy(zero_copy_only=False)
    if not np.array_equal(lengths, counts):
        raise PseudoLabelInputError(
            f"user_interest_anchors: {name} lengths differ from num_anchors "
            f"({int((lengths != counts).sum())} sets)"
        )
    return lists


def _catalog_rows(
    anchors: pa.Table, items: ItemIndex, counts: npt.NDArray[np.int64]
) -> npt.NDArray[np.int64] | None:
    """Every anchor's catalog row (flat, set by set), or None when some anchor is not in it."""
    if "anchor_item_ids" not in anchors.column_names:
        return None
    ids = _check_lengths(anchors.column("anchor_item_ids"), counts, "anchor_item_ids")
    rows = items.lookup(ids.flatten())
    unknown = int((rows < 0).sum())
    if unknown:
        logger.warning(
            "%d anchor(s) name items missing from item_semantics (or without a usable "
            "embedding there); using the anchors' own embeddings instead",
            unknown,
        )
        return None
    return rows


def _own_vectors(
    column: pa.ChunkedArray | pa.Array, counts: npt.NDArray[np.int64], dim: int
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]:
    """The anchors' own ``anchor_embeddings``, one row per anchor (set by set), checked.

    Returns:
        The ``(total anchors, D)`` vectors (rows too long for float32's squared norm scaled
        down, directions kept) and which have a direction (a nonzero length).
    """
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    values = column.flatten().to_numpy(zero_copy_only=False)
    if values.size != counts.sum() * dim:
        raise PseudoLabelInputError(
            f"anchor_embeddings hold {values.size} values, expected num_anchors x {dim} (the "
            "item embedding size); were the anchors built from another item_semantics?"
        )
    if not np.isfinite(values).all():
        bad = np.unique(np.flatnonzero(~np.isfinite(values)) // dim)
        raise PseudoLabelInputError(
            f"anchor_embeddings hold NaN or infinite values ({len(bad)} of {values.size // dim} "
            "anchors); regenerate the anchors (`gpl anchors generate`)"
        )
    flat = np.asarray(values, np.float32).reshape(-1, dim)
    squared = np.einsum("ij,ij->i", flat, flat)
    huge = ~np.isfinite(squared)
    if huge.any():  # finite values whose squared length overflows: scale them into range
        flat = flat.copy()
        flat[huge] /= np.abs(flat[huge]).max(axis=1, keepdims=True)
        squared[huge] = np.einsum("ij,ij->i", flat[huge], flat[huge])
    return flat, squared > 0


@dataclass
class PseudoLabelResult:
    """Where the labels were written and what the job measured."""

    path: Path
    metrics: dict[str, Any] = field(default_factory=dict)


def _batches(
    requests: pa.Table | Path, batch_rows: int, columns: list[str] = _REQUEST_COLUMNS
) -> Iterator[pa.Table]:
    if isinstance(requests, Path):
        schema = pq.read_schema(requests)
        as_dictionary = [
            c
            for c in columns
            if c in _DICTIONARY_COLUMNS
            and c in schema.names
            and (
                pa.types.is_string(schema.field(c).type)
                or pa.types.is_large_string(schema.field(c).type)
            )
        ]
        reader = pq.ParquetFile(requests, read_dictionary=as_dictionary)
        for batch in reader.iter_batches(batch_size=batch_rows, columns=columns):
            yield pa.Table.from_batches([batch])
    else:
        for batch in requests.select(columns).to_batches(max_chunksize=batch_rows):
            yield pa.Table.from_batches([batch])


def _read_ahead(batches: Iterator[pa.Table], pool: ThreadPoolExecutor) -> Iterator[pa.Table]:
    """``batches``, read and decoded by ``pool`` one batch ahead of the consumer.

    The first batch is submitted now, not at the first ``next()``: a caller starts the read, does
    other work (loading the catalog and the anchor bank), and finds the batch decoded.
    """
    pending = pool.submit(next, batches, None)

    def drain() -> Iterator[pa.Table]:
        nonlocal pending
        while (batch := pending.result()) is not None:
            pending = pool.submit(next, batches, None)
            yield batch

    return drain()


def _rounded_auc(labels: npt.NDArray[np.int8], scores: npt.NDArray[np.float32]) -> float | None:
    """AUC to 4 decimals; None when the rows hold one class only (no ranking to measure)."""
    value = auc(labels, scores)
    return None if np.isnan(value) else round(value, 4)


def _exposed_pass_columns(schema: pa.Schema, cfg: PseudoLabelConfig) -> list[str]:
    """What the calibration pass reads.

    The clicks' own times only for a calibration cut at a time, and only when the log has them.
    """
    timed = cfg.calibrate_until is not None and "label_timestamp" in schema.names
    return _EXPOSED_PASS_COLUMNS + (["label_timestamp"] if timed else [])


def _check_requests_schema(schema: pa.Schema, exposed_columns: list[str]) -> None:
    """The columns the job reads (presence, types, UTC timestamps), checked before any row is.

    The log is streamed, so the row-level rules of the ``requests`` contract are not re-checked
    here (``gpl data validate`` does that); a timezone-naive or mistyped column would otherwise be
    cast silently. Exposed rows' labels are checked batch by batch in the calibration pass.
    """
    columns = dict.fromkeys(_REQUEST_COLUMNS + exposed_columns)  # the ones read, in order
    problems = check_columns(schema, "requests", list(columns))
    if problems:
        raise ContractError("requests", problems)


def _exposed_labels(exposed: pa.Table) -> npt.NDArray[np.int8]:
    """The exposed rows' click labels, refused when one is null or not 0/1."""
    labels = exposed.column("label")
    if labels.null_count:
        raise PseudoLabelInputError(
            f"requests: {labels.null_count} exposed rows have no label (the calibration is "
            "fitted on exposed rows' clicks)"
        )
    values = labels.to_numpy(zero_copy_only=False)
    if not np.isin(values, (0, 1)).all():
        raise PseudoLabelInputError("requests: exposed rows' labels must be 0 or 1")
    return values.astype(np.int8)


def _num_rows(requests: pa.Table | Path) -> int:
    if isinstance(requests, Path):
        return int(pq.ParquetFile(requests).metadata.num_rows)
    return int(requests.num_rows)


def _confidence_table(bank: AnchorBank, cfg: PseudoLabelConfig) -> npt.NDArray[np.float32]:
    """Combined confidence of every (set, anchor slot), ``(S, N)``: a row's is its matched slot's.

    The factors depend only on the set and the matched anchor, so they are combined once per
    slot here instead of once per candidate row (the same values, bit for bit).
    """
    w = cfg.confidence_weights
    dispersion = np.broadcast_to(bank.dispersion[:, None], bank.history.shape)
    return combine(
        [dispersion, bank.history, bank.lm], [w.dispersion, w.history, w.lm], cfg.combination
    )


def _spread(
    values: npt.NDArray[Any], where: npt.NDArray[np.bool_], fill: float
) -> npt.NDArray[Any]:
    """``values`` placed at the True positions of ``where``, ``fill`` elsewhere."""
    out = np.full(len(where), fill, values.dtype)
    out[where] = values
    return out


@dataclass
class _LikelihoodScorer:
    """``relevance: lm_likelihood``: the LM, every anchor set's prompt, the item rows it knows."""

    lm: LmRelevance
    prompts: list[list[int]]
    #: Catalog (trie) row of each row of the job's item index; -1 for an item without a SID.
    trie_rows: npt.NDArray[np.int64]

    @classmethod
    def of(
        cls, lm: LmRelevance, bank: AnchorBank, items: ItemIndex, positives: pa.Table
    ) -> _LikelihoodScorer:
        catalog = pa.array(lm.catalog_ids.tolist(), pa.string())
        rows = pc.index_in(items.item_ids.cast(pa.string()), value_set=catalog)
        trie_rows = np.asarray(pc.fill_null(rows, -1).to_numpy(zero_copy_only=False), np.int64)
        return cls(lm=lm, prompts=lm.prompts(bank.keys, positives), trie_rows=trie_rows)


def _score(
    batch: pa.Table,
    items: ItemIndex,
    bank: AnchorBank,
    confidence_table: npt.NDArray[np.float32],
    likelihood: _LikelihoodScorer | None = None,
    density_temperature: float | None = None,
) -> dict[str, Any]:
    """Relevance and confidence of every row of ``batch`` (status tells which rows are usable).

    With ``density_temperature`` the result also holds ``density``, each row's history density
    (:func:`history_log_density`), which the caller weighs into the relevance.
    """
    set_idx = bank.sets_of(batch.column("user_id"), batch.column("event_timestamp"))
    item_idx = items.lookup(batch.column("item_id"))
    trie_idx = None
    if likelihood is not None:
        # An item the LM has no SID for cannot be scored by it: no usable item, like a missing
        # embedding (status no_item_embedding), never a made-up score.
        trie_idx = np.where(item_idx >= 0, likelihood.trie_rows[np.maximum(item_idx, 0)], -1)
        item_idx = np.where(trie_idx >= 0, item_idx, -1)
    has_set = set_idx >= 0
    ok = has_set & (item_idx >= 0)
    if not ok.any():
        # Also the case of a bank without any anchor: nothing to score or to look up.
        return _unscored(bank, set_idx, item_idx, density_temperature is not None)
    # Usually every row is usable: then no row is masked and no array copied for it.
    every = bool(ok.all())
    relevance, matched = max_cosine_rows(
        items.embeddings,
        item_idx if every else item_idx[ok],
        bank.anchors.vectors,
        bank.anchors.rows,
        bank.mask,
        set_idx if every else set_idx[ok],
    )
    if likelihood is not None and trie_idx is not None:
        # The matched anchor (for the confidence's per-anchor factors) stays the closest one.
        relevance = likelihood.lm.score(
            likelihood.prompts,
            set_idx if every else set_idx[ok],
            trie_idx if every else trie_idx[ok],
        )
    density = None
    if density_temperature is not None:
        assert bank.history_rows is not None, "load_anchor_bank(keep_history_rows=True)"
        density = history_log_density(
            items.embeddings,
            item_idx if every else item_idx[ok],
            bank.history_rows,
            set_idx if every else set_idx[ok],
            density_temperature,
        )
    safe_sets = set_idx if every else np.where(ok, set_idx, 0)
    if not every:
        relevance = _spread(relevance, ok, np.nan)
        matched = _spread(matched, ok, 0)
        if density is not None:
            density = _spread(density, ok, np.nan)
    # Per-(set, slot) tables read through one flat index instead of two fancy indices.
    slot = safe_sets * confidence_table.shape[1] + matched
    factors = {
        "dispersion": bank.dispersion.take(safe_sets),
        "history_consistency": bank.history.ravel().take(slot),
        "lm_confidence": bank.lm.ravel().take(slot),
        "confidence": confidence_table.ravel().take(slot),
    }
    if not every:
        factors = {name: np.where(ok, v, np.nan).astype(np.float32) for name, v in factors.items()}
    extra = {} if density is None else {"density": density}
    return {
        "ok": ok,
        "relevance": relevance,
        **factors,
        **extra,
        **_status(bank, set_idx, item_idx),
    }


def _unscored(
    bank: AnchorBank,
    set_idx: npt.NDArray[np.int64],
    item_idx: npt.NDArray[np.int64],
    density: bool = False,
) -> dict[str, Any]:
    """:func:`_score`'s result for a batch without a single usable row."""
    nan = np.full(len(set_idx), np.nan, np.float32)
    return {
        "ok": np.zeros(len(set_idx), bool),
        "relevance": nan,
        **{name: nan for name in _FACTOR_OUTPUTS},
        **({"density": nan} if density else {}),
        **_status(bank, set_idx, item_idx),
    }


def _status(
    bank: AnchorBank, set_idx: npt.NDArray[np.int64], item_idx: npt.NDArray[np.int64]
) -> dict[str, Any]:
    """Each row's status (codes index ``_STATUS_VALUES``) and the cutoff of its anchor set."""
    has_set = set_idx >= 0
    codes = np.where(has_set, np.where(item_idx < 0, 2, 0), 1)
    status = pa.DictionaryArray.from_arrays(pa.array(codes.astype(np.int32)), _STATUS_VALUES)
    if not has_set.any():
        cutoffs = pa.nulls(len(set_idx), TIMESTAMP)
    else:
        cutoffs = bank.keys.column("event_timestamp").take(pa.array(np.where(has_set, set_idx, 0)))
        if not has_set.all():
            cutoffs = pc.if_else(pa.array(has_set), cutoffs, pa.scalar(None, TIMESTAMP))
    return {"status": status, "status_codes": codes, "anchor_cutoff": cutoffs}


_EXPOSED = pa.array(["exposed"])


def _member_mask(column: pa.Array | pa.ChunkedArray, values: pa.Array) -> pa.Array:
    """Boolean filter: which rows of ``column`` hold one of ``values`` (plain or dictionary)."""
    return pa.array(positions_in(column, values) >= 0)


def _dictionary(column: pa.Array | pa.ChunkedArray) -> pa.ChunkedArray:
    """``column`` as a dictionary<int32, string> column (encoded here only when read plain)."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    dtype = pa.dictionary(pa.int32(), pa.string())
    return pa.chunked_array(
        [
            c if c.type == dtype else pc.dictionary_encode(c.cast(pa.string())).cast(dtype)
            for c in chunks
        ],
        dtype,
    )


def _nullable(values: npt.NDArray[np.float32]) -> pa.Array:
    return pa.array(values, pa.float32(), mask=np.isnan(values))


def _read_anchors(
    anchors: pa.Table | Path,
) -> tuple[pa.Table, Callable[[], pa.ChunkedArray] | None]:
    """The anchors table, read without ``anchor_embeddings`` when they may not be needed.

    From a file that names the anchors' items, the vectors (15 KB a set) are read only if some
    anchor turns out to be missing from the catalog; the returned callable reads them then.
    """
    if not isinstance(anchors, Path):
        return anchors, None
    names = pq.read_schema(anchors).names
    if "anchor_item_ids" in names and "anchor_embeddings" in names:
        table = pq.read_table(anchors, columns=[n for n in names if n != "anchor_embeddings"])
        return table, lambda: pq.read_table(anchors, columns=["anchor_embeddings"]).column(0)
    return pq.read_table(anchors), None


def generate_pseudo_labels(
    requests: pa.Table | Path,
    item_semantics: pa.Table,
    anchors: pa.Table | Path,
    positives: pa.Table,
    cfg: PseudoLabelConfig,
    out_dir: Path,
    *,
    sources: Mapping[str, str] | None = None,
    lm: LmRelevance | None = None,
) -> PseudoLabelResult:
    """Pseudo-label every unexposed candidate; write parquet + manifest into ``out_dir``.

    Args:
        requests: The request log (contract ``requests``), as a table or a parquet path (streamed).
        item_semantics: item_id + content_embedding of the catalog.
        anchors: ``user_interest_anchors`` (one row per user and cutoff), as a table or a
            parquet path (then read without the anchor vectors when the catalog has them).
        positives: Positive interactions, for the historical-consistency factor.
        cfg: Job settings.
        out_dir: Output directory (``RUN_DIR/pseudo_labels``).
        sources: Files the tables passed in were read from, for the manifest's ``inputs``.
        lm: The anchor LM (:meth:`LmRelevance.load`), needed by ``relevance: lm_likelihood``.

    Returns:
        The output path and the metrics written to the manifest.

    Raises:
        PseudoLabelInputError: when ``relevance: lm_likelihood`` is given no ``lm``.
    """
    if cfg.relevance == "lm_likelihood" and lm is None:
        raise PseudoLabelInputError(
            "relevance 'lm_likelihood' scores candidates with the anchor LM: pass its model "
            "directory (gpl pseudo-labels reads RUN_DIR/anchors/model)"
        )
    began = time.perf_counter()
    targets = ["prerank_negative", "rank_negative"] + (
        ["global_negative"] if cfg.include_global_negatives else []
    )
    target_set = pa.array(targets)
    schema = pq.read_schema(requests) if isinstance(requests, Path) else requests.schema
    exposed_columns = _exposed_pass_columns(schema, cfg)
    _check_requests_schema(schema, exposed_columns)
    total = _num_rows(requests)
    until = cfg.calibrate_until
    clicks_known_later = 0

    # Pass 1, exposed rows only (a few percent of the log): fit the relevance -> click mapping
    # first, so that pass 2 writes final labels in one go instead of rewriting its output.
    exposed_rel: list[npt.NDArray[np.float32]] = []
    exposed_density: list[npt.NDArray[np.float32]] = []
    exposed_lab: list[npt.NDArray[np.int8]] = []
    density_weight = cfg.density_weight
    temperature = cfg.history_density_temperature if density_weight != 0 else None
    with ThreadPoolExecutor(2, thread_name_prefix="pseudo-labels-read") as reader:
        # The log's first batch is read, and the compiled kernels loaded, while the catalog and
        # the anchor bank load.
        warm = reader.submit(warm_up)
        exposed_batches = _read_ahead(_batches(requests, cfg.batch_rows, exposed_columns), reader)
        items = ItemIndex.from_item_semantics(item_semantics)
        anchor_table, read_embeddings = _read_anchors(anchors)
        bank = load_anchor_bank(
            anchor_table,
            items,
            positives,
            cfg.history_items,
            read_embeddings,
            cfg.history_form,
            keep_history_rows=temperature is not None,
        )
        confidence_table = _confidence_table(bank, cfg)
        likelihood = (
            _LikelihoodScorer.of(lm, bank, items, positives)
            if lm is not None and cfg.relevance == "lm_likelihood"
            else None
        )
        warm.result()
        for batch in exposed_batches:
            exposed = batch.filter(_member_mask(batch.column("stage"), _EXPOSED))
            if until is not None:
                exposed, later = log_as_of(exposed, until)
                clicks_known_later += later
            if exposed.num_rows:
                scored = _score(exposed, items, bank, confidence_table, likelihood, temperature)
                exposed_rel.append(scored["relevance"][scored["ok"]])
                if temperature is not None:
                    exposed_density.append(scored["density"][scored["ok"]])
                exposed_lab.append(_exposed_labels(exposed)[scored["ok"]])
    rel = np.concatenate(exposed_rel) if exposed_rel else np.zeros(0, np.float32)
    lab = np.concatenate(exposed_lab) if exposed_lab else np.zeros(0, np.int8)
    base_rel, density = rel, None
    weight: DensityWeight | None = None
    if temperature is not None:
        density = np.concatenate(exposed_density) if exposed_density else np.zeros(0, np.float32)
        weight = (
            fit_density_weight(rel, density, lab)
            if density_weight == "fitted"
            else DensityWeight(weight=float(density_weight), fitted=False)
        )
        if weight.clamped:
            logger.warning(
                "on the %d exposed rows, the history density does not add clicks to the "
                "relevance (its fitted weight came out negative): weight 0, the relevance alone",
                len(rel),
            )
        rel = (rel + weight.weight * density).astype(np.float32)
    scaler: PlattScaler | None = fit_platt(rel, lab) if cfg.calibration == "platt" else None
    if scaler is not None and scaler.clamped:
        logger.warning(
            "on the %d exposed rows, clicks fall as relevance rises (the Platt slope came out "
            "negative): the anchors do not predict clicks here, and every pseudo-label is the "
            "click base rate %.4f instead of an inverted relevance",
            len(rel),
            float(lab.mean()),
        )

    # Pass 2: every unexposed target row, streamed, written once.
    out_dir.mkdir(parents=True, exist_ok=True)
    rows_in = 0
    target_rows = 0
    scoring_seconds = 0.0
    stats = _Stats()
    path = out_dir / OUTPUT_NAME
    # Reading the next batch and writing the previous one run on two I/O threads while this one
    # is scored: Arrow's parquet decoding and zstd encoding release the GIL, and alone they were
    # a third of the job (at most three batches are held at once, so memory stays bounded).
    with (
        atomic_path(path) as tmp,
        pq.ParquetWriter(
            tmp,
            _WRITE_SCHEMA,
            compression="zstd",
            # Parquet dictionaries for the few-valued columns; item ids (tens of thousands
            # distinct per batch) are written plain, as before (the file size is unchanged).
            use_dictionary=["request_id", "user_id", "group", "status"],
            # No Arrow schema in the file: it would make readers restore the dictionary types;
            # without it they read OUTPUT_SCHEMA's strings (types, nullability and the UTC
            # timestamps all come from the parquet schema itself).
            store_schema=False,
            write_statistics=_STATISTICS_COLUMNS,
        ) as writer,
        ThreadPoolExecutor(2, thread_name_prefix="pseudo-labels-io") as io,
        tqdm(total=total, unit="rows", desc="pseudo-labels", disable=not cfg.progress) as bar,
    ):
        written: Future[None] | None = None
        for batch in _read_ahead(_batches(requests, cfg.batch_rows), io):
            rows_in += batch.num_rows
            t = batch.filter(_member_mask(batch.column("group"), target_set))
            target_rows += t.num_rows
            t0 = time.perf_counter()
            scored = _score(t, items, bank, confidence_table, likelihood, temperature)
            if weight is not None:
                scored["relevance"] = (
                    scored["relevance"] + weight.weight * scored["density"]
                ).astype(np.float32)
            scoring_seconds += time.perf_counter() - t0
            relevance = scored["relevance"]
            if scaler is not None:
                label = scaler(np.nan_to_num(relevance))
            else:
                label = np.clip(np.nan_to_num(relevance), 0.0, 1.0).astype(np.float32)
            if cfg.hard_threshold is not None:
                label = (label >= cfg.hard_threshold).astype(np.float32)
            scored["pseudo_label"] = np.where(np.isnan(relevance), np.nan, label).astype(np.float32)
            table = pa.table(
                {
                    "request_id": _dictionary(t.column("request_id")),
                    "user_id": _dictionary(t.column("user_id")),
                    "item_id": _dictionary(t.column("item_id")),
                    "event_timestamp": pc.cast(t.column("event_timestamp"), TIMESTAMP, safe=False),
                    "group": _dictionary(t.column("group")),
                    "anchor_cutoff": scored["anchor_cutoff"],
                    **{name: _nullable(scored[name]) for name in _FLOAT_OUTPUTS},
                    "status": scored["status"],
                },
                schema=_WRITE_SCHEMA,
            )
            stats.add(scored["status_codes"], t.column("user_id"), scored)
            if written is not None:
                written.result()  # batches reach the file in order, one write at a time
            written = io.submit(writer.write_table, table)
            bar.update(batch.num_rows)
        summary = stats.summary()  # while the last batch is written
        if written is not None:
            written.result()

    seconds = time.perf_counter() - began
    metrics: dict[str, Any] = {
        "request_rows": rows_in,
        "unexposed_rows": target_rows,
        "target_groups": targets,
        "anchor_sets": bank.num_sets,
        "anchor_vectors": bank.source,
        "calibration": (
            {
                "method": "platt",
                "a": scaler.a,
                "b": scaler.b,
                "slope_clamped_to_zero": scaler.clamped,
                "exposed_rows": len(rel),
                "clicks": int(lab.sum()),
                # How well relevance ranks the real clicks it was fitted on: the one quality
                # figure a production log gives without a truth table (compare settings by it).
                "relevance_auc": _rounded_auc(lab, rel),
                "until": None if until is None else until.isoformat(),
                "clicks_known_after_until": clicks_known_later,
            }
            if scaler
            else {"method": "none"}
        ),
        "relevance": cfg.relevance,
        "relevance_model": None if likelihood is None else str(likelihood.lm.model_dir),
        "relevance_model_caveats": None if likelihood is None else list(likelihood.lm.caveats),
        "history_density": (
            None
            if weight is None or density is None  # set together; both named for the type checker
            else {
                "weight": round(weight.weight, 6),
                "fitted": weight.fitted,
                "clamped_to_zero": weight.clamped,
                "temperature": cfg.history_density_temperature,
                # Each part's AUC on the exposed clicks, beside the combined relevance_auc above.
                "base_relevance_auc": _rounded_auc(lab, base_rel),
                "density_auc": _rounded_auc(lab, density),
            }
        ),
        "confidence_weights": cfg.confidence_weights.model_dump(),
        "history_form": cfg.history_form,
        "combination": cfg.combination,
        "seconds": round(seconds, 3),
        "scoring_seconds": round(scoring_seconds, 3),
        **summary,
        "items_with_unusable_embedding": len(items.unusable),
    }
    if (
        metrics["ok_rows"] + metrics["no_anchors_rows"] + metrics["no_item_embedding_rows"]
        != target_rows
    ):
        raise RuntimeError("pseudo-label row accounting does not add up; this is a bug")
    write_manifest(
        out_dir,
        "pseudo_labels",
        inputs={
            # What was read: a path when given one, else a table passed in by the caller
            # (whose files, when it read them, are in ``sources``).
            "requests": str(requests) if isinstance(requests, Path) else "table",
            "item_semantics": "table",
            "anchors": str(anchors) if isinstance(anchors, Path) else "table",
            "positives": "table",
            **(sources or {}),
        },
        outputs={"pseudo_labels": OUTPUT_NAME},
        config=cfg.model_dump(),
        metrics=metrics,
    )
    return PseudoLabelResult(path=path, metrics=metrics)


class _Stats:
    """Streaming counts and distributions for the manifest (from the batch's arrays)."""

    QUANTILES = (0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99)
    SAMPLE_PER_BATCH = 50_000

    def __init__(self) -> None:
        self.status = np.zeros(len(_STATUS_VALUES), np.int64)
        self.samples: dict[str, list[npt.NDArray[np.float32]]] = {
            name: [] for name in _FLOAT_OUTPUTS
        }
        self.users_without_anchors: set[str] = set()
        self.rng = np.random.default_rng(0)

    def add(self, codes: npt.NDArray[np.int64], user_ids: pa.Array, floats: dict[str, Any]) -> None:
        """Count one batch: ``codes`` index ``_STATUS_VALUES``; ``floats`` the output columns."""
        self.status += np.bincount(codes, minlength=len(_STATUS_VALUES))
        no_anchor = codes == 1
        if no_anchor.any():
            users = pc.unique(pc.filter(user_ids, pa.array(no_anchor)))
            self.users_without_anchors.update(users.to_pylist())
        ok = np.flatnonzero(codes == 0)
        # A bounded random sample per batch keeps the quantiles' memory constant.
        if len(ok):
            idx = ok[self.rng.choice(len(ok), min(len(ok), self.SAMPLE_PER_BATCH), replace=False)]
            for name in self.samples:
                self.samples[name].append(floats[name][idx])

    def summary(self) -> dict[str, Any]:
        """Row counts per status and each float column's mean and quantiles."""
        counts = dict(zip(_STATUS_VALUES.to_pylist(), self.status.tolist(), strict=True))
        out: dict[str, Any] = {
            "ok_rows": counts["ok"],
            "no_anchors_rows": counts["no_anchors"],
            "no_item_embedding_rows": counts["no_item_embedding"],
            "users_without_anchors": len(self.users_without_anchors),
            "distributions": {},
        }
        for name, parts in self.samples.items():
            if parts:
                values = np.concatenate(parts)
                # One call for all quantiles: one partial sort instead of one per quantile.
                qs = np.quantile(values, self.QUANTILES)
                out["distributions"][name] = {
                    "mean": round(float(values.mean()), 6),
                    **{
                        f"q{int(q * 100):02d}": round(float(v), 6)
                        for q, v in zip(self.QUANTILES, qs, strict=True)
                    },
                }
        return out
