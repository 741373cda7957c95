"""The random-weight Qwen2 checkpoint for trying the LoRA path without downloads."""

from __future__ import annotations

import json

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.training.anchors.conftest import tiny_config, toy_codes
from training.anchors.base_checkpoint import EOS, QwenShape, main, save_random_checkpoint
from training.anchors.job import train_anchor_model
from training.anchors.model import ModelConfig, build_model, embedding_rows, load_anchor_model


def test_command_line_writes_a_loadable_checkpoint(tmp_path, capsys) -> None:
    texts = tmp_path / "texts.txt"
    texts.write_text("microscope slides and lab gloves\n\npipette tips, beakers\n")
    main([str(tmp_path / "base"), "--shape", "tiny", "--untied", "--texts", str(texts)])
    assert "random-weight Qwen2 checkpoint (tiny" in capsys.readouterr().out
    tok = AutoTokenizer.from_pretrained(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    assert tok.eos_token == EOS and model.config.eos_token_id == tok.eos_token_id
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 2
    assert not model.config.tie_word_embeddings
    assert tok.decode(tok("pipette tips")["input_ids"]) == "pipette tips"


def test_spare_embedding_rows_take_the_sid_tokens_without_a_resize(tmp_path) -> None:
    """Like Qwen's own checkpoints: more embedding rows than tokens."""
    shape = QwenShape(32, 1, 2, 1, 64, embedding_rows=640)
    base = save_random_checkpoint(tmp_path / "base", shape)
    assert json.loads((base / "config.json").read_text())["vocab_size"] == 640
    _, sizes = toy_codes(24)
    model, vocab = build_model(ModelConfig(base_model_path=str(base)), sizes)
    assert len(vocab.tokenizer) < 640
    assert embedding_rows(model.get_base_model()) == 640
    # Too few spare rows: resized to the next multiple of 64.
    small = save_random_checkpoint(tmp_path / "small", QwenShape(32, 1, 2, 1, 64, 302))
    model, vocab = build_model(ModelConfig(base_model_path=str(small)), sizes)
    rows = embedding_rows(model.get_base_model())
    assert rows >= len(vocab.tokenizer) and rows % 64 == 0


def test_unknown_shape_is_refused(tmp_path) -> None:
    with pytest.raises(KeyError):
        save_random_checkpoint(tmp_path / "x", "qwen-1000b")


def test_lora_path_trains_on_the_random_checkpoint(tmp_path, toy_data) -> None:
    semantics, positives, sizes = toy_data
    base = save_random_checkpoint(tmp_path / "base", "tiny")
    cfg = tiny_config(epochs=1, learning_rate=5e-3)
    cfg = cfg.model_copy(update={"model": ModelConfig(base_model_path=str(base), lora={"rank": 4})})
    train_anchor_model(semantics, positives, sizes, cfg, tmp_path / "m")
    loaded = load_anchor_model(tmp_path / "m", sizes)
    assert json.loads((tmp_path / "m" / "anchor_model.json").read_text())["kind"] == "lora"
    assert loaded.vocab.codebook_sizes == tuple(sizes)
