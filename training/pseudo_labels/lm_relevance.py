"""Relevance as the anchor LM's own probability of the candidate (``relevance: lm_likelihood``).

GPL's relevance (:mod:`training.pseudo_labels.relevance`) is the max cosine between a candidate
and the user's anchors in the frozen content space: what the LM believes reaches a candidate only
through the content vectors of the few items its beam search kept. ``lm_likelihood`` asks the
same LM about the candidate itself: ``log p(SID of the candidate | the anchor set's history)``,
teacher-forced under the trie (:func:`training.anchors.scoring.score_items`): the score the beam
search gives an item it reaches. The history is the anchor set's own: the user's latest
positives strictly before the set's cutoff, as many as the model was trained on
(``max_history`` in its ``anchor_model.json``), oldest first, as generation builds it.
docs/pseudo_labels.md compares the two on the simulators' truth.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import torch
from transformers import PreTrainedModel

from training.anchors.catalog import SidCatalog
from training.anchors.generate import EnsembleCombine
from training.anchors.model import check_trained_sids, ensemble_dirs, load_anchor_model
from training.anchors.scoring import score_items
from training.anchors.trie import SidTrie
from training.anchors.vocab import SidVocab
from training.data.contract import TIMESTAMP
from training.io import read_manifest
from training.pseudo_labels.lookup import latest_before

logger = logging.getLogger(__name__)

DEFAULT_MAX_HISTORY = 50
"""History items when the model's ``anchor_model.json`` does not record its training length."""


def likelihood_caveats(model_dir: Path) -> list[str]:
    """The anchor model's training settings that bend its probabilities as relevance.

    The anchors' defaults serve a beam search, which only ranks one user's items; relevance
    compares probabilities across items and users, and three of those defaults distort them
    (:mod:`training.anchors.recipes`; `gpl anchors train --for-likelihood` turns them off).

    Args:
        model_dir: An anchor model directory (its ``manifest.json`` holds the training config).

    Returns:
        One sentence per such setting; empty when the manifest is missing (a model copied
        without it) or the model was trained for likelihood.
    """
    try:
        config = read_manifest(model_dir).get("config", {})
    except (FileNotFoundError, ValueError):
        return []
    sequences, training = config.get("sequences", {}), config.get("training", {})
    caveats = []
    if sequences.get("downsample_threshold") is not None:
        caveats.append(
            f"trained with popular-item downsampling (threshold "
            f"{sequences['downsample_threshold']}), which under-rates popular items; "
            "`gpl anchors train --for-likelihood` sets sequences.downsample_threshold: null"
        )
    if training.get("label_smoothing", 0.0) > 0:
        caveats.append(
            f"trained with label smoothing {training['label_smoothing']}, which flattens its "
            "probabilities; `gpl anchors train --for-likelihood` sets training.label_smoothing: 0"
        )
    if training.get("early_stopping_metric") == "hr@10":
        caveats.append(
            "stopped on held-out HR@10, usually long before the held-out loss; `gpl anchors "
            "train --for-likelihood` sets training.early_stopping_metric: loss"
        )
    return caveats


@dataclass
class LmRelevance:
    """The anchor LM, ready to score candidates of anchor sets.

    Attributes:
        models: The LM, or an ensemble's members (eval mode, on their device).
        vocab: Its SID vocabulary.
        trie: The catalog's valid SIDs.
        catalog_ids: Item id of each catalog (trie) row.
        max_history: History items per prompt.
        model_dir: Where the model was loaded from (for the manifest).
        combine: How an ensemble's next-code distributions are combined.
        caveats: Its training settings that distort the likelihood (:func:`likelihood_caveats`),
            logged as warnings at load and written to the pseudo-label manifest.
    """

    models: tuple[PreTrainedModel, ...]
    vocab: SidVocab
    trie: SidTrie
    catalog_ids: npt.NDArray[np.str_]
    max_history: int
    model_dir: Path
    combine: EnsembleCombine = "arithmetic"
    caveats: tuple[str, ...] = ()

    @classmethod
    def load(
        cls,
        model_dir: Path,
        item_semantics: pa.Table,
        device: str = "cpu",
        combine: EnsembleCombine = "arithmetic",
    ) -> LmRelevance:
        """Load the anchor model trained on ``item_semantics``' SIDs, with every ensemble member.

        Args:
            model_dir: The anchor model directory (``RUN_DIR/anchors/model``).
            item_semantics: The SID stage's table the model must have been trained on.
            device: Torch device to score on.
            combine: How an ensemble's next-code distributions are combined; use the rule the
                anchors were generated with (``generation.ensemble_combine``).

        Raises:
            SidVocabularyError: when the SIDs are not the ones the model was trained on.
        """
        catalog = SidCatalog.from_table(item_semantics)
        members = []
        for member_dir in ensemble_dirs(model_dir):
            loaded = load_anchor_model(member_dir, device=torch.device(device), dtype=torch.float32)
            loaded.vocab.check_codes(catalog.codes)
            check_trained_sids(member_dir, catalog.item_ids.tolist(), catalog.sids.tolist())
            members.append(loaded)
        caveats = likelihood_caveats(model_dir)
        for caveat in caveats:
            logger.warning("relevance 'lm_likelihood' with %s: %s", model_dir, caveat)
        first = members[0]
        return cls(
            models=tuple(m.model.eval() for m in members),
            vocab=first.vocab,
            trie=SidTrie(catalog.codes, first.vocab.codebook_sizes),
            catalog_ids=catalog.item_ids,
            max_history=int(first.info.get("max_history", DEFAULT_MAX_HISTORY)),
            model_dir=model_dir,
            combine=combine,
            caveats=tuple(caveats),
        )

    def prompts(self, sets: pa.Table, positives: pa.Table) -> list[list[int]]:
        """Each anchor set's prompt: its history's SID tokens (user_id, event_timestamp).

        Positives of items outside the catalog are left out, as generation leaves them out.
        """
        catalog = pa.array(self.catalog_ids.tolist(), pa.string())
        rows = pc.index_in(positives.column("item_id").cast(pa.string()), value_set=catalog)
        known = pc.is_valid(rows)
        positives = positives.filter(known)
        item_rows = rows.filter(known).to_numpy(zero_copy_only=False).astype(np.int64)

        def micros(column: pa.ChunkedArray) -> npt.NDArray[np.int64]:
            values = pc.cast(column, TIMESTAMP, safe=False).cast(pa.int64())
            return np.asarray(values.to_numpy(zero_copy_only=False), dtype=np.int64)

        events = latest_before(
            positives.column("user_id"),
            micros(positives.column("event_timestamp")),
            sets.column("user_id"),
            micros(sets.column("event_timestamp")),
            self.max_history,
        )
        tokens = self.vocab.item_tokens(self.trie.codes)
        return [self.vocab.encode(tokens[item_rows[row[row >= 0]]]) for row in events]

    def score(
        self,
        prompts: list[list[int]],
        set_idx: npt.NDArray[np.int64],
        item_ids: npt.NDArray[np.int64],
        batch_sets: int = 64,
    ) -> npt.NDArray[np.float32]:
        """``log p(item | set history)`` of each row (``set_idx`` into ``prompts``).

        Args:
            prompts: Every set's prompt (:meth:`prompts`).
            set_idx: Each row's anchor set.
            item_ids: Each row's catalog (trie) row.
            batch_sets: Sets whose candidates are decoded together.
        """
        out = np.zeros(len(set_idx), np.float32)
        if not len(set_idx):
            return out
        order = np.argsort(set_idx, kind="stable")
        sets, starts = np.unique(set_idx[order], return_index=True)
        bounds = np.append(starts, len(order))
        for first in range(0, len(sets), batch_sets):
            chunk = range(first, min(first + batch_sets, len(sets)))
            rows = [order[bounds[k] : bounds[k + 1]] for k in chunk]
            scores = score_items(
                list(self.models),
                self.vocab,
                self.trie,
                [prompts[int(sets[k])] for k in chunk],
                [item_ids[r] for r in rows],
                combine=self.combine,
            )
            for r, s in zip(rows, scores, strict=True):
                out[r] = s
        return out
