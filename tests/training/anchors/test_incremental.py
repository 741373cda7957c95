"""Incremental generation: reused sets are exactly those a full run would write again."""

from __future__ import annotations

import shutil
from datetime import timedelta

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tests.training.anchors.conftest import T0, TS, assert_same_anchors, tiny_config
from training.anchors.job import generate_anchors
from training.anchors.schema import ANCHORS_FILE
from training.anchors.sequences import day_cutoffs


def _sorted(table: pa.Table) -> pa.Table:
    return table.sort_by([("user_id", "ascending"), ("event_timestamp", "ascending")])


def _incremental():
    cfg = tiny_config()
    cfg.generation.incremental = True
    cfg.generation.chunk_sets = 5  # kept rows are copied, and the rest decoded, in chunks
    return cfg


def test_a_second_run_reuses_every_set(tmp_path, toy_data, trained_compact) -> None:
    semantics, positives, _ = toy_data
    cutoffs = day_cutoffs(positives.column("event_timestamp"))
    model = trained_compact.model_dir
    first = generate_anchors(semantics, positives, cutoffs, model, tiny_config(), tmp_path)
    before = first.table
    again = generate_anchors(semantics, positives, cutoffs, model, _incremental(), tmp_path)
    n = before.num_rows
    assert again.metrics["sets_reused"] == n and again.metrics["sets_decoded"] == 0
    assert again.metrics["anchor_sets"] == n
    assert again.metrics["generation_key"] == first.metrics["generation_key"]
    assert _sorted(again.table).equals(_sorted(before))


def test_new_and_changed_histories_are_decoded(tmp_path, toy_data, trained_compact) -> None:
    """Yesterday's log, then today's: new positives after it and one late positive before every
    cutoff of user u3. The incremental file equals a full run on today's log."""
    semantics, positives, _ = toy_data
    cutoffs = day_cutoffs(positives.column("event_timestamp"))
    model = trained_compact.model_dir
    split = T0 + timedelta(days=1, hours=12)
    yesterday = positives.filter(pc.less(positives.column("event_timestamp"), split))
    late = pa.table(
        {"user_id": ["u3"], "item_id": ["i5"], "event_timestamp": pa.array([T0], TS)}
    ).cast(positives.schema)
    today = pa.concat_tables([positives, late])
    generate_anchors(semantics, yesterday, cutoffs, model, tiny_config(), tmp_path / "inc")
    inc = generate_anchors(semantics, today, cutoffs, model, _incremental(), tmp_path / "inc")
    full = generate_anchors(semantics, today, cutoffs, model, tiny_config(), tmp_path / "full")
    m = inc.metrics
    assert m["sets_reused"] > 0 and m["sets_decoded"] > 0
    assert m["sets_reused"] + m["sets_decoded"] == m["anchor_sets"] == full.table.num_rows
    assert_same_anchors(_sorted(inc.table), _sorted(full.table))
    # u3's sets all changed (the late positive precedes every cutoff): none reused.
    kept = pq.read_table(tmp_path / "inc" / ANCHORS_FILE).slice(0, m["sets_reused"])
    assert "u3" not in kept.column("user_id").to_pylist()
    assert m["sets_with_fewer_anchors"] == full.metrics["sets_with_fewer_anchors"]


def test_a_changed_setting_or_older_file_decodes_every_set(
    tmp_path, toy_data, trained_compact
) -> None:
    semantics, positives, _ = toy_data
    cutoffs = day_cutoffs(positives.column("event_timestamp"))
    model = trained_compact.model_dir
    generate_anchors(semantics, positives, cutoffs, model, tiny_config(), tmp_path)
    other = _incremental()
    other.generation.num_anchors = 4
    changed = generate_anchors(semantics, positives, cutoffs, model, other, tmp_path)
    assert changed.metrics["sets_reused"] == 0
    assert set(changed.table.column("num_anchors").to_pylist()) == {4}
    # A file written before history_hash existed: nothing to compare a history with.
    path = tmp_path / ANCHORS_FILE
    pq.write_table(pq.read_table(path).drop_columns(["history_hash"]), path)
    older = generate_anchors(semantics, positives, cutoffs, model, other, tmp_path)
    assert older.metrics["sets_reused"] == 0 and older.metrics["sets_decoded"] > 0


def test_the_key_follows_the_model_files_contents_not_their_times(
    tmp_path, toy_data, trained_compact
) -> None:
    """A copy of the model with fresh file times (another host's) reuses every set; the same
    files with one byte changed reuse none."""
    semantics, positives, _ = toy_data
    cutoffs = day_cutoffs(positives.column("event_timestamp"))
    first = generate_anchors(
        semantics, positives, cutoffs, trained_compact.model_dir, tiny_config(), tmp_path
    )
    copy = shutil.copytree(
        trained_compact.model_dir, tmp_path / "copy", copy_function=shutil.copyfile
    )
    assert copy.joinpath("anchor_model.json").stat().st_mtime_ns != (
        trained_compact.model_dir.joinpath("anchor_model.json").stat().st_mtime_ns
    )
    again = generate_anchors(semantics, positives, cutoffs, copy, _incremental(), tmp_path)
    assert again.metrics["generation_key"] == first.metrics["generation_key"]
    assert again.metrics["sets_reused"] == first.metrics["anchor_sets"]
    weights = next(copy.rglob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    changed = generate_anchors(semantics, positives, cutoffs, copy, _incremental(), tmp_path)
    assert changed.metrics["sets_reused"] == 0


def test_an_unreadable_earlier_output_decodes_every_set(
    tmp_path, toy_data, trained_compact
) -> None:
    """A truncated earlier file or manifest (a crashed copy): logged, every set decoded."""
    semantics, positives, _ = toy_data
    cutoffs = day_cutoffs(positives.column("event_timestamp"))
    model = trained_compact.model_dir
    first = generate_anchors(semantics, positives, cutoffs, model, tiny_config(), tmp_path)
    path = tmp_path / ANCHORS_FILE
    path.write_bytes(path.read_bytes()[:300])
    again = generate_anchors(semantics, positives, cutoffs, model, _incremental(), tmp_path)
    assert again.metrics["sets_reused"] == 0
    assert again.metrics["sets_decoded"] == first.metrics["anchor_sets"]
    manifest = tmp_path / "manifest.json"
    manifest.write_text(manifest.read_text()[:50])
    third = generate_anchors(semantics, positives, cutoffs, model, _incremental(), tmp_path)
    assert third.metrics["sets_reused"] == 0
