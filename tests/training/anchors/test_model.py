from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.training.anchors.conftest import tiny_config, toy_codes
from training.anchors.base_checkpoint import save_random_checkpoint
from training.anchors.job import AnchorConfig, generate_anchors, train_anchor_model
from training.anchors.model import (
    ModelConfig,
    build_model,
    load_anchor_model,
    load_lora_adapter,
)
from training.anchors.vocab import SidVocabularyError, add_sid_tokens, format_sid


@pytest.mark.parametrize("tie", [True, False])
def test_lora_train_merge_and_reload(tmp_path, toy_data, trained_compact, tie: bool) -> None:
    semantics, positives, sizes = toy_data
    base = save_random_checkpoint(tmp_path / "base", "tiny", tie_word_embeddings=tie)
    base_weights = AutoModelForCausalLM.from_pretrained(base).state_dict()
    cfg = tiny_config(epochs=2, learning_rate=5e-3)
    cfg = cfg.model_copy(
        update={
            "model": ModelConfig.model_validate(
                {
                    "base_model_path": str(base),
                    "text_prefix": "items the user liked",
                    "lora": {"rank": 4},
                }
            )
        }
    )
    result = train_anchor_model(semantics, positives, sizes, cfg, tmp_path / "m")
    # Counted on the LoRA wrapper before the merge: the adapter and the new token rows train.
    assert 0 < result.metrics["trainable_parameters"] < result.metrics["parameters"]
    info = json.loads((tmp_path / "m" / "anchor_model.json").read_text())
    assert info["kind"] == "lora" and info["text_prefix"] == "items the user liked"

    merged = load_anchor_model(tmp_path / "m", sizes)
    adapter = load_lora_adapter(tmp_path / "m").eval()
    codes = semantics.column("sid_codes").to_pylist()
    ids = torch.tensor([merged.vocab.encode(merged.vocab.item_tokens(np.array(codes[:3])))])
    assert merged.vocab.prefix_ids and ids[0, 0].item() == merged.vocab.prefix_ids[0]
    with torch.no_grad():
        np.testing.assert_allclose(
            merged.model(input_ids=ids).logits.numpy(),
            adapter(input_ids=ids).logits.numpy(),
            atol=1e-5,
        )
    # The pretrained weights outside the new tokens' rows are untouched by the merge ... except
    # where LoRA adds its low-rank update (the attention/MLP projections).
    tuned = merged.model.state_dict()
    emb = "model.embed_tokens.weight"
    n_old = base_weights[emb].shape[0]
    torch.testing.assert_close(tuned[emb][:n_old], base_weights[emb])
    assert not torch.equal(tuned[emb][merged.vocab.level_token_ids[0]], torch.zeros(1))
    torch.testing.assert_close(tuned["model.norm.weight"], base_weights["model.norm.weight"])
    assert not torch.allclose(
        tuned["model.layers.0.self_attn.q_proj.weight"],
        base_weights["model.layers.0.self_attn.q_proj.weight"],
    )
    # And the merged model generates valid anchors through the job.
    cutoffs = [positives.column("event_timestamp").to_pylist()[-1]]
    out = generate_anchors(semantics, positives, cutoffs, tmp_path / "m", cfg, tmp_path / "anchors")
    assert out.table.num_rows > 0
    valid = set(semantics.column("sid").to_pylist())
    assert all(s in valid for row in out.table.column("anchor_sids").to_pylist() for s in row)
    # Its tokens are not the compact model's: the two cannot decode as an ensemble.
    assert not merged.vocab.same_sequences(load_anchor_model(trained_compact.model_dir).vocab)
    with pytest.raises(SidVocabularyError, match="tokenize SIDs differently"):
        generate_anchors(
            semantics,
            positives,
            cutoffs,
            [trained_compact.model_dir, tmp_path / "m"],
            cfg,
            tmp_path / "mixed",
        )


def test_checkpoint_vocabulary_mismatch(tmp_path, toy_data, trained_compact) -> None:
    semantics, positives, sizes = toy_data
    model_dir = trained_compact.model_dir
    # Loading for another codebook.
    with pytest.raises(SidVocabularyError, match="retrain"):
        load_anchor_model(model_dir, [*sizes[:2], sizes[2] + 3])
    # SIDs with a code the tokenizer does not know.
    codes, _ = toy_codes(24)
    codes[0, 1] = sizes[1] + 5
    bad = semantics.set_column(
        semantics.schema.get_field_index("sid_codes"),
        "sid_codes",
        pa.array(codes.tolist(), pa.list_(pa.int32())),
    ).set_column(
        semantics.schema.get_field_index("sid"),
        "sid",
        pa.array([format_sid(c) for c in codes.tolist()]),
    )
    cutoffs = [positives.column("event_timestamp").to_pylist()[-1]]
    with pytest.raises(SidVocabularyError, match="unknown to the tokenizer"):
        generate_anchors(bad, positives, cutoffs, model_dir, tiny_config(), tmp_path / "a")
    # SIDs re-trained since the model (same codebook, items moved).
    shuffled = semantics.set_column(
        semantics.schema.get_field_index("sid"),
        "sid",
        pa.array(semantics.column("sid").to_pylist()[::-1]),
    )
    with pytest.raises(SidVocabularyError, match="re-trained"):
        generate_anchors(shuffled, positives, cutoffs, model_dir, tiny_config(), tmp_path / "a")
    # A pretrained checkpoint whose tokenizer already holds another SID codebook.
    base = save_random_checkpoint(tmp_path / "base", "tiny")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    add_sid_tokens(tok, [2, 2])
    tok.save_pretrained(base)
    with pytest.raises(SidVocabularyError, match="needs"):
        build_model(ModelConfig(base_model_path=str(base)), sizes)


def test_config_rejects_unknown_fields_and_bad_combinations() -> None:
    with pytest.raises(ValueError):
        AnchorConfig.model_validate({"training": {"epoch": 3}})
    with pytest.raises(ValueError, match="text_prefix"):
        ModelConfig(text_prefix="hello")
    with pytest.raises(ValueError, match="num_anchors"):
        AnchorConfig.model_validate({"generation": {"beam_width": 5, "num_anchors": 10}})
    # Head size 9: divides, but rotary embeddings rotate pairs (it crashed at the first forward).
    with pytest.raises(ValueError, match="head size must be even"):
        AnchorConfig.model_validate(
            {"model": {"compact": {"hidden_size": 36, "num_heads": 4, "num_kv_heads": 4}}}
        )
    for section in ("training", "generation"):
        with pytest.raises(ValueError, match="device 'gpu': expected 'auto' or a torch device"):
            AnchorConfig.model_validate({section: {"device": "gpu"}})
        assert AnchorConfig.model_validate({section: {"device": "cuda:1"}})
    cfg = AnchorConfig()
    assert cfg.generation.beam_width == 20 and cfg.generation.num_anchors == 10
    assert all(f.description for f in AnchorConfig.model_fields.values())


def test_hidden_dropout_drops_while_training_only_and_is_not_saved(tmp_path) -> None:
    codes, sizes = toy_codes(24)
    compact = {**tiny_config().model.compact.model_dump(), "attention_dropout": 0.0}
    plain, vocab = build_model(
        ModelConfig.model_validate({"compact": {**compact, "hidden_dropout": 0.0}}), sizes
    )
    ids = torch.tensor([vocab.encode(vocab.item_tokens(codes[:3]))])
    plain.train()
    assert torch.equal(plain(input_ids=ids).logits, plain(input_ids=ids).logits)
    cfg = ModelConfig.model_validate({"compact": {**compact, "hidden_dropout": 0.5}})
    model, _ = build_model(cfg, sizes, seed=0)
    model.train()
    assert not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)
    model.eval()
    with torch.no_grad():
        before = model(input_ids=ids).logits
        assert torch.equal(before, model(input_ids=ids).logits)
    model.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    # The reloaded model is a plain Qwen2 (what generation loads): same weights, no hooks.
    assert not reloaded.get_decoder().layers[0]._forward_hooks
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, before)
