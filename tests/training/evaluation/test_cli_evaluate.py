"""`gpl evaluate` scores the recalled candidates only and adds the request bootstrap."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import yaml

from tests.gpl_service.test_cli import gpl
from tests.training.preranker.conftest import Run, run  # noqa: F401  (module-scoped fixture)
from training.io import read_table, write_table

GLOBAL_FROM = 12
"""make_requests' candidates at pre-rank positions after this become global negatives."""


@pytest.fixture
def run_dir(run: Run, tmp_path: Path) -> Path:  # noqa: F811  (the fixture above, used)
    root = tmp_path / "run"
    shutil.copytree(run.root, root)
    # A quarter of every request's candidates: random catalog negatives, as the simulator
    # draws them (stage retrieved, no funnel position).
    late = pc.greater(run.requests.column("prerank_position"), GLOBAL_FROM)
    requests = run.requests.set_column(
        run.requests.schema.get_field_index("group"),
        "group",
        pc.if_else(late, "global_negative", run.requests.column("group")),
    )
    requests = requests.set_column(
        requests.schema.get_field_index("prerank_position"),
        "prerank_position",
        pc.if_else(late, pa.scalar(None, pa.int32()), requests.column("prerank_position")),
    )
    write_table(requests, root / "funnel" / "requests.parquet")
    write_table(run.semantics, root / "sids" / "item_semantics.parquet")
    write_table(run.items, root / "data" / "items.parquet")
    rng = np.random.default_rng(0)
    truth = pa.table(
        {
            "request_id": requests.column("request_id"),
            "user_id": requests.column("user_id"),
            "item_id": requests.column("item_id"),
            "label": pa.array((rng.random(requests.num_rows) < 0.2).astype(np.int8)),
        }
    )
    write_table(truth, root / "funnel" / "truth.parquet")
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


def evaluate(run_dir: Path, *args: str) -> tuple[str, dict[str, Any], str]:
    """(report.md, report.json, the command's output) of `gpl evaluate` of the exposed model."""
    code, out = gpl(
        "evaluate",
        "--run-dir",
        str(run_dir),
        "--config",
        str(run_dir / "preranker.yaml"),
        "--objectives",
        "exposed",
        "--seeds",
        "1",
        *args,
    )
    assert code == 0, out
    report = run_dir / "evaluation"
    return (
        (report / "report.md").read_text(),
        json.loads((report / "report.json").read_text()),
        out,
    )


def test_global_negatives_leave_the_evaluation_unless_asked(run_dir: Path) -> None:
    requests = read_table(run_dir / "funnel" / "requests.parquet", "requests")
    assert pc.sum(pc.equal(requests.column("group"), "global_negative")).as_py() > 0

    md, payload, out = evaluate(run_dir)
    # A plain note of the report (it was a "Warning: ..." line, the one channel there was).
    note = re.search(
        r"^- global_negative rows left out of every metric: ([\d,]+) of the ([\d,]+)", md, re.M
    )
    assert note, md
    assert "Warning: global_negative" not in md
    dropped, total = (int(g.replace(",", "")) for g in note.groups())
    assert dropped == total // 4  # 4 of every request's 16 candidates
    assert f"{dropped:,} global_negative rows of the evaluation requests left out" in out
    popularity = payload["methods"]["reference: popularity"]["seeds"][0]
    assert popularity["rows"] == total - dropped
    # Every other row of the evaluation requests is scored: the unexposed rows lose exactly the
    # global negatives (all of them stage retrieved).
    unexposed_without = popularity["unexposed_rows"]
    # The request bootstrap against the exposed-only model, in the report and its JSON.
    assert "## Request-level uncertainty: difference to exposed, paired bootstrap" in md
    boot = payload["bootstrap"]
    assert (boot["baseline"], boot["resamples"], boot["seed"]) == ("exposed", 1000, 0)
    assert "recall@50" in boot["methods"]["reference: popularity"]
    assert "category_recall@50" in payload["columns"]
    assert "category_coverage@50" not in payload["columns"]

    md, payload, out = evaluate(
        run_dir,
        "--include-global-negatives",
        "--bootstrap-resamples",
        "50",
        "--bootstrap-seed",
        "3",
    )
    assert (
        f"- global_negative rows included in every metric (--include-global-negatives): "
        f"{dropped:,}" in md
    )
    assert f"{dropped:,} global_negative rows of the evaluation requests scored" in out
    popularity = payload["methods"]["reference: popularity"]["seeds"][0]
    assert popularity["rows"] == total
    assert popularity["unexposed_rows"] == unexposed_without + dropped
    boot = payload["bootstrap"]
    assert (boot["resamples"], boot["seed"]) == (50, 3)
    assert "50 resamples of the" in md


def test_bootstrap_flags_turn_it_off_and_refuse_what_cannot_resample(run_dir: Path) -> None:
    md, payload, _ = evaluate(run_dir, "--bootstrap-resamples", "0")
    assert payload["bootstrap"] is None
    assert "Request-level uncertainty" not in md

    base = ["evaluate", "--run-dir", str(run_dir), "--objectives", "exposed", "--seeds", "1"]
    code, out = gpl(*base, "--bootstrap-resamples", "-5")
    assert code == 2 and "Invalid value for '--bootstrap-resamples'" in out, out
    code, out = gpl(*base, "--bootstrap-seed", "-1")
    assert code == 2 and "Invalid value for '--bootstrap-seed'" in out, out
    # One resample has no spread: refused before any training, naming the flag.
    code, out = gpl(*base, "--bootstrap-resamples", "1")
    assert code == 2 and "error: --bootstrap-resamples must be 0" in out, out
    assert "Traceback" not in out and "report ->" not in out
