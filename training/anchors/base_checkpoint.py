"""A randomly initialized Qwen2 checkpoint + tokenizer, for trying the LoRA path offline.

The anchor LM's second path (``model.base_model_path``) tunes a local pretrained checkpoint with
LoRA. Where no checkpoint can be downloaded (CI, an air-gapped trial, these benchmarks), this
writes a directory that loads exactly like a downloaded one: a ``Qwen2ForCausalLM`` with random
weights and a byte-level BPE tokenizer with an end-of-text token, so the whole path (SID tokens
added to the tokenizer, embeddings resized, LoRA + trainable token rows, merge, save, reload,
generation) runs for real. It has **no pretrained knowledge**: what it learns comes from the LoRA
adapters and the SID rows on top of a random frozen network, so its anchors say nothing about a
real Qwen2.5's quality. Shapes:

* ``tiny``: 32 wide, 2 layers (tests, CPU smoke runs);
* ``qwen2.5-0.5b``: Qwen2.5-0.5B's shape (896 wide, 24 layers, 14 query / 2 key-value heads,
  MLP 4864, RoPE base 1e6, tied embeddings, 151,936 embedding rows), ~494M parameters.

    python -m training.anchors.base_checkpoint --shape tiny /tmp/base-tiny
    gpl anchors train --base-model /tmp/base-tiny
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

import torch

if TYPE_CHECKING:
    from transformers import Qwen2Config

EOS: Final = "<|endoftext|>"
# A few sentences for the BPE merges: the tokenizer only has to encode a text prefix.
DEFAULT_TEXTS: Final = (
    "items the user liked are listed here",
    "Items the user liked: a sequence of products, films and books in the order they were taken.",
    "The next item the user will like is",
)


@dataclass(frozen=True)
class QwenShape:
    """Shape of a Qwen2 checkpoint."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    embedding_rows: int
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096

    def config(
        self,
        vocab_size: int,
        tie_word_embeddings: bool = True,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
    ) -> Qwen2Config:
        """A ``Qwen2Config`` of this shape with ``vocab_size`` embedding rows and these tokens."""
        from transformers import Qwen2Config

        return Qwen2Config(
            vocab_size=vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            intermediate_size=self.intermediate_size,
            max_position_embeddings=self.max_position_embeddings,
            rope_parameters={"rope_theta": self.rope_theta, "rope_type": "default"},
            tie_word_embeddings=tie_word_embeddings,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
        )


SHAPES: Final[dict[str, QwenShape]] = {
    "tiny": QwenShape(32, 2, 2, 2, 64, embedding_rows=0),
    "qwen2.5-0.5b": QwenShape(
        896, 24, 14, 2, 4864, embedding_rows=151_936, rope_theta=1e6, max_position_embeddings=32768
    ),
}


def save_random_checkpoint(
    path: Path,
    shape: QwenShape | str = "tiny",
    tie_word_embeddings: bool = True,
    texts: Iterable[str] = DEFAULT_TEXTS,
    tokenizer_vocab: int = 300,
    seed: int = 0,
) -> Path:
    """Write a random-weight Qwen2 causal LM and a byte-level BPE tokenizer to ``path``.

    Args:
        path: Directory to write (created).
        shape: A :data:`SHAPES` name or a :class:`QwenShape`.
        tie_word_embeddings: Whether the LM head shares the input embedding (Qwen2.5-0.5B does;
            untied exercises the LM head's own SID rows).
        texts: Text the BPE merges are learned from.
        tokenizer_vocab: BPE vocabulary size (bytes and merges, plus the end-of-text token).
        seed: Weight initialization seed.

    Returns:
        ``path``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2ForCausalLM

    dims = SHAPES[shape] if isinstance(shape, str) else shape
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=tokenizer_vocab,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts) * 5, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS)
    path.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(path)
    # Like Qwen's own checkpoints, the embedding may hold more rows than the tokenizer has
    # tokens (151,936 rows for ~151.6k tokens). Here the tokenizer is tiny, so the SID tokens fit
    # in spare rows; the real checkpoint's 271 spare rows are too few for a default codebook, and
    # the loader resizes.
    config = dims.config(
        max(len(fast), dims.embedding_rows), tie_word_embeddings, eos_token_id=fast.eos_token_id
    )
    torch.manual_seed(seed)
    Qwen2ForCausalLM(config).save_pretrained(path)
    return path


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: ``python -m training.anchors.base_checkpoint [--shape S] OUT``."""
    parser = argparse.ArgumentParser(
        prog="python -m training.anchors.base_checkpoint",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("out", type=Path, help="checkpoint directory to write")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--untied", action="store_true", help="an LM head of its own")
    parser.add_argument(
        "--texts",
        type=Path,
        default=None,
        help="text file (one text per line) to learn the BPE merges from; default: a few "
        "built-in sentences",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    texts: Iterable[str] = DEFAULT_TEXTS
    if args.texts is not None:
        texts = [line for line in args.texts.read_text().splitlines() if line.strip()]
    out = save_random_checkpoint(args.out, args.shape, not args.untied, texts=texts, seed=args.seed)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors")) / 2**20
    print(f"random-weight Qwen2 checkpoint ({args.shape}, {size:,.1f} MiB of weights) -> {out}")


if __name__ == "__main__":
    main()
