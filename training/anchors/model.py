"""The anchor language model: a compact Qwen2 built from config, or a local checkpoint + LoRA.

Two paths, picked by :attr:`ModelConfig.base_model_path`:

* **compact** (no checkpoint, the default): a small Qwen2-architecture causal LM
  (:class:`transformers.Qwen2Config`) over the SID vocabulary alone, trained fully from scratch.
* **pretrained + LoRA**: a local checkpoint directory (e.g. Qwen2.5-0.5B) whose tokenizer gets the
  SID tokens; its weights stay frozen except LoRA adapters on the attention and MLP projections
  and the new tokens' rows of the embedding and LM head. Those rows are trained with peft's
  ``trainable_token_indices`` rather than ``modules_to_save``: ``modules_to_save`` would copy and
  train the whole embedding and LM head (2 x 151k x 896 = 272M parameters for Qwen2.5-0.5B, plus
  their AdamW state) although only the ~800 SID rows need to move; ``trainable_token_indices``
  trains exactly those rows, follows tied embeddings (Qwen2.5-0.5B ties the LM head to the input
  embedding), and for an untied LM head is given the same rows of ``lm_head``.

A saved anchor model is a directory::

    model/              a plain Hugging Face causal LM + tokenizer (LoRA merged in): generation
                        loads only this
    adapter/            (LoRA path) the peft adapter, for inspection or further tuning
    anchor_model.json   codebook sizes, sequence format, base checkpoint, training metrics
    trained_sids.parquet  item_id -> sid the model was trained on (guards against re-trained SIDs)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, cast

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from training.anchors.errors import AnchorInputError
from training.anchors.vocab import (
    SidVocab,
    SidVocabularyError,
    add_sid_tokens,
    build_compact_tokenizer,
)

MODEL_SUBDIR: Final = "model"
ADAPTER_SUBDIR: Final = "adapter"
INFO_FILE: Final = "anchor_model.json"
FORMAT_VERSION: Final = 1


class LoraSettings(BaseModel):
    """LoRA settings of the pretrained-checkpoint path."""

    model_config = ConfigDict(extra="forbid")

    rank: int = Field(default=16, ge=1, description="LoRA rank r.")
    alpha: int = Field(default=32, gt=0, description="LoRA scaling alpha (update scale alpha/r).")
    dropout: float = Field(default=0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] = Field(
        default_factory=lambda: [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
        description="Module names that get LoRA adapters (Qwen2/Llama attention and MLP).",
    )


class CompactSettings(BaseModel):
    """Shape of the compact Qwen2 model trained from scratch."""

    model_config = ConfigDict(extra="forbid")

    hidden_size: int = Field(
        default=128,
        ge=8,
        description="Hidden size (a wider model measured no better on Amazon Scientific: "
        "docs/anchors.md).",
    )
    num_layers: int = Field(default=2, ge=1, description="Transformer layers.")
    num_heads: int = Field(default=4, ge=1, description="Attention heads.")
    num_kv_heads: int = Field(
        default=4, ge=1, description="Key/value heads (grouped-query attention when fewer)."
    )
    intermediate_size: int = Field(default=384, ge=8, description="MLP inner size.")
    max_position_embeddings: int = Field(
        default=1024,
        ge=16,
        description="Longest sequence; must hold the prefix, <bos> and (max_history + 1) items.",
    )
    rope_theta: float = Field(default=10000.0, gt=0, description="RoPE base.")
    attention_dropout: float = Field(default=0.1, ge=0, lt=1, description="Attention dropout.")
    hidden_dropout: float = Field(
        default=0.1,
        ge=0,
        lt=1,
        description="Dropout on the token embeddings and on every layer's output while training "
        "(Qwen2 itself has only attention dropout; on Amazon Scientific 0.1 lifted anchor HR@10 "
        "by ~9% over 0, two seeds; BENCHMARKS.md). Not part of the saved model: generation "
        "never drops.",
    )
    tie_word_embeddings: bool = Field(
        default=True, description="Share the input embedding with the LM head (fewer parameters)."
    )

    @model_validator(mode="after")
    def _heads_divide(self) -> CompactSettings:
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(
                "hidden_size must be a multiple of num_heads, num_heads of num_kv_heads"
            )
        if (self.hidden_size // self.num_heads) % 2:
            # Rotary position embeddings rotate pairs of dimensions.
            raise ValueError(
                f"hidden_size / num_heads = {self.hidden_size // self.num_heads}: the head size "
                "must be even (rotary position embeddings rotate pairs of dimensions)"
            )
        return self


class ModelConfig(BaseModel):
    """Which model the anchor stage trains."""

    model_config = ConfigDict(extra="forbid")

    base_model_path: str | None = Field(
        default=None,
        description="Local pretrained checkpoint directory (e.g. Qwen2.5-0.5B) to tune with LoRA; "
        "None builds the compact model from `compact`.",
    )
    text_prefix: str = Field(
        default="",
        description="Text put before <bos> in every sequence (pretrained path only), e.g. "
        "'Items the user liked:'.",
    )
    lora: LoraSettings = Field(default_factory=LoraSettings, description="LoRA settings.")
    compact: CompactSettings = Field(
        default_factory=CompactSettings, description="Compact model shape."
    )

    @model_validator(mode="after")
    def _prefix_needs_checkpoint(self) -> ModelConfig:
        if self.text_prefix and self.base_model_path is None:
            raise ValueError("text_prefix needs base_model_path: the compact model has no text")
        return self


def build_compact_model(settings: CompactSettings, vocab: SidVocab) -> PreTrainedModel:
    """A randomly initialized Qwen2 causal LM over ``vocab``'s tokenizer."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = vocab.tokenizer
    config = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=settings.hidden_size,
        intermediate_size=settings.intermediate_size,
        num_hidden_layers=settings.num_layers,
        num_attention_heads=settings.num_heads,
        num_key_value_heads=settings.num_kv_heads,
        max_position_embeddings=settings.max_position_embeddings,
        rope_parameters={"rope_theta": settings.rope_theta, "rope_type": "default"},
        attention_dropout=settings.attention_dropout,
        tie_word_embeddings=settings.tie_word_embeddings,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = Qwen2ForCausalLM(config)
    if settings.hidden_dropout > 0:
        add_hidden_dropout(model, settings.hidden_dropout)
    return model


class _OutputDropout:
    """Forward hook: dropout on a module's output, only in training mode."""

    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        return nn.functional.dropout(output, self.p, module.training)


def add_hidden_dropout(model: PreTrainedModel, p: float) -> None:
    """Drop ``p`` of the token embeddings and of each decoder layer's output while training.

    Hooks rather than a subclass keep the model a plain ``Qwen2ForCausalLM``: it saves, loads and
    generates like any other, and a reloaded copy (generation) simply has no dropout.
    """
    inner = model.get_decoder()
    hook = _OutputDropout(p)
    inner.embed_tokens.register_forward_hook(hook)
    for layer in inner.layers:
        layer.register_forward_hook(hook)


def _init_new_rows(model: PreTrainedModel, token_ids: Sequence[int], seed: int) -> None:
    """Initialize new tokens' embedding (and untied LM head) rows near the old rows' mean.

    Rows drawn from the old rows' per-dimension mean and standard deviation look like ordinary
    tokens to the pretrained layers, so the first steps do not see out-of-distribution inputs.
    """
    if not token_ids:
        return
    ids = torch.as_tensor(sorted(token_ids))
    gen = torch.Generator().manual_seed(seed)
    modules = [model.get_input_embeddings()]
    head = model.get_output_embeddings()
    if head is not None and head.weight is not modules[0].weight:
        modules.append(head)
    with torch.no_grad():
        for module in modules:
            weight = cast(torch.Tensor, module.weight)
            # Added tokens are appended, so the rows before the first one are the original vocab.
            ref = weight[: int(ids[0])].float()
            noise = torch.randn((len(ids), weight.shape[1]), generator=gen)
            rows = ref.mean(0) + noise * ref.std(0)
            weight[ids] = rows.to(weight.dtype)  # in place: tied heads share this tensor


def build_lora_model(
    cfg: ModelConfig, codebook_sizes: Sequence[int], seed: int = 0
) -> tuple[nn.Module, SidVocab]:
    """Load ``cfg.base_model_path``, add the SID tokens, and wrap it with LoRA.

    Raises:
        SidVocabularyError: when the checkpoint's tokenizer already holds SID tokens of another
            codebook.
    """
    from peft import LoraConfig, get_peft_model

    assert cfg.base_model_path is not None
    path = Path(cfg.base_model_path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: base_model_path must be a local checkpoint directory")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as exc:  # no tokenizer or weights, unknown model type
        raise AnchorInputError(
            f"{path}: not a usable Hugging Face checkpoint (a causal LM with its tokenizer, "
            f"e.g. written by `python -m training.anchors.base_checkpoint DIR`): "
            f"{' '.join(str(exc).split())[:300]}"
        ) from exc
    new_ids = add_sid_tokens(tokenizer, codebook_sizes)
    vocab = SidVocab.from_tokenizer(tokenizer, codebook_sizes, cfg.text_prefix)
    # (The model was loaded above in float32: master weights; training autocasts to bf16 on GPU.)
    if len(tokenizer) > embedding_rows(model):
        # Multiples of 64 keep the LM head's matrix shapes tensor-core friendly.
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64, mean_resizing=False)
    _init_new_rows(model, new_ids, seed)
    for name, tid in (("bos", tokenizer.bos_token_id), ("pad", tokenizer.pad_token_id)):
        setattr(model.config, f"{name}_token_id", tid)
        if model.generation_config is not None:
            setattr(model.generation_config, f"{name}_token_id", tid)
    trainable = sorted(
        {*new_ids, *(int(i) for ids in vocab.level_token_ids for i in ids), vocab.bos_id}
    )
    tied = model.get_output_embeddings() is None or (
        model.get_output_embeddings().weight is model.get_input_embeddings().weight
    )
    token_targets = {"embed_tokens": trainable}
    if not tied:
        # An untied head has its own rows for the SID tokens: train them too.
        token_targets["lm_head"] = trainable
    lora = LoraConfig(
        r=cfg.lora.rank,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=list(cfg.lora.target_modules),
        trainable_token_indices=token_targets,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora), vocab


def build_model(
    cfg: ModelConfig, codebook_sizes: Sequence[int], seed: int = 0
) -> tuple[nn.Module, SidVocab]:
    """The trainable anchor model and its vocabulary, for either path (seeded init)."""
    torch.manual_seed(seed)
    if cfg.base_model_path is not None:
        return build_lora_model(cfg, codebook_sizes, seed)
    vocab = SidVocab.from_tokenizer(build_compact_tokenizer(codebook_sizes), codebook_sizes)
    return build_compact_model(cfg.compact, vocab), vocab


def causal_lm(model: nn.Module) -> PreTrainedModel:
    """The Hugging Face causal LM inside ``model`` (a peft wrapper's base model, LoRA layers in)."""
    get_base = getattr(model, "get_base_model", None)
    inner = get_base() if callable(get_base) else model
    if not isinstance(inner, PreTrainedModel):
        raise TypeError(f"expected a Hugging Face causal LM, got {type(inner).__name__}")
    return inner


def is_peft(model: nn.Module) -> bool:
    """Whether ``model`` is a peft wrapper."""
    return callable(getattr(model, "merge_and_unload", None))


def _save_adapter(model: nn.Module, target: Path) -> None:
    # The SID tokens resized the embeddings and they train with the adapter, so they are part
    # of it: said explicitly (peft would infer it, with a warning on every save).
    cast(Any, model).save_pretrained(target, save_embedding_layers=True)


def save_checkpoint(model: nn.Module, vocab: SidVocab, out_dir: Path) -> None:
    """Save the trainable state: the adapter for LoRA, the full model for the compact path."""
    if is_peft(model):
        _save_adapter(model, out_dir / ADAPTER_SUBDIR)
        return
    cast(Any, model).save_pretrained(out_dir / MODEL_SUBDIR)
    vocab.tokenizer.save_pretrained(out_dir / MODEL_SUBDIR)


def save_anchor_model(
    model: nn.Module, vocab: SidVocab, out_dir: Path, info: dict[str, Any]
) -> PreTrainedModel:
    """Save the model for generation: LoRA merged into a plain checkpoint under ``out_dir/model``.

    Args:
        model: The trained model (peft wrapper or compact model). A peft wrapper is merged in
            place and must not be trained further.
        vocab: Its vocabulary.
        out_dir: The anchor model directory.
        info: Extra entries for ``anchor_model.json`` (base checkpoint, metrics).

    Returns:
        The plain (merged) causal LM.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    if is_peft(model):
        _save_adapter(model, out_dir / ADAPTER_SUBDIR)
        merged = cast(Any, model).merge_and_unload()
    else:
        merged = model
    assert isinstance(merged, PreTrainedModel)
    merged.save_pretrained(out_dir / MODEL_SUBDIR)
    vocab.tokenizer.save_pretrained(out_dir / MODEL_SUBDIR)
    payload = {
        "format_version": FORMAT_VERSION,
        "codebook_sizes": list(vocab.codebook_sizes),
        "text_prefix": vocab.text_prefix,
        "kind": "lora" if is_peft(model) else "compact",
        **info,
    }
    (out_dir / INFO_FILE).write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return merged


@dataclass
class LoadedAnchorModel:
    """A saved anchor model ready for generation."""

    model: PreTrainedModel
    vocab: SidVocab
    info: dict[str, Any]


def read_info(model_dir: Path) -> dict[str, Any]:
    """``anchor_model.json`` of a saved anchor model."""
    path = model_dir / INFO_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: not an anchor model directory; train the model first")
    info: dict[str, Any] = json.loads(path.read_text())
    return info


def load_anchor_model(
    model_dir: Path,
    codebook_sizes: Sequence[int] | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> LoadedAnchorModel:
    """Load a saved anchor model (merged) for generation.

    Args:
        model_dir: Directory written by :func:`save_anchor_model`.
        codebook_sizes: When given, the codebook the caller's SIDs use; must equal the model's.
        device: Where to put the model.
        dtype: Parameter dtype (bfloat16 halves memory and time on GPU).

    Raises:
        SidVocabularyError: when the checkpoint's vocabulary does not match ``codebook_sizes``
            or its embedding matrix is smaller than its tokenizer.
    """
    info = read_info(model_dir)
    sizes = list(info["codebook_sizes"])
    if codebook_sizes is not None and list(codebook_sizes) != sizes:
        raise SidVocabularyError(
            f"anchor model {model_dir} was trained for SID codebook sizes {sizes}, but these SIDs "
            f"use {list(codebook_sizes)}: retrain the anchor model on these SIDs"
        )
    tokenizer = _load_tokenizer(model_dir / MODEL_SUBDIR, info)
    vocab = SidVocab.from_tokenizer(tokenizer, sizes, info.get("text_prefix", ""))
    model = AutoModelForCausalLM.from_pretrained(model_dir / MODEL_SUBDIR, dtype=dtype)
    check_embedding_rows(model, vocab)
    cast(Any, model).to(device).eval()
    return LoadedAnchorModel(model=model, vocab=vocab, info=info)


def _load_tokenizer(path: Path, info: dict[str, Any]) -> PreTrainedTokenizerBase:
    """The saved tokenizer; the compact one as the exact WordLevel tokenizer that was built.

    ``AutoTokenizer`` would pick the tokenizer class from the model type (Qwen2) and could rebuild
    a compact tokenizer with Qwen2's pre-tokenizer; the compact path loads the saved
    ``tokenizer.json`` as it is.
    """
    if info.get("kind") == "compact":
        return PreTrainedTokenizerFast.from_pretrained(path)
    tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(path)
    return tokenizer


def embedding_rows(model: PreTrainedModel) -> int:
    """Rows of the model's input embedding matrix."""
    return int(cast(nn.Embedding, model.get_input_embeddings()).weight.shape[0])


def check_embedding_rows(model: PreTrainedModel, vocab: SidVocab) -> None:
    """Raise :class:`SidVocabularyError` when the model has no embedding row for some SID token."""
    rows = embedding_rows(model)
    top = max(int(ids.max()) for ids in vocab.level_token_ids)
    if top >= rows:
        raise SidVocabularyError(
            f"checkpoint has {rows} embedding rows but its tokenizer's SID tokens reach id {top}: "
            "the tokenizer and weights come from different models"
        )


def load_lora_adapter(model_dir: Path) -> nn.Module:
    """Rebuild the unmerged peft model (base checkpoint + saved adapter) of a LoRA anchor model."""
    from peft import PeftModel

    info = read_info(model_dir)
    if info.get("kind") != "lora":
        raise AnchorInputError(f"{model_dir} holds a compact model, not a LoRA adapter")
    tokenizer = _load_tokenizer(model_dir / MODEL_SUBDIR, info)
    base = AutoModelForCausalLM.from_pretrained(info["base_model_path"], dtype=torch.float32)
    if len(tokenizer) > embedding_rows(base):
        base.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64, mean_resizing=False)
    return PeftModel.from_pretrained(base, model_dir / ADAPTER_SUBDIR)


TRAINED_SIDS_FILE: Final = "trained_sids.parquet"


MEMBERS_SUBDIR: Final = "members"
"""Where an ensemble's further members live inside the first member's model directory."""


def member_dir(model_dir: Path, k: int) -> Path:
    """Directory of ensemble member ``k`` (member 0 is ``model_dir`` itself)."""
    return model_dir if k == 0 else model_dir / MEMBERS_SUBDIR / str(k)


def ensemble_dirs(model_dir: Path) -> list[Path]:
    """Every member's model directory: ``model_dir``, then those its ``anchor_model.json`` lists.

    Raises:
        FileNotFoundError: when ``model_dir`` is not an anchor model or a listed member is gone.
    """
    members = [model_dir / rel for rel in read_info(model_dir).get("ensemble_members", [])]
    for d in members:
        if not (d / INFO_FILE).exists():
            raise FileNotFoundError(
                f"{d}: ensemble member listed in {model_dir / INFO_FILE} is missing; copy the "
                "whole model directory, or retrain"
            )
    return [model_dir, *members]


def update_info(model_dir: Path, entries: dict[str, Any]) -> None:
    """Add ``entries`` to a saved model's ``anchor_model.json``."""
    info = read_info(model_dir)
    info.update(entries)
    (model_dir / INFO_FILE).write_text(json.dumps(info, indent=2, default=str) + "\n")


def write_trained_sids(model_dir: Path, item_ids: Sequence[str], sids: Sequence[str]) -> None:
    """Record which SID each item had when the model was trained."""
    import pyarrow as pa

    from training.io import write_table

    table = pa.table(
        {"item_id": pa.array(item_ids, pa.string()), "sid": pa.array(sids, pa.string())}
    )
    write_table(table, model_dir / TRAINED_SIDS_FILE)


def check_trained_sids(model_dir: Path, item_ids: Sequence[str], sids: Sequence[str]) -> None:
    """Refuse SIDs that were re-trained after the model: an item whose SID changed.

    New items (unknown at training time) are fine: their SIDs use the same codebook. An item
    whose SID *changed* means the SID stage was re-run, and the model's tokens now mean other
    things.

    Raises:
        SidVocabularyError: naming how many items changed their SID, with an example.
    """
    import pyarrow.parquet as pq

    path = model_dir / TRAINED_SIDS_FILE
    if not path.exists():
        return
    trained = dict(
        zip(*(pq.read_table(path).column(c).to_pylist() for c in ("item_id", "sid")), strict=True)
    )
    changed = [
        (i, trained[i], s)
        for i, s in zip(item_ids, sids, strict=True)
        if i in trained and trained[i] != s
    ]
    if changed:
        item, old, new = changed[0]
        raise SidVocabularyError(
            f"{len(changed)} items have other SIDs than when anchor model {model_dir} was trained "
            f"(e.g. {item}: {old} -> {new}): the SIDs were re-trained; retrain the anchor model"
        )
