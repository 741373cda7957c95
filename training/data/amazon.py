"""Loader for Amazon review datasets in the UniSRec / RecBole text + inter format.

Users build or download their own copy (the review data is McAuley-lab research data and may
not be redistributed). A directory holds, for a dataset prefix such as ``Scientific``:

* ``Scientific.text``: header ``item_id:token<TAB>text:token_seq``, then ``ASIN<TAB>text``.
* ``Scientific.{train,valid,test}.inter``: header, then
  ``user_idx<TAB>space-separated history item idxs<TAB>next item idx``. ``test`` holds each
  user's last item as target, ``valid`` the second-to-last, ``train`` one line per earlier
  position. Histories are cut to the most recent ``max_seq_len`` items (50 in UniSRec).
* ``Scientific.item2index`` / ``Scientific.user2index``: ``ASIN<TAB>idx`` / ``user<TAB>idx``.

Sequences. A user's sequence is their test line's history + target (else the valid line's, else
their longest train line's). When that history is at the length cap, its start may have been cut
off; the loader then rebuilds the full sequence by chaining the user's lines (each line's
history is the tail of the sequence before its target) and keeps the rebuilt sequence only when
it ends exactly with the test line, so no event is ever lost or invented.

Timestamps are synthesized. UniSRec drops review times, but the contract needs them, and a
time-based split must put each user's test target after everything else. So each user's events
are spread evenly over one global window ``[start, start + span_days]``: the first event at the
window start, the last at the window end minus a small per-user jitter (up to
``max_jitter_seconds``, seeded) so users' last events do not all collide. Order within a user is
the sequence order; across users, only "last event is near the end" is meaningful; the absolute
times are not real. Items' ``event_timestamp`` is the window start. ``info`` records
``timestamps_synthesized: True``.

Category. The text is ``"<title>. <category path>. <brand>. "``, where the category path joins
the levels of the Amazon category tree with plain spaces (``"Industrial & Scientific Tapes,
Adhesives & Sealants Adhesive Tapes Duct Tape"``). The first level is the same root for every
item, the informative levels below it cannot be separated without a list of category names,
and titles and brands may themselves contain ``". "``. No category can be cut cleanly, so the
``category`` column is omitted.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import numpy as np
import pyarrow as pa

from training.data.contract import TIMESTAMP
from training.data.dataset import LoadedDataset
from training.data.errors import DatasetFormatError

SPLITS: Final = ("train", "valid", "test")
_MAX_EXAMPLES: Final = 5

Line = tuple[list[int], int]
"""One inter line: (history item idxs, target item idx)."""


def load_unisrec(
    directory: Path,
    name: str | None = None,
    *,
    start: datetime | str = "2018-01-01T00:00:00Z",
    span_days: float = 365.0,
    max_jitter_seconds: int = 3600,
    seed: int = 0,
) -> LoadedDataset:
    """Load a UniSRec-format dataset directory into the data contract.

    Args:
        directory: Directory holding ``<name>.text``, ``<name>.{train,valid,test}.inter``,
            ``<name>.item2index`` and (optionally) ``<name>.user2index``.
        name: Dataset prefix (``Scientific``); detected from the single ``*.text`` file when None.
        start: Start of the synthetic time window (UTC; a naive value is read as UTC).
        span_days: Length of the synthetic time window in days.
        max_jitter_seconds: Largest per-user offset of the last event before the window end.
        seed: Seed for the per-user jitter.

    Returns:
        The dataset named ``amazon-<name lowercased>``; ``info`` holds counts, the time window
        and ``timestamps_synthesized: True``.

    Raises:
        FileNotFoundError: When the directory, the text file, an inter file or the item index
            is missing (named).
        DatasetFormatError: On a malformed line (file and line named), an ambiguous prefix, or items
            used by the inter files that the text file or the item index does not know.
    """
    directory = Path(directory)
    if span_days <= 0:
        raise ValueError(f"span_days must be positive, got {span_days}")
    if not 0 <= max_jitter_seconds < span_days * 86400:
        raise ValueError(
            f"max_jitter_seconds must be >= 0 and shorter than the window, got {max_jitter_seconds}"
        )
    prefix = name if name is not None else _detect_prefix(directory)
    text_file = directory / f"{prefix}.text"
    item_index_file = directory / f"{prefix}.item2index"
    user_index_file = directory / f"{prefix}.user2index"
    inter_files = {split: directory / f"{prefix}.{split}.inter" for split in SPLITS}
    for file in (text_file, item_index_file, *inter_files.values()):
        if not file.is_file():
            raise FileNotFoundError(f"{file}: no such file (expected a UniSRec-format dataset)")

    texts = _read_texts(text_file)
    idx_to_asin = _invert(_read_index(item_index_file), item_index_file)
    idx_to_user = (
        _invert(_read_index(user_index_file), user_index_file) if user_index_file.is_file() else {}
    )
    lines = {split: _read_inter(file) for split, file in inter_files.items()}
    _check_items(lines, inter_files, idx_to_asin, texts, text_file)

    sequences, n_rebuilt, n_capped = _user_sequences(lines)
    window_start = _as_utc(start)
    # Whole seconds: readable times, and still strictly increasing within any real user.
    window_s = round(span_days * 86400)
    user_idxs = sorted(sequences)
    rng = np.random.default_rng(seed)
    jitter_s = rng.integers(0, max_jitter_seconds + 1, size=len(user_idxs))

    lengths = np.array([len(sequences[u]) for u in user_idxs], dtype=np.int64)
    offsets = _even_offsets(lengths, window_s - jitter_s) * 1_000_000
    start_us = int(window_start.timestamp()) * 1_000_000
    user_ids = [idx_to_user.get(u, str(u)) for u in user_idxs]
    interactions = pa.table(
        {
            "user_id": pa.array(np.repeat(np.array(user_ids, dtype=object), lengths), pa.string()),
            "item_id": pa.array(
                [idx_to_asin[i] for u in user_idxs for i in sequences[u]], pa.string()
            ),
            "event_timestamp": pa.array(start_us + offsets, pa.int64()).cast(TIMESTAMP),
        }
    )
    # Same order as the other loaders; the sort is stable, so each user's order is kept.
    interactions = interactions.sort_by(
        [("user_id", "ascending"), ("event_timestamp", "ascending")]
    )
    items = pa.table(
        {
            "item_id": pa.array(list(texts), pa.string()),
            "text": pa.array(list(texts.values()), pa.string()),
            "event_timestamp": pa.array([start_us] * len(texts), pa.int64()).cast(TIMESTAMP),
        }
    )
    window_end = window_start + timedelta(seconds=window_s)
    info: dict[str, Any] = {
        "source": str(directory),
        "prefix": prefix,
        "n_items": items.num_rows,
        "n_users": len(user_idxs),
        "n_interactions": interactions.num_rows,
        "n_users_rebuilt_past_history_cap": n_rebuilt,
        "n_users_possibly_cut_at_history_cap": n_capped,
        "timestamps_synthesized": True,
        "time_start": window_start.isoformat(),
        "time_end": window_end.isoformat(),
        "span_days": span_days,
    }
    return LoadedDataset(f"amazon-{prefix.lower()}", items, interactions, info)


def _detect_prefix(directory: Path) -> str:
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such directory")
    candidates = sorted(p.name[: -len(".text")] for p in directory.glob("*.text"))
    if not candidates:
        raise FileNotFoundError(f"{directory}: no '<name>.text' file (UniSRec format expected)")
    if len(candidates) > 1:
        raise DatasetFormatError(
            f"{directory}: several datasets ({', '.join(candidates)}); choose one with --name "
            "(name= in Python)"
        )
    return candidates[0]


def _as_utc(value: datetime | str) -> datetime:
    """``value`` as an aware UTC datetime to whole seconds; naive values are read as UTC."""
    moment = (
        datetime.fromisoformat(value.replace("Z", "+00:00")) if isinstance(value, str) else value
    )
    moment = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    return moment.replace(microsecond=0)


def _data_lines(file: Path) -> Iterator[tuple[int, str]]:
    """Non-empty lines with their 1-based numbers, skipping a RecBole ``field:type`` header."""
    with file.open(encoding="utf-8") as handle:
        for lineno, raw in enumerate(handle, start=1):
            line = raw.rstrip("\r\n")
            if lineno == 1 and ":token" in line:
                continue
            if line.strip():
                yield lineno, line


def _read_texts(file: Path) -> dict[str, str]:
    texts: dict[str, str] = {}
    for lineno, line in _data_lines(file):
        asin, sep, text = line.partition("\t")
        asin, text = asin.strip(), text.strip()
        if not sep or not asin or not text:
            raise DatasetFormatError(
                f"{file}:{lineno}: expected 'item_id<TAB>text', got {line[:80]!r}"
            )
        if asin in texts:
            raise DatasetFormatError(f"{file}:{lineno}: duplicate item id {asin!r}")
        texts[asin] = text
    return texts


def _read_index(file: Path) -> dict[str, int]:
    index: dict[str, int] = {}
    for lineno, line in _data_lines(file):
        key, sep, value = line.partition("\t")
        if not sep or not key.strip() or not value.strip().isdigit():
            raise DatasetFormatError(
                f"{file}:{lineno}: expected 'id<TAB>integer index', got {line!r}"
            )
        index[key.strip()] = int(value)
    return index


def _invert(index: dict[str, int], file: Path) -> dict[int, str]:
    inverse = {idx: key for key, idx in index.items()}
    if len(inverse) != len(index):
        raise DatasetFormatError(f"{file}: {len(index) - len(inverse)} indices are assigned twice")
    return inverse


def _read_inter(file: Path) -> dict[int, list[Line]]:
    """Lines of one inter file grouped by user index, in file order."""
    by_user: dict[int, list[Line]] = {}
    for lineno, line in _data_lines(file):
        fields = line.split("\t")
        try:
            if len(fields) != 3:
                raise ValueError(f"expected 3 tab-separated fields, got {len(fields)}")
            user = int(fields[0])
            history = [int(x) for x in fields[1].split()]
            target = int(fields[2])
        except ValueError as exc:
            raise DatasetFormatError(
                f"{file}:{lineno}: malformed line {line[:80]!r} "
                f"(expected user<TAB>history idxs<TAB>target idx): {exc}"
            ) from exc
        by_user.setdefault(user, []).append((history, target))
    return by_user


def _check_items(
    lines: dict[str, dict[int, list[Line]]],
    inter_files: dict[str, Path],
    idx_to_asin: dict[int, str],
    texts: dict[str, str],
    text_file: Path,
) -> None:
    """Every item the inter files use must have an ASIN and a text."""
    used: set[int] = set()
    for by_user in lines.values():
        for user_lines in by_user.values():
            for history, target in user_lines:
                used.update(history)
                used.add(target)
    files = ", ".join(str(f) for f in inter_files.values())
    no_asin = sorted(used - idx_to_asin.keys())
    if no_asin:
        raise DatasetFormatError(
            f"{len(no_asin)} item indices used in {files} are missing from the item index, "
            f"e.g. {', '.join(map(str, no_asin[:_MAX_EXAMPLES]))}"
        )
    no_text = sorted({idx_to_asin[i] for i in used} - texts.keys())
    if no_text:
        raise DatasetFormatError(
            f"{len(no_text)} items used in {files} are missing from {text_file}, "
            f"e.g. {', '.join(no_text[:_MAX_EXAMPLES])}"
        )


def _user_sequences(
    lines: dict[str, dict[int, list[Line]]],
) -> tuple[dict[int, list[int]], int, int]:
    """Each user's full item sequence.

    Returns:
        The sequences by user index; how many were rebuilt past the history cap; and how many
        sit at the cap but could not be rebuilt (kept as the capped test line: they may miss
        their earliest events).
    """
    cap = max(
        (len(h) for by_user in lines.values() for ls in by_user.values() for h, _ in ls),
        default=0,
    )
    users = set().union(*(by_user.keys() for by_user in lines.values()))
    sequences: dict[int, list[int]] = {}
    rebuilt = unverified = 0
    for user in users:
        if user in lines["test"]:
            history, target = lines["test"][user][-1]
        elif user in lines["valid"]:
            history, target = lines["valid"][user][-1]
        else:
            history, target = max(lines["train"][user], key=lambda line: len(line[0]))
        sequence = [*history, target]
        if len(history) >= cap > 0:
            # The history may have been cut at the cap: try to recover the earlier events.
            user_lines = [ln for split in SPLITS for ln in lines[split].get(user, [])]
            chained = _chain(user_lines, cap)
            if len(chained) >= len(sequence) and chained[-len(sequence) :] == sequence:
                rebuilt += len(chained) > len(sequence)
                sequence = chained
            else:
                unverified += 1
        sequences[user] = sequence
    return sequences, rebuilt, unverified


def _chain(user_lines: list[Line], cap: int) -> list[int]:
    """Rebuild a sequence from prefix lines: each history is the last ``cap`` items before it.

    Starts from the shortest line and repeatedly appends the target of the line whose history
    equals the current tail; stops when no line continues the chain.
    """
    by_history = {tuple(history): target for history, target in user_lines}
    shortest = min(user_lines, key=lambda line: len(line[0]))
    sequence = [*shortest[0], shortest[1]]
    for _ in range(len(by_history)):
        tail = tuple(sequence[-min(len(sequence), cap) :])
        if tail not in by_history:
            break
        sequence.append(by_history.pop(tail))
    return sequence


def _even_offsets(lengths: np.ndarray, last_offsets: np.ndarray) -> np.ndarray:
    """Offsets placing each user's ``n`` events evenly on ``[0, last]`` (the last one at ``last``).

    A user with a single event gets it at ``last``.
    """
    owner = np.repeat(np.arange(len(lengths)), lengths)
    starts = np.cumsum(lengths) - lengths
    position = np.arange(int(lengths.sum())) - starts[owner]
    steps = np.maximum(lengths - 1, 1)[owner]
    fraction = np.where(lengths[owner] > 1, position / steps, 1.0)
    return np.round(fraction * last_offsets[owner]).astype(np.int64)
