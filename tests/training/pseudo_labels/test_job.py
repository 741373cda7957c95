"""The pseudo-label job: artifact contract, no row lost or double-labelled, honest statuses."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from tests.factories import T0, make_requests
from training.data.contract import ContractError
from training.evaluation.metrics import auc
from training.io import read_manifest, write_table
from training.pseudo_labels.calibration import CalibrationError, fit_platt
from training.pseudo_labels.confidence import (
    AnchorVectors,
    HistoryForm,
    combine,
    dispersion_factor,
    history_factor,
    history_factors,
    lm_factor,
)
from training.pseudo_labels.job import (
    OUTPUT_SCHEMA,
    ConfidenceWeights,
    PseudoLabelConfig,
    PseudoLabelInputError,
    generate_pseudo_labels,
)

N_ITEMS = 40
DIM = 16
N_ANCHORS = 5


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def make_item_semantics(n_items: int = N_ITEMS, drop: tuple[str, ...] = ()) -> pa.Table:
    rng = np.random.default_rng(1)
    centers = _unit(rng.standard_normal((4, DIM)))
    emb = _unit(centers[np.arange(n_items) % 4] + 0.3 * rng.standard_normal((n_items, DIM)))
    ids = [f"i{i}" for i in range(n_items)]
    keep = [k for k, i in enumerate(ids) if i not in drop]
    return pa.table(
        {
            "item_id": [ids[k] for k in keep],
            "content_embedding": pa.array([emb[k] for k in keep], pa.list_(pa.float32())),
        }
    )


def make_anchors(users: list[str], cutoff_days: list[int], items: pa.Table) -> pa.Table:
    """One anchor set per (user, cutoff day): N anchors drawn from the catalog."""
    rng = np.random.default_rng(2)
    emb = np.stack(items.column("content_embedding").to_numpy(zero_copy_only=False))
    ids = items.column("item_id").to_pylist()
    rows = []
    for u in users:
        for d in cutoff_days:
            pick = rng.choice(len(ids), N_ANCHORS, replace=False)
            logp = np.sort(rng.uniform(-8, -1, N_ANCHORS))[::-1].astype(np.float32)
            rows.append(
                {
                    "user_id": u,
                    "event_timestamp": T0 + timedelta(days=d),
                    "anchor_sids": [f"<a_{k}>" for k in pick],
                    "anchor_item_ids": [ids[k] for k in pick],
                    "anchor_embeddings": emb[pick].ravel().tolist(),
                    "anchor_log_probs": logp.tolist(),
                    "num_anchors": N_ANCHORS,
                    "history_length": 5,
                }
            )
    schema = pa.schema(
        [
            ("user_id", pa.string()),
            ("event_timestamp", pa.timestamp("us", tz="UTC")),
            ("anchor_sids", pa.list_(pa.string())),
            ("anchor_item_ids", pa.list_(pa.string())),
            ("anchor_embeddings", pa.list_(pa.float32())),
            ("anchor_log_probs", pa.list_(pa.float32())),
            ("num_anchors", pa.int32()),
            ("history_length", pa.int32()),
        ]
    )
    return pa.Table.from_pylist(rows, schema=schema)


def make_positives(users: list[str]) -> pa.Table:
    rng = np.random.default_rng(3)
    rows = [
        {
            "user_id": u,
            "item_id": f"i{rng.integers(N_ITEMS)}",
            "event_timestamp": T0 + timedelta(hours=int(h)),
        }
        for u in users
        for h in rng.integers(0, 24 * 30, 8)
    ]
    return pa.Table.from_pylist(
        rows,
        schema=pa.schema(
            [
                ("user_id", pa.string()),
                ("item_id", pa.string()),
                ("event_timestamp", pa.timestamp("us", tz="UTC")),
            ]
        ),
    )


@pytest.fixture
def inputs():  # type: ignore[no-untyped-def]
    requests = make_requests(n_requests=200, n_users=10, n_items=N_ITEMS, seed=7, exposed=4)
    users = [f"u{k}" for k in range(9)]  # u9 never gets anchors
    items = make_item_semantics(drop=("i39",))  # i39 has no embedding
    anchors = make_anchors(users, [0, 10, 20], items)
    return requests, items, anchors, make_positives(users)


def _unexposed(requests: pa.Table, groups: tuple[str, ...]) -> pa.Table:
    return requests.filter(pc.is_in(requests.column("group"), pa.array(list(groups))))


def test_artifact_contract_and_no_row_lost_or_doubled(inputs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    requests, items, anchors, positives = inputs
    result = generate_pseudo_labels(
        requests, items, anchors, positives, PseudoLabelConfig(progress=False), tmp_path
    )
    out = pq.read_table(result.path)
    assert out.schema.equals(OUTPUT_SCHEMA, check_metadata=False)
    unexposed = _unexposed(requests, ("prerank_negative", "rank_negative"))
    assert out.num_rows == unexposed.num_rows
    keys_out = set(
        zip(out.column("request_id").to_pylist(), out.column("item_id").to_pylist(), strict=True)
    )
    keys_in = set(
        zip(
            unexposed.column("request_id").to_pylist(),
            unexposed.column("item_id").to_pylist(),
            strict=True,
        )
    )
    assert keys_out == keys_in and len(keys_out) == out.num_rows
    manifest = read_manifest(tmp_path)
    m = manifest["metrics"]
    assert m["ok_rows"] + m["no_anchors_rows"] + m["no_item_embedding_rows"] == out.num_rows
    assert m["no_anchors_rows"] > 0 and m["no_item_embedding_rows"] > 0
    assert "distributions" in m and "confidence" in m["distributions"]
    # Time columns keep their min/max (readers prune row groups by time with them); the unsorted
    # id strings do without (they would prune nothing and cost a quarter of the writing).
    group = pq.ParquetFile(result.path).metadata.row_group(0)
    stats = {
        group.column(i).path_in_schema: group.column(i).is_stats_set
        for i in range(group.num_columns)
    }
    assert stats["event_timestamp"] and stats["anchor_cutoff"] and stats["relevance"]
    assert not (stats["request_id"] or stats["user_id"] or stats["item_id"])


def test_statuses_are_explicit_never_a_silent_zero(inputs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    requests, items, anchors, positives = inputs
    out = pq.read_table(
        generate_pseudo_labels(
            requests, items, anchors, positives, PseudoLabelConfig(progress=False), tmp_path
        ).path
    ).to_pandas()
    no_anchor = out[out["status"] == "no_anchors"]
    # Anchor sets start at T0, so only the user who never got one lacks anchors.
    assert set(no_anchor["user_id"]) == {"u9"}
    assert (out.loc[out["user_id"] == "u9", "status"] == "no_anchors").all()
    assert (
        out.loc[(out["item_id"] == "i39") & (out["user_id"] != "u9"), "status"]
        == "no_item_embedding"
    ).all()
    bad = out[out["status"] != "ok"]
    assert bad["pseudo_label"].isna().all() and bad["confidence"].isna().all()
    good = out[out["status"] == "ok"]
    assert good["pseudo_label"].notna().all()
    assert good["pseudo_label"].between(0, 1).all()
    for col in ("dispersion", "history_consistency", "lm_confidence", "confidence"):
        assert good[col].between(0, 1).all(), col


def test_items_with_non_finite_embeddings_count_as_having_none(  # type: ignore[no-untyped-def]
    inputs, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    requests, items, anchors, positives = inputs
    emb = items.column("content_embedding").to_pylist()
    ids = items.column("item_id").to_pylist()
    emb[ids.index("i3")][0] = float("nan")
    emb[ids.index("i7")][2] = float("inf")
    broken = items.set_column(1, "content_embedding", pa.array(emb, pa.list_(pa.float32())))
    result = generate_pseudo_labels(
        requests, broken, anchors, positives, PseudoLabelConfig(progress=False), tmp_path
    )
    out = pq.read_table(result.path).to_pandas()
    mine = out[out["item_id"].isin(["i3", "i7"]) & (out["user_id"] != "u9")]
    assert len(mine) > 0
    assert (mine["status"] == "no_item_embedding").all()
    assert mine["pseudo_label"].isna().all() and mine["relevance"].isna().all()
    ok = out[out["status"] == "ok"]
    assert np.isfinite(ok["relevance"]).all()
    assert result.metrics["items_with_unusable_embedding"] == 2
    assert "2 item(s) have a null, NaN, infinite or all-zero content embedding" in caplog.text


def test_items_with_null_or_zero_embeddings_count_as_having_none(inputs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A zero vector has no direction (its cosine would be a silent 0); a null one no values."""
    requests, items, anchors, positives = inputs
    emb = items.column("content_embedding").to_pylist()
    ids = items.column("item_id").to_pylist()
    emb[ids.index("i5")] = [0.0] * DIM
    emb[ids.index("i6")] = None
    broken = items.set_column(1, "content_embedding", pa.array(emb, pa.list_(pa.float32())))
    result = generate_pseudo_labels(
        requests, broken, anchors, positives, PseudoLabelConfig(progress=False), tmp_path
    )
    out = pq.read_table(result.path).to_pandas()
    mine = out[out["item_id"].isin(["i5", "i6"]) & (out["status"] != "no_anchors")]
    assert len(mine) > 0
    assert (mine["status"] == "no_item_embedding").all()
    assert result.metrics["items_with_unusable_embedding"] == 2
    others = out[~out["item_id"].isin(["i5", "i6", "i39"]) & (out["status"] != "no_anchors")]
    assert len(others) > 0 and (others["status"] == "ok").all()


def _with_sets(anchors: pa.Table, change: dict[int, dict[str, object]]) -> pa.Table:
    """``anchors`` with the given rows' fields replaced."""
    rows = anchors.to_pylist()
    for k, fields in change.items():
        rows[k].update(fields)
    return pa.Table.from_pylist(rows, schema=anchors.schema)


_EMPTY_SET = {
    "anchor_sids": [],
    "anchor_item_ids": [],
    "anchor_embeddings": [],
    "anchor_log_probs": [],
    "num_anchors": 0,
}


@pytest.mark.parametrize("calibration", ["platt", "none"])
def test_an_empty_anchor_set_means_no_anchors(inputs, tmp_path: Path, calibration: str) -> None:  # type: ignore[no-untyped-def]
    """Rows whose latest set is empty (every beam invalid) get no label, not an older set's.

    Before, such rows were scored against nothing (relevance -inf) with status ok, and the -inf
    made the Platt fit NaN for every user.
    """
    requests, items, anchors, positives = inputs
    cfg = PseudoLabelConfig(progress=False, calibration=calibration)
    full = generate_pseudo_labels(requests, items, anchors, positives, cfg, tmp_path / "a")
    users = anchors.column("user_id").to_pylist()
    days = [(t - T0).days for t in anchors.column("event_timestamp").to_pylist()]
    # u0 loses every set; u1 only its latest (day 20).
    empty = {
        k: _EMPTY_SET
        for k, (u, d) in enumerate(zip(users, days, strict=True))
        if u == "u0" or (u, d) == ("u1", 20)
    }
    result = generate_pseudo_labels(
        requests, items, _with_sets(anchors, empty), positives, cfg, tmp_path / "b"
    )
    before = pq.read_table(full.path).to_pandas()
    out = pq.read_table(result.path).to_pandas()
    assert len(out) == len(before)
    u1_late = (out["user_id"] == "u1") & (out["event_timestamp"] >= T0 + timedelta(days=20))
    hit = (out["user_id"] == "u0") | u1_late
    assert hit.sum() > 0 and (out.loc[hit, "status"] == "no_anchors").all()
    assert out.loc[hit, ["relevance", "pseudo_label", "confidence"]].isna().all().all()
    assert out.loc[hit, "anchor_cutoff"].isna().all()
    # Every other row is labelled exactly as before, from finite relevance.
    keep = ~hit & (before["status"] == "ok")
    assert (out.loc[keep, "status"] == "ok").all()
    np.testing.assert_array_equal(out.loc[keep, "relevance"], before.loc[keep, "relevance"])
    assert np.isfinite(out.loc[keep, ["relevance", "pseudo_label"]].to_numpy()).all()
    assert result.metrics["no_anchors_rows"] == full.metrics["no_anchors_rows"] + int(
        (hit & (before["status"] != "no_anchors")).sum()
    )


def test_a_bank_without_any_anchor_labels_nothing(inputs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """An empty anchors table, or one whose sets are all empty: every row no_anchors, no crash."""
    requests, items, anchors, positives = inputs
    cfg = PseudoLabelConfig(progress=False, calibration="none")
    all_empty = _with_sets(anchors, dict.fromkeys(range(anchors.num_rows), _EMPTY_SET))
    for k, table in enumerate([anchors.slice(0, 0), all_empty]):
        result = generate_pseudo_labels(requests, items, table, positives, cfg, tmp_path / f"{k}")
        out = pq.read_table(result.path)
        assert out.num_rows == result.metrics["unexposed_rows"] > 0
        assert set(out.column("status").to_pylist()) == {"no_anchors"}
        assert out.column("pseudo_label").null_count == out.num_rows
    with pytest.raises(CalibrationError, match="needs at least 5 clicked"):
        generate_pseudo_labels(
            requests, items, all_empty, positives, PseudoLabelConfig(progress=False), tmp_path
        )


def test_the_request_log_is_checked_before_it_is_streamed(inputs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Its schema (a naive timestamp would be cast to UTC silently) and exposed rows' labels."""
    requests, items, anchors, positives = inputs
    cfg = PseudoLabelConfig(progress=False)
    ts = requests.schema.get_field_index("event_timestamp")
    naive = requests.set_column(ts, "event_timestamp", requests.column(ts).cast(pa.timestamp("us")))
    path = write_table(naive, tmp_path / "naive.parquet")
    with pytest.raises(ContractError, match="timezone-naive"):
        generate_pseudo_labels(path, items, anchors, positives, cfg, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    labels = requests.column("label").to_pylist()
    exposed = requests.column("stage").to_pylist().index("exposed")
    labels[exposed] = None
    unlabelled = requests.set_column(
        requests.schema.get_field_index("label"), "label", pa.array(labels, pa.int8())
    )
    with pytest.raises(PseudoLabelInputError, match="1 exposed rows have no label"):
        generate_pseudo_labels(unlabelled, items, anchors, positives, cfg, tmp_path / "b")


def test_anchor_log_probs_are_checked(inputs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Lists must match num_anchors (also when the total matches); NaN and +inf stop the job."""
    requests, items, anchors, positives = inputs
    cfg = PseudoLabelConfig(progress=False)
    lp = anchors.column("anchor_log_probs").to_pylist()
    moved = {0: {"anchor_log_probs": lp[0][:-1]}, 1: {"anchor_log_probs": [*lp[1], lp[0][-1]]}}
    with pytest.raises(PseudoLabelInputError, match=r"anchor_log_probs lengths differ .*2 sets"):
        generate_pseudo_labels(
            requests, items, _with_sets(anchors, moved), positives, cfg, tmp_path
        )
    for bad in (float("nan"), float("inf")):
        broken = _with_sets(anchors, {3: {"anchor_log_probs": [bad, *lp[3][1:]]}})
        with pytest.raises(PseudoLabelInputError, match="1 anchor_log_probs are NaN or \\+inf"):
            generate_pseudo_labels(requests, items, broken, positives, cfg, tmp_path)
    # -inf is a probability of 0: kept, and its anchor simply earns no LM confidence.
    impossible = _with_sets(anchors, {3: {"anchor_log_probs": [*lp[3][:-1], float("-inf")]}})
    result = generate_pseudo_labels(requests, items, impossible, positives, cfg, tmp_path)
    out = pq.read_table(result.path).filter(pc.equal(pc.field("status"), "ok")).to_pandas()
    assert np.isfinite(out[["relevance", "confidence", "lm_confidence"]].to_numpy()).all()


def test_anchors_with_non_finite_embeddings_fail_loudly(inputs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """When the anchors' own vectors are used (here: no anchor_item_ids), NaN stops the job."""
    requests, items, anchors, positives = inputs
    emb = anchors.column("anchor_embeddings").to_pylist()
    emb[4][7] = float("nan")
    broken = anchors.set_column(
        anchors.schema.get_field_index("anchor_embeddings"),
        "anchor_embeddings",
        pa.array(emb, pa.list_(pa.float32())),
    ).drop_columns(["anchor_item_ids"])
    with pytest.raises(PseudoLabelInputError, match="NaN or infinite values \\(1 of"):
        generate_pseudo_labels(
            requests, items, broken, positives, PseudoLabelConfig(progress=False), tmp_path
        )


def test_anchors_are_catalog_rows_when_the_catalog_has_their_items(inputs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Catalog rows and the anchors' own vectors give the same labels; the manifest says which."""
    requests, items, anchors, positives = inputs
    cfg = PseudoLabelConfig(progress=False)
    rows = generate_pseudo_labels(requests, items, anchors, positives, cfg, tmp_path / "a")
    own = generate_pseudo_labels(
        requests, items, anchors.drop_columns(["anchor_item_ids"]), positives, cfg, tmp_path / "b"
    )
    assert rows.metrics["anchor_vectors"] == "catalog"
    assert own.metrics["anchor_vectors"] == "anchor_embeddings"
    assert pq.read_table(rows.path).equals(pq.read_table(own.path))
    # An anchor whose item the catalog lacks (i39 has no embedding): the anchors' own vectors.
    ids = anchors.column("anchor_item_ids").to_pylist()
    ids[3][1] = "i39"
    emb = anchors.column("anchor_embeddings").to_pylist()
    emb[3][DIM : 2 * DIM] = make_item_semantics().column("content_embedding")[39].as_py()
    stray = anchors.set_column(
        anchors.schema.get_field_index("anchor_item_ids"),
        "anchor_item_ids",
        pa.array(ids, pa.list_(pa.string())),
    ).set_column(
        anchors.schema.get_field_index("anchor_embeddings"),
        "anchor_embeddings",
        pa.array(emb, pa.list_(pa.float32())),
    )
    fallback = generate_pseudo_labels(requests, items, stray, positives, cfg, tmp_path / "c")
    assert fallback.metrics["anchor_vectors"] == "anchor_embeddings"
    assert fallback.metrics["ok_rows"] == rows.metrics["ok_rows"]


def test_anchors_from_a_file_are_read_without_their_vectors_unless_needed(  # type: ignore[no-untyped-def]
    inputs, tmp_path: Path, monkeypatch
) -> None:
    requests, items, anchors, positives = inputs
    cfg = PseudoLabelConfig(progress=False)
    path = write_table(anchors, tmp_path / "anchors.parquet")
    read_columns: list[list[str] | None] = []
    real = pq.read_table

    def recording(source, *args, columns=None, **kwargs):  # type: ignore[no-untyped-def]
        if Path(str(source)) == path:
            read_columns.append(columns)
        return real(source, *args, columns=columns, **kwargs)

    monkeypatch.setattr(pq, "read_table", recording)
    from_file = generate_pseudo_labels(requests, items, path, positives, cfg, tmp_path / "a")
    assert read_columns == [[c for c in anchors.column_names if c != "anchor_embeddings"]]
    in_memory = generate_pseudo_labels(requests, items, anchors, positives, cfg, tmp_path / "b")
    assert pq.read_table(from_file.path).equals(pq.read_table(in_memory.path))
    # A catalog without one anchor's item: the vectors are read after all.
    read_columns.clear()
    smaller = items.filter(pc.not_equal(items.column("item_id"), anchors["anchor_item_ids"][0][0]))
    fallback = generate_pseudo_labels(requests, smaller, path, positives, cfg, tmp_path / "c")
    assert fallback.metrics["anchor_vectors"] == "anchor_embeddings"
    assert read_columns[-1] == ["anchor_embeddings"]


def test_anchor_item_ids_must_match_num_anchors(inputs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    requests, items, anchors, positives = inputs
    ids = anchors.column("anchor_item_ids").to_pylist()
    ids[2] = ids[2][:-1]
    broken = anchors.set_column(
        anchors.schema.get_field_index("anchor_item_ids"),
        "anchor_item_ids",
        pa.array(ids, pa.list_(pa.string())),
    )
    with pytest.raises(PseudoLabelInputError, match="lengths differ from num_anchors \\(1 sets"):
        generate_pseudo_labels(
            requests, items, broken, positives, PseudoLabelConfig(progress=False), tmp_path
        )


def test_relevance_is_max_cosine_to_the_point_in_time_anchor_set(inputs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    requests, items, anchors, positives = inputs
    out = pq.read_table(
        generate_pseudo_labels(
            requests, items, anchors, positives, PseudoLabelConfig(progress=False), tmp_path
        ).path
    ).to_pandas()
    emb = dict(
        zip(
            items.column("item_id").to_pylist(),
            items.column("content_embedding").to_pylist(),
            strict=True,
        )
    )
    anc = anchors.to_pandas()
    for _, row in out[out["status"] == "ok"].sample(60, random_state=0).iterrows():
        sets = anc[
            (anc["user_id"] == row["user_id"]) & (anc["event_timestamp"] <= row["event_timestamp"])
        ]
        latest = sets.sort_values("event_timestamp").iloc[-1]
        assert row["anchor_cutoff"] == latest["event_timestamp"]
        a = np.asarray(latest["anchor_embeddings"], np.float32).reshape(N_ANCHORS, DIM)
        expected = float((_unit(a) @ np.asarray(emb[row["item_id"]], np.float32)).max())
        assert row["relevance"] == pytest.approx(expected, abs=1e-5)


def test_embeddings_not_of_unit_length_are_normalized(inputs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Unit vectors are used in place; any other length gives the same labels after normalizing."""
    requests, items, anchors, positives = inputs
    cfg = PseudoLabelConfig(progress=False)
    unit = pq.read_table(
        generate_pseudo_labels(requests, items, anchors, positives, cfg, tmp_path / "a").path
    )

    def scaled(table: pa.Table, column: str, factor: float) -> pa.Table:
        values = pc.multiply(table.column(column).combine_chunks().flatten(), factor)
        lists = pa.ListArray.from_arrays(table.column(column).combine_chunks().offsets, values)
        return table.set_column(table.column_names.index(column), column, lists)

    other = pq.read_table(
        generate_pseudo_labels(
            requests,
            scaled(items, "content_embedding", 3.0),
            # Without item ids the anchors' own (here non-unit) vectors are used.
            scaled(anchors, "anchor_embeddings", 0.5).drop_columns(["anchor_item_ids"]),
            positives,
            cfg,
            tmp_path / "b",
        ).path
    )
    for column in unit.column_names:
        if unit.schema.field(column).type == pa.float32():
            np.testing.assert_allclose(
                other.column(column).to_numpy(zero_copy_only=False),
                unit.column(column).to_numpy(zero_copy_only=False),
                atol=1e-6,
            )
        else:
            assert other.column(column).equals(unit.column(column))


def test_streaming_from_parquet_in_small_batches_matches(inputs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    requests, items, anchors, positives = inputs
    whole = generate_pseudo_labels(
        requests, items, anchors, positives, PseudoLabelConfig(progress=False), tmp_path / "a"
    )
    path = write_table(requests, tmp_path / "requests.parquet")
    # Small row groups too: every row group brings its own dictionaries of the id columns.
    grouped = tmp_path / "requests_grouped.parquet"
    pq.write_table(requests, grouped, row_group_size=700)
    for name, source in (("b", path), ("c", grouped)):
        streamed = generate_pseudo_labels(
            source,
            items,
            anchors,
            positives,
            PseudoLabelConfig(progress=False, batch_rows=1024),
            tmp_path / name,
        )
        out = pq.read_table(streamed.path)
        assert out.schema.equals(OUTPUT_SCHEMA, check_metadata=False)
        assert pq.read_table(whole.path).equals(out)
        for key in ("ok_rows", "no_anchors_rows", "users_without_anchors", "calibration"):
            assert streamed.metrics[key] == whole.metrics[key], key


def test_global_negatives_are_optional(inputs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    requests, items, anchors, positives = inputs
    rows = requests.slice(0, 1).to_pylist()[0]
    extra = dict(
        rows,
        item_id="i5",
        group="global_negative",
        stage="retrieved",
        label=None,
        prerank_position=None,
        rank_position=None,
        request_id="rg",
    )
    requests = pa.concat_tables([requests, pa.Table.from_pylist([extra], schema=requests.schema)])
    without = pq.read_table(
        generate_pseudo_labels(
            requests, items, anchors, positives, PseudoLabelConfig(progress=False), tmp_path / "a"
        ).path
    )
    with_g = pq.read_table(
        generate_pseudo_labels(
            requests,
            items,
            anchors,
            positives,
            PseudoLabelConfig(progress=False, include_global_negatives=True),
            tmp_path / "b",
        ).path
    )
    assert "global_negative" not in without.column("group").to_pylist()
    assert with_g.num_rows == without.num_rows + 1


def test_calibration_cut_at_a_time_sees_only_the_clicks_known_then(  # type: ignore[no-untyped-def]
    inputs, tmp_path: Path
) -> None:
    """calibrate_until: exposed rows before it, a click known only later counted as no click."""
    requests, items, anchors, positives = inputs
    clicked = requests.column("label").to_numpy(zero_copy_only=False) == 1
    delays = [timedelta(days=3 * (k % 4)) if c else None for k, c in enumerate(clicked)]
    known_at = pc.add(requests.column("event_timestamp"), pa.array(delays, pa.duration("us")))
    requests = requests.append_column("label_timestamp", known_at)
    times = requests.column("event_timestamp").to_pandas()
    until = times.quantile(0.6).to_pydatetime()
    cut = PseudoLabelConfig(progress=False, calibrate_until=until)
    result = generate_pseudo_labels(requests, items, anchors, positives, cut, tmp_path / "cut")

    # The same log written by hand as it stood at `until`: later exposed rows gone, later
    # clicks negatives; calibrated on every exposed row, it must give the same labels.
    log = requests.to_pandas()
    exposed = log["stage"] == "exposed"
    log = log[~exposed | (log["event_timestamp"] < until)].copy()
    late = log["label_timestamp"] >= until
    assert 0 < late.sum() < (log["label"] == 1).sum()
    log.loc[late, ["label", "group"]] = [0, "exposed_negative"]
    as_known = pa.Table.from_pandas(
        log.drop(columns="label_timestamp"),
        schema=requests.schema.remove(requests.schema.get_field_index("label_timestamp")),
        preserve_index=False,
    )
    plain = PseudoLabelConfig(progress=False)
    expected = generate_pseudo_labels(as_known, items, anchors, positives, plain, tmp_path / "hand")
    got, want = result.metrics["calibration"], expected.metrics["calibration"]
    assert got["until"] == until.isoformat() and want["until"] is None
    assert got["clicks_known_after_until"] == late.sum() and want["clicks_known_after_until"] == 0
    for key in ("a", "b", "exposed_rows", "clicks", "relevance_auc"):
        assert got[key] == want[key], key
    assert pq.read_table(result.path).equals(pq.read_table(expected.path))
    # Without the cut the whole log's clicks shape the labels.
    whole = generate_pseudo_labels(requests, items, anchors, positives, plain, tmp_path / "all")
    assert whole.metrics["calibration"]["clicks"] > got["clicks"]
    with pytest.raises(ValueError, match="timezone"):
        PseudoLabelConfig(calibrate_until=until.replace(tzinfo=None))


def test_calibration_reports_how_well_relevance_ranks_the_exposed_clicks(  # type: ignore[no-untyped-def]
    inputs, tmp_path: Path
) -> None:
    requests, items, anchors, positives = inputs
    plain = PseudoLabelConfig(progress=False)
    got = generate_pseudo_labels(requests, items, anchors, positives, plain, tmp_path / "job")
    # The exposed rows relabelled as pre-rank negatives: the job's second pass then writes their
    # relevance, to be ranked against their real clicks by hand.
    log = requests.to_pandas()
    exposed = log[log["stage"] == "exposed"].copy()
    clicks = exposed.set_index(["request_id", "item_id"])["label"]
    exposed[["stage", "group", "label"]] = ["preranked", "prerank_negative", None]
    as_unexposed = pa.Table.from_pandas(exposed, schema=requests.schema, preserve_index=False)
    scored = generate_pseudo_labels(
        as_unexposed,
        items,
        anchors,
        positives,
        PseudoLabelConfig(progress=False, calibration="none"),
        tmp_path / "exposed",
    )
    rows = pq.read_table(scored.path).to_pandas()
    rows = rows[rows["status"] == "ok"].set_index(["request_id", "item_id"])
    labels = clicks.loc[rows.index].to_numpy()
    assert 0 < labels.sum() < len(labels)
    calibration = got.metrics["calibration"]
    assert calibration["exposed_rows"] == len(rows)
    expected = auc(labels, rows["relevance"].to_numpy())
    assert calibration["relevance_auc"] == pytest.approx(expected, abs=1e-4)


def test_hard_labels(inputs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    requests, items, anchors, positives = inputs
    cfg = PseudoLabelConfig(progress=False, hard_threshold=0.2)
    out = pq.read_table(
        generate_pseudo_labels(requests, items, anchors, positives, cfg, tmp_path).path
    )
    labels = set(pc.drop_null(out.column("pseudo_label")).to_pylist())
    assert labels <= {0.0, 1.0}


def test_platt_scaling_is_monotone_and_fails_loudly() -> None:
    rng = np.random.default_rng(0)
    rel = rng.uniform(-1, 1, 2000).astype(np.float32)
    labels = (rng.random(2000) < 1 / (1 + np.exp(-(4 * rel - 1)))).astype(np.int8)
    scaler = fit_platt(rel, labels)
    assert scaler.a == pytest.approx(4, abs=0.7) and scaler.b == pytest.approx(-1, abs=0.3)
    with pytest.raises(CalibrationError, match="clicked"):
        fit_platt(rel[:50], np.zeros(50, np.int8))
    assert not scaler.clamped
    # Clicks falling with relevance: never an inverted mapping, the base rate instead.
    inverted = fit_platt(-rel, labels)
    assert inverted.clamped and inverted.a == 0.0
    np.testing.assert_allclose(inverted(rel), labels.mean(), rtol=1e-6)
    with pytest.raises(CalibrationError, match="1 non-finite relevance"):
        fit_platt(np.append(rel, -np.inf).astype(np.float32), np.append(labels, 0).astype(np.int8))


def test_confidence_factors() -> None:
    rng = np.random.default_rng(0)
    base = _unit(rng.standard_normal(DIM))
    focused = _unit(base + 0.05 * rng.standard_normal((N_ANCHORS, DIM)))
    scattered = _unit(rng.standard_normal((N_ANCHORS, DIM)))
    mask = np.ones((2, N_ANCHORS), bool)
    logp = np.zeros((2, N_ANCHORS), np.float32)
    disp = dispersion_factor(np.stack([focused, scattered]), mask, logp)
    assert disp[0] > 0.9 > disp[1]
    lm = lm_factor(np.array([[-1.0, -1.0 - np.log(10), -5.0]], np.float32), np.ones((1, 3), bool))
    np.testing.assert_allclose(lm[0, :2], [1.0, 0.1], rtol=1e-5)
    geo = combine([np.array([1.0]), np.array([0.25])], [1, 1])
    assert geo[0] == pytest.approx(0.5)
    assert combine([np.array([1.0]), np.array([0.0])], [1, 1])[0] < 1e-2


def test_history_coverage_counts_the_interests_the_anchors_miss() -> None:
    rng = np.random.default_rng(1)
    a, b = _unit(rng.standard_normal((2, DIM)))
    anchors_on_a = _unit(a + 0.01 * rng.standard_normal((N_ANCHORS, DIM)))
    # Half of the history is interest a, half interest b: anchors all on a cover half of it.
    history = np.stack([a, a, b, b]).astype(np.float32)
    one_sided = history_factor(anchors_on_a, history, "coverage")
    both = history_factor(np.stack([anchors_on_a[0], b]), history, "coverage")
    assert one_sided.shape == (N_ANCHORS,) and np.ptp(one_sided) == 0
    expected = (2 * 1.0 + 2 * max(0.0, float(a @ b))) / 4
    assert one_sided[0] == pytest.approx(expected, abs=0.01)
    assert both[0] == pytest.approx(1.0, abs=1e-3)
    assert both[0] > one_sided[0] + 0.3
    # The matched form scores every anchor on a as fully consistent: it cannot see b is missed.
    assert history_factor(anchors_on_a, history, "matched").min() > 0.99
    assert (history_factor(anchors_on_a, history[:0], "coverage") == 0).all()


@pytest.mark.parametrize("form", ["coverage", "matched"])
@pytest.mark.parametrize("workers", [1, 2, 3])
@pytest.mark.parametrize("chunk", [1, 3, 256])
def test_history_factors_equal_the_per_set_factor(
    chunk: int, workers: int, form: HistoryForm
) -> None:
    rng = np.random.default_rng(chunk)
    items = _unit(rng.standard_normal((40, DIM))).astype(np.float32)
    counts = rng.integers(0, N_ANCHORS + 1, 9)
    anchors = np.zeros((9, N_ANCHORS, DIM), np.float32)
    mask = np.arange(N_ANCHORS)[None, :] < counts[:, None]
    anchors[mask] = _unit(rng.standard_normal((int(counts.sum()), DIM)))
    history = np.full((9, 6), -1, np.int64)
    for s, n in enumerate(rng.integers(0, 7, 9)):  # right-aligned, some with unknown items
        if n:
            history[s, 6 - n :] = np.where(rng.random(n) < 0.2, -1, rng.integers(0, 40, n))
    history[0] = -1  # one set without any history
    got = history_factors(
        AnchorVectors.of(anchors), mask, items, history, chunk=chunk, workers=workers, form=form
    )
    for s in range(9):
        rows = history[s][history[s] >= 0]
        expected = np.zeros(N_ANCHORS, np.float32)
        expected[: counts[s]] = history_factor(anchors[s, : counts[s]], items[rows], form)
        np.testing.assert_allclose(got[s], expected, atol=1e-6)
    assert (got[0] == 0).all() and (got[~mask] == 0).all()


def test_default_confidence_is_the_history_coverage_and_the_weights_are_configurable(
    inputs,  # type: ignore[no-untyped-def]
    tmp_path: Path,
) -> None:
    requests, items, anchors, positives = inputs
    default = generate_pseudo_labels(
        requests, items, anchors, positives, PseudoLabelConfig(progress=False), tmp_path / "d"
    )
    out = pq.read_table(default.path).filter(pc.equal(pc.field("status"), "ok"))
    # Measured defaults: historical consistency 1 (coverage form), the other two reported only.
    np.testing.assert_allclose(
        out.column("confidence").to_numpy(),
        np.maximum(out.column("history_consistency").to_numpy(), 1e-6),
        rtol=1e-6,
    )
    assert default.metrics["confidence_weights"] == {"dispersion": 0.0, "history": 1.0, "lm": 0.0}
    assert default.metrics["history_form"] == "coverage"
    # Coverage is one value per anchor set: every row of one request shares it.
    frame = out.select(["request_id", "history_consistency"]).to_pandas()
    assert (frame.groupby("request_id")["history_consistency"].nunique() == 1).all()
    matched = generate_pseudo_labels(
        requests,
        items,
        anchors,
        positives,
        PseudoLabelConfig(progress=False, history_form="matched"),
        tmp_path / "m",
    )
    assert matched.metrics["history_form"] == "matched"
    by_anchor = pq.read_table(matched.path).filter(pc.equal(pc.field("status"), "ok"))
    assert not np.allclose(
        by_anchor.column("history_consistency").to_numpy(),
        out.column("history_consistency").to_numpy(),
    )
    equal = ConfidenceWeights(dispersion=1, history=1, lm=1)
    mixed = generate_pseudo_labels(
        requests,
        items,
        anchors,
        positives,
        PseudoLabelConfig(progress=False, weights=equal),
        tmp_path / "e",
    )
    got = pq.read_table(mixed.path).filter(pc.equal(pc.field("status"), "ok"))
    want = combine(
        [got.column(c).to_numpy() for c in ("dispersion", "history_consistency", "lm_confidence")],
        [1, 1, 1],
    )
    np.testing.assert_allclose(got.column("confidence").to_numpy(), want, rtol=1e-6)
    with pytest.raises(ValueError, match="at least one must be positive"):
        ConfidenceWeights(dispersion=0, history=0, lm=0)
    for bad in (float("inf"), float("nan")):
        with pytest.raises(ValueError, match="finite number"):
            ConfidenceWeights(dispersion=bad)


def test_zero_length_anchor_vectors_are_left_out_of_their_sets(inputs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """An anchor with a zero vector (and no catalog row) has no direction: it is left out of its
    set, so it cannot pass for a match of cosine 0; a set of only such anchors has none."""
    requests, items, anchors, positives = inputs
    cfg = PseudoLabelConfig(progress=False)
    own = anchors.drop_columns(["anchor_item_ids"])
    emb = own.column("anchor_embeddings").to_pylist()
    counts = own.column("num_anchors").to_pylist()
    emb[2][:DIM] = [0.0] * DIM  # set 2 loses its first anchor
    emb[5] = [0.0] * (DIM * counts[5])  # set 5 loses every anchor
    zeroed = own.set_column(
        own.schema.get_field_index("anchor_embeddings"),
        "anchor_embeddings",
        pa.array(emb, pa.list_(pa.float32())),
    )
    # The same sets without those anchors (set 5 empty), written the way the job reads them.
    trimmed_emb = [list(e) for e in emb]
    trimmed_emb[2] = trimmed_emb[2][DIM:]
    trimmed_emb[5] = []
    lp = own.column("anchor_log_probs").to_pylist()
    lp[2], lp[5] = lp[2][1:], []
    sids = own.column("anchor_sids").to_pylist()
    sids[2], sids[5] = sids[2][1:], []
    n = list(counts)
    n[2], n[5] = n[2] - 1, 0
    trimmed = zeroed
    for name, values, typ in (
        ("anchor_embeddings", trimmed_emb, pa.list_(pa.float32())),
        ("anchor_log_probs", lp, pa.list_(pa.float32())),
        ("anchor_sids", sids, pa.list_(pa.string())),
        ("num_anchors", n, own.schema.field("num_anchors").type),
    ):
        trimmed = trimmed.set_column(
            trimmed.schema.get_field_index(name), name, pa.array(values, typ)
        )
    got = generate_pseudo_labels(requests, items, zeroed, positives, cfg, tmp_path / "a")
    want = generate_pseudo_labels(requests, items, trimmed, positives, cfg, tmp_path / "b")
    assert pq.read_table(got.path).equals(pq.read_table(want.path))
    assert got.metrics["ok_rows"] == want.metrics["ok_rows"]


def test_a_log_in_nanoseconds_and_no_positives_at_all(inputs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A request log written in ns (sub-microsecond parts truncated to the contract's us) labels
    like the us log; with no positives every history is empty, not a crash."""
    requests, items, anchors, positives = inputs
    cfg = PseudoLabelConfig(progress=False)
    ts = requests.column("event_timestamp").cast(pa.timestamp("ns", tz="UTC"))
    nanos = pc.add(ts.cast(pa.int64()), 1).cast(pa.timestamp("ns", tz="UTC"))
    ns_log = requests.set_column(
        requests.schema.get_field_index("event_timestamp"), "event_timestamp", nanos
    )
    path = tmp_path / "requests_ns.parquet"
    pq.write_table(ns_log, path)
    us = generate_pseudo_labels(requests, items, anchors, positives, cfg, tmp_path / "us")
    ns = generate_pseudo_labels(path, items, anchors, positives, cfg, tmp_path / "ns")
    assert pq.read_table(ns.path).equals(pq.read_table(us.path))
    none = generate_pseudo_labels(
        requests, items, anchors, positives.slice(0, 0), cfg, tmp_path / "none"
    )
    assert none.metrics["ok_rows"] == us.metrics["ok_rows"]
