"""ONNX export: parity with PyTorch, dynamic batch, the bundle's manifest and checksums."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pyarrow as pa
import pytest
import torch

import export.onnx_export as onnx_export
from export.bundle import (
    CHECKSUMS,
    MANIFEST,
    BundleError,
    ExportError,
    ExportResult,
    export_bundle,
    verify_bundle,
)
from export.onnx_export import INPUT_NAMES, OUTPUT_NAMES, ServingGraph, cross_in_graph
from export.parity import (
    ExportParityError,
    cases_from_data,
    cases_from_joined,
    onnx_session,
    random_cases,
    run_graph,
    run_model,
    run_onnx,
    run_split,
)
from export.signature import ITEM_INPUT_NAMES, SCORE_INPUT_NAMES
from feature_repo.feature_services import preranker as preranker_service
from tests.training.preranker.conftest import Run, small_config
from training.io import read_manifest, write_table
from training.preranker.data import cross_features
from training.preranker.job import (
    Prepared,
    fit,
    join_features,
    load_preranker,
    prepare,
    save_preranker,
    split_at,
    time_quantile,
)

TOL = 1e-5
SPLIT = {f"{k}.{half}.onnx" for k in ("light", "expressive") for half in ("item", "score")}
BUNDLE_FILES = {"light.onnx", "expressive.onnx", *SPLIT, MANIFEST, CHECKSUMS}


@dataclass
class Trained:
    model_dir: Path
    prepared: Prepared
    cutoff: Any
    later: pa.Table  # joined rows from the cutoff on: never seen in training


@pytest.fixture(scope="module")
def trained(run: Run) -> Trained:
    """A gpl_hap pre-ranker saved the way `gpl train` saves it, in a run with real rows."""
    cutoff = time_quantile(run.requests, 0.8)
    joined = join_features(run.store, run.requests)
    early, later, _ = split_at(joined, cutoff)
    cfg = small_config()
    prepared = prepare(early, run.semantics, cfg)
    fitted = fit(prepared, cfg, "gpl_hap")
    write_table(run.requests, run.root / "funnel" / "requests.parquet")
    write_table(run.semantics, run.root / "sids" / "item_semantics.parquet")
    model_dir = save_preranker(
        fitted,
        prepared,
        cfg,
        run.root / "preranker",
        inputs={"requests_before": str(cutoff), "rows": early.num_rows},
    )
    return Trained(model_dir, prepared, cutoff, later)


@pytest.fixture(scope="module")
def bundle(trained: Trained, tmp_path_factory: pytest.TempPathFactory) -> ExportResult:
    return export_bundle(trained.model_dir, tmp_path_factory.mktemp("out") / "bundle")


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_export_writes_a_verified_bundle(bundle: ExportResult) -> None:
    assert {p.name for p in bundle.path.iterdir()} == BUNDLE_FILES
    assert verify_bundle(bundle.path) == bundle.manifest
    assert not _leftovers(bundle.path.parent)  # the temporary build directory is gone
    parity = bundle.parity
    assert parity["passed"] and parity["max_abs_diff"] <= TOL
    checks = {(c["model"], c["case"]): c for c in parity["checks"]}
    # Each model twice: the full graph, and its item graph composed with its score graph.
    for kind in ("light", "expressive", "light (split)", "expressive (split)"):
        for r in (1, 3):
            for n in (1, 7, 500):
                c = checks[(kind, f"random_r{r}_n{n}")]
                assert (c["requests"], c["rows"]) == (r, n)
                assert c["vs_graph"] <= TOL and c["vs_training"] <= TOL
        real = checks[(kind, "real_rows")]
        assert real["requests"] > 1 and real["vs_training"] <= TOL
        assert checks[(kind, "real_rows_one_request")]["requests"] == 1
    # The checksum file is in `sha256sum -c` format.
    lines = (bundle.path / CHECKSUMS).read_text().splitlines()
    assert sorted(line.split("  ")[1] for line in lines) == sorted(BUNDLE_FILES - {CHECKSUMS})
    if shutil.which("sha256sum"):
        subprocess.run(["sha256sum", "--quiet", "-c", CHECKSUMS], cwd=bundle.path, check=True)


def test_verifying_imports_neither_torch_nor_onnxruntime(bundle: ExportResult) -> None:
    code = (
        "import sys; from export import verify_bundle; "
        f"verify_bundle({str(bundle.path)!r}); "
        "assert not {'torch', 'onnxruntime'} & set(sys.modules), sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])


def test_manifest_records_features_preprocessing_training_and_versions(
    bundle: ExportResult, trained: Trained
) -> None:
    m = json.loads((bundle.path / MANIFEST).read_text())
    prep = trained.prepared.prep
    source = read_manifest(trained.model_dir)
    assert m["feature_service"] == {
        "name": "preranker",
        "version": preranker_service.tags["version"],
    }
    assert m["features"]["user"]["columns"] == [s.column for s in prep.user_numeric]
    assert m["features"]["item"]["columns"] == [s.column for s in prep.item_numeric]
    assert m["features"]["user"]["shape"] == ["R", len(prep.user_numeric)]
    assert m["features"]["history"]["shape"] == ["R", prep.history_length, prep.embedding_dim]
    assert m["features"]["anchors"]["shape"] == ["R", prep.num_anchors, prep.embedding_dim]
    assert m["features"]["category"]["vocabulary"] == prep.categories
    assert m["preprocessing"]["fitted"] == prep.model_dump()
    for kind in ("light", "expressive"):
        model = m["models"][kind]
        assert model["file"] == f"{kind}.onnx" and model["opset"] >= 17
        assert [i["name"] for i in model["inputs"]] == list(INPUT_NAMES)
        assert [o["name"] for o in model["outputs"]] == list(OUTPUT_NAMES)
        assert model["flops"] == source["metrics"]["flops"][kind]
        split = m["split"][kind]
        assert split["state_width"] == 1 + small_config().model.tower_dim + (
            small_config().model.attention_dim if kind == "expressive" else 0
        )
        assert split["item"]["file"] == f"{kind}.item.onnx"
        assert [i["name"] for i in split["item"]["inputs"]] == list(ITEM_INPUT_NAMES)
        assert split["item"]["outputs"][0]["shape"] == ["N", split["state_width"]]
        assert [i["name"] for i in split["score"]["inputs"]] == list(SCORE_INPUT_NAMES)
        assert [o["name"] for o in split["score"]["outputs"]] == list(OUTPUT_NAMES)
    assert m["training"]["metrics"] == source["metrics"]
    assert m["data_cutoff"] == str(trained.cutoff)
    assert m["objective"] == "gpl_hap"
    assert isinstance(m["code_version"], str) and m["code_version"]
    assert m["versions"]["onnxruntime"] and m["versions"]["torch"]
    assert m["parity"]["passed"]


def test_onnx_matches_torch_on_real_rows(bundle: ExportResult, trained: Trained) -> None:
    loaded = load_preranker(trained.model_dir)
    p = trained.prepared
    cases = [
        *cases_from_data(p.valid, p.embeddings, p.prep, name="valid"),
        *cases_from_joined(trained.later, p.items, p.prep, name="later"),
    ]
    for kind, model in (("light", loaded.light), ("expressive", loaded.expressive)):
        session = onnx_session(bundle.path / f"{kind}.onnx")
        for case in cases:
            got, got_logit = run_onnx(session, case.graph_inputs)
            assert case.model_inputs is not None
            want, want_logit = run_model(model, case.model_inputs)
            assert got.shape == (case.rows,) and np.isfinite(got).all()
            assert np.abs(got - want).max() <= TOL, (kind, case.name)
            assert np.abs(got_logit - want_logit).max() <= 1e-4, (kind, case.name)
            assert ((got > 0) & (got < 1)).all()
            item = onnx_session(bundle.path / f"{kind}.item.onnx")
            score = onnx_session(bundle.path / f"{kind}.score.onnx")
            split, split_logit = run_split(item, score, case.graph_inputs)
            assert np.abs(split - want).max() <= TOL, (kind, case.name, "split")
            assert np.abs(split_logit - want_logit).max() <= 1e-4, (kind, case.name, "split")


def test_item_states_are_per_row_and_compose_to_the_model(trained: Trained) -> None:
    """An item's state does not depend on the other rows of the batch (so it can be computed
    once per item and cached), and score_side(item_side) is the model, exactly."""
    loaded = load_preranker(trained.model_dir)
    p = trained.prepared
    case = cases_from_data(p.valid, p.embeddings, p.prep, name="valid")[0]
    assert case.model_inputs is not None
    x = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in case.model_inputs.items()}
    for model in (loaded.light, loaded.expressive):
        model.eval()
        with torch.no_grad():
            state = model.item_side(x["item_numeric"], x["category"], x["item_emb"])
            assert state.shape == (case.rows, model.item_side_width)
            one = model.item_side(x["item_numeric"][3:4], x["category"][3:4], x["item_emb"][3:4])
            torch.testing.assert_close(one[0], state[3], rtol=0, atol=1e-6)
            full = model(*x.values())
            composed = model.score_side(
                x["user_numeric"],
                x["history_emb"],
                x["anchor_emb"],
                x["row_request"],
                state,
                x["cross"],
            )
            assert torch.equal(full, composed)


def test_dynamic_batch(bundle: ExportResult, trained: Trained) -> None:
    prep = trained.prepared.prep
    loaded = load_preranker(trained.model_dir)
    for kind, model in (("light", loaded.light), ("expressive", loaded.expressive)):
        path = bundle.path / f"{kind}.onnx"
        graph_in = {i.name: i for i in onnx.load(str(path)).graph.input}
        assert graph_in["user_features"].type.tensor_type.shape.dim[0].dim_param == "R"
        assert graph_in["item_emb"].type.tensor_type.shape.dim[0].dim_param == "N"
        session = onnx_session(path)
        graph = ServingGraph(model, prep)
        for case in random_cases(prep, sizes=[(1, 1), (1, 1000), (2, 1000)], seed=7):
            got, _ = run_onnx(session, case.graph_inputs)
            assert got.shape == (case.rows,)
            assert np.abs(got - run_graph(graph, case.graph_inputs)[0]).max() <= TOL


def test_cross_in_graph_is_training_cross_features(trained: Trained) -> None:
    p = trained.prepared
    data = p.valid.select_requests(np.arange(min(5, p.valid.n_requests)))
    emb = p.embeddings
    got = cross_in_graph(
        emb[torch.from_numpy(data.item).long()],
        emb[torch.from_numpy(data.anchors).long()],
        emb[torch.from_numpy(data.history).long()],
        torch.from_numpy(data.row_request).long(),
    ).numpy()
    want = cross_features(p.items.embeddings, data.offsets, data.item, data.history, data.anchors)
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_cross_from_item_states_is_cross_in_graph() -> None:
    g = torch.Generator().manual_seed(3)
    r, n, d = 3, 50, 16
    anchors, history = torch.randn(r, 4, d, generator=g), torch.randn(r, 6, d, generator=g)
    anchors[1, 2:] = 0.0  # padding
    history[2] = 0.0  # a user without history
    item = torch.randn(n, d, generator=g) * 3.0
    item[5] = 0.0  # an unknown item
    rows = torch.arange(n) % r
    inverse = onnx_export._inverse_norm(item)
    got = onnx_export.cross_from_states(item, inverse, anchors, history, rows)
    want = cross_in_graph(item, anchors, history, rows)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_verify_bundle_catches_tampering(bundle: ExportResult, tmp_path: Path) -> None:
    def fresh(name: str) -> Path:
        return Path(shutil.copytree(bundle.path, tmp_path / name))

    altered = fresh("altered")
    data = bytearray((altered / "light.onnx").read_bytes())
    data[-1] ^= 0xFF
    (altered / "light.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"light\.onnx does not match its sha256"):
        verify_bundle(altered)

    missing = fresh("missing")
    (missing / "expressive.onnx").unlink()
    with pytest.raises(BundleError, match=r"expressive\.onnx is missing"):
        verify_bundle(missing)

    extra = fresh("extra")
    (extra / "notes.txt").write_text("hi")
    with pytest.raises(BundleError, match=r"notes\.txt is not listed"):
        verify_bundle(extra)

    manifest = fresh("manifest")
    (manifest / MANIFEST).write_text((manifest / MANIFEST).read_text().replace("gpl_hap", "x"))
    with pytest.raises(BundleError, match=r"manifest\.json does not match"):
        verify_bundle(manifest)

    no_sums = fresh("no_sums")
    (no_sums / CHECKSUMS).unlink()
    with pytest.raises(BundleError, match="no checksums"):
        verify_bundle(no_sums)

    with pytest.raises(BundleError, match="no bundle directory"):
        verify_bundle(tmp_path / "nothing")


def test_broken_export_fails_parity_and_leaves_no_bundle(
    trained: Trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = cases_from_data(
        trained.prepared.valid, trained.prepared.embeddings, trained.prepared.prep
    )
    original = onnx_export.export_graph

    def wrong_mean(graph: ServingGraph, *args: Any, **kwargs: Any) -> str:
        """Export a graph whose first user-feature mean is off by 0.5."""
        with torch.no_grad():
            graph.user.mean[0] += 0.5
            try:
                return original(graph, *args, **kwargs)
            finally:
                graph.user.mean[0] -= 0.5

    # A previous good bundle at the target survives a failed re-export untouched.
    kept = export_bundle(trained.model_dir, tmp_path / "kept", real_rows=real)
    before = (kept.path / MANIFEST).read_bytes()
    monkeypatch.setattr(onnx_export, "export_graph", wrong_mean)
    for target in (tmp_path / "new", kept.path):
        with pytest.raises(ExportParityError, match="ONNX parity failed") as info:
            export_bundle(trained.model_dir, target, real_rows=real)
        assert info.value.max_abs_diff > TOL
        assert info.value.report.failures()
    assert not (tmp_path / "new").exists()
    assert (kept.path / MANIFEST).read_bytes() == before
    verify_bundle(kept.path)
    assert not _leftovers(tmp_path)


def test_a_wrong_logit_fails_parity_even_with_right_probabilities(
    trained: Trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The service ranks by the `logit` output: a graph whose probability is right but whose
    logit is 3 * logit + 1 must not pass."""
    real = cases_from_data(
        trained.prepared.valid, trained.prepared.embeddings, trained.prepared.prep
    )
    original = onnx_export.export_graph

    class WrongLogit(torch.nn.Module):
        def __init__(self, graph: ServingGraph) -> None:
            super().__init__()
            self.graph = graph

        def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            prob, logit = self.graph(*inputs)
            return prob, 3.0 * logit + 1.0

    def wrong_logit(graph: ServingGraph, *args: Any, **kwargs: Any) -> str:
        return original(WrongLogit(graph), *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(onnx_export, "export_graph", wrong_logit)
    with pytest.raises(ExportParityError, match="relative logit difference") as info:
        export_bundle(trained.model_dir, tmp_path / "b", real_rows=real)
    report = info.value.report
    assert report.max_abs_diff <= TOL and report.max_logit_diff > report.logit_tolerance
    assert {c["model"] for c in report.failures()} == {"light", "expressive"}


def test_broken_split_graphs_fail_parity(
    trained: Trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = cases_from_data(
        trained.prepared.valid, trained.prepared.embeddings, trained.prepared.prep
    )
    original = onnx_export.export_split

    def wrong_std(graph: ServingGraph, *args: Any, **kwargs: Any) -> str:
        """Export split graphs whose first item-feature std is doubled."""
        with torch.no_grad():
            graph.item.std[0] *= 2.0
            try:
                return original(graph, *args, **kwargs)
            finally:
                graph.item.std[0] /= 2.0

    monkeypatch.setattr(onnx_export, "export_split", wrong_std)
    with pytest.raises(ExportParityError, match=r"\(split\)") as info:
        export_bundle(trained.model_dir, tmp_path / "b", real_rows=real)
    failed = {c["model"] for c in info.value.report.failures()}
    assert failed <= {"light (split)", "expressive (split)"} and failed
    assert not (tmp_path / "b").exists()


def test_replaces_a_bundle_refuses_other_directories(
    trained: Trained, run: Run, tmp_path: Path
) -> None:
    real = cases_from_data(
        trained.prepared.valid, trained.prepared.embeddings, trained.prepared.prep
    )
    out = tmp_path / "bundle"
    first = export_bundle(run.root, out, real_rows=real)  # a run directory works too
    second = export_bundle(trained.model_dir, out, real_rows=real)
    assert verify_bundle(out)["created_at"] == second.manifest["created_at"]
    assert first.manifest["created_at"] <= second.manifest["created_at"]
    assert not _leftovers(tmp_path)

    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not a bundle"):
        export_bundle(trained.model_dir, other, real_rows=real)
    assert (other / "keep.txt").read_text() == "mine"


def test_export_needs_a_model_and_real_rows(trained: Trained, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="gpl train"):
        export_bundle(tmp_path / "nothing", tmp_path / "out")
    alone = Path(shutil.copytree(trained.model_dir, tmp_path / "elsewhere" / "preranker"))
    with pytest.raises(ExportError, match="no real rows"):
        export_bundle(alone, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_bundle_records_the_feature_service_version_training_used(
    trained: Trained, tmp_path: Path
) -> None:
    """Not the feature_repo code's at export time: the service compares it with the registry."""
    model_dir = shutil.copytree(trained.model_dir, tmp_path / "model")
    manifest = json.loads((model_dir / "manifest.json").read_text())
    manifest["inputs"]["feature_service"] = {"name": "preranker", "version": "trained-7"}
    (model_dir / "manifest.json").write_text(json.dumps(manifest))
    real = cases_from_data(
        trained.prepared.valid, trained.prepared.embeddings, trained.prepared.prep
    )
    result = export_bundle(model_dir, tmp_path / "bundle", real_rows=real)
    assert result.manifest["feature_service"] == {"name": "preranker", "version": "trained-7"}
