"""Sharded generation: N shards merged equal one process's output; merging refuses a mix."""

from __future__ import annotations

import hashlib
import json
import shutil
from datetime import timedelta

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from tests.training.anchors.conftest import T0, TS, assert_same_anchors, tiny_config
from training.anchors.errors import AnchorInputError
from training.anchors.job import generate_anchors
from training.anchors.schema import ANCHORS_FILE, ANCHORS_SCHEMA
from training.anchors.sequences import cutoffs_of, day_cutoffs
from training.anchors.shards import Shard, merge_anchor_shards, shard_of
from training.io import MANIFEST_NAME


def _sorted(table: pa.Table) -> pa.Table:
    return table.sort_by([("user_id", "ascending"), ("event_timestamp", "ascending")])


def _blake2b_shard(user_id: str, count: int) -> int:
    digest = hashlib.blake2b(user_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % count


def test_shard_of_is_the_documented_hash() -> None:
    """blake2b-64 of the UTF-8 id, little-endian, mod N: what any host or language computes."""
    ids = ["u0", "u1", "ユーザー", "", "u0", "a" * 300]
    for count in (1, 2, 7, 64):
        assert shard_of(ids, count).tolist() == [_blake2b_shard(u, count) for u in ids]
    chunked = pa.chunked_array([["u0", None], ["ユーザー", "u1"]])
    assert shard_of(chunked, 7).tolist() == [
        _blake2b_shard("u0", 7),
        -1,  # a null id is in no shard
        _blake2b_shard("ユーザー", 7),
        _blake2b_shard("u1", 7),
    ]
    # Pinned, so that a change of the scheme (which would split a deployment's users
    # differently from the shards already written) cannot pass unnoticed.
    assert shard_of(["u0", "u1", "u2", "u3", "ユーザー"], 1000).tolist() == [
        687,
        130,
        114,
        291,
        912,
    ]


def test_shard_parse_and_bounds() -> None:
    assert Shard.parse("2/8") == Shard(2, 8) and Shard.parse(" 0 / 1 ").name == "00000-of-00001"
    for bad in ("8/8", "1", "a/b", "-1/4", "1/0"):
        with pytest.raises(AnchorInputError, match="shard"):
            Shard.parse(bad)


def _inputs(positives: pa.Table):
    """The toy log plus a requested user without positives and a positive of an unknown item."""
    extra = pa.table(
        {"user_id": ["u4"], "item_id": ["no-such-item"], "event_timestamp": pa.array([T0], TS)}
    ).cast(positives.schema)
    positives = pa.concat_tables([positives, extra])
    users = [*sorted(set(positives.column("user_id").to_pylist())), "newcomer"]
    times = positives.column("event_timestamp")
    requests = pa.table(
        {
            "user_id": pa.array(users[:-1] * 2 + ["newcomer"]),
            "event_timestamp": pa.array(
                [T0 + timedelta(days=1)] * (len(users) - 1)
                + [T0 + timedelta(days=2)] * (len(users) - 1)
                + [T0 + timedelta(days=1)],
                TS,
            ),
        }
    )
    return positives, users, {"request": cutoffs_of(requests, "request"), "day": day_cutoffs(times)}


@pytest.mark.parametrize(
    ("granularity", "listed"), [("request", True), ("request", False), ("day", True)]
)
def test_merged_shards_equal_one_process(
    tmp_path, toy_data, trained_compact, granularity, listed
) -> None:
    semantics, positives, _ = toy_data
    positives, every_user, cutoffs = _inputs(positives)
    cuts = cutoffs[granularity]
    users = every_user if listed else None
    model = trained_compact.model_dir
    cfg = tiny_config()
    cfg.generation.chunk_sets = 4
    one = generate_anchors(semantics, positives, cuts, model, cfg, tmp_path / "one", users=users)
    out = tmp_path / "sharded"
    for k in range(3):
        part = generate_anchors(
            semantics, positives, cuts, model, cfg, out, users=users, shard=Shard(k, 3)
        )
        assert part.path == out / "shards" / f"0000{k}-of-00003" / ANCHORS_FILE
        assert set(shard_of(part.table.column("user_id"), 3).tolist()) <= {k}
        assert part.metrics["shard"] == {"index": k, "count": 3}
        assert part.metrics["inputs_fingerprint"] == one.metrics["inputs_fingerprint"]
    assert not (out / ANCHORS_FILE).exists()  # nothing merged yet
    merged = merge_anchor_shards(out)
    assert merged.path == out / ANCHORS_FILE
    table = pq.read_table(merged.path)
    assert table.schema.equals(ANCHORS_SCHEMA)
    assert_same_anchors(_sorted(table), _sorted(one.table))
    for name in (
        "users",
        "anchor_sets",
        "cutoffs",
        "skipped_empty_history",
        "positives_dropped_unknown_items",
        "sets_with_fewer_anchors",
        "sets_decoded",
        "mean_history_length",
        "generation_key",
    ):
        assert merged.metrics[name] == one.metrics[name], name
    assert one.metrics["skipped_empty_history"] >= 1
    assert one.metrics["positives_dropped_unknown_items"] == 1
    assert merged.metrics["shards"] == 3 and len(merged.metrics["shard_runs"]) == 3
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["inputs"]["shards"] == [f"shards/0000{k}-of-00003" for k in range(3)]


@pytest.fixture
def three_shards(tmp_path, toy_data, trained_compact):
    semantics, positives, _ = toy_data
    cuts = day_cutoffs(positives.column("event_timestamp"))
    out = tmp_path / "anchors"

    def run(k: int, n: int = 3, positives: pa.Table = positives, **generation: object) -> None:
        cfg = tiny_config()
        for name, value in generation.items():
            setattr(cfg.generation, name, value)
        generate_anchors(
            semantics, positives, cuts, trained_compact.model_dir, cfg, out, shard=Shard(k, n)
        )

    for k in range(3):
        run(k)
    return out, run


def test_merge_refuses_missing_stale_or_mixed_shards(three_shards, toy_data) -> None:
    out, run = three_shards
    _, positives, _ = toy_data
    shard1 = out / "shards" / "00001-of-00003"
    moved = out / "moved"
    shard1.rename(moved)
    with pytest.raises(AnchorInputError, match=r"1 of 3 shards missing.*: 1;"):
        merge_anchor_shards(out)
    moved.rename(shard1)
    # Shard 1 re-run on a log that gained a row since the other two: another input.
    later = pa.table(
        {"user_id": ["u0"], "item_id": ["i1"], "event_timestamp": pa.array([T0], TS)}
    ).cast(positives.schema)
    run(1, positives=pa.concat_tables([positives, later]))
    with pytest.raises(AnchorInputError, match=r"shard 1/3 differs.*inputs_fingerprint"):
        merge_anchor_shards(out)
    # Or on one whose row of a shard-1 user names another item at the same time.
    ids = positives.column("user_id").to_pylist()
    row = next(k for k, u in enumerate(ids) if shard_of([u], 3)[0] == 1)
    items = positives.column("item_id").to_pylist()
    items[row] = "i0" if items[row] != "i0" else "i1"
    changed = positives.set_column(
        positives.schema.get_field_index("item_id"), "item_id", pa.array(items)
    )
    run(1, positives=changed)
    with pytest.raises(AnchorInputError, match=r"shard 1/3 differs.*inputs_fingerprint"):
        merge_anchor_shards(out)
    run(1, num_anchors=4)
    with pytest.raises(AnchorInputError, match=r"shard 1/3 differs.*generation_key"):
        merge_anchor_shards(out)
    run(1)
    # A run with another count beside them: which one is meant must be said.
    run(0, n=2)
    with pytest.raises(AnchorInputError, match=r"2 different counts.*--shards N"):
        merge_anchor_shards(out)
    assert merge_anchor_shards(out, count=3).metrics["shards"] == 3
    with pytest.raises(AnchorInputError, match="1 of 2 shards missing"):
        merge_anchor_shards(out, count=2)
    assert not list(out.glob(f".{ANCHORS_FILE}*"))  # no temporary file left behind


def test_merge_checks_each_file_against_its_manifest_and_shard(three_shards) -> None:
    out, _ = three_shards
    merged = merge_anchor_shards(out).table
    path = out / "shards" / "00002-of-00003" / ANCHORS_FILE
    whole = pq.read_table(path)
    pq.write_table(whole.slice(1), path)
    with pytest.raises(AnchorInputError, match="rows but its manifest counts"):
        merge_anchor_shards(out)
    # Rows of shard 0's users in shard 2's file, as many as its manifest counts.
    other = pq.read_table(out / "shards" / "00000-of-00003" / ANCHORS_FILE)
    pq.write_table(pa.concat_tables([whole.slice(1), other.slice(0, 1)]), path)
    with pytest.raises(AnchorInputError, match="outside shard 2/3"):
        merge_anchor_shards(out)
    assert pq.read_table(out / ANCHORS_FILE).equals(merged)  # the earlier merge is untouched
    (out / "shards" / "00001-of-00003" / MANIFEST_NAME).unlink()
    with pytest.raises(AnchorInputError, match="shard 1/3 has not finished"):
        merge_anchor_shards(out)
    shutil.rmtree(out / "shards")
    with pytest.raises(AnchorInputError, match="no shard outputs"):
        merge_anchor_shards(out)


def test_merge_refuses_a_half_copied_shard(three_shards) -> None:
    out, _ = three_shards
    path = out / "shards" / "00001-of-00003" / ANCHORS_FILE
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(AnchorInputError, match="shard 1/3 is unreadable"):
        merge_anchor_shards(out)
    manifest = out / "shards" / "00002-of-00003" / MANIFEST_NAME
    manifest.write_text(manifest.read_text()[:40])
    with pytest.raises(AnchorInputError, match="unreadable"):
        merge_anchor_shards(out)


def test_remove_shards_after_merging(three_shards) -> None:
    out, _ = three_shards
    merge_anchor_shards(out, remove=True)
    assert not (out / "shards").exists() and (out / ANCHORS_FILE).exists()


def test_incremental_shards_reuse_the_merged_file(tmp_path, toy_data, trained_compact) -> None:
    """Day 1 sharded and merged; day 2's log (new positives after a split) sharded
    incrementally: each shard keeps its users' unchanged sets from the merged file, and the
    merge equals a full one-process run on day 2's log."""
    semantics, positives, _ = toy_data
    cuts = day_cutoffs(positives.column("event_timestamp"))
    model = trained_compact.model_dir
    split = T0 + timedelta(days=1, hours=12)
    yesterday = positives.filter(pc.less(positives.column("event_timestamp"), split))
    out = tmp_path / "anchors"
    inc = tiny_config()
    inc.generation.incremental = True
    for day, cfg in ((yesterday, tiny_config()), (positives, inc)):
        parts = [
            generate_anchors(semantics, day, cuts, model, cfg, out, shard=Shard(k, 2))
            for k in range(2)
        ]
        merged = merge_anchor_shards(out)
    assert all(p.metrics["sets_reused"] > 0 for p in parts)
    assert merged.metrics["sets_reused"] == sum(p.metrics["sets_reused"] for p in parts)
    full = generate_anchors(semantics, positives, cuts, model, tiny_config(), tmp_path / "full")
    assert merged.metrics["sets_reused"] + merged.metrics["sets_decoded"] == full.table.num_rows
    assert_same_anchors(_sorted(merged.table), _sorted(full.table))
