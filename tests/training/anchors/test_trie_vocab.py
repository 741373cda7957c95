from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from training.anchors.trie import SidTrie
from training.anchors.vocab import (
    SidVocab,
    SidVocabularyError,
    add_sid_tokens,
    build_compact_tokenizer,
    check_layout,
    format_sid,
    sid_token,
)


def test_sid_tokens_and_strings() -> None:
    assert sid_token(0, 12) == "<a_12>" and sid_token(3, 0) == "<d_0>"
    assert format_sid([12, 7, 201, 0]) == "<a_12><b_7><c_201><d_0>"


def test_compact_tokenizer_saves_and_loads(tmp_path) -> None:
    tok = build_compact_tokenizer([3, 2, 2])
    tok.save_pretrained(tmp_path)
    for loaded in (
        PreTrainedTokenizerFast.from_pretrained(tmp_path),
        AutoTokenizer.from_pretrained(tmp_path),
    ):
        assert loaded.get_vocab() == tok.get_vocab()
        ids = loaded("<bos><a_2><b_1><c_0>")["input_ids"]
        assert ids == loaded.convert_tokens_to_ids(["<bos>", "<a_2>", "<b_1>", "<c_0>"])
    vocab = SidVocab.from_tokenizer(tok, [3, 2, 2])
    assert [v.tolist() for v in vocab.level_token_ids] == [[4, 5, 6], [7, 8], [9, 10]]
    tokens = vocab.item_tokens(np.array([[2, 1, 0]]))
    assert vocab.encode(tokens) == [vocab.bos_id, 6, 8, 9]


def test_vocabulary_mismatch_is_a_clear_error() -> None:
    tok = build_compact_tokenizer([3, 2, 2])
    with pytest.raises(SidVocabularyError, match=r"sizes \[3, 2, 2\].*needs \[3, 2, 4\]"):
        check_layout(tok, [3, 2, 4])
    with pytest.raises(SidVocabularyError, match="needs"):
        add_sid_tokens(tok, [3, 2])  # a tokenizer tuned on another codebook
    vocab = SidVocab.from_tokenizer(tok, [3, 2, 2])
    with pytest.raises(SidVocabularyError, match="unknown to the tokenizer"):
        vocab.check_codes(np.array([[0, 0, 0], [2, 1, 3]]))
    with pytest.raises(SidVocabularyError, match="levels"):
        vocab.check_codes(np.array([[0, 0, 0, 0]]))


def test_trie_tables() -> None:
    codes = np.array([[0, 0, 0], [0, 1, 0], [2, 1, 0], [2, 1, 1]])
    trie = SidTrie(codes, [3, 2, 2])
    child, allowed = trie.tables(torch.device("cpu"))
    assert allowed[0][0].tolist() == [True, False, True]
    assert trie.allowed_codes([]) == [0, 2]
    assert trie.allowed_codes([2, 1]) == [0, 1]
    assert trie.allowed_codes([1]) == []
    # Walking the dense tables from the root ends at each item's own row.
    for item, row in enumerate(codes.tolist()):
        node = 0
        for lvl, code in enumerate(row):
            node = int(child[lvl][node, code])
        assert node == item == trie.item_of(row)
    assert trie.item_of([1, 0, 0]) == -1


def test_trie_rejects_duplicate_sids() -> None:
    with pytest.raises(ValueError, match="disambiguate"):
        SidTrie(np.array([[0, 1, 0], [0, 1, 0]]), [1, 2, 1])
