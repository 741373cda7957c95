"""Synthetic catalog generator: determinism, counts, time order, Zipf, topic structure, drift."""

from __future__ import annotations

import re
from collections import Counter
from datetime import UTC, datetime, timedelta
from itertools import combinations

import numpy as np
import pydantic
import pytest

from training.data.contract import validate
from training.data.dataset import LoadedDataset
from training.data.synthetic import ADJECTIVES, TOPICS, USES, SynthConfig, generate_synthetic, gini

SMALL: dict[str, object] = {"n_items": 600, "n_users": 200, "mean_interactions_per_user": 30.0}


def small(**overrides: object) -> SynthConfig:
    return SynthConfig.model_validate({**SMALL, **overrides})


@pytest.fixture(scope="module")
def data() -> LoadedDataset:
    return generate_synthetic(small())


def test_same_seed_same_tables_other_seed_other_tables(data: LoadedDataset) -> None:
    again = generate_synthetic(small())
    assert again.items.equals(data.items)
    assert again.interactions.equals(data.interactions)
    other = generate_synthetic(small(seed=8))
    assert not other.items.equals(data.items)
    assert not other.interactions.equals(data.interactions)


def test_contract_and_counts(data: LoadedDataset) -> None:
    assert data.name == "synthetic"
    assert validate(data.items, "items") == []
    assert validate(data.interactions, "interactions") == []
    assert data.items.num_rows == 600
    users = data.interactions.column("user_id").to_pylist()
    assert len(set(users)) == 200
    assert data.info["n_interactions"] == data.interactions.num_rows
    assert data.info["n_topics"] == 12
    assert set(data.items.column("item_id").to_pylist()) >= set(
        data.interactions.column("item_id").to_pylist()
    )
    counts = Counter(users)
    assert min(counts.values()) >= 8
    # Mean is the configured one, within sampling noise.
    assert 25 < data.interactions.num_rows / 200 < 35


def test_timestamps(data: LoadedDataset) -> None:
    start = datetime(2024, 1, 1, tzinfo=UTC)
    assert set(data.items.column("event_timestamp").to_pylist()) == {start}
    rows = data.interactions.to_pylist()
    keys = [(r["user_id"], r["event_timestamp"]) for r in rows]
    assert keys == sorted(keys)  # sorted by user, and per-user times never decrease
    times = [r["event_timestamp"] for r in rows]
    assert start <= min(times) and max(times) <= start + timedelta(days=90)


def test_no_immediate_repeats(data: LoadedDataset) -> None:
    users = data.interactions.column("user_id").to_pylist()
    items = data.interactions.column("item_id").to_pylist()
    repeats = [
        i for i in range(1, len(items)) if users[i] == users[i - 1] and items[i] == items[i - 1]
    ]
    assert repeats == []


def test_zipf_head_takes_a_large_share(data: LoadedDataset) -> None:
    counts = np.array(sorted(Counter(data.interactions.column("item_id").to_pylist()).values()))
    head = counts[::-1][: 600 // 10].sum()
    assert head / counts.sum() > 0.5
    assert data.info["popularity_gini"] > 0.5


def test_gini() -> None:
    assert gini(np.ones(10)) == pytest.approx(0.0)
    assert gini(np.array([0, 0, 0, 10])) == pytest.approx(0.75)
    assert gini(np.array([])) == 0.0


def test_vocabularies_are_distinct() -> None:
    seen: dict[str, str] = {}
    for topic, words in TOPICS.items():
        assert 25 <= len(words) == len(set(words))
        for word in words:
            assert word not in seen, f"{word!r} is in both {seen.get(word)} and {topic}"
            seen[word] = topic
    assert not set(seen) & (set(ADJECTIVES) | set(USES))


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def test_text_separates_topics(data: LoadedDataset) -> None:
    texts = data.items.column("text").to_pylist()[:200]
    categories = data.items.column("category").to_pylist()[:200]
    for text, category in zip(texts, categories, strict=True):
        assert text.endswith(f"Category: {category}.")
    bags = [_words(t) for t in texts]
    # Leave out words most items share (template words like "and", "category").
    common = {w for w, n in Counter(w for b in bags for w in b).items() if n > len(bags) / 4}
    bags = [b - common for b in bags]
    same: list[int] = []
    different: list[int] = []
    for i, j in combinations(range(len(bags)), 2):
        shared = len(bags[i] & bags[j])
        (same if categories[i] == categories[j] else different).append(shared)
    assert np.mean(same) > 5 * np.mean(different)
    assert np.mean(same) >= 2.0


def _first_vs_second_half_shift(dataset: LoadedDataset) -> float:
    """Mean L1 distance between each user's category mix in the first and second half."""
    category = dict(
        zip(
            dataset.items.column("item_id").to_pylist(),
            dataset.items.column("category").to_pylist(),
            strict=True,
        )
    )
    by_user: dict[str, list[str]] = {}
    for user, item in zip(
        dataset.interactions.column("user_id").to_pylist(),
        dataset.interactions.column("item_id").to_pylist(),
        strict=True,
    ):
        by_user.setdefault(user, []).append(category[item])
    distances = []
    for seq in by_user.values():
        half = len(seq) // 2
        first, second = Counter(seq[:half]), Counter(seq[half:])
        distances.append(
            sum(abs(first[c] / half - second[c] / (len(seq) - half)) for c in first | second)
        )
    return float(np.mean(distances))


def test_drift_moves_interests_over_time() -> None:
    steady = generate_synthetic(small(mean_interactions_per_user=60.0, drift=0.0))
    drifting = generate_synthetic(small(mean_interactions_per_user=60.0, drift=0.2))
    assert _first_vs_second_half_shift(drifting) > _first_vs_second_half_shift(steady) + 0.1


@pytest.mark.parametrize(
    "bad",
    [
        {"unknown_field": 1},
        {"min_interests_per_user": 5, "max_interests_per_user": 4},
        {"n_items": 20},
        {"n_topics": len(TOPICS) + 1},
        {"drift": 1.5},
        {"mean_interactions_per_user": 5.0},
        {"start": "2024-01-01T00:00:00"},  # naive
    ],
)
def test_config_validation(bad: dict[str, object]) -> None:
    with pytest.raises(pydantic.ValidationError):
        SynthConfig.model_validate(bad)
