"""Artifact I/O shared by every stage: atomic parquet writes, contract reads, manifests.

Every stage writes its outputs to a temporary sibling path and renames it into place, so an
interrupted or failed run never leaves a half-written table that a later stage could pick up.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any, Final

import pyarrow as pa
import pyarrow.parquet as pq

from training.data.contract import ContractError, conform

MANIFEST_NAME = "manifest.json"


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only on success."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_table(table: pa.Table, path: Path) -> Path:
    """Write ``table`` as parquet to ``path`` atomically and return the path."""
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return path


# The command that writes each run-directory file, for "no such file" errors.
_PRODUCERS: Final = {
    ("data", "items.parquet"): "`gpl data synth` or `gpl data import`",
    ("data", "interactions.parquet"): "`gpl data synth` or `gpl data import`",
    ("funnel", "requests.parquet"): "`gpl data simulate`",
    ("funnel", "truth.parquet"): "`gpl data simulate` (or pass --truth)",
    ("sids", "item_semantics.parquet"): "`gpl sids train`",
    ("anchors", "user_interest_anchors.parquet"): "`gpl anchors generate`",
    ("pseudo_labels", "pseudo_labels.parquet"): "`gpl pseudo-labels`",
}


def _producer_hint(path: Path) -> str:
    producer = _PRODUCERS.get((path.parent.name, path.name))
    return f"; run {producer} first" if producer else ""


def read_table(path: Path, contract: str | None = None) -> pa.Table:
    """Read a parquet table, optionally checking and casting it to a contract table.

    Args:
        path: Parquet file to read.
        contract: Contract table name (``items``, ``interactions``, ``requests``, ``truth``).

    Raises:
        FileNotFoundError: when ``path`` does not exist, naming it.
        ContractError: when the table breaks the contract (every problem listed).
    """
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file{_producer_hint(path)}")
    try:
        table = pq.read_table(path)
    except pa.ArrowInvalid as exc:
        raise ContractError(
            contract or path.name, [f"{path} is not a readable parquet file: {exc}"]
        ) from exc
    return conform(table, contract) if contract else table


def code_version() -> str:
    """The git commit of the running code when available, else the package version."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent,
            timeout=5,
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return package_version()


def package_version() -> str:
    """The installed version of this distribution."""
    try:
        return metadata.version("gpl-preranking")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def write_manifest(
    directory: Path,
    stage: str,
    *,
    inputs: Mapping[str, Any],
    outputs: Mapping[str, Any],
    config: Mapping[str, Any],
    metrics: Mapping[str, Any],
) -> Path:
    """Write a stage manifest (inputs, outputs, config, versions, metrics) atomically.

    The manifest makes a stage re-runnable on its own: it names exactly what was read, with which
    settings, and what came out.
    """
    manifest = {
        "stage": stage,
        "created_at": datetime.now(UTC).isoformat(),
        "code_version": code_version(),
        "versions": {
            "python": platform.python_version(),
            **{pkg: _version(pkg) for pkg in ("pyarrow", "feast", "torch", "numpy")},
        },
        "inputs": dict(inputs),
        "outputs": dict(outputs),
        "config": dict(config),
        "metrics": dict(metrics),
    }
    path = directory / MANIFEST_NAME
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False, default=str) + "\n")
    return path


def read_manifest(directory: Path) -> dict[str, Any]:
    """Read a stage manifest written by :func:`write_manifest`."""
    path = directory / MANIFEST_NAME
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: no manifest; run the stage that writes {directory.name} first"
        )
    result: dict[str, Any] = json.loads(path.read_text())
    return result


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None
