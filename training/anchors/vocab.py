"""SID tokens in a tokenizer, and the token sequence format of the anchor model.

Every (level, code) pair of the SID codebook is one token, ``<a_12>`` for code 12 of level 0,
``<b_7>`` for code 7 of level 1, and so on (letters ``a``..``z``); an item is ``n_levels`` tokens.
A sequence is::

    [text prefix tokens] <bos> item_1 tokens ... item_n tokens [target item tokens]

* The text prefix is empty for the compact model (it has no natural language); for a pretrained
  checkpoint a short prompt such as ``"Items the user liked:"`` can help it use what it knows.
* There is no ``<eos>`` after the target: decoding is constrained to the trie of real SIDs, which
  fixes the length at ``n_levels`` tokens, so an end token would be trained for nothing.
* Generation is the same sequence without the target: the prompt ends after the last history
  item, and the model continues with the next item's ``n_levels`` tokens.

For the compact model the tokenizer is built here (a ``tokenizers`` WordLevel model holding the
special tokens, wrapped as :class:`transformers.PreTrainedTokenizerFast`), so it saves and loads
with ``save_pretrained`` / ``AutoTokenizer.from_pretrained`` like any Hugging Face tokenizer.
For a pretrained checkpoint the SID tokens are added to its own tokenizer as special tokens.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

import numpy as np
import numpy.typing as npt
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from training.anchors.errors import AnchorInputError

LEVEL_LETTERS: Final = string.ascii_lowercase
SID_TOKEN_RE: Final = re.compile(r"^<([a-z])_(\d+)>$")
PAD: Final = "<pad>"
BOS: Final = "<bos>"
EOS: Final = "<eos>"
UNK: Final = "<unk>"


class SidVocabularyError(AnchorInputError):
    """A tokenizer or checkpoint does not match the SID codebook it is used with."""


def sid_token(level: int, code: int) -> str:
    """The token of ``code`` at SID ``level`` (0-based), e.g. ``sid_token(1, 7) == "<b_7>"``."""
    if not 0 <= level < len(LEVEL_LETTERS):
        raise SidVocabularyError(f"SID level {level} out of range: at most 26 levels (a..z)")
    return f"<{LEVEL_LETTERS[level]}_{code}>"


def sid_tokens(codebook_sizes: Sequence[int]) -> list[str]:
    """All SID tokens of a codebook, level by level."""
    return [sid_token(lvl, c) for lvl, size in enumerate(codebook_sizes) for c in range(size)]


def format_sid(codes: Sequence[int]) -> str:
    """The SID string of one item's codes, e.g. ``[12, 7, 201, 0] -> "<a_12><b_7><c_201><d_0>"``."""
    return "".join(sid_token(lvl, int(c)) for lvl, c in enumerate(codes))


def _sid_layout(tokenizer: PreTrainedTokenizerBase) -> dict[int, set[int]]:
    """The SID tokens a tokenizer already holds: level -> set of codes."""
    layout: dict[int, set[int]] = {}
    for token in tokenizer.get_vocab():
        m = SID_TOKEN_RE.match(token)
        if m:
            layout.setdefault(LEVEL_LETTERS.index(m.group(1)), set()).add(int(m.group(2)))
    return layout


def _layout_sizes(layout: dict[int, set[int]]) -> list[int]:
    return [max(layout.get(lvl, {-1})) + 1 for lvl in range(max(layout, default=-1) + 1)]


def check_layout(tokenizer: PreTrainedTokenizerBase, codebook_sizes: Sequence[int]) -> None:
    """Raise :class:`SidVocabularyError` unless the tokenizer holds exactly the codebook's tokens.

    Exactly means: ``len(codebook_sizes)`` levels, level ``l`` with codes ``0..size_l - 1``, no
    other SID-like token.
    """
    layout = _sid_layout(tokenizer)
    expected = {lvl: set(range(size)) for lvl, size in enumerate(codebook_sizes)}
    if layout != expected:
        raise SidVocabularyError(
            f"tokenizer SID vocabulary has per-level sizes {_layout_sizes(layout)}, but the SID "
            f"codebook needs {list(codebook_sizes)}: the model was trained on other Semantic IDs; "
            "retrain the anchor model on these SIDs (or use the SIDs it was trained on)"
        )


def build_compact_tokenizer(codebook_sizes: Sequence[int]) -> PreTrainedTokenizerFast:
    """A tokenizer with only ``<pad> <bos> <eos> <unk>`` and the SID tokens, ids in that order."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    specials = [PAD, BOS, EOS, UNK]
    sids = sid_tokens(codebook_sizes)
    vocab = {tok: i for i, tok in enumerate(specials + sids)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    # Split "<a_1><b_2>" into its bracketed tokens; anything else becomes <unk>.
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(r"<[^<>]*>"), "isolated")]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK
    )
    # Special tokens are never split or normalized, and `skip_special_tokens` drops them.
    tokenizer.add_tokens(sids, special_tokens=True)
    return tokenizer


def add_sid_tokens(tokenizer: PreTrainedTokenizerBase, codebook_sizes: Sequence[int]) -> list[int]:
    """Add the SID tokens (and ``<bos>``/``<pad>`` where missing) to a pretrained tokenizer.

    A tokenizer that already holds exactly this codebook's SID tokens (a checkpoint tuned on the
    same SIDs) is left as it is.

    Returns:
        The ids of the tokens added (their embeddings are new and must be trained).

    Raises:
        SidVocabularyError: when the tokenizer already holds SID tokens of another codebook.
    """
    if _sid_layout(tokenizer):
        check_layout(tokenizer, codebook_sizes)
        return []
    before = len(tokenizer)
    tokenizer.add_tokens(sid_tokens(codebook_sizes), special_tokens=True)
    if tokenizer.bos_token is None:
        tokenizer.add_special_tokens({"bos_token": BOS})
    if tokenizer.pad_token is None:
        # Padding is always masked out, so any existing token would do; eos is the usual choice.
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        else:
            tokenizer.add_special_tokens({"pad_token": PAD})
    return list(range(before, len(tokenizer)))


@dataclass(frozen=True)
class SidVocab:
    """A tokenizer that holds a SID codebook, and the sequence format over it.

    Attributes:
        tokenizer: The Hugging Face tokenizer (saved with the model).
        codebook_sizes: Codes per SID level, the disambiguation level included.
        level_token_ids: Per level, the token id of each code, shape ``[size_l]``.
        bos_id: Token that starts the item sequence.
        pad_id: Padding token (always masked).
        text_prefix: Text put before ``<bos>`` (empty for the compact model).
        prefix_ids: The text prefix's token ids.
    """

    tokenizer: PreTrainedTokenizerBase
    codebook_sizes: tuple[int, ...]
    level_token_ids: tuple[npt.NDArray[np.int64], ...]
    bos_id: int
    pad_id: int
    text_prefix: str = ""
    prefix_ids: tuple[int, ...] = field(default=())

    @classmethod
    def from_tokenizer(
        cls,
        tokenizer: PreTrainedTokenizerBase,
        codebook_sizes: Sequence[int],
        text_prefix: str = "",
    ) -> SidVocab:
        """Wrap a tokenizer that holds the codebook's SID tokens.

        Raises:
            SidVocabularyError: when its SID tokens are not exactly the codebook's.
        """
        check_layout(tokenizer, codebook_sizes)
        if tokenizer.bos_token_id is None or tokenizer.pad_token_id is None:
            raise SidVocabularyError("tokenizer needs a bos and a pad token")
        level_ids = tuple(
            np.asarray(
                tokenizer.convert_tokens_to_ids([sid_token(lvl, c) for c in range(size)]),
                dtype=np.int64,
            )
            for lvl, size in enumerate(codebook_sizes)
        )
        prefix = (
            tuple(tokenizer(text_prefix, add_special_tokens=False)["input_ids"])
            if text_prefix
            else ()
        )
        return cls(
            tokenizer=tokenizer,
            codebook_sizes=tuple(int(s) for s in codebook_sizes),
            level_token_ids=level_ids,
            bos_id=int(tokenizer.bos_token_id),
            pad_id=int(tokenizer.pad_token_id),
            text_prefix=text_prefix,
            prefix_ids=prefix,
        )

    def same_sequences(self, other: SidVocab) -> bool:
        """Whether ``other`` encodes every history and SID with the same token ids.

        Models that share this can decode together (an ensemble) from one set of prompts.
        """
        return (
            self.codebook_sizes == other.codebook_sizes
            and self.bos_id == other.bos_id
            and self.pad_id == other.pad_id
            and self.prefix_ids == other.prefix_ids
            and all(
                np.array_equal(a, b)
                for a, b in zip(self.level_token_ids, other.level_token_ids, strict=True)
            )
        )

    @property
    def n_levels(self) -> int:
        """Tokens per item."""
        return len(self.codebook_sizes)

    def check_codes(self, codes: npt.NDArray[np.int64]) -> None:
        """Raise :class:`SidVocabularyError` when some SID is not expressible in this vocabulary."""
        if codes.ndim != 2 or codes.shape[1] != self.n_levels:
            raise SidVocabularyError(
                f"SIDs have {codes.shape[-1]} levels but the model's vocabulary has "
                f"{self.n_levels} (sizes {list(self.codebook_sizes)}): the model was trained on "
                "other Semantic IDs; retrain the anchor model"
            )
        too_big = codes >= np.asarray(self.codebook_sizes)[None, :]
        if too_big.any():
            row, lvl = (int(v) for v in np.argwhere(too_big)[0])
            raise SidVocabularyError(
                f"{int(too_big.any(axis=1).sum())} SIDs use codes unknown to the tokenizer, e.g. "
                f"{format_sid(codes[row].tolist())} (level {lvl} has {self.codebook_sizes[lvl]} "
                "codes in the model's vocabulary): retrain the anchor model on these SIDs"
            )

    def item_tokens(self, codes: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        """Token ids of items, shape ``[n_items, n_levels]``, from their SID codes."""
        self.check_codes(codes)
        return np.stack(
            [self.level_token_ids[lvl][codes[:, lvl]] for lvl in range(self.n_levels)], 1
        )

    def encode(self, item_tokens: npt.NDArray[np.int64]) -> list[int]:
        """Token ids of a sequence of items (rows of :meth:`item_tokens`), prefix and bos first."""
        return [*self.prefix_ids, self.bos_id, *item_tokens.reshape(-1).tolist()]

    @property
    def items_offset(self) -> int:
        """Position of the first item token in an encoded sequence."""
        return len(self.prefix_ids) + 1
