"""MovieLens-100k loader on a tiny fake copy in the exact file format (never the real data)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pytest

from training.data.contract import validate
from training.data.movielens import _title_and_year, load_movielens_100k

GENRES = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance",
    "Sci-Fi", "Thriller", "War", "Western",
]  # fmt: skip


def _flags(*names: str) -> str:
    return "|".join("1" if g in names else "0" for g in GENRES)


TOY_STORY_GENRES = _flags("Animation", "Children's", "Comedy")
ITEMS = [
    "1|Toy Story (1995)|01-Jan-1995||http://us.imdb.com/M/title-exact?Toy%20Story%20(1995)|"
    + TOY_STORY_GENRES,
    f"2|Misérables, Les (1995)|01-Jan-1995||http://x|{_flags('Drama', 'Musical')}",
    f"3|Usual Suspects, The (1995)|14-Aug-1995||http://x|{_flags('Crime', 'Thriller')}",
    f"4|Land Before Time III: The Time of the Great Giving (1995) (V)|01-Jan-1995||http://x|"
    f"{_flags('Animation')}",
    f"5|unknown||||{_flags('unknown')}",
    f"6|Never Rated (1990)|01-Jan-1990||http://x|{_flags('Western')}",
]
# user, item, rating, unix seconds; user 10 has two ratings at the same second (file order kept).
RATINGS = [
    (10, 1, 5, 881250949),
    (2, 1, 3, 881250000),
    (10, 3, 4, 881250949),
    (10, 2, 1, 881240000),
    (2, 4, 2, 881260000),
    (7, 5, 4, 881270000),
    (2, 3, 5, 881255000),
]


def write_ml100k(
    directory: Path, *, items: list[str] = ITEMS, ratings: Sequence[tuple[object, ...]] = RATINGS
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "u.genre").write_bytes(
        ("".join(f"{g}|{i}\n" for i, g in enumerate(GENRES)) + "\n").encode("latin-1")
    )
    (directory / "u.item").write_bytes(("\n".join(items) + "\n").encode("latin-1"))
    (directory / "u.data").write_text("".join("\t".join(map(str, r)) + "\n" for r in ratings))
    return directory


@pytest.fixture
def ml_dir(tmp_path: Path) -> Path:
    return write_ml100k(tmp_path / "ml-100k")


def _utc(seconds: int) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def test_tables_conform_and_keep_every_row(ml_dir: Path) -> None:
    data = load_movielens_100k(ml_dir)
    assert data.name == "ml-100k"
    assert validate(data.items, "items") == []
    assert validate(data.interactions, "interactions") == []
    assert data.items.num_rows == len(ITEMS)
    assert data.interactions.num_rows == len(RATINGS)
    assert data.items.column("item_id").to_pylist() == ["1", "2", "3", "4", "5", "6"]
    got = sorted(
        (r["user_id"], r["item_id"], r["weight"], r["event_timestamp"])
        for r in data.interactions.to_pylist()
    )
    want = sorted((str(u), str(i), float(w), _utc(t)) for u, i, w, t in RATINGS)
    assert got == want
    assert data.interactions.schema.field("weight").type == pa.float32()
    assert data.info["n_items"] == 6
    assert data.info["n_users"] == 3
    assert data.info["n_interactions"] == 7
    assert data.info["time_start"] == _utc(881240000).isoformat()
    assert data.info["time_end"] == _utc(881270000).isoformat()


def test_item_text_category_and_latin1(ml_dir: Path) -> None:
    rows = {r["item_id"]: r for r in load_movielens_100k(ml_dir).items.to_pylist()}
    assert rows["1"]["text"] == "Toy Story. Year: 1995. Genres: Animation, Children's, Comedy."
    assert rows["1"]["category"] == "Animation"
    assert rows["2"]["text"] == "Les Misérables. Year: 1995. Genres: Drama, Musical."
    assert rows["3"]["text"] == "The Usual Suspects. Year: 1995. Genres: Crime, Thriller."
    assert rows["4"]["text"].startswith("Land Before Time III: The Time of the Great Giving (V).")
    assert "Year: 1995" in rows["4"]["text"]
    assert rows["5"]["text"] == "unknown. Genres: unknown."
    assert rows["6"]["category"] == "Western"


def test_item_timestamps(ml_dir: Path) -> None:
    rows = {r["item_id"]: r for r in load_movielens_100k(ml_dir).items.to_pylist()}
    assert rows["1"]["event_timestamp"] == _utc(881250000)  # earliest of its two ratings
    assert rows["2"]["event_timestamp"] == _utc(881240000)
    assert rows["6"]["event_timestamp"] == _utc(881240000)  # never rated: dataset's first time


def test_interactions_sorted_by_user_then_time_stably(ml_dir: Path) -> None:
    rows = load_movielens_100k(ml_dir).interactions.to_pylist()
    keys = [(r["user_id"], r["event_timestamp"]) for r in rows]
    assert keys == sorted(keys)
    user10 = [r["item_id"] for r in rows if r["user_id"] == "10"]
    assert user10 == ["2", "1", "3"]  # items 1 and 3 share a second: file order kept


def test_min_rating_filters_interactions_not_items(ml_dir: Path) -> None:
    data = load_movielens_100k(ml_dir, min_rating=4)
    assert data.interactions.num_rows == 4
    assert min(data.interactions.column("weight").to_pylist()) >= 4
    assert data.items.num_rows == len(ITEMS)
    assert data.info["n_ratings_in_file"] == 7


@pytest.mark.parametrize("missing", ["u.data", "u.item", "u.genre"])
def test_missing_file_is_named(ml_dir: Path, missing: str) -> None:
    (ml_dir / missing).unlink()
    with pytest.raises(FileNotFoundError, match=missing):
        load_movielens_100k(ml_dir)


def test_malformed_rating_names_file_and_line(tmp_path: Path) -> None:
    directory = write_ml100k(tmp_path / "ml", ratings=[*RATINGS[:2], (3, 1, "five", 881250000)])
    with pytest.raises(ValueError, match=r"u\.data:3"):
        load_movielens_100k(directory)


def test_malformed_item_names_file_and_line(tmp_path: Path) -> None:
    directory = write_ml100k(tmp_path / "ml", items=[*ITEMS[:2], "3|Too Few Fields (1995)|x"])
    with pytest.raises(ValueError, match=r"u\.item:3"):
        load_movielens_100k(directory)


def test_unknown_rated_item_is_reported(tmp_path: Path) -> None:
    directory = write_ml100k(tmp_path / "ml", ratings=[*RATINGS, (2, 99, 4, 881250000)])
    with pytest.raises(ValueError, match=r"1 rated item ids .* e\.g\. 99"):
        load_movielens_100k(directory)


def test_importing_nothing_is_an_error_not_an_empty_run(ml_dir: Path, tmp_path: Path) -> None:
    """`--min-rating 10` keeps no rating: one line, exit 2, and no data written for the next
    stages to fail on later with a misleading message."""
    from tests.gpl_service.test_cli import gpl

    run = tmp_path / "run"
    code, out = gpl(
        "data", "import", "movielens", str(ml_dir), "--run-dir", str(run), "--min-rating", "10"
    )
    assert code == 2 and "nothing to import" in out and "Traceback" not in out, out
    assert not (run / "data" / "interactions.parquet").exists()
    code, out = gpl("data", "import", "movielens", str(ml_dir), "--run-dir", str(run))
    assert code == 0, out


def test_malformed_files_are_one_line_on_the_command_line(tmp_path: Path) -> None:
    """The loaders' format errors were tracebacks from `gpl data import` (exit 1)."""
    from tests.gpl_service.test_cli import gpl

    directory = write_ml100k(tmp_path / "ml", ratings=[*RATINGS[:2], (3, 1, "five", 881250000)])
    code, out = gpl("data", "import", "movielens", str(directory), "--run-dir", str(tmp_path))
    assert code == 2 and "Traceback" not in out, out
    assert out.startswith("error: ") and "u.data:3: malformed rating row" in out, out
    code, out = gpl("data", "synth", "--run-dir", str(tmp_path), "--seed", "-1")
    assert code == 2 and "error: --seed: Input should be greater than or equal to 0" in out, out


@pytest.mark.parametrize(
    ("raw", "title"),
    [
        ("Tin Drum, The (Blechtrommel, Die) (1979)", "The Tin Drum (Die Blechtrommel)"),
        ("Hate (Haine, La) (1995)", "Hate (La Haine)"),
        ("Star Maker, The (Uomo delle stelle, L') (1995)", "The Star Maker (L'Uomo delle stelle)"),
        ("Postino, Il (1994)", "Il Postino"),
        ("Die xue shuang xiong (Killer, The) (1989)", "Die xue shuang xiong (The Killer)"),
        ("Good, The Bad and The Ugly, The (1966)", "The Good, The Bad and The Ugly"),
        ("Maybe, Maybe Not (Bewegte Mann, Der) (1994)", "Maybe, Maybe Not (Der Bewegte Mann)"),
    ],
)
def test_trailing_articles_move_to_the_front_in_titles_and_aliases(raw: str, title: str) -> None:
    assert _title_and_year(raw, "")[0] == title
