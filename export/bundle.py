"""The model bundle: both ONNX graphs, a manifest and checksums, written atomically.

Layout of a bundle directory::

    light.onnx          light model with in-graph preprocessing (dynamic R and N)
    expressive.onnx     expressive model, same inputs and outputs
    light.item.onnx     the light model split: item graph (raw item inputs -> item_state)
    light.score.onnx    ... and score graph (user inputs, item_state, item_emb -> scores)
    expressive.item.onnx, expressive.score.onnx   the same for the expressive model
    manifest.json       feature service, feature order and shapes, preprocessing, model
                        inputs/outputs, training metrics, data cutoff, code version, parity
    checksums.sha256    sha256 of every other file, ``sha256sum -c`` format

:func:`export_bundle` builds the bundle in a temporary sibling directory and renames it onto the
target only after the parity check passed, so a failed export never leaves (or damages) a
bundle. :func:`verify_bundle` recomputes the checksums; the service calls it before loading or
hot-reloading a bundle. This module imports torch and ONNX Runtime only inside
:func:`export_bundle`.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from export.parity import ParityCase
    from training.preranker.data import Preprocessing

BUNDLE_FORMAT: Final = "gpl-preranker-bundle"
FORMAT_VERSION: Final = 1
MANIFEST: Final = "manifest.json"
CHECKSUMS: Final = "checksums.sha256"
MODEL_FILES: Final = {"light": "light.onnx", "expressive": "expressive.onnx"}
SPLIT_FILES: Final = {
    kind: (f"{kind}.item.onnx", f"{kind}.score.onnx") for kind in ("light", "expressive")
}
"""Model kind -> (item graph, score graph); optional in a bundle (the manifest's ``split``)."""
FEATURE_SERVICE: Final = "preranker"
REAL_REQUESTS: Final = 32
"""Requests (the latest before the data cutoff) joined from the run for the real-row check."""


class ExportError(RuntimeError):
    """The export cannot be done (no trained model, no real rows, unreplaceable target...)."""


class BundleError(RuntimeError):
    """A bundle directory is incomplete, altered or not a bundle."""


@dataclass
class ExportResult:
    """What :func:`export_bundle` wrote.

    Attributes:
        path: The bundle directory.
        manifest: The manifest written into it.
        seconds: Wall time of the export (graphs, parity, bundle).
    """

    path: Path
    manifest: dict[str, Any]
    seconds: float

    @property
    def parity(self) -> dict[str, Any]:
        """The parity record (tolerance, max_abs_diff, every check)."""
        result: dict[str, Any] = self.manifest["parity"]
        return result


# --- checksums -------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_checksums(directory: Path) -> Path:
    """Write ``checksums.sha256`` for every other file of ``directory`` (sorted by name)."""
    names = sorted(p.name for p in directory.iterdir() if p.is_file() and p.name != CHECKSUMS)
    lines = [f"{sha256_file(directory / n)}  {n}\n" for n in names]
    path = directory / CHECKSUMS
    path.write_text("".join(lines))
    return path


def _read_checksums(path: Path, text: str | None = None) -> dict[str, str]:
    sums: dict[str, str] = {}
    lines = (path.read_text() if text is None else text).splitlines()
    for k, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        digest, sep, name = line.partition("  ")
        ok = (
            sep
            and len(digest) == 64
            and all(c in "0123456789abcdef" for c in digest)
            and name
            and "/" not in name
            and "\\" not in name
            and name not in (".", "..", CHECKSUMS)
        )
        if not ok:
            raise BundleError(f"{path}: line {k} is not '<sha256>  <file name>': {line!r}")
        sums[name] = digest
    return sums


@dataclass(frozen=True)
class VerifiedBundle:
    """A bundle's files as they were verified: what a loader must use, not the paths.

    Attributes:
        manifest: The parsed manifest.
        files: Every listed file's bytes, exactly those whose sha256 was checked (a writer
            replacing a file after the check cannot slip another one in).
        checksums: The bytes of ``checksums.sha256`` (the bundle's version is their digest).
    """

    manifest: dict[str, Any]
    files: dict[str, bytes]
    checksums: bytes


def verify_bundle(path: Path) -> dict[str, Any]:
    """Check a bundle directory against its checksums and return its manifest.

    Every file listed in ``checksums.sha256`` must exist with that sha256, the models and the
    manifest must be listed, and no other file may be present.

    Raises:
        BundleError: naming every missing, altered or unlisted file (or why the directory is
            not a bundle).
    """
    return read_bundle(path).manifest


def read_bundle(path: Path) -> VerifiedBundle:
    """:func:`verify_bundle`, keeping the verified bytes of every file for the loader."""
    path = Path(path)
    if not path.is_dir():
        raise BundleError(f"{path}: no bundle directory here; run `gpl export` first")
    sums_path = path / CHECKSUMS
    if not sums_path.is_file():
        raise BundleError(f"{path}: no {CHECKSUMS}; not a complete bundle")
    checksums = sums_path.read_bytes()
    try:
        text = checksums.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BundleError(f"{sums_path}: not text: {exc}") from exc
    sums = _read_checksums(sums_path, text)
    problems: list[str] = []
    for name in [MANIFEST, *MODEL_FILES.values()]:
        if name not in sums:
            problems.append(f"{name} is not listed in {CHECKSUMS}")
    files: dict[str, bytes] = {}
    for name, digest in sorted(sums.items()):
        file = path / name
        if not file.is_file():
            problems.append(f"{name} is missing")
            continue
        data = file.read_bytes()
        if hashlib.sha256(data).hexdigest() != digest:
            problems.append(f"{name} does not match its sha256 (altered or corrupt)")
        files[name] = data
    extra = sorted(p.name for p in path.iterdir() if p.name != CHECKSUMS and p.name not in sums)
    problems += [f"{name} is not listed in {CHECKSUMS}" for name in extra]
    if problems:
        raise BundleError(f"{path}: bundle verification failed: " + "; ".join(problems))
    try:
        manifest = json.loads(files[MANIFEST])
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path / MANIFEST}: not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict):
        raise BundleError(f"{path / MANIFEST}: not a JSON object")
    if manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{path / MANIFEST}: format is {manifest.get('format')!r}, not a bundle")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(
            f"{path / MANIFEST}: format_version {manifest.get('format_version')!r}; this code "
            f"reads version {FORMAT_VERSION}"
        )
    try:
        split = manifest.get("split") or {}
        listed = [f for rec in split.values() for f in (rec["item"]["file"], rec["score"]["file"])]
    except (AttributeError, KeyError, TypeError) as exc:
        raise BundleError(f"{path / MANIFEST}: its 'split' section lacks or mangles {exc}") from exc
    unlisted = [f for f in listed if f not in sums]
    if unlisted:
        raise BundleError(f"{path}: split graphs {unlisted} are not listed in {CHECKSUMS}")
    return VerifiedBundle(manifest=manifest, files=files, checksums=checksums)


# --- manifest --------------------------------------------------------------------------------


def _trained_on(source: dict[str, Any]) -> str | None:
    """The FeatureService version the model was trained on.

    Its manifest's (what `gpl train` read from the registry), else the feature_repo code's (a
    model saved before the version was recorded there).
    """
    inputs = source.get("inputs")
    service = inputs.get("feature_service") if isinstance(inputs, dict) else None
    if isinstance(service, dict) and "version" in service:
        version = service["version"]
        return None if version is None else str(version)
    return feature_service_version()


def feature_service_version() -> str | None:
    """The ``version`` tag of the ``preranker`` FeatureService in feature_repo."""
    from feature_repo.feature_services import preranker

    version: str | None = preranker.tags.get("version")
    return version


def _package(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def features_record(prep: Preprocessing) -> dict[str, Any]:
    """The raw features the service must fetch, in graph order, with their shapes."""
    from training.preranker.data import ANCHORS_COLUMN, CATEGORY_COLUMN, HISTORY_COLUMN

    h, a, d = prep.history_length, prep.num_anchors, prep.embedding_dim
    return {
        "user": {
            "input": "user_features",
            "shape": ["R", len(prep.user_numeric)],
            "columns": [s.column for s in prep.user_numeric],
        },
        "item": {
            "input": "item_features",
            "shape": ["N", len(prep.item_numeric)],
            "columns": [s.column for s in prep.item_numeric],
        },
        "category": {
            "input": "category",
            "shape": ["N"],
            "column": CATEGORY_COLUMN,
            "vocabulary": list(prep.categories),
            "encoding": "1 + index in vocabulary; 0 for any other, unknown or empty category",
        },
        "history": {
            "input": "history_emb",
            "shape": ["R", h, d],
            "column": HISTORY_COLUMN,
            "encoding": f"content vectors of the last {h} item ids of the list (oldest first), "
            "in list order from slot 0; zero rows pad the end; unknown ids give zero rows",
        },
        "anchors": {
            "input": "anchor_emb",
            "shape": ["R", a, d],
            "column": ANCHORS_COLUMN,
            "encoding": f"content vectors of the first {a} anchor item ids (best first) from "
            "slot 0; zero rows pad the end; unknown ids give zero rows",
        },
        "item_embedding": {
            "input": "item_emb",
            "shape": ["N", d],
            "source": "item_semantics.content_embedding (RUN_DIR/sids/item_semantics.parquet)",
            "encoding": "the candidate's content vector; zeros for an unknown item",
        },
        "row_request": {
            "input": "row_request",
            "shape": ["N"],
            "encoding": "0-based request (row of user_features) of each candidate; 0 when R = 1",
        },
    }


IN_GRAPH: Final = [
    "NaN -> 0 in user_features and item_features",
    "signed log1p sign(x) * log1p(|x|) of the columns with log1p = true",
    "(x - mean) / std per column, in float64, then float32 (constants from 'fitted')",
    "cross features: max cosine of the candidate to the present anchors, has anchors, max "
    "cosine to the present history items, has history (a slot is present when its vector is "
    "not all zeros)",
    "sigmoid of the logit",
]
OUTSIDE_GRAPH: Final = [
    "category string -> id (features.category.vocabulary)",
    "item id -> content vector (item_semantics; zeros for padding and unknown items)",
    "feature defaults for entities the online store lacks (the feature views' 'default' tags "
    "and <view>__missing = 1), as in the training-set builder",
]


# --- export ----------------------------------------------------------------------------------


def _opset(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next(int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx"))


def resolve_model_dir(path: Path) -> Path:
    """``path`` itself when it holds a trained pre-ranker, else ``path/preranker``."""
    path = Path(path)
    if (path / "preprocessing.json").exists():
        return path
    if (path / "preranker" / "preprocessing.json").exists():
        return path / "preranker"
    raise ExportError(f"{path}: no trained pre-ranker here (nor in preranker/); run `gpl train`")


def _check_target(out_dir: Path) -> None:
    if out_dir.exists():
        is_bundle = (out_dir / CHECKSUMS).is_file()
        if not out_dir.is_dir() or (not is_bundle and any(out_dir.iterdir())):
            raise ExportError(
                f"{out_dir} exists and is not a bundle; refusing to replace it (choose another "
                "output directory)"
            )


def _install(tmp: Path, out_dir: Path) -> None:
    """Rename ``tmp`` onto ``out_dir``, replacing a previous bundle there."""
    if not out_dir.exists():
        os.rename(tmp, out_dir)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    aside.rmdir()
    os.rename(out_dir, aside)
    try:
        os.rename(tmp, out_dir)
    except OSError:
        os.rename(aside, out_dir)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def real_cases_from_run(
    run_dir: Path, prep: Preprocessing, cutoff: str | None, max_requests: int = REAL_REQUESTS
) -> list[ParityCase]:
    """Real-row cases: the latest requests before ``cutoff``, joined through the run's store.

    Reads ``funnel/requests.parquet``, ``sids/item_semantics.parquet`` and the Feast repo of
    ``run_dir`` (its ``feature_store.yaml`` as it is) and joins the ``preranker``
    FeatureService point-in-time, as training did.

    Raises:
        ExportError: when the run lacks one of them.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    from feast import FeatureStore

    from export.parity import cases_from_joined
    from training.features.training_set import build_training_set
    from training.io import read_table
    from training.preranker.data import ItemTable

    needed = [
        run_dir / "funnel" / "requests.parquet",
        run_dir / "sids" / "item_semantics.parquet",
        run_dir / "feature_store.yaml",
    ]
    absent = [str(p) for p in needed if not p.exists()]
    if absent:
        raise ExportError(
            f"no real rows for the parity check: {', '.join(absent)} not found (export from a "
            "run directory, or pass real_rows=)"
        )
    requests = read_table(needed[0], "requests")
    if cutoff:
        ts = requests.column("event_timestamp")
        try:
            bound = pa.scalar(datetime.fromisoformat(cutoff), ts.type)
        except ValueError as exc:
            raise ExportError(f"data cutoff {cutoff!r} in the manifest is not a time") from exc
        requests = requests.filter(pc.less(ts, bound))
    if requests.num_rows == 0:
        raise ExportError(f"no real rows for the parity check: no request before {cutoff}")
    latest = (
        requests.group_by("request_id")
        .aggregate([("event_timestamp", "max")])
        .sort_by([("event_timestamp_max", "descending"), ("request_id", "ascending")])
        .slice(0, max_requests)
    )
    sample = requests.filter(pc.is_in(requests.column("request_id"), latest.column("request_id")))
    store = FeatureStore(repo_path=str(run_dir.resolve()))
    joined = build_training_set(store, sample, FEATURE_SERVICE).table
    items = ItemTable.from_semantics(read_table(needed[1]))
    return cases_from_joined(joined, items, prep)


def export_bundle(
    model_dir: Path,
    out_dir: Path,
    *,
    run_dir: Path | None = None,
    real_rows: Sequence[ParityCase] | None = None,
    real_requests: int = REAL_REQUESTS,
    tolerance: float = 1e-5,
    seed: int = 0,
) -> ExportResult:
    """Export a trained pre-ranker to a verified ONNX bundle at ``out_dir``.

    Both models are exported with their in-graph preprocessing (:mod:`export.onnx_export`),
    checked against PyTorch on random inputs (R in {1, 3}, N in {1, 7, 500}) and on real rows
    (:mod:`export.parity`), and written with ``manifest.json`` and ``checksums.sha256``. The
    bundle is built in a temporary sibling of ``out_dir`` and renamed onto it at the end; an
    existing bundle at ``out_dir`` is replaced, anything else there is refused.

    Args:
        model_dir: ``RUN_DIR/preranker`` (as written by ``gpl train``) or the run directory.
        out_dir: The bundle directory to create or replace.
        run_dir: Where real rows come from (default: ``model_dir``'s parent): the latest
            ``real_requests`` requests before the data cutoff, joined through its Feast repo.
        real_rows: Real-row cases to use instead (:func:`export.parity.cases_from_joined`,
            :func:`export.parity.cases_from_data`).
        real_requests: Requests sampled from ``run_dir`` for the real-row check.
        tolerance: Largest allowed absolute difference of probabilities.
        seed: Seed of the random parity inputs.

    Returns:
        The bundle path, its manifest and the wall time.

    Raises:
        ExportError: no trained model, no real rows, or an unreplaceable ``out_dir``.
        export.parity.ExportParityError: ONNX Runtime and PyTorch disagree (nothing written).
    """
    import onnx
    import torch

    from export.onnx_export import (
        MODEL_KINDS,
        OPSET,
        GraphSpec,
        ServingGraph,
        export_graph,
        export_split,
        state_width,
    )
    from export.parity import check_parity, random_cases
    from training.io import code_version, read_manifest
    from training.preranker.job import load_preranker

    began = time.perf_counter()
    model_dir = resolve_model_dir(Path(model_dir))
    out_dir = Path(out_dir).absolute()
    _check_target(out_dir)
    loaded = load_preranker(model_dir)
    source = read_manifest(model_dir)
    cutoff = source.get("inputs", {}).get("requests_before")
    prep = loaded.prep
    spec = GraphSpec.of(prep)
    if real_rows is None:
        real_rows = real_cases_from_run(
            Path(run_dir) if run_dir is not None else model_dir.parent,
            prep,
            cutoff,
            real_requests,
        )
    if not real_rows:
        raise ExportError("no real rows for the parity check")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would hide the bundle from a service running as another user
    try:
        graphs = {
            "light": ServingGraph(loaded.light, prep).eval(),
            "expressive": ServingGraph(loaded.expressive, prep).eval(),
        }
        paths = {kind: tmp / MODEL_FILES[kind] for kind in MODEL_KINDS}
        split_paths = {
            kind: (tmp / SPLIT_FILES[kind][0], tmp / SPLIT_FILES[kind][1]) for kind in MODEL_KINDS
        }
        exporters = {}
        for kind in MODEL_KINDS:
            exporters[kind] = export_graph(graphs[kind], spec, paths[kind], OPSET)
            export_split(graphs[kind], spec, *split_paths[kind], OPSET)
            for file in (paths[kind], *split_paths[kind]):
                onnx.checker.check_model(str(file))
        cases = [*random_cases(prep, seed=seed), *real_rows]
        report = check_parity(graphs, paths, cases, tolerance, split_paths)

        metrics = source.get("metrics", {})
        flops = metrics.get("flops", {}) if isinstance(metrics, dict) else {}
        manifest: dict[str, Any] = {
            "format": BUNDLE_FORMAT,
            "format_version": FORMAT_VERSION,
            "created_at": datetime.now(UTC).isoformat(),
            "code_version": code_version(),
            "feature_service": {"name": FEATURE_SERVICE, "version": _trained_on(source)},
            "data_cutoff": cutoff,
            "objective": loaded.objective,
            "routing": loaded.config.routing.model_dump(),
            "features": features_record(prep),
            "preprocessing": {
                "in_graph": IN_GRAPH,
                "outside_graph": OUTSIDE_GRAPH,
                "fitted": prep.model_dump(),
            },
            "models": {
                kind: {
                    "file": MODEL_FILES[kind],
                    "inputs": spec.inputs(),
                    "outputs": spec.outputs(),
                    "opset": _opset(paths[kind]),
                    "exporter": f"torch.onnx ({exporters[kind]})",
                    "flops": flops.get(kind),
                }
                for kind in MODEL_KINDS
            },
            "split": {
                kind: {
                    "item": {
                        "file": SPLIT_FILES[kind][0],
                        "inputs": spec.item_inputs(),
                        "outputs": [
                            {
                                "name": "item_state",
                                "shape": ["N", state_width(graphs[kind])],
                                "dtype": "float32",
                            }
                        ],
                    },
                    "score": {
                        "file": SPLIT_FILES[kind][1],
                        "inputs": spec.score_inputs(state_width(graphs[kind])),
                        "outputs": spec.outputs(),
                    },
                    "state_width": state_width(graphs[kind]),
                    "state_columns": "the model's item side (item tower; expressive: then the "
                    "attention query), then 1 / ||item_emb||",
                }
                for kind in MODEL_KINDS
            },
            "training": {
                "source": str(model_dir),
                "created_at": source.get("created_at"),
                "code_version": source.get("code_version"),
                "inputs": source.get("inputs", {}),
                "metrics": metrics,
                "config": source.get("config", {}),
            },
            "parity": report.to_json(),
            "versions": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "onnx": onnx.__version__,
                "onnxruntime": _package("onnxruntime-gpu") or _package("onnxruntime"),
            },
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
        write_checksums(tmp)
        verify_bundle(tmp)
        _install(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return ExportResult(out_dir, manifest, round(time.perf_counter() - began, 2))
