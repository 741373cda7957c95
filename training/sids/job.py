"""The Semantic ID stage: items -> frozen content vectors -> residual codes -> unique SIDs.

``train_sids`` fits the quantizer (RQ-VAE or residual k-means) on a catalog and writes, in the
stage folder (``RUN_DIR/sids/``):

* ``item_semantics.parquet``: one row per item (schema :data:`ITEM_SEMANTICS_SCHEMA`), the
  source of the ``item_semantics`` Feast feature view;
* ``codebooks.safetensors`` + ``codebooks.json``: the frozen :class:`SemanticIdTokenizer`;
* ``encoder_cache.parquet``: text vectors, so a re-run encodes only new or changed texts;
* ``manifest.json``: inputs, config (with how modalities were fused), metrics, and under
  ``outputs.codebook_sizes`` the vocabulary size of every SID level, disambiguation included.

``assign_sids`` gives SIDs to new items with the frozen codebooks, without retraining: existing
items keep their rows exactly, even when their text changed (a SID is an identifier; retrain to
re-tokenize the catalog).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from training.data.contract import TIMESTAMP, ContractError, conform, validate
from training.io import read_manifest, read_table, write_manifest, write_table
from training.sids import metrics as quality
from training.sids.collaborative import collaborative_vectors
from training.sids.config import SidConfig
from training.sids.encoder import (
    CollaborativeBlock,
    EmbeddingCache,
    EncodedItems,
    EncoderConfig,
    encode_items,
    encoder_fingerprint,
    list_array,
    list_column_matrix,
    model_path_problems,
    resolve_model_path,
    text_sha256,
)
from training.sids.ids import (
    collision_rate,
    disambiguate,
    format_sids,
    next_free_indices,
    shared_prefix_rate,
    taken_last_codes,
    unique_last_level,
)
from training.sids.rkmeans import fit_rkmeans
from training.sids.rqvae import train_rqvae
from training.sids.tokenizer import (
    CODEBOOKS_CONFIG,
    CODEBOOKS_FILE,
    SemanticIdTokenizer,
)
from training.threads import torch_threads

__all__ = [
    "ITEM_SEMANTICS_FILE",
    "ITEM_SEMANTICS_SCHEMA",
    "STAGE_DIR",
    "SidConfig",
    "SidInputError",
    "SidResult",
    "assign_sids",
    "read_codebook_sizes",
    "train_sids",
]

STAGE: Final = "sids"
STAGE_DIR: Final = "sids"
"""The stage folder inside a run directory."""

ITEM_SEMANTICS_FILE: Final = "item_semantics.parquet"
CACHE_FILE: Final = "encoder_cache.parquet"

ITEM_SEMANTICS_SCHEMA: Final = pa.schema(
    [
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("event_timestamp", TIMESTAMP, nullable=False),
        pa.field("sid_codes", pa.list_(pa.int32()), nullable=False),
        pa.field("sid", pa.string(), nullable=False),
        pa.field("content_embedding", pa.list_(pa.float32()), nullable=False),
    ]
)
"""``item_semantics.parquet``: ``sid_codes`` has ``levels + 1`` codes, the last one the
disambiguation index; ``sid`` is their token string; ``content_embedding`` the encoder's unit
vector; ``event_timestamp`` the item's own timestamp (when its content became valid)."""


class SidInputError(ValueError):
    """The items (or the encoder setting) cannot be tokenized; raised before any work is done.

    Attributes:
        problems: Every problem found, one human-readable line each.
    """

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


@dataclass
class SidResult:
    """What a SID run produced.

    Attributes:
        table: The full ``item_semantics`` table as written.
        codebook_sizes: Vocabulary size of every SID level, the disambiguation level last.
        metrics: The figures written to the manifest.
        out_dir: The stage folder.
        tokenizer: The frozen quantizer.
        paths: Written files by role (``item_semantics``, ``codebooks``, ``manifest``, ...).
    """

    table: pa.Table
    codebook_sizes: list[int]
    metrics: dict[str, Any]
    out_dir: Path
    tokenizer: SemanticIdTokenizer
    paths: dict[str, Path] = field(default_factory=dict)


def input_problems(
    items: pa.Table,
    encoder: EncoderConfig,
    *,
    min_items: int | None = None,
    embedding_dim: int | None = None,
) -> list[str]:
    """Every reason ``items`` cannot be tokenized, one line each (empty when it can).

    Checks the items contract (columns, types, null or empty text, empty or duplicate ids), the
    ``content_embedding`` column (one length for all rows, only finite values, and when
    ``embedding_dim`` is given that width), the encoder directory, and the item count.

    Args:
        items: The catalog.
        encoder: Encoder settings (its directory must exist).
        min_items: Fewest items needed (training needs one per code).
        embedding_dim: The ``content_embedding`` width the codebooks were trained with (assigning
            new items); None when training.
    """
    problems = validate(items, "items")
    if "content_embedding" in items.column_names:
        problems += _embedding_problems(items.column("content_embedding"), embedding_dim)
    elif embedding_dim:
        # Items without the column are fused with a zero block: allowed, nothing to report.
        pass
    problems += model_path_problems(encoder)
    if min_items is not None and items.num_rows < min_items:
        problems.append(
            f"{items.num_rows} items; training needs at least codebook_size = {min_items} items "
            "(one per code): set a smaller codebook_size in a --config file (`gpl config sids`)"
        )
    return problems


def _embedding_problems(column: pa.ChunkedArray, expected_dim: int | None) -> list[str]:
    typ = column.type
    if not (pa.types.is_list(typ) or pa.types.is_large_list(typ)) or not pa.types.is_floating(
        typ.value_type
    ):
        return []  # the contract check has reported the type
    problems = []
    lengths = pc.unique(pc.list_value_length(column).drop_null()).to_pylist()
    if len(lengths) > 1:
        shown = ", ".join(str(n) for n in sorted(lengths)[:5])
        problems.append(
            f"column 'content_embedding' has vectors of {len(lengths)} different lengths "
            f"({shown}); every vector must have the same length"
        )
    if expected_dim is not None and lengths:
        widths = {int(n) for n in lengths}
        if expected_dim == 0 and widths != {0}:
            problems.append(
                "column 'content_embedding' is present, but the codebooks were trained on text "
                "only; drop the column or retrain"
            )
        elif expected_dim and widths != {expected_dim}:
            problems.append(
                f"column 'content_embedding' has length {sorted(widths)}, but the codebooks were "
                f"trained with length {expected_dim}"
            )
    arr = column.combine_chunks()
    values = pc.list_flatten(arr)
    parents = pc.list_parent_indices(arr)
    bad = pc.invert(pc.is_finite(values))
    rows = pc.count_distinct(parents.filter(bad)).as_py() if len(values) else 0
    if rows:
        problems.append(
            f"column 'content_embedding' has {rows} vectors with NaN or infinite values"
        )
    return problems


def train_sids(
    items: pa.Table, cfg: SidConfig, out_dir: Path, interactions: pa.Table | None = None
) -> SidResult:
    """Fit the quantizer on ``items`` and write every item's unique SID to ``out_dir``.

    Args:
        items: Contract ``items`` table (``item_id``, ``text``, ``event_timestamp``, optional
            ``content_embedding``).
        cfg: Stage settings.
        interactions: Contract ``interactions`` table; needed (and only read) when
            ``cfg.collaborative.weight`` is above 0, to build the collaborative block.
        out_dir: The stage folder (``RUN_DIR/sids``); created if needed. Its encoder cache is
            reused, so only new or changed texts are encoded.

    Returns:
        The written table, codebook sizes, metrics and the frozen tokenizer.

    Raises:
        SidInputError: listing every problem with the input, before any work is done.
    """
    began = time.perf_counter()
    problems = input_problems(items, cfg.encoder, min_items=cfg.codebook_size)
    collaborative = cfg.collaborative.weight > 0
    if collaborative and interactions is None:
        problems.append(
            f"collaborative.weight is {cfg.collaborative.weight}, but no interactions were given "
            "to build the collaborative block from; pass them, or set the weight to 0"
        )
    elif collaborative and interactions is not None:
        try:  # validated once, here, with every other problem reported before any work
            interactions = conform(interactions, "interactions")
        except ContractError as exc:
            problems += exc.problems
    if problems:
        raise SidInputError(problems)
    items = conform(items, "items")
    out_dir.mkdir(parents=True, exist_ok=True)

    block = None
    collaborative_metrics: dict[str, Any] = {}
    if collaborative and interactions is not None:
        built = collaborative_vectors(
            items.column("item_id").to_pylist(), interactions, cfg.collaborative
        )
        block = CollaborativeBlock(built.matrix, cfg.collaborative.weight)
        collaborative_metrics = {"collaborative": built.metrics}
    encoded = encode_items(
        items,
        cfg.encoder,
        cache_path=out_dir / CACHE_FILE,
        collaborative=block,
        show_progress=cfg.show_progress,
    )
    x = encoded.vectors
    quantizer_metrics: dict[str, Any]
    # The text encoder above keeps every core; the quantizer's nearest-code choices do not
    # tolerate run-to-run rounding differences (see training/threads.py).
    with torch_threads(1 if cfg.deterministic else None):
        if cfg.method == "rqvae":
            rq = train_rqvae(x, cfg)
            tokenizer, reconstruction = rq.tokenizer, rq.reconstruction
            train_seconds = rq.train_seconds
            quantizer_metrics = {
                "loss_first_epoch": round(rq.losses[0], 6),
                "loss_last_epoch": round(rq.losses[-1], 6),
                "dead_codes_reseeded": rq.reseeded,
                "colliding_items_per_epoch": rq.colliding,
            }
        else:
            rk = fit_rkmeans(x, cfg)
            tokenizer, reconstruction = rk.tokenizer, rk.reconstruction
            train_seconds = rk.train_seconds
            quantizer_metrics = {"inertia": [round(v, 6) for v in rk.inertia]}
        nearest, last_residual = tokenizer.codes_and_last_residual(x)

    ids = items.column("item_id").to_pylist()
    prefix = _last_level(nearest, last_residual, tokenizer, ids, cfg)
    index = disambiguate(prefix, ids)
    sid_codes = np.column_stack([prefix, index]).astype(np.int32)
    table = _semantics_table(items, sid_codes, x)
    if len(set(table.column("sid").to_pylist())) != table.num_rows:
        raise RuntimeError("disambiguation left duplicate SIDs; this is a bug")
    codebook_sizes = [cfg.codebook_size] * cfg.levels + [int(index.max()) + 1]

    mse, cosine = quality.reconstruction(x, reconstruction)
    metrics: dict[str, Any] = {
        "items": table.num_rows,
        "embedding_dim": int(x.shape[1]),
        **_encoding_metrics(encoded),
        "train_seconds": round(train_seconds, 3),
        "utilization": [round(u, 6) for u in quality.utilization(prefix, cfg.codebook_size)],
        "perplexity": [round(p, 3) for p in quality.perplexity(prefix, cfg.codebook_size)],
        "recon_mse": round(mse, 8),
        "recon_cosine": round(cosine, 6),
        "collision_rate": round(collision_rate(prefix), 6),
        "collision_rate_nearest": round(collision_rate(nearest), 6),
        "shared_prefix_rate": round(shared_prefix_rate(prefix), 6),
        "shared_prefix_rate_nearest": round(shared_prefix_rate(nearest), 6),
        "last_level_reassigned": int((prefix[:, -1] != nearest[:, -1]).sum()),
        "max_disambiguation_index": int(index.max()),
        **quantizer_metrics,
        **collaborative_metrics,
    }
    paths = _write_outputs(out_dir, table, tokenizer)
    metrics["seconds"] = round(time.perf_counter() - began, 3)
    paths["manifest"] = write_manifest(
        out_dir,
        STAGE,
        inputs={
            "items": items.num_rows,
            "encoder_path": str(resolve_model_path(cfg.encoder)),
            "encoder_id": encoded.encoder_id,
        },
        outputs=_outputs(codebook_sizes),
        config={**cfg.model_dump(mode="json"), "fusion": encoded.fusion(cfg.encoder)},
        metrics=metrics,
    )
    return SidResult(table, codebook_sizes, metrics, out_dir, tokenizer, paths)


def assign_sids(items: pa.Table, out_dir: Path) -> SidResult:
    """Give SIDs to the items of ``items`` that have none yet, with the frozen codebooks.

    New items are encoded with the encoder and fusion the codebooks were trained with,
    quantized, and disambiguated against the SIDs already taken: with ``unique_last_level``, new
    items sharing their first ``levels - 1`` codes with each other or with existing items are
    matched to the group's last-level codes not yet in use; what still collides takes the group's
    next free disambiguation indices in ``item_id`` order. Items that already have a SID keep their
    row exactly, also when their text changed (counted as ``changed_text`` in the metrics: retrain
    to re-tokenize). Items of the existing table missing from ``items`` are kept too.

    Args:
        items: Contract ``items`` table: new items, or the whole current catalog.
        out_dir: A stage folder written by :func:`train_sids`.

    Returns:
        The full updated table and codebook sizes (the disambiguation level can grow).

    Raises:
        FileNotFoundError: when ``out_dir`` holds no trained stage.
        SidInputError: listing every problem with the input, before any work is done.
    """
    began = time.perf_counter()
    manifest = read_manifest(out_dir)
    config = dict(manifest["config"])
    fusion = config.pop("fusion")
    cfg = SidConfig.model_validate(config)
    tokenizer = SemanticIdTokenizer.load(out_dir)
    existing = read_table(out_dir / ITEM_SEMANTICS_FILE)

    embedding_dim = int(fusion["embedding_dim"])
    problems = input_problems(items, cfg.encoder, embedding_dim=embedding_dim)
    if not model_path_problems(cfg.encoder):
        trained_id = manifest["inputs"]["encoder_id"]
        if encoder_fingerprint(cfg.encoder) != trained_id:
            problems.append(
                f"the encoder at {str(resolve_model_path(cfg.encoder))!r} differs from the one "
                f"the codebooks were trained with ({trained_id}); retrain with train_sids"
            )
    if problems:
        raise SidInputError(problems)
    items = conform(items, "items")

    known = set(existing.column("item_id").to_pylist())
    is_new = np.array([i not in known for i in items.column("item_id").to_pylist()], dtype=bool)
    new_items = items.filter(pa.array(is_new))
    changed = _changed_texts(items.filter(pa.array(~is_new)), out_dir, manifest)

    existing_codes = _codes_matrix(existing.column("sid_codes"))
    metrics: dict[str, Any] = {
        "items_in": items.num_rows,
        "new_items": new_items.num_rows,
        "existing_items": int((~is_new).sum()),
        "changed_text": changed,
    }
    table = existing
    last_size = int(manifest["outputs"]["codebook_sizes"][-1])
    if new_items.num_rows:
        # New items had no interactions when the block was built: a zero block, as any item
        # that co-occurred with nothing then.
        collaborative_dim = int(fusion.get("collaborative_dim") or 0)
        block = (
            CollaborativeBlock(
                np.zeros((new_items.num_rows, collaborative_dim), np.float32),
                float(fusion["collaborative_weight"]),
            )
            if collaborative_dim
            else None
        )
        encoded = encode_items(
            new_items,
            cfg.encoder,
            cache_path=out_dir / CACHE_FILE,
            embedding_dim=embedding_dim,
            collaborative=block,
            show_progress=cfg.show_progress,
        )
        ids = new_items.column("item_id").to_pylist()
        # One thread, like the codes of the catalog (a few new items: no cost worth a flag).
        with torch_threads(1):
            nearest, last_residual = tokenizer.codes_and_last_residual(encoded.vectors)
        taken = taken_last_codes(existing_codes) if existing_codes.size else None
        prefix = _last_level(nearest, last_residual, tokenizer, ids, cfg, taken)
        index = disambiguate(prefix, ids, next_free_indices(existing_codes))
        sid_codes = np.column_stack([prefix, index]).astype(np.int32)
        table = pa.concat_tables(
            [existing, _semantics_table(new_items, sid_codes, encoded.vectors)]
        )
        last_size = max(last_size, int(index.max()) + 1)
        all_codes = (
            np.concatenate([existing_codes[:, :-1], prefix]) if existing_codes.size else prefix
        )
        metrics.update(
            {
                **_encoding_metrics(encoded),
                "new_items_sharing_a_prefix": int((index > 0).sum()),
                "last_level_reassigned": int((prefix[:, -1] != nearest[:, -1]).sum()),
                "collision_rate_all_items": round(collision_rate(all_codes), 6),
                "max_disambiguation_index": int(index.max()),
            }
        )
    if len(set(table.column("sid").to_pylist())) != table.num_rows:
        raise RuntimeError("assignment left duplicate SIDs; this is a bug")
    codebook_sizes = [cfg.codebook_size] * cfg.levels + [last_size]

    paths: dict[str, Path] = {}
    if new_items.num_rows:
        paths["item_semantics"] = write_table(table, out_dir / ITEM_SEMANTICS_FILE)
    metrics["seconds"] = round(time.perf_counter() - began, 3)
    training_metrics = {k: v for k, v in manifest["metrics"].items() if k != "last_assignment"}
    paths["manifest"] = write_manifest(
        out_dir,
        STAGE,
        inputs=manifest["inputs"],
        outputs=_outputs(codebook_sizes),
        config=manifest["config"],
        metrics={**training_metrics, "last_assignment": metrics},
    )
    return SidResult(table, codebook_sizes, metrics, out_dir, tokenizer, paths)


def read_codebook_sizes(out_dir: Path) -> list[int]:
    """The vocabulary size of every SID level of a stage folder, disambiguation level last."""
    return [int(n) for n in read_manifest(out_dir)["outputs"]["codebook_sizes"]]


def _last_level(
    nearest: npt.NDArray[np.int32],
    last_residual: npt.NDArray[np.float32],
    tokenizer: SemanticIdTokenizer,
    item_ids: list[str],
    cfg: SidConfig,
    taken: dict[tuple[int, ...], set[int]] | None = None,
) -> npt.NDArray[np.int32]:
    """The SID prefix codes: nearest codes, last level made unique per group when configured."""
    if not cfg.unique_last_level or cfg.levels < 2:
        return nearest
    book = tokenizer.codebooks[-1].numpy()
    return unique_last_level(nearest, last_residual, book, item_ids, taken)


def _semantics_table(
    items: pa.Table, sid_codes: npt.NDArray[np.int32], vectors: npt.NDArray[np.float32]
) -> pa.Table:
    n, width = sid_codes.shape
    codes = pa.ListArray.from_arrays(
        pa.array(np.arange(n + 1, dtype=np.int32) * width), pa.array(sid_codes.ravel(), pa.int32())
    )
    return pa.Table.from_arrays(
        [
            items.column("item_id").cast(pa.string()),
            items.column("event_timestamp").cast(TIMESTAMP),
            codes,
            pa.array(format_sids(sid_codes), pa.string()),
            list_array(vectors),
        ],
        schema=ITEM_SEMANTICS_SCHEMA,
    )


def _codes_matrix(column: pa.ChunkedArray) -> npt.NDArray[np.int32]:
    if len(column) == 0:
        return np.zeros((0, 0), dtype=np.int32)
    return list_column_matrix(column).astype(np.int32)


def _changed_texts(items: pa.Table, out_dir: Path, manifest: dict[str, Any]) -> int | None:
    """How many of these (existing) items have a text other than the one they were encoded from.

    None when the encoder cache, which remembers the encoded texts' hashes, is gone.
    """
    path = out_dir / CACHE_FILE
    if not path.exists():
        return None
    cache = EmbeddingCache(path, manifest["inputs"]["encoder_id"])
    ids = items.column("item_id").to_pylist()
    texts = items.column("text").to_pylist()
    return sum(
        1
        for item_id, text in zip(ids, texts, strict=True)
        if cache.text_hash(item_id) not in (None, text_sha256(text))
    )


def _encoding_metrics(encoded: EncodedItems) -> dict[str, Any]:
    speed = encoded.items_per_second
    return {
        "encode_items_per_second": round(speed, 3) if speed is not None else None,
        "encode_seconds": round(encoded.encode_seconds, 3),
        "encoder_load_seconds": round(encoded.load_seconds, 3),
        "cache_hits": encoded.cache_hits,
        "cache_misses": encoded.cache_misses,
    }


def _write_outputs(
    out_dir: Path, table: pa.Table, tokenizer: SemanticIdTokenizer
) -> dict[str, Path]:
    codebooks, codebook_config = tokenizer.save(out_dir)
    return {
        "codebooks": codebooks,
        "codebooks_config": codebook_config,
        "item_semantics": write_table(table, out_dir / ITEM_SEMANTICS_FILE),
        "encoder_cache": out_dir / CACHE_FILE,
    }


def _outputs(codebook_sizes: list[int]) -> dict[str, Any]:
    return {
        "item_semantics": ITEM_SEMANTICS_FILE,
        "codebooks": CODEBOOKS_FILE,
        "codebooks_config": CODEBOOKS_CONFIG,
        "encoder_cache": CACHE_FILE,
        "codebook_sizes": codebook_sizes,
    }
