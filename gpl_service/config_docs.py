"""A stage's settings as a commented YAML file: what ``gpl config STAGE`` prints.

Every stage reads its settings from a pydantic model (validated when loaded, unknown keys
rejected). Printing the model's defaults as YAML, each setting preceded by its ``description``,
gives users a starting ``--config`` file that documents itself and always matches the code.
"""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import BaseModel

WIDTH = 96


def _comment(text: str, indent: str) -> list[str]:
    """``text`` wrapped into ``# `` lines at ``indent``."""
    words, lines, line = text.split(), [], ""
    limit = max(WIDTH - len(indent) - 2, 20)
    for word in words:
        if line and len(line) + 1 + len(word) > limit:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    if line:
        lines.append(line)
    return [f"{indent}# {part}" for part in lines]


def _scalar(value: Any) -> str:
    """One YAML value on one line (flow style for lists and mappings)."""
    text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10_000)
    return text.strip().removesuffix("...").strip()


def _lines(model: BaseModel, indent: str) -> list[str]:
    out: list[str] = []
    # JSON mode turns tuples, paths and enums into plain YAML-safe values.
    plain = model.model_dump(mode="json")
    for name, info in type(model).model_fields.items():
        value = getattr(model, name)
        # A section without a description of its own is introduced by its model's summary.
        text = info.description
        if not text and isinstance(value, BaseModel):
            text = (type(value).__doc__ or "").strip().split("\n\n")[0]
        if text:
            out.extend(_comment(text, indent))
        if isinstance(value, BaseModel):
            out.append(f"{indent}{name}:")
            out.extend(_lines(value, indent + "  "))
        else:
            out.append(f"{indent}{name}: {_scalar(plain[name])}")
    return out


def settings_yaml(model: type[BaseModel], title: str) -> str:
    """The defaults of ``model`` as YAML with every setting's description as a comment.

    Args:
        model: A stage's settings model; every field must have a default.
        title: First comment line (what the file configures and how to use it).

    Returns:
        YAML text that ``model.model_validate(yaml.safe_load(text))`` reads back as the defaults.
    """
    head = _comment(title, "")
    return "\n".join([*head, "", *_lines(model(), "")]) + "\n"
