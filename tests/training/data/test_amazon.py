"""UniSRec-format loader on a tiny fake dataset in the exact file format (never the real data)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from training.data.amazon import load_unisrec
from training.data.contract import validate

HEADER = "user_id:token\titem_id_list:token_seq\titem_id:token\n"
ASINS = [f"B00ITEM{i:03d}" for i in range(10)]
TEXTS = {
    asin: f"Widget {i} with 1/2-Inch parts. Industrial & Scientific Fasteners Screws. Acme. "
    for i, asin in enumerate(ASINS)
}
USERS = ["AUSERZERO", "AUSERONE", "AUSERTWO", "AUSERTHREE"]
# Item indices per user index. User 2's sequence is longer than the history cap (3) + 1, so its
# test line alone would lose its first items.
SEQUENCES = {0: [0, 1, 2, 3], 1: [4, 5, 4, 6], 2: [7, 8, 9, 0, 1, 2, 3], 3: [9, 8, 7]}
CAP = 3


def _line(user: int, history: list[int], target: int) -> str:
    return f"{user}\t{' '.join(map(str, history))}\t{target}\n"


def write_unisrec(
    directory: Path,
    prefix: str = "Scientific",
    *,
    sequences: dict[int, list[int]] = SEQUENCES,
    texts: dict[str, str] = TEXTS,
    users_without_test: tuple[int, ...] = (),
) -> Path:
    """Write the files the way UniSRec does: test = last item, valid = second-to-last, train =
    every earlier position (longest first), histories cut to the last ``CAP`` items."""
    directory.mkdir(parents=True, exist_ok=True)
    splits: dict[str, list[str]] = {"train": [], "valid": [], "test": []}
    for user, seq in sequences.items():
        n = len(seq)
        if user not in users_without_test:
            splits["test"].append(_line(user, seq[max(0, n - 1 - CAP) : n - 1], seq[n - 1]))
        splits["valid"].append(_line(user, seq[max(0, n - 2 - CAP) : n - 2], seq[n - 2]))
        for p in range(n - 3, 0, -1):
            splits["train"].append(_line(user, seq[max(0, p - CAP) : p], seq[p]))
    for split, lines in splits.items():
        (directory / f"{prefix}.{split}.inter").write_text(HEADER + "".join(lines))
    (directory / f"{prefix}.text").write_text(
        "item_id:token\ttext:token_seq\n" + "".join(f"{a}\t{t}\n" for a, t in texts.items())
    )
    (directory / f"{prefix}.item2index").write_text(
        "".join(f"{a}\t{i}\n" for i, a in enumerate(ASINS))
    )
    # User 3 is missing from user2index: the loader falls back to its index.
    (directory / f"{prefix}.user2index").write_text(
        "".join(f"{u}\t{i}\n" for i, u in enumerate(USERS[:3]))
    )
    return directory


@pytest.fixture
def sci_dir(tmp_path: Path) -> Path:
    return write_unisrec(tmp_path / "amazon")


def _sequences(data_interactions: list[dict[str, object]]) -> dict[str, list[object]]:
    by_user: dict[str, list[object]] = {}
    for row in data_interactions:
        by_user.setdefault(str(row["user_id"]), []).append(row["item_id"])
    return by_user


def test_tables_conform_and_keep_every_event(sci_dir: Path) -> None:
    data = load_unisrec(sci_dir)
    assert data.name == "amazon-scientific"
    assert validate(data.items, "items") == []
    assert validate(data.interactions, "interactions") == []
    assert "category" not in data.items.column_names
    assert data.items.num_rows == len(ASINS)
    assert data.interactions.num_rows == sum(len(s) for s in SEQUENCES.values())
    want = {
        (USERS[u] if u < 3 else str(u)): [ASINS[i] for i in seq] for u, seq in SEQUENCES.items()
    }
    assert _sequences(data.interactions.to_pylist()) == want
    assert data.info["n_users"] == 4
    assert data.info["n_items"] == 10
    assert data.info["n_interactions"] == 18
    assert data.info["n_users_rebuilt_past_history_cap"] == 1
    assert data.info["timestamps_synthesized"] is True


def test_item_ids_and_texts(sci_dir: Path) -> None:
    rows = {r["item_id"]: r for r in load_unisrec(sci_dir).items.to_pylist()}
    assert set(rows) == set(ASINS)
    assert rows["B00ITEM003"]["text"] == TEXTS["B00ITEM003"].strip()
    start = datetime(2018, 1, 1, tzinfo=UTC)
    assert {r["event_timestamp"] for r in rows.values()} == {start}


def test_synthesized_timestamps(sci_dir: Path) -> None:
    data = load_unisrec(sci_dir, start="2020-06-01", span_days=10, max_jitter_seconds=60)
    start = datetime(2020, 6, 1, tzinfo=UTC)
    end = start + timedelta(days=10)
    by_user: dict[str, list[datetime]] = {}
    for row in data.interactions.to_pylist():
        by_user.setdefault(row["user_id"], []).append(row["event_timestamp"])
    last_events, earlier_events = [], []
    for times in by_user.values():
        assert times == sorted(times) and len(set(times)) == len(times)  # strictly increasing
        assert times[0] == start
        assert end - timedelta(seconds=60) <= times[-1] <= end
        last_events.append(times[-1])
        earlier_events += times[:-1]
    # Every user's last item comes after every user's earlier items: a time split puts all
    # test targets on the far side.
    assert min(last_events) > max(earlier_events)
    assert data.info["time_start"] == start.isoformat()
    assert data.info["time_end"] == end.isoformat()


def test_same_seed_same_timestamps(sci_dir: Path) -> None:
    assert load_unisrec(sci_dir).interactions.equals(load_unisrec(sci_dir).interactions)


def test_user_without_test_line_uses_valid(tmp_path: Path) -> None:
    directory = write_unisrec(tmp_path / "a", users_without_test=(0,))
    data = load_unisrec(directory)
    seq = _sequences(data.interactions.to_pylist())["AUSERZERO"]
    assert seq == [ASINS[i] for i in SEQUENCES[0][:-1]]


def test_prefix_detection(tmp_path: Path) -> None:
    directory = write_unisrec(tmp_path / "a", prefix="Office")
    assert load_unisrec(directory).name == "amazon-office"
    write_unisrec(directory, prefix="Scientific")
    with pytest.raises(ValueError, match="several datasets"):
        load_unisrec(directory)
    assert load_unisrec(directory, name="Scientific").name == "amazon-scientific"


def test_no_text_file(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"\.text"):
        load_unisrec(tmp_path / "empty")


def test_missing_inter_file_is_named(sci_dir: Path) -> None:
    (sci_dir / "Scientific.valid.inter").unlink()
    with pytest.raises(FileNotFoundError, match=r"Scientific\.valid\.inter"):
        load_unisrec(sci_dir)


def test_malformed_line_names_file_and_line(sci_dir: Path) -> None:
    path = sci_dir / "Scientific.test.inter"
    path.write_text(path.read_text() + "5\t1 two 3\t4\n")
    with pytest.raises(ValueError, match=r"Scientific\.test\.inter:6"):
        load_unisrec(sci_dir)


def test_item_missing_from_text_file(tmp_path: Path) -> None:
    texts = {a: t for a, t in TEXTS.items() if a not in ("B00ITEM001", "B00ITEM005")}
    directory = write_unisrec(tmp_path / "a", texts=texts)
    with pytest.raises(ValueError, match=r"2 items .* missing from .*Scientific\.text.*B00ITEM001"):
        load_unisrec(directory)


def test_item_index_missing_from_item2index(tmp_path: Path) -> None:
    directory = write_unisrec(tmp_path / "a", sequences={**SEQUENCES, 3: [9, 8, 42]})
    with pytest.raises(
        ValueError, match=r"1 item indices .* missing from the item index, e\.g\. 42"
    ):
        load_unisrec(directory)
