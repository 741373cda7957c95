from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

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
