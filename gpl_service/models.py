"""A served model bundle: verified, loaded into ONNX Runtime, smoke-tested, then swapped in.

:func:`load_bundle` either returns a :class:`LoadedBundle` that has already scored a request, or
raises :class:`~gpl_service.errors.BundleLoadError` saying why; the service only swaps a bundle
in after that, so a bad bundle can never replace a good one.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from export.bundle import MODEL_FILES, BundleError, VerifiedBundle, read_bundle
from export.signature import (
    INPUT_NAMES,
    ITEM_INPUT_NAMES,
    ITEM_OUTPUT_NAMES,
    OUTPUT_NAMES,
    SCORE_INPUT_NAMES,
)

F32 = npt.NDArray[np.float32]
Providers = Literal["auto", "cpu", "cuda"]
CUDA: str = "CUDAExecutionProvider"
CPU: str = "CPUExecutionProvider"
SPLIT_TOLERANCE: float = 1e-4
"""Largest logit difference allowed between a split pair and its full graph at load time (the
export checked probabilities to 1e-5; this only catches mismatched or damaged files)."""


class BundleLoadError(RuntimeError):
    """A bundle cannot be served; the reload endpoint answers it as ``BundleRejectedError``."""


def gpu_present() -> bool:
    """Whether an NVIDIA GPU is visible (onnxruntime-gpu lists CUDA even where none is)."""
    return os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/nvidia0")


@functools.cache
def _load_cuda_libraries() -> None:
    """Make the CUDA and cuDNN libraries of NVIDIA's pip wheels visible to ONNX Runtime (once).

    onnxruntime-gpu links CUDA 13 dynamically. Where CUDA comes from the ``nvidia-*`` wheels
    (as it does beside torch) the libraries are not on the loader's path, and ONNX Runtime
    would log an error and quietly run on the CPU. ``preload_dlls`` loads them from those
    wheels; a system-wide CUDA needs nothing (failures here are left to the session check).
    """
    preload = getattr(ort, "preload_dlls", None)
    # Best effort: load_bundle checks which provider each session really got.
    if preload is not None:
        with contextlib.suppress(Exception):
            preload()


def _providers(choice: Providers) -> list[str]:
    if choice == "cpu":
        return [CPU]
    cuda = CUDA in ort.get_available_providers() and gpu_present()
    if choice == "cuda" and not cuda:
        raise BundleLoadError("providers=cuda but no CUDA GPU / CUDA provider is available")
    if not cuda:
        return [CPU]
    _load_cuda_libraries()
    return [CUDA, CPU]


@dataclass
class SplitModel:
    """A model's split graphs in ONNX Runtime (see :mod:`gpl_service.item_states`).

    Attributes:
        item: Item graph session: raw item inputs -> ``item_state``.
        score: Score graph session: user inputs, ``item_state``, ``item_emb`` -> scores.
        width: Columns of ``item_state``.
    """

    item: ort.InferenceSession
    score: ort.InferenceSession
    width: int


@dataclass
class LoadedBundle:
    """Both models of a bundle in ONNX Runtime, with what scoring needs from the manifest.

    Attributes:
        path: The bundle directory it was loaded from.
        manifest: The bundle's manifest.
        model_version: First 16 hex digits of the sha256 of ``checksums.sha256``: names the
            exact files served.
        sessions: ``light`` and ``expressive`` inference sessions.
        providers: The execution providers ONNX Runtime actually uses.
        user_columns: Raw user feature columns, graph order (``<view>__<feature>``).
        item_columns: Raw item feature columns, graph order.
        categories: Category vocabulary (id = 1 + index; 0 = other).
        history_length: H.
        num_anchors: A.
        embedding_dim: D.
        hard_fraction: Share of candidates the expressive model re-scores.
        loaded_at: Epoch seconds.
        warnings: What the service noticed when binding it (e.g. a changed FeatureService).
        split: Model kind -> its split graphs, when the bundle has them and precomputing item
            states is on; empty otherwise (the full graphs score every request).
    """

    path: Path
    manifest: dict[str, Any]
    model_version: str
    sessions: dict[str, ort.InferenceSession]
    providers: list[str]
    user_columns: list[str]
    item_columns: list[str]
    categories: list[str]
    history_length: int
    num_anchors: int
    embedding_dim: int
    hard_fraction: float
    loaded_at: float = field(default_factory=time.time)
    warnings: list[str] = field(default_factory=list)
    split: dict[str, SplitModel] = field(default_factory=dict)

    @property
    def category_index(self) -> dict[str, int]:
        """Category string -> graph id."""
        return {c: k + 1 for k, c in enumerate(self.categories)}

    def run(self, kind: str, inputs: dict[str, npt.NDArray[Any]]) -> F32:
        """Logits of model ``kind`` ("light" or "expressive") for the inputs (see export)."""
        out = self.sessions[kind].run(["logit"], inputs)
        return np.asarray(out[0], dtype=np.float32)

    def item_state(self, kind: str, item_features: F32, category: Any, item_emb: F32) -> F32:
        """Item states (N, S) of model ``kind`` from raw item inputs (its item graph)."""
        feeds = {"item_features": item_features, "category": category, "item_emb": item_emb}
        out = self.split[kind].item.run(["item_state"], feeds)
        return np.asarray(out[0], dtype=np.float32)

    def run_split(self, kind: str, inputs: dict[str, npt.NDArray[Any]]) -> F32:
        """Logits of model ``kind`` from its score graph (inputs: SCORE_INPUT_NAMES)."""
        out = self.split[kind].score.run(["logit"], inputs)
        return np.asarray(out[0], dtype=np.float32)

    def describe(self) -> dict[str, Any]:
        """What ``GET /v1/models`` shows."""
        return {
            "model_version": self.model_version,
            "bundle_dir": str(self.path),
            "loaded_at": self.loaded_at,
            "providers": self.providers,
            "hard_fraction": self.hard_fraction,
            "precomputed_item_states": sorted(self.split),
            "warnings": self.warnings,
            "manifest": self.manifest,
        }


def _session(
    model: bytes, providers: list[str], threads: int, spinning: bool = False
) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    if not spinning:
        # Idle ORT threads spin-wait by default; on a few cores shared with the event loop and
        # the store client that steals the CPU the next request needs (measured: p50 9.6 ms
        # spinning vs 5.1 ms not, one request of 2,000 candidates on 2 cores).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # From the verified bytes, never the path: a file replaced after the checksum check
    # cannot be loaded under the verified bundle's version.
    return ort.InferenceSession(model, opts, providers=providers)


def smoke_inputs(bundle: LoadedBundle, n: int = 3) -> dict[str, npt.NDArray[Any]]:
    """A one-request, ``n``-candidate input of zeros and defaults (shapes as served)."""
    d = bundle.embedding_dim
    return {
        "user_features": np.zeros((1, len(bundle.user_columns)), np.float32),
        "history_emb": np.zeros((1, bundle.history_length, d), np.float32),
        "anchor_emb": np.zeros((1, bundle.num_anchors, d), np.float32),
        "row_request": np.zeros(n, np.int64),
        "item_features": np.zeros((n, len(bundle.item_columns)), np.float32),
        "category": np.zeros(n, np.int64),
        "item_emb": np.zeros((n, d), np.float32),
    }


def _check_signature(
    session: ort.InferenceSession, file: Path, inputs: tuple[str, ...], outputs: tuple[str, ...]
) -> None:
    got_in = tuple(i.name for i in session.get_inputs())
    got_out = tuple(o.name for o in session.get_outputs())
    if set(got_in) != set(inputs) or set(got_out) != set(outputs):
        raise BundleLoadError(
            f"{file}: graph signature {got_in} -> {got_out}, expected {inputs} -> {outputs}"
        )


def _load_split(
    path: Path, verified: VerifiedBundle, chosen: list[str], threads: int, spinning: bool
) -> dict[str, SplitModel]:
    """The split graphs the manifest lists (none for a bundle exported without them)."""
    split: dict[str, SplitModel] = {}
    for kind, record in (verified.manifest.get("split") or {}).items():
        if kind not in MODEL_FILES:
            raise BundleLoadError(f"{path}: manifest lists split graphs of unknown model {kind!r}")
        try:
            names = (record["item"]["file"], record["score"]["file"])
            width = int(record["state_width"])
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleLoadError(f"{path}: manifest 'split.{kind}' lacks {exc}") from exc
        files = tuple(path / n for n in names)
        sessions = []
        for name, file in zip(names, files, strict=True):
            try:
                sessions.append(_session(verified.files[name], chosen, threads, spinning))
            except Exception as exc:
                raise BundleLoadError(f"{file}: ONNX Runtime cannot load it: {exc}") from exc
        _check_signature(sessions[0], files[0], ITEM_INPUT_NAMES, ITEM_OUTPUT_NAMES)
        _check_signature(sessions[1], files[1], SCORE_INPUT_NAMES, OUTPUT_NAMES)
        split[kind] = SplitModel(sessions[0], sessions[1], width)
    return split


def _check_split(bundle: LoadedBundle, kind: str, n: int = 8) -> None:
    """The split pair of ``kind`` must score a random request like the full graph."""
    rng = np.random.default_rng(0)
    d = bundle.embedding_dim
    inputs: dict[str, npt.NDArray[Any]] = {
        "user_features": rng.random((1, len(bundle.user_columns)), np.float32),
        "history_emb": rng.standard_normal((1, bundle.history_length, d), np.float32),
        "anchor_emb": rng.standard_normal((1, bundle.num_anchors, d), np.float32),
        "row_request": np.zeros(n, np.int64),
        "item_features": rng.random((n, len(bundle.item_columns)), np.float32),
        "category": rng.integers(0, len(bundle.categories) + 1, n).astype(np.int64),
        "item_emb": rng.standard_normal((n, d), np.float32),
    }
    try:
        full = bundle.run(kind, inputs)
        state = bundle.item_state(
            kind, inputs["item_features"], inputs["category"], inputs["item_emb"]
        )
        feeds = {k: v for k, v in inputs.items() if k in SCORE_INPUT_NAMES}
        split = bundle.run_split(kind, {**feeds, "item_state": state})
    except Exception as exc:
        raise BundleLoadError(f"{bundle.path}: the {kind} split graphs fail: {exc}") from exc
    if state.shape != (n, bundle.split[kind].width):
        raise BundleLoadError(
            f"{bundle.path}: the {kind} item graph returns {state.shape}, the manifest says "
            f"width {bundle.split[kind].width}"
        )
    diff = float(np.abs(full - split).max())
    if not diff <= SPLIT_TOLERANCE:
        raise BundleLoadError(
            f"{bundle.path}: the {kind} split graphs disagree with {kind}.onnx (max |d logit| "
            f"{diff:.3g} > {SPLIT_TOLERANCE:g}); re-export the bundle"
        )


def load_bundle(
    path: Path,
    *,
    providers: Providers = "auto",
    threads: int = 0,
    spinning: bool = False,
    hard_fraction: float | None = None,
    precompute: bool = True,
) -> LoadedBundle:
    """Verify, load and smoke-test the bundle at ``path``.

    With ``precompute`` (and a bundle that has split graphs) the split graphs are loaded too
    and must score a random request like the full graphs.

    Raises:
        BundleLoadError: naming what is wrong (checksums, manifest, graph signature, a
            failed or non-finite smoke inference).
    """
    path = Path(path)
    try:
        verified = read_bundle(path)
    except BundleError as exc:
        raise BundleLoadError(str(exc)) from exc
    manifest = verified.manifest
    try:
        features = manifest["features"]
        fitted = manifest["preprocessing"]["fitted"]
        user_columns = list(features["user"]["columns"])
        item_columns = list(features["item"]["columns"])
        categories = list(features["category"]["vocabulary"])
        # What ServingPlan.build binds: checked here so a mangled manifest is a load error.
        for section in ("history", "anchors", "category"):
            if not isinstance(features[section]["column"], str):
                raise TypeError(f"features.{section}.column is not a string")
        history_length = int(fitted["history_length"])
        num_anchors = int(fitted["num_anchors"])
        embedding_dim = int(fitted["embedding_dim"])
        trained_fraction = float(manifest["routing"]["hard_fraction"])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise BundleLoadError(f"{path}: manifest lacks or mangles {exc}") from exc
    chosen = _providers(providers)
    sessions: dict[str, ort.InferenceSession] = {}
    for kind, name in MODEL_FILES.items():
        try:
            session = _session(verified.files[name], chosen, threads, spinning)
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
            raise BundleLoadError(f"{path / name}: ONNX Runtime cannot load it: {exc}") from exc
        _check_signature(session, path / name, INPUT_NAMES, OUTPUT_NAMES)
        if providers == "cuda" and CUDA not in session.get_providers():
            raise BundleLoadError(
                f"{path / name}: providers=cuda, but ONNX Runtime could not start its CUDA "
                "provider (CUDA 13 / cuDNN 9 libraries missing?) and fell back to the CPU"
            )
        sessions[kind] = session
    digest = hashlib.sha256(verified.checksums).hexdigest()[:16]
    bundle = LoadedBundle(
        path=path.resolve(),
        manifest=manifest,
        model_version=digest,
        sessions=sessions,
        providers=list(sessions["light"].get_providers()),
        user_columns=user_columns,
        item_columns=item_columns,
        categories=categories,
        history_length=history_length,
        num_anchors=num_anchors,
        embedding_dim=embedding_dim,
        hard_fraction=hard_fraction if hard_fraction is not None else trained_fraction,
        split=_load_split(path, verified, chosen, threads, spinning) if precompute else {},
    )
    smoke = smoke_inputs(bundle)
    for kind in MODEL_FILES:
        try:
            logits = bundle.run(kind, smoke)
        except Exception as exc:
            raise BundleLoadError(
                f"{path}: the {kind} model fails on a smoke input: {exc}"
            ) from exc
        if logits.shape != (3,) or not np.isfinite(logits).all():
            raise BundleLoadError(
                f"{path}: the {kind} model returns {logits.shape} / non-finite logits on a "
                "smoke input"
            )
    for kind in bundle.split:
        _check_split(bundle, kind)
    return bundle
