"""Small SID fixtures built in code: a tiny BERT encoder directory and clustered catalogs."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from tests.factories import T0
from training.data.contract import conform
from training.sids.config import SidConfig
from training.sids.encoder import EncoderConfig

WORDS = [f"w{i}" for i in range(60)]


def build_tiny_bert(directory: Path, seed: int = 0) -> Path:
    """A 2-layer, 32-wide BERT with a word-level tokenizer, saved as a Hugging Face folder."""
    import torch
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    vocab = {tok: i for i, tok in enumerate(specials + WORDS)}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        model_max_length=64,
    )
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    model = BertModel(config)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    fast.save_pretrained(directory)
    return directory


def clustered(
    n: int, *, clusters: int, dim: int, seed: int, spread: float = 0.15
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """Unit vectors around ``clusters`` random centres (gaussian noise of scale ``spread``)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = rng.integers(0, clusters, n)
    x = centres[labels] + spread * rng.standard_normal((n, dim)) / np.sqrt(dim)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), labels


def make_catalog(
    n: int, *, seed: int = 0, dim: int = 16, start: int = 0, clusters: int = 12
) -> pa.Table:
    """Items whose text draws words by topic and whose content_embedding is clustered."""
    rng = np.random.default_rng(seed)
    x, labels = clustered(n, clusters=clusters, dim=dim, seed=seed)
    texts = []
    for label in labels:
        topic = WORDS[int(label) * 4 : int(label) * 4 + 4]
        words = rng.choice(topic + WORDS, size=8)
        texts.append(" ".join(words))
    return conform(
        pa.table(
            {
                "item_id": [f"i{start + k:04d}" for k in range(n)],
                "text": texts,
                "event_timestamp": pa.array(
                    [T0 + timedelta(hours=k) for k in range(n)], pa.timestamp("us", tz="UTC")
                ),
                "content_embedding": pa.array(x.tolist(), pa.list_(pa.float32())),
            }
        ),
        "items",
    )


def tiny_config(model_path: Path, **overrides: object) -> SidConfig:
    """A SID config small enough for unit tests (seconds on two cores)."""
    values: dict[str, object] = {
        "levels": 3,
        "codebook_size": 16,
        "code_dim": 8,
        "hidden_dims": (32,),
        "epochs": 3,
        "batch_size": 64,
        "kmeans_iters": 10,
        "show_progress": False,
        "encoder": EncoderConfig(model_path=str(model_path), batch_size=64, device="cpu"),
    }
    values.update(overrides)
    return SidConfig.model_validate(values)
