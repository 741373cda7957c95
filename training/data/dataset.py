"""A loaded dataset: the catalog plus a plain interaction log, both in the data contract."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from training.data.contract import conform
from training.io import write_manifest, write_table


@dataclass
class LoadedDataset:
    """What a loader or the synthetic generator produces.

    Attributes:
        name: Short dataset name (``ml-100k``, ``amazon-scientific``, ``synthetic``).
        items: Table conforming to the ``items`` contract.
        interactions: Table conforming to the ``interactions`` contract.
        info: Facts about the source worth recording in the manifest (counts, time span, ...).
    """

    name: str
    items: pa.Table
    interactions: pa.Table
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Fail at construction: a loader bug must never produce an off-contract artifact.
        self.items = conform(self.items, "items")
        self.interactions = conform(self.interactions, "interactions")

    def write(self, directory: Path, config: dict[str, Any]) -> dict[str, Path]:
        """Write ``items.parquet``, ``interactions.parquet`` and a manifest into ``directory``."""
        paths = {
            "items": write_table(self.items, directory / "items.parquet"),
            "interactions": write_table(self.interactions, directory / "interactions.parquet"),
        }
        write_manifest(
            directory,
            "data",
            inputs={"dataset": self.name},
            outputs={k: str(v.name) for k, v in paths.items()},
            config=config,
            metrics={
                "items": self.items.num_rows,
                "interactions": self.interactions.num_rows,
                **self.info,
            },
        )
        return paths
