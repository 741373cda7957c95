from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from tests.training.evaluation.test_bootstrap import Data
from training.evaluation.bootstrap import BootstrapSettings
from training.evaluation.ranking import Evaluation
from training.evaluation.report import write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def results() -> dict[str, list[dict[str, float]]]:
    return {
        "light": [
            {"auc": 0.7, "gauc": 0.6, "ndcg@10": 0.2, "ndcg@50": 0.3, "rows": 1000.0},
            {"auc": 0.8, "gauc": 0.6, "ndcg@10": 0.3, "ndcg@50": 0.3, "rows": 1000.0},
            {"auc": 0.9, "gauc": 0.6, "ndcg@10": 0.4, "ndcg@50": math.nan, "rows": 1000.0},
        ],
        "gpl | hap": [
            {"auc": 0.85, "gauc": 0.7, "ndcg@10": 0.5, "ndcg@50": 0.6, "rows": 1000.0},
            {"auc": 0.85, "gauc": 0.8, "ndcg@10": 0.5, "ndcg@50": 0.6, "rows": 1000.0},
            {"auc": 0.85, "gauc": 0.9, "ndcg@10": 0.5, "ndcg@50": 0.6, "rows": 1000.0},
        ],
    }


def test_report_writes_markdown_html_json_and_plots(tmp_path: Path) -> None:
    curves = {"light": [(1.0, 0.3), (0.1, 0.2)], "gpl | hap": [(0.1, 0.4), (1.0, 0.6)]}
    paths = write_report(
        results(),
        tmp_path / "report",
        "Pre-ranker comparison",
        notes=["MovieLens-100k, 3 seeds"],
        curves=curves,
    )
    assert paths.markdown == tmp_path / "report" / "report.md"
    assert [p.name for p in paths.plots] == ["metrics.png", "curves.png"]
    for plot in paths.plots:
        assert plot.read_bytes().startswith(PNG_MAGIC)
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == [
        "curves.png",
        "metrics.png",
        "report.html",
        "report.json",
        "report.md",
    ]  # no temporary files left behind

    md = paths.markdown.read_text()
    assert "# Pre-ranker comparison" in md
    assert "- MovieLens-100k, 3 seeds" in md
    assert "n = 3 seeds" in md
    assert "| method | seeds | auc | gauc | ndcg@10 | ndcg@50 |" in md  # default: no count column
    assert (
        "| light | 3 | 0.8000 ± 0.1000 | 0.6000 ± 0.0000 | 0.3000 ± 0.1000 | 0.3000 ± 0.0000 |"
        in md
    )
    assert (
        "| gpl \\| hap | 3 | **0.8500 ± 0.0000** | **0.8000 ± 0.1000** | **0.5000 ± 0.0000** "
        "| **0.6000 ± 0.0000** |" in md
    )
    assert "![metrics](metrics.png)" in md
    assert "![curves](curves.png)" in md

    page = paths.html.read_text()
    assert page.count('src="data:image/png;base64,') == 2
    assert "<td>0.8000 ± 0.1000</td>" in page
    assert "<td>gpl | hap</td>" in page
    for external in ('src="http', "<link", "<script", "href="):
        assert external not in page  # self-contained: no external assets

    data = json.loads(paths.json.read_text())
    light = data["methods"]["light"]
    assert light["mean"]["auc"] == pytest.approx(0.8)
    assert light["std"]["auc"] == pytest.approx(0.1)
    assert light["seeds"][2]["ndcg@50"] is None
    assert light["n"]["ndcg@50"] == 2
    assert data["curves"]["light"]["points"] == [[1.0, 0.3], [0.1, 0.2]]
    assert data["curves"]["light"]["labels"] == ["FLOPs share", "NDCG@50"]
    # Plain dicts carry no per-request values: no bootstrap table.
    assert data["bootstrap"] is None
    assert "Request-level uncertainty" not in md


def test_report_primary_columns_and_single_seed(tmp_path: Path) -> None:
    one = {"only": [{"auc": 0.75, "rows": 123456.0, "recall@10": 0.5}]}
    paths = write_report(one, tmp_path, "One seed", primary=["rows", "auc"])
    md = paths.markdown.read_text()
    assert "| method | seeds | rows | auc |" in md
    assert "| only | 1 | 123456.0 ± 0.0 | 0.7500 ± 0.0000 |" in md
    assert "n = 1 seeds" in md
    assert [p.name for p in paths.plots] == ["metrics.png"]
    with pytest.raises(ValueError, match="appear in no result"):
        write_report(one, tmp_path, "bad", primary=["ndcg@10"])
    with pytest.raises(ValueError, match="empty"):
        write_report({}, tmp_path, "empty")
    with pytest.raises(ValueError, match="without any seed"):
        write_report({"x": []}, tmp_path, "no seeds")


INTERVAL = re.compile(r"[+-]\d\.\d{3} \[[+-]\d\.\d{3}, [+-]\d\.\d{3}\]")


def test_report_adds_paired_bootstrap_intervals_against_exposed(tmp_path: Path) -> None:
    data = Data(n_requests=60, rows=8, seed=11)
    weak, strong = data.scores(0.2), data.scores(2.0)
    routed = data.evaluate(strong)
    routed["auc"] = 0.5  # assigned after evaluation, without the parts it came from
    results: dict[str, list[Evaluation]] = {
        "reference: popularity": [data.evaluate(data.scores(0.0))],
        "exposed": [data.evaluate(weak), data.evaluate(data.scores(0.2))],
        "gpl_hap": [data.evaluate(strong), data.evaluate(data.scores(2.0))],
        "gpl_hap routing@0.2": [routed],
    }
    settings = BootstrapSettings(resamples=200, seed=3)
    paths = write_report(results, tmp_path, "Bootstrap", bootstrap=settings)

    md = paths.markdown.read_text()
    heading = "## Request-level uncertainty: difference to exposed, paired bootstrap"
    assert heading in md
    section = md[md.index(heading) :]
    assert "200 resamples of the 60 evaluation requests" in section
    assert "not the seed variance" in section
    rows = {line.split(" | ")[0][2:]: line for line in section.splitlines() if line[:2] == "| "}
    assert "exposed" not in rows  # the baseline is the reference, not a row
    header = rows["method"].strip("| ").split(" | ")
    assert header[:3] == ["method", "auc", "gauc"] and "category_recall@5" in header
    cells = dict(zip(header, rows["gpl_hap"].strip("| ").split(" | "), strict=True))
    assert all(INTERVAL.fullmatch(cells[c]) for c in header[1:]), cells
    routed_cells = dict(
        zip(header, rows["gpl_hap routing@0.2"].strip("| ").split(" | "), strict=True)
    )
    assert routed_cells["auc"] == "—"  # no interval for a value not computed from its parts
    assert INTERVAL.fullmatch(routed_cells["gauc"])
    assert heading[3:] in paths.html.read_text()

    payload = json.loads(paths.json.read_text())
    boot = payload["bootstrap"]
    assert (boot["baseline"], boot["resamples"], boot["requests"]) == ("exposed", 200, 60)
    mean = payload["methods"]
    recall = boot["methods"]["gpl_hap"]["recall@5"]
    assert recall["difference"] == pytest.approx(
        mean["gpl_hap"]["mean"]["recall@5"] - mean["exposed"]["mean"]["recall@5"]
    )
    assert recall["low"] <= recall["difference"] <= recall["high"]
    assert recall["low"] > 0  # a strong signal against a weak one
    assert "unexposed_hr@3" in boot["methods"]["gpl_hap"]  # JSON: every metric, not the columns
    assert "auc" not in boot["methods"]["gpl_hap routing@0.2"]

    # The same inputs and seed give the same intervals; another baseline, other differences.
    again = write_report(results, tmp_path / "again", "Bootstrap", bootstrap=settings)
    assert json.loads(again.json.read_text())["bootstrap"]["methods"] == boot["methods"]
    other = write_report(
        results, tmp_path / "other", "Bootstrap", bootstrap=settings, baseline="gpl_hap"
    )
    flipped = json.loads(other.json.read_text())["bootstrap"]["methods"]["exposed"]["recall@5"]
    assert flipped["difference"] == pytest.approx(-recall["difference"])
    assert flipped["high"] == pytest.approx(-recall["low"], abs=1e-9)  # the same resamples

    none = write_report(results, tmp_path / "none", "No bootstrap", bootstrap=None)
    assert "Request-level" not in none.markdown.read_text()
    with pytest.raises(ValueError, match="baseline 'nope'"):
        write_report(results, tmp_path / "bad", "Bad", baseline="nope")
