"""Loader for MovieLens-100k (GroupLens): ``u.data``, ``u.item`` and ``u.genre`` to the contract.

Users download their own copy (https://grouplens.org/datasets/movielens/100k/); the licence does
not allow redistribution, so nothing here ships or fetches the data.

What comes out:

* ``items``: one row per movie in ``u.item``. ``item_id`` is the movie id as a string; ``text`` is
  ``"<Title>. Year: <year>. Genres: <g1>, <g2>."`` (the title without its ``(year)`` suffix, with
  a trailing article moved to the front, in the title and in its aliases,
  ``"Usual Suspects, The"`` -> ``"The Usual Suspects"``, ``"Tin Drum, The (Blechtrommel, Die)"``
  -> ``"The Tin Drum (Die Blechtrommel)"``, so a sentence encoder reads natural language);
  ``category`` is the first genre; ``event_timestamp`` is the item's earliest rating (over all
  ratings, before any ``min_rating`` filter: the movie was in the catalog from then on), or the
  dataset's first rating time for movies nobody rated.
* ``interactions``: every rating as an engagement, ``weight`` = the rating (float32), sorted by
  ``(user_id, event_timestamp)`` with ties kept in file order.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import numpy as np
import pyarrow as pa

from training.data.contract import TIMESTAMP
from training.data.dataset import LoadedDataset
from training.data.errors import DatasetFormatError

ENCODING: Final = "latin-1"
"""``u.item`` and ``u.genre`` are Latin-1 (e.g. ``Misérables``), not UTF-8."""

# The last "(1995)" in a title is its year; a few titles carry more after it ("... (1995) (V)").
_TITLE_YEAR = re.compile(r"^(?P<title>.*)\s*\((?P<year>\d{4})\)(?P<after>.*)$")
# Titles file their article at the end, "Usual Suspects, The"; so do the foreign titles
# ("Postino, Il") and the aliases in parentheses ("Tin Drum, The (Blechtrommel, Die)"). The
# articles are those u.item uses; "Die xue shuang xiong" shows why only a trailing one moves.
_ARTICLES: Final = (
    "The|A|An|Il|La|Le|Les|L'|Lo|Gli|Das|Der|Die|Det|Den|El|Los|Las|O|Os|Un|Une|Uno|Una"
)
_TRAILING_ARTICLE = re.compile(rf"^(?P<rest>.+), (?P<article>{_ARTICLES})$")
_PARENTHESES = re.compile(r"\(([^()]*)\)")
_N_ITEM_FIXED_FIELDS: Final = 5  # id, title, release date, video release date, IMDb URL


def load_movielens_100k(path: Path, min_rating: float | None = None) -> LoadedDataset:
    """Load a MovieLens-100k directory into the data contract.

    Args:
        path: Directory holding ``u.data``, ``u.item`` and ``u.genre``.
        min_rating: Keep only ratings ``>= min_rating`` as interactions (all ratings when None).
            Items are kept either way: the catalog does not depend on the filter.

    Returns:
        The dataset named ``ml-100k``; ``info`` holds counts and the time span.

    Raises:
        FileNotFoundError: When the directory or one of the three files is missing (named).
        DatasetFormatError: On a malformed row (file and line named), or when ``u.data`` rates
            movies that ``u.item`` does not list.
    """
    path = Path(path)
    files = {name: path / name for name in ("u.data", "u.item", "u.genre")}
    for file in files.values():
        if not file.is_file():
            raise FileNotFoundError(f"{file}: no such file (expected a MovieLens-100k directory)")

    genres = _read_genres(files["u.genre"])
    movie_ids, texts, categories = _read_items(files["u.item"], genres)
    users, items, ratings, times = _read_ratings(files["u.data"])

    known = set(movie_ids)
    unknown = sorted(set(items.tolist()) - known, key=int)
    if unknown:
        raise DatasetFormatError(
            f"{files['u.data']}: {len(unknown)} rated item ids are not in {files['u.item']}, "
            f"e.g. {', '.join(unknown[:5])}"
        )
    if len(times) == 0:
        raise DatasetFormatError(f"{files['u.data']}: no ratings")

    first_seen = _earliest_per_item(items, times)
    dataset_start = int(times.min())
    item_times = np.array([first_seen.get(m, dataset_start) for m in movie_ids], dtype=np.int64)
    items_table = pa.table(
        {
            "item_id": pa.array(movie_ids, pa.string()),
            "text": pa.array(texts, pa.string()),
            "event_timestamp": _to_timestamps(item_times),
            "category": pa.array(categories, pa.string()),
        }
    )

    n_ratings = len(ratings)
    if min_rating is not None:
        keep = ratings >= min_rating
        users, items, ratings, times = users[keep], items[keep], ratings[keep], times[keep]
    interactions = pa.table(
        {
            "user_id": pa.array(users, pa.string()),
            "item_id": pa.array(items, pa.string()),
            "event_timestamp": _to_timestamps(times),
            "weight": pa.array(ratings, pa.float32()),
        }
    )
    # Arrow's sort is stable, so equal (user, time) pairs keep their file order.
    interactions = interactions.sort_by(
        [("user_id", "ascending"), ("event_timestamp", "ascending")]
    )

    info: dict[str, Any] = {
        "source": str(path),
        "n_items": len(movie_ids),
        "n_users": len(set(users.tolist())),
        "n_interactions": interactions.num_rows,
        "n_ratings_in_file": n_ratings,
        "min_rating": min_rating,
        "time_start": _iso(int(times.min())) if len(times) else None,
        "time_end": _iso(int(times.max())) if len(times) else None,
        "span_days": round(float(times.max() - times.min()) / 86400.0, 2) if len(times) else 0.0,
        "timestamps_synthesized": False,
    }
    return LoadedDataset("ml-100k", items_table, interactions, info)


def _read_genres(file: Path) -> list[str]:
    """Genre names ordered by their flag index (``name|index`` lines)."""
    by_index: dict[int, str] = {}
    for lineno, line in enumerate(file.read_text(encoding=ENCODING).splitlines(), start=1):
        if not line.strip():
            continue  # the official file ends with a blank line
        name, sep, index = line.rpartition("|")
        if not sep or not name or not index.strip().isdigit():
            raise DatasetFormatError(f"{file}:{lineno}: expected 'name|index', got {line!r}")
        by_index[int(index)] = name
    if sorted(by_index) != list(range(len(by_index))):
        raise DatasetFormatError(f"{file}: genre indices must be 0..n-1, got {sorted(by_index)}")
    return [by_index[i] for i in range(len(by_index))]


def _read_items(file: Path, genres: list[str]) -> tuple[list[str], list[str], list[str | None]]:
    """Movie ids, texts and first genres from ``u.item``."""
    n_fields = _N_ITEM_FIXED_FIELDS + len(genres)
    ids: list[str] = []
    texts: list[str] = []
    categories: list[str | None] = []
    seen: set[str] = set()
    for lineno, line in enumerate(file.read_text(encoding=ENCODING).splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("|")
        if len(fields) != n_fields:
            raise DatasetFormatError(
                f"{file}:{lineno}: expected {n_fields} '|'-separated fields "
                f"(5 + {len(genres)} genre flags), got {len(fields)}"
            )
        movie_id = fields[0].strip()
        flags = fields[_N_ITEM_FIXED_FIELDS:]
        if not movie_id.isdigit() or any(f not in ("0", "1") for f in flags):
            raise DatasetFormatError(
                f"{file}:{lineno}: expected a numeric movie id and 0/1 genre flags: {line!r}"
            )
        if movie_id in seen:
            raise DatasetFormatError(f"{file}:{lineno}: duplicate movie id {movie_id}")
        seen.add(movie_id)
        movie_genres = [g for g, flag in zip(genres, flags, strict=True) if flag == "1"]
        title, year = _title_and_year(fields[1], fields[2])
        ids.append(movie_id)
        texts.append(_item_text(title or f"Movie {movie_id}", year, movie_genres))
        categories.append(movie_genres[0] if movie_genres else None)
    return ids, texts, categories


def _title_and_year(raw_title: str, release_date: str) -> tuple[str, str | None]:
    """Split ``"Usual Suspects, The (1995)"`` into ``("The Usual Suspects", "1995")``.

    The year comes from the title suffix, else from the release date (``01-Jan-1995``).
    """
    title = raw_title.strip()
    year: str | None = None
    match = _TITLE_YEAR.match(title)
    if match:
        title = f"{match.group('title').strip()} {match.group('after').strip()}".strip()
        year = match.group("year")
    elif re.search(r"\d{4}$", release_date.strip()):
        year = release_date.strip()[-4:]
    # The title proper is what precedes its first alias in parentheses.
    head, paren, tail = title.partition(" (")
    title = _front_article(head) + (paren + tail if paren else "")
    title = _PARENTHESES.sub(lambda m: f"({_front_article(m.group(1))})", title)
    return title, year


def _front_article(title: str) -> str:
    """``"Usual Suspects, The"`` -> ``"The Usual Suspects"``; ``"Uomo, L'"`` -> ``"L'Uomo"``."""
    article = _TRAILING_ARTICLE.match(title.strip())
    if not article:
        return title
    word = article.group("article")
    space = "" if word.endswith("'") else " "
    return f"{word}{space}{article.group('rest')}"


def _item_text(title: str, year: str | None, genres: list[str]) -> str:
    parts = [title.rstrip(".")]
    if year:
        parts.append(f"Year: {year}")
    if genres:
        parts.append(f"Genres: {', '.join(genres)}")
    return ". ".join(parts) + "."


def _read_ratings(file: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Users, items (string arrays), ratings (float32) and unix seconds (int64) of ``u.data``."""
    users: list[str] = []
    items: list[str] = []
    ratings: list[float] = []
    times: list[int] = []
    with file.open(encoding=ENCODING) as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            fields = line.split()
            try:
                if len(fields) != 4:
                    raise ValueError(f"expected 4 fields, got {len(fields)}")
                user, item = fields[0], fields[1]
                if not (user.isdigit() and item.isdigit()):
                    raise ValueError("user and item ids must be integers")
                rating, seconds = float(fields[2]), int(fields[3])
            except ValueError as exc:
                raise DatasetFormatError(
                    f"{file}:{lineno}: malformed rating row {line.rstrip()!r} "
                    f"(expected user<TAB>item<TAB>rating<TAB>unix seconds): {exc}"
                ) from exc
            users.append(user)
            items.append(item)
            ratings.append(rating)
            times.append(seconds)
    return (
        np.array(users, dtype=object),
        np.array(items, dtype=object),
        np.array(ratings, dtype=np.float32),
        np.array(times, dtype=np.int64),
    )


def _earliest_per_item(items: np.ndarray, times: np.ndarray) -> dict[str, int]:
    first: dict[str, int] = {}
    for item, t in zip(items.tolist(), times.tolist(), strict=True):
        if item not in first or t < first[item]:
            first[item] = t
    return first


def _to_timestamps(seconds: np.ndarray) -> pa.Array:
    return pa.array(seconds.astype(np.int64) * 1_000_000, pa.int64()).cast(TIMESTAMP)


def _iso(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat()
