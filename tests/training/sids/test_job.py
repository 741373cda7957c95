"""The SID stage end to end: artifact contract, determinism, uniqueness, new items, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.training.sids.helpers import make_catalog, tiny_config
from training.io import read_manifest
from training.sids.ids import format_sid, parse_sid
from training.sids.job import (
    ITEM_SEMANTICS_FILE,
    ITEM_SEMANTICS_SCHEMA,
    SidInputError,
    SidResult,
    assign_sids,
    read_codebook_sizes,
    train_sids,
)

N_ITEMS = 300


@pytest.fixture(scope="module")
def catalog() -> pa.Table:
    return make_catalog(N_ITEMS, seed=0)


@pytest.fixture(scope="module")
def trained(
    catalog: pa.Table, tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, SidResult]:
    import torch

    torch.set_num_threads(1)  # module-scoped: the autouse fixture has not run yet
    out = tmp_path_factory.mktemp("sids")
    return out, train_sids(catalog, tiny_config(tiny_bert), out)


def test_artifact_contract(catalog: pa.Table, trained: tuple[Path, SidResult]) -> None:
    out, result = trained
    table = pq.read_table(out / ITEM_SEMANTICS_FILE)
    assert table.schema.equals(ITEM_SEMANTICS_SCHEMA)
    assert table.num_rows == catalog.num_rows
    assert table.column("item_id").to_pylist() == catalog.column("item_id").to_pylist()
    assert table.column("event_timestamp").equals(catalog.column("event_timestamp"))
    codes = table.column("sid_codes").to_pylist()
    assert all(len(c) == 3 + 1 for c in codes)
    assert table.column("sid").to_pylist() == [format_sid(c) for c in codes]
    assert len(set(table.column("sid").to_pylist())) == N_ITEMS
    emb = np.array(table.column("content_embedding").to_pylist(), dtype=np.float32)
    assert emb.shape == (N_ITEMS, 32 + 16)
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    for path in (
        "codebooks.safetensors",
        "codebooks.json",
        "manifest.json",
        "encoder_cache.parquet",
    ):
        assert (out / path).exists(), path

    manifest = read_manifest(out)
    sizes = read_codebook_sizes(out)
    assert sizes[:3] == [16, 16, 16]
    assert sizes[3] == max(c[3] for c in codes) + 1 == result.codebook_sizes[3]
    metrics = manifest["metrics"]
    for key in (
        "utilization",
        "perplexity",
        "recon_mse",
        "recon_cosine",
        "collision_rate",
        "collision_rate_nearest",
        "shared_prefix_rate",
        "shared_prefix_rate_nearest",
        "last_level_reassigned",
        "max_disambiguation_index",
        "train_seconds",
        "encode_items_per_second",
    ):
        assert key in metrics, key
    assert len(metrics["utilization"]) == 3
    assert manifest["config"]["fusion"]["embedding_dim"] == 16
    assert manifest["config"]["encoder"]["model_path"] is not None


def test_same_seed_same_sids(
    catalog: pa.Table, trained: tuple[Path, SidResult], tiny_bert: Path, tmp_path: Path
) -> None:
    out, result = trained
    again = train_sids(catalog, tiny_config(tiny_bert), tmp_path / "again")
    assert again.table.column("sid").equals(result.table.column("sid"))
    assert again.metrics["cache_misses"] == N_ITEMS  # a fresh folder: nothing cached
    assert (tmp_path / "again" / "codebooks.safetensors").read_bytes() == (
        out / "codebooks.safetensors"
    ).read_bytes()
    other = train_sids(catalog, tiny_config(tiny_bert, seed=7), tmp_path / "other")
    assert not other.table.column("sid").equals(result.table.column("sid"))


@pytest.mark.parametrize("unique_last_level", [True, False])
def test_duplicates_split_at_the_last_level_or_by_disambiguation(
    catalog: pa.Table, tiny_bert: Path, tmp_path: Path, unique_last_level: bool
) -> None:
    # Copies of 20 items under new ids: same text, same content vector, same nearest codes.
    copies = catalog.slice(0, 20)
    ids = [f"dup{k:02d}" for k in range(20)]
    copies = copies.set_column(0, "item_id", pa.array(ids, pa.string())).cast(catalog.schema)
    cfg = tiny_config(tiny_bert, method="rkmeans", unique_last_level=unique_last_level)
    result = train_sids(pa.concat_tables([catalog, copies]), cfg, tmp_path)
    codes = np.array(result.table.column("sid_codes").to_pylist())
    m = result.metrics
    assert len(set(result.table.column("sid").to_pylist())) == N_ITEMS + 20
    assert m["shared_prefix_rate_nearest"] >= 40 / (N_ITEMS + 20)
    if unique_last_level:
        # Each copy differs from its original in the last content code, not by a counter.
        assert m["shared_prefix_rate"] == 0.0 and m["max_disambiguation_index"] == 0
        assert m["last_level_reassigned"] >= 20
        assert result.codebook_sizes[-1] == 1
    else:
        assert m["shared_prefix_rate"] == m["shared_prefix_rate_nearest"]
        assert m["last_level_reassigned"] == 0
        assert int((codes[:, -1] > 0).sum()) >= 20


def test_rkmeans_method_and_cached_rerun(
    catalog: pa.Table, tiny_bert: Path, tmp_path: Path
) -> None:
    cfg = tiny_config(tiny_bert, method="rkmeans")
    first = train_sids(catalog, cfg, tmp_path)
    assert len(set(first.table.column("sid").to_pylist())) == N_ITEMS
    assert json.loads((tmp_path / "codebooks.json").read_text())["method"] == "rkmeans"
    second = train_sids(catalog, cfg, tmp_path)
    assert (second.metrics["cache_hits"], second.metrics["cache_misses"]) == (N_ITEMS, 0)
    assert second.table.equals(first.table)


def test_new_items_get_sids_and_old_ones_keep_theirs(
    catalog: pa.Table,
    trained: tuple[Path, SidResult],
    tiny_bert: Path,
    tmp_path: Path,
) -> None:
    import shutil

    out, result = trained
    work = tmp_path / "sids"
    shutil.copytree(out, work)
    before = pq.read_table(work / ITEM_SEMANTICS_FILE)

    # The whole catalog again, one text edited, plus 40 new items (some near old ones).
    texts = catalog.column("text").to_pylist()
    texts[0] = "w0 w0 w0 a different text now"
    edited = catalog.set_column(1, "text", pa.array(texts)).cast(catalog.schema)
    new = make_catalog(40, seed=0, start=N_ITEMS)  # same clusters as the catalog
    assigned = assign_sids(pa.concat_tables([edited, new]), work)

    table = pq.read_table(work / ITEM_SEMANTICS_FILE)
    assert table.num_rows == N_ITEMS + 40
    assert table.slice(0, N_ITEMS).equals(before)  # old rows unchanged, edited one included
    sids = table.column("sid").to_pylist()
    assert len(set(sids)) == len(sids)
    assert assigned.metrics["new_items"] == 40
    assert assigned.metrics["existing_items"] == N_ITEMS
    assert assigned.metrics["changed_text"] == 1
    assert assigned.metrics["cache_misses"] == 40
    assert all(len(parse_sid(s)) == 4 for s in sids[N_ITEMS:])
    assert read_codebook_sizes(work)[-1] >= result.codebook_sizes[-1]
    assert (
        read_codebook_sizes(work)[-1]
        == max(c[-1] for c in table.column("sid_codes").to_pylist()) + 1
    )
    manifest = read_manifest(work)
    assert manifest["metrics"]["last_assignment"]["new_items"] == 40
    assert manifest["metrics"]["utilization"] == result.metrics["utilization"]

    # Nothing new: nothing changes.
    again = assign_sids(new, work)
    assert again.metrics["new_items"] == 0
    assert pq.read_table(work / ITEM_SEMANTICS_FILE).equals(table)


def test_every_input_problem_reported_before_any_work(catalog: pa.Table, tmp_path: Path) -> None:
    rows = catalog.slice(0, 10).to_pylist()
    rows[1]["text"] = "   "
    rows[2]["item_id"] = rows[3]["item_id"]
    rows[4]["content_embedding"] = [0.1, 0.2]
    rows[5]["content_embedding"] = [float("nan")] * 16
    bad = pa.Table.from_pylist(rows, schema=catalog.schema)
    cfg = tiny_config(tmp_path / "no-such-model")
    with pytest.raises(SidInputError) as info:
        train_sids(bad, cfg, tmp_path / "out")
    text = str(info.value)
    assert "empty texts" in text
    assert "duplicate" in text
    assert "different lengths" in text
    assert "NaN" in text
    assert "does not exist" in text
    assert "at least codebook_size" in text
    assert len(info.value.problems) == 6
    assert not (tmp_path / "out").exists()


def test_missing_text_and_assign_checks(
    catalog: pa.Table, trained: tuple[Path, SidResult], tiny_bert: Path
) -> None:
    out, _ = trained
    rows = catalog.slice(0, 3).to_pylist()
    rows[0]["text"] = None
    rows[1]["content_embedding"] = [0.5] * 8  # the codebooks were trained with 16
    schema = pa.schema([f.with_nullable(True) for f in catalog.schema])
    with pytest.raises(SidInputError) as info:
        assign_sids(pa.Table.from_pylist(rows, schema=schema), out)
    assert "null" in str(info.value)
    assert "trained with length 16" in str(info.value)
    with pytest.raises(FileNotFoundError):
        assign_sids(catalog, out / "not-a-stage")


@pytest.mark.parametrize("deterministic", [True, False])
def test_quantizer_runs_on_one_thread_unless_told_otherwise(
    catalog: pa.Table,
    tiny_bert: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    deterministic: bool,
) -> None:
    # Multi-threaded matrix products differ in their last bits between runs, which flips
    # near-tied codes: the deterministic default fits the quantizer on one thread.
    import torch

    import training.sids.job as job

    seen: list[int] = []
    real = job.train_rqvae

    def spy(x: np.ndarray, cfg: object) -> object:
        seen.append(torch.get_num_threads())
        return real(x, cfg)  # type: ignore[arg-type]

    monkeypatch.setattr(job, "train_rqvae", spy)
    torch.set_num_threads(2)
    train_sids(catalog, tiny_config(tiny_bert, deterministic=deterministic), tmp_path)
    assert seen == [1 if deterministic else 2]
    assert torch.get_num_threads() == 2  # the caller's setting is back
