"""`gpl config STAGE`: every stage's settings as commented YAML that reads back as the defaults."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel
from typer.testing import CliRunner

from gpl_service.cli import CONFIG_STAGES, _load_config, app
from gpl_service.config_docs import settings_yaml

runner = CliRunner()


def _model(stage: str) -> type[BaseModel]:
    module, name, _ = CONFIG_STAGES[stage]
    model: type[BaseModel] = getattr(importlib.import_module(module), name)
    return model


def _described_leaves(model: type[BaseModel]) -> list[str]:
    """Descriptions of every non-model setting, nested ones included."""
    found = []
    for name, info in model.model_fields.items():
        value = getattr(model(), name)
        if isinstance(value, BaseModel):
            found.extend(_described_leaves(type(value)))
        elif info.description:
            found.append(info.description)
    return found


@pytest.mark.parametrize("stage", list(CONFIG_STAGES))
def test_printed_settings_read_back_as_the_defaults(stage: str, tmp_path: Path) -> None:
    result = runner.invoke(app, ["config", stage])
    assert result.exit_code == 0, result.output
    model = _model(stage)
    path = tmp_path / f"{stage}.yaml"
    path.write_text(result.output)
    # The file is what --config reads: the same loader, the same validation.
    assert _load_config(model, path) == model()
    assert isinstance(yaml.safe_load(result.output), dict)
    comments = " ".join(
        line.strip().removeprefix("#").strip()
        for line in result.output.splitlines()
        if line.strip().startswith("#")
    )
    for description in _described_leaves(model):
        assert " ".join(description.split()) in comments, description


def test_nested_settings_are_indented_under_their_section() -> None:
    text = settings_yaml(_model("preranker"), "title")
    loaded = yaml.safe_load(text)
    assert loaded["loss"]["objective"] == "gpl_hap"
    assert loaded["loss"]["popularity_debias"] == 0.75
    assert loaded["expressive_groups"] == ["exposed_negative", "rank_negative"]


def test_unknown_stage_is_a_usage_error() -> None:
    result = runner.invoke(app, ["config", "nope"])
    assert result.exit_code == 2
    assert "unknown stage 'nope'" in result.output


@pytest.mark.parametrize("stage", list(CONFIG_STAGES))
def test_every_setting_and_section_has_a_comment(stage: str) -> None:
    """Sections whose field had no description (preranker's model, loss, training, routing;
    pseudo-labels' weights) were printed bare."""
    lines = settings_yaml(_model(stage), "title").splitlines()
    for k, line in enumerate(lines):
        if line.strip() and not line.lstrip().startswith("#"):
            assert lines[k - 1].lstrip().startswith("#"), (stage, line)
