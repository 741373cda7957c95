"""`gpl train` never reads the truth table; `gpl evaluate` writes the report against it."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import yaml

from tests.gpl_service.test_cli import gpl
from tests.training.preranker.conftest import Run
from training.io import write_table


@pytest.fixture
def run_dir(run: Run, tmp_path: Path) -> Path:
    root = tmp_path / "run"
    shutil.copytree(run.root, root)
    write_table(run.requests, root / "funnel" / "requests.parquet")
    write_table(run.semantics, root / "sids" / "item_semantics.parquet")
    write_table(run.items, root / "data" / "items.parquet")
    (root / "preranker.yaml").write_text(
        yaml.safe_dump(
            {
                "model": {"light_hidden": 16, "expressive_hidden": 32, "tower_dim": 8},
                "training": {"epochs": 1, "batch_requests": 16, "progress": False},
            }
        )
    )
    code, out = gpl("features", "apply", "--run-dir", str(root))
    assert code == 0, out
    return root


def evaluate(run_dir: Path, *args: str) -> tuple[int, str]:
    """`gpl evaluate` of the exposed-only baseline and GPL + HAP with the tiny config."""
    config = str(run_dir / "preranker.yaml")
    return gpl(
        "evaluate",
        "--run-dir",
        str(run_dir),
        "--config",
        config,
        "--objectives",
        "exposed,gpl_hap",
        *args,
    )


def test_train_without_truth_then_evaluate(run_dir: Path, run: Run) -> None:
    assert not (run_dir / "funnel" / "truth.parquet").exists()
    cfg = str(run_dir / "preranker.yaml")
    code, out = gpl("train", "--run-dir", str(run_dir), "--config", cfg, "--objective", "gpl_hap")
    assert code == 0, out
    manifest = json.loads((run_dir / "preranker" / "manifest.json").read_text())
    assert manifest["config"]["objective"] == "gpl_hap"
    assert manifest["metrics"]["pseudo_labelled_rows"] > 0
    from feature_repo.feature_services import preranker as service

    assert manifest["inputs"]["feature_service"] == {
        "name": "preranker",
        "version": service.tags["version"],  # as `features apply` registered it
    }
    for name in ("light.safetensors", "expressive.safetensors", "preprocessing.json"):
        assert (run_dir / "preranker" / name).exists()

    code, out = gpl("evaluate", "--run-dir", str(run_dir), "--config", cfg, "--seeds", "1")
    assert code == 2 and "truth.parquet" in out

    rng = np.random.default_rng(0)
    truth = pa.table(
        {
            "request_id": run.requests.column("request_id"),
            "user_id": run.requests.column("user_id"),
            "item_id": run.requests.column("item_id"),
            "label": pa.array((rng.random(run.requests.num_rows) < 0.2).astype(np.int8)),
        }
    )
    write_table(truth, run_dir / "funnel" / "truth.parquet")
    code, out = evaluate(run_dir, "--seeds", "2")
    assert code == 0, out
    report = (run_dir / "evaluation" / "report.md").read_text()
    # The fixture's pseudo-labels were calibrated on the whole log, evaluation period included.
    assert "warning: the pseudo-labels' calibration was fitted on exposed rows of the whole" in out
    assert "Warning: the pseudo-labels' calibration" in report
    for method in ("exposed", "gpl_hap", "gpl_hap expressive-all", "gpl_hap routing@0.2"):
        assert f"| {method} |" in report or method in report, method
    # Untrained references from the models' own inputs, and the truth's coverage.
    for method in ("popularity", "history cosine", "anchors + history cosine"):
        assert f"| reference: {method} | 1 |" in report, method
    assert "Truth coverage: 100.0% of the evaluated candidates have a truth row" in report
    assert "±" in report
    assert "with a long-tail positive" in report
    assert (run_dir / "evaluation" / "report.html").exists()
    # The cascade's pooled AUCs (from its served probabilities) get bootstrap intervals too:
    # they carry the served scoring's per-request parts (they showed "—").
    section = report[report.index("## Request-level uncertainty") :]
    rows = {line.split(" | ")[0][2:]: line for line in section.splitlines() if line[:2] == "| "}
    header = rows["method"].strip("| ").split(" | ")
    routed = dict(zip(header, rows["gpl_hap routing@0.2"].strip("| ").split(" | "), strict=True))
    for pooled in ("auc", "unexposed_auc"):
        assert re.fullmatch(r"[+-]\d\.\d{3} \[[+-]\d\.\d{3}, [+-]\d\.\d{3}\]", routed[pooled]), (
            routed
        )

    code, out = gpl("evaluate", "--run-dir", str(run_dir), "--objectives", "exposed,nope")
    assert code == 2 and "unknown objectives" in out
    code, out = gpl("evaluate", "--run-dir", str(run_dir), "--objectives", ",")
    assert code == 2 and "--objectives names none" in out, out
    no_positive = truth.set_column(3, "label", pa.array(np.zeros(truth.num_rows, np.int8)))
    write_table(no_positive, run_dir / "none.parquet")
    code, out = evaluate(run_dir, "--truth", str(run_dir / "none.parquet"))
    assert code == 2 and "has no positive label" in out, out


def test_evaluate_against_a_separate_random_exposure_truth(run_dir: Path, run: Run) -> None:
    # A random-exposure test set (KuaiRand / Yahoo! R3 style): user-level outcomes of items
    # shown at random, no request ids, some items never among the logged candidates.
    rng = np.random.default_rng(1)
    users = np.unique(run.requests.column("user_id").to_numpy(zero_copy_only=False))
    items = np.unique(run.requests.column("item_id").to_numpy(zero_copy_only=False))
    shown_users = np.repeat(users, 5)
    shown_items = np.concatenate([rng.choice(items, 4), ["never-a-candidate"]] * len(users))
    truth = pa.table(
        {
            "user_id": pa.array(shown_users),
            "item_id": pa.array(shown_items[: len(shown_users)]),
            "label": pa.array((rng.random(len(shown_users)) < 0.3).astype(np.int8)),
        }
    )
    truth_path = run_dir / "random_exposure.parquet"
    write_table(truth, truth_path)
    code, out = evaluate(run_dir, "--seeds", "1", "--truth", str(truth_path))
    assert code == 0, out
    assert not (run_dir / "funnel" / "truth.parquet").exists()
    report = json.loads((run_dir / "evaluation" / "report.json").read_text())
    for method in ("exposed", "gpl_hap"):
        seed = report["methods"][method]["seeds"][0]
        # Joined on (user, item): only the truth rows whose item was a candidate count.
        assert 0 < seed["positives"] < truth.num_rows
        assert 0 <= seed["auc"] <= 1 and seed["requests_evaluated"] > 0
    report_md = (run_dir / "evaluation" / "report.md").read_text()
    assert "| exposed |" in report_md and "| gpl_hap |" in report_md


def test_the_cascade_is_gpl_hap_at_the_configured_fraction_and_sid_less_items_count(
    run_dir: Path, run: Run
) -> None:
    """`--objectives gpl_hap,exposed` (GPL + HAP not last) with hard_fraction 0.25 (not among the
    swept fractions), and a logged item without a SID: the cascade rows are GPL + HAP's at
    0.25, and the item is scored like training scores it (the all-zero vector)."""
    write_table(
        pa.table(
            {
                "request_id": run.requests.column("request_id"),
                "user_id": run.requests.column("user_id"),
                "item_id": run.requests.column("item_id"),
                "label": pa.array(
                    (np.random.default_rng(2).random(run.requests.num_rows) < 0.2).astype(np.int8)
                ),
            }
        ),
        run_dir / "funnel" / "truth.parquet",
    )
    logged = run.requests.column("item_id")[0].as_py()
    semantics = run.semantics.filter(pa.compute.not_equal(run.semantics.column("item_id"), logged))
    write_table(semantics, run_dir / "sids" / "item_semantics.parquet")
    cfg = yaml.safe_load((run_dir / "preranker.yaml").read_text())
    cfg["routing"] = {"hard_fraction": 0.25}
    (run_dir / "preranker.yaml").write_text(yaml.safe_dump(cfg))
    code, out = gpl(
        "evaluate", "--run-dir", str(run_dir), "--config", str(run_dir / "preranker.yaml"),
        "--objectives", "gpl_hap,exposed", "--seeds", "1",
    )  # fmt: skip
    assert code == 0, out
    methods = json.loads((run_dir / "evaluation" / "report.json").read_text())["methods"]
    assert {"gpl_hap expressive-all", "gpl_hap routing@0.25"} <= set(methods)
    assert not any(m.startswith("exposed ") for m in methods), sorted(methods)


def test_objectives_without_pseudo_labels_need_no_pseudo_label_stage(run_dir: Path) -> None:
    """`--objective exposed` trains, and an evaluation of such objectives runs, on a run whose
    pseudo-label stage never ran (the labels' join read its missing output and failed)."""
    shutil.rmtree(run_dir / "pseudo_labels")
    cfg = str(run_dir / "preranker.yaml")
    code, out = gpl("train", "--run-dir", str(run_dir), "--config", cfg, "--objective", "exposed")
    assert code == 0, out
    code, out = gpl("train", "--run-dir", str(run_dir), "--config", cfg, "--objective", "gpl")
    assert code == 2 and "pseudo_labels" in out and "Traceback" not in out, out


def test_an_objective_listed_twice_is_trained_once_per_seed(run_dir: Path, run: Run) -> None:
    """`--objectives exposed,exposed` trained each seed twice and reported a std of duplicates."""
    write_table(
        pa.table(
            {
                "request_id": run.requests.column("request_id"),
                "user_id": run.requests.column("user_id"),
                "item_id": run.requests.column("item_id"),
                "label": pa.array(np.arange(run.requests.num_rows) % 5 == 0).cast(pa.int8()),
            }
        ),
        run_dir / "funnel" / "truth.parquet",
    )
    config = str(run_dir / "preranker.yaml")
    code, out = gpl(
        "evaluate", "--run-dir", str(run_dir), "--config", config, "--seeds", "1",
        "--objectives", "exposed,exposed",
    )  # fmt: skip
    assert code == 0, out
    report = (run_dir / "evaluation" / "report.md").read_text()
    assert "| exposed | 1 |" in report, report
