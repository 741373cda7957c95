"""Numerical parity of the exported graphs against PyTorch, on random and on real rows.

Every case feeds the same raw inputs to ONNX Runtime (CPU execution provider) and compares its
click probabilities with two references:

* ``graph``: the PyTorch :class:`~export.onnx_export.ServingGraph` on the same raw inputs (did the
  export preserve the computation?);
* ``training``: the trained model on inputs preprocessed the way training preprocessed them
  (:meth:`~training.preranker.data.Preprocessing.transform`,
  :func:`~training.preranker.data.cross_features`), so the in-graph preprocessing is checked
  against the training pipeline, not against itself.

The split graphs (item graph, then score graph on its ``item_state``) are checked the same way,
composed, against the same two references (``model`` = ``light (split)``...).

The export fails (:class:`ExportParityError`) when any probability differs by more than the
tolerance (``1e-5``) from either reference, or is not finite. Everything is float32 except the
integer ids (int64).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import nn

from export.bundle import ExportError
from export.onnx_export import ServingGraph
from export.signature import ITEM_INPUT_NAMES, SCORE_INPUT_NAMES
from training.preranker.data import (
    ItemTable,
    NumericSpec,
    Preprocessing,
    PrerankData,
    cross_one_request,
    encode,
)

TOLERANCE: Final = 1e-5
# Logits relative to their size: float32 graphs agree to ~1e-6 of it (ONNX Runtime vs PyTorch).
LOGIT_TOLERANCE: Final = 1e-4
_PROB_KEYS: Final = ("vs_graph", "vs_training")
_LOGIT_KEYS: Final = ("logit_vs_graph", "logit_vs_training")
RANDOM_SIZES: Final = ((1, 1), (1, 7), (1, 500), (3, 1), (3, 7), (3, 500))
"""(R, N) of the random cases: one request as served, and several requests in one call."""

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]
Arrays = dict[str, npt.NDArray[Any]]


class ExportParityError(ExportError):
    """ONNX Runtime and PyTorch disagree by more than the tolerance; nothing was exported."""

    def __init__(self, message: str, report: ParityReport) -> None:
        super().__init__(message)
        self.report = report
        self.max_abs_diff = report.max_abs_diff


@dataclass
class ParityCase:
    """One set of inputs: raw graph inputs and, when known, the training pipeline's inputs.

    Attributes:
        name: Shown in the report (``random_r3_n500``, ``real_rows``, ...).
        graph_inputs: The graph's seven raw inputs (see :mod:`export.onnx_export`).
        model_inputs: The model's eight preprocessed inputs as training computes them
            (``user_numeric`` ... ``cross``), or None to compare with the PyTorch graph only.
    """

    name: str
    graph_inputs: Arrays
    model_inputs: Arrays | None = None

    @property
    def requests(self) -> int:
        """R."""
        return int(self.graph_inputs["user_features"].shape[0])

    @property
    def rows(self) -> int:
        """N."""
        return int(self.graph_inputs["row_request"].shape[0])


@dataclass
class ParityReport:
    """Per model and case: the largest probability and logit differences to each reference.

    Probabilities are compared absolutely (``tolerance``); logits, which the service ranks by,
    relative to the reference's size (``logit_tolerance``; absolute below 1).
    """

    tolerance: float
    checks: list[dict[str, Any]] = field(default_factory=list)
    logit_tolerance: float = LOGIT_TOLERANCE

    @staticmethod
    def _diffs(check: dict[str, Any], keys: tuple[str, str]) -> list[float]:
        return [check[k] for k in keys if check.get(k) is not None]

    @property
    def max_abs_diff(self) -> float:
        """The largest probability difference (inf when some output was not finite)."""
        return max((d for c in self.checks for d in self._diffs(c, _PROB_KEYS)), default=0.0)

    @property
    def max_logit_diff(self) -> float:
        """The largest relative logit difference (inf when some output was not finite)."""
        return max((d for c in self.checks for d in self._diffs(c, _LOGIT_KEYS)), default=0.0)

    @property
    def passed(self) -> bool:
        """Every difference within its tolerance."""
        return self.max_abs_diff <= self.tolerance and self.max_logit_diff <= self.logit_tolerance

    def excess(self, check: dict[str, Any]) -> float:
        """How far ``check`` is over its tolerances (the larger ratio; > 1 fails)."""
        return max(
            max(self._diffs(check, _PROB_KEYS), default=0.0) / self.tolerance,
            max(self._diffs(check, _LOGIT_KEYS), default=0.0) / self.logit_tolerance,
        )

    def failures(self) -> list[dict[str, Any]]:
        """The checks over a tolerance."""
        return [c for c in self.checks if self.excess(c) > 1.0]

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready record for the bundle manifest."""
        return {
            "tolerance": self.tolerance,
            "max_abs_diff": self.max_abs_diff,
            "logit_tolerance": self.logit_tolerance,
            "max_logit_diff": self.max_logit_diff,
            "passed": self.passed,
            "execution_provider": "CPUExecutionProvider",
            "checks": self.checks,
        }


# --- building cases --------------------------------------------------------------------------


def _unit_table(embeddings: F32) -> F32:
    """Row-normalized item vectors, exactly as :func:`training.preranker.data.cross_features`."""
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    return (embeddings / np.maximum(norms, 1e-12)).astype(np.float32)


def _standardize(raw: npt.NDArray[Any], specs: list[NumericSpec], prep: Preprocessing) -> F32:
    """Training's own transform of raw values (column ``j`` is ``specs[j]``)."""
    table = pa.table({s.column: pa.array(raw[:, j]) for j, s in enumerate(specs)})
    return prep.transform(table, specs)


def case_from_indices(
    name: str,
    prep: Preprocessing,
    embeddings: F32,
    *,
    user_raw: npt.NDArray[Any],
    history: npt.NDArray[np.integer[Any]],
    anchors: npt.NDArray[np.integer[Any]],
    row_request: npt.NDArray[np.integer[Any]],
    item_raw: npt.NDArray[Any],
    category: npt.NDArray[np.integer[Any]],
    item: npt.NDArray[np.integer[Any]],
) -> ParityCase:
    """A case from raw feature values and rows of an item-embedding table (row 0 = zeros).

    The graph gets gathered vectors; the training reference gets ``Preprocessing.transform``
    of the same raw values and the cross features of :func:`cross_one_request`.
    """
    user32 = np.asarray(user_raw, dtype=np.float32)
    item32 = np.asarray(item_raw, dtype=np.float32)
    rr = np.asarray(row_request, dtype=np.int64)
    item_idx = np.asarray(item, dtype=np.int64)
    unit = _unit_table(embeddings)
    cross = np.zeros((len(rr), 4), dtype=np.float32)
    for r in range(user32.shape[0]):
        rows = np.flatnonzero(rr == r)
        if len(rows):
            cross[rows] = cross_one_request(
                unit,
                item_idx[rows].astype(np.int32),
                np.asarray(history[r], dtype=np.int32),
                np.asarray(anchors[r], dtype=np.int32),
            )
    graph_inputs: Arrays = {
        "user_features": user32,
        "history_emb": embeddings[np.asarray(history, dtype=np.int64)],
        "anchor_emb": embeddings[np.asarray(anchors, dtype=np.int64)],
        "row_request": rr,
        "item_features": item32,
        "category": np.asarray(category, dtype=np.int64),
        "item_emb": embeddings[item_idx],
    }
    model_inputs: Arrays = {
        "user_numeric": _standardize(user32, prep.user_numeric, prep),
        "history_emb": graph_inputs["history_emb"],
        "anchor_emb": graph_inputs["anchor_emb"],
        "row_request": rr,
        "item_numeric": _standardize(item32, prep.item_numeric, prep),
        "category": graph_inputs["category"],
        "item_emb": graph_inputs["item_emb"],
        "cross": cross,
    }
    return ParityCase(name, graph_inputs, model_inputs)


def _random_raw(specs: list[NumericSpec], n: int, rng: np.random.Generator) -> F32:
    """Plausible raw values: counts around the training distribution, floats likewise."""
    out = np.zeros((n, len(specs)), dtype=np.float32)
    for j, s in enumerate(specs):
        z = s.mean + 2.0 * s.std * rng.standard_normal(n)
        out[:, j] = np.round(np.expm1(np.abs(z))) if s.log1p else z
    if n and len(specs):
        out[rng.random((n, len(specs))) < 0.05] = 0.0
        out[rng.random((n, len(specs))) < 0.02] = np.nan  # a gap the store did not fill: 0
    return out


def random_cases(
    prep: Preprocessing,
    sizes: Iterable[tuple[int, int]] = RANDOM_SIZES,
    seed: int = 0,
    n_items: int = 64,
) -> list[ParityCase]:
    """Random cases of several (R, N): padding, unknown items, empty histories included."""
    rng = np.random.default_rng(seed)
    d = prep.embedding_dim
    embeddings = np.zeros((n_items + 1, d), dtype=np.float32)
    embeddings[1:] = rng.standard_normal((n_items, d)).astype(np.float32)
    cases = []
    for r, n in sizes:
        h, a = prep.history_length, prep.num_anchors
        history = rng.integers(1, n_items + 1, (r, h))
        anchors = rng.integers(1, n_items + 1, (r, a))
        for k in range(r):  # a random amount of padding per request
            history[k, rng.integers(0, h + 1) :] = 0
            anchors[k, rng.integers(1, a + 1) :] = 0
        if r > 1:
            history[1] = 0  # a user with no history
            anchors[r - 1] = 0  # and one without anchors
        item = rng.integers(0, n_items + 1, n)  # 0: unknown item, zero vector
        cases.append(
            case_from_indices(
                f"random_r{r}_n{n}",
                prep,
                embeddings,
                user_raw=_random_raw(prep.user_numeric, r, rng),
                history=history,
                anchors=anchors,
                row_request=rng.integers(0, r, n),  # any order: the graph must not care
                item_raw=_random_raw(prep.item_numeric, n, rng),
                category=rng.integers(0, len(prep.categories) + 1, n),
                item=item,
            )
        )
    return cases


def _raw_columns(table: pa.Table, specs: list[NumericSpec]) -> npt.NDArray[np.float64]:
    out = np.zeros((table.num_rows, len(specs)), dtype=np.float64)
    for j, s in enumerate(specs):
        if s.column not in table.column_names:
            raise ExportError(f"real rows lack feature column {s.column!r}")
        values = table.column(s.column).cast(pa.float64()).to_numpy(zero_copy_only=False)
        out[:, j] = np.asarray(values, dtype=np.float64)
    return out


def _cases_from_data(
    data: PrerankData,
    embeddings: F32,
    user_raw: npt.NDArray[Any],
    item_raw: npt.NDArray[Any],
    name: str,
) -> list[ParityCase]:
    """The whole sample as one call, and its first request alone (R = 1, as served)."""
    emb = np.asarray(embeddings, dtype=np.float32)

    def case(case_name: str, d: PrerankData, ur: npt.NDArray[Any], ir: npt.NDArray[Any]) -> Any:
        hist, anch = emb[d.history.astype(np.int64)], emb[d.anchors.astype(np.int64)]
        item_emb = emb[d.item.astype(np.int64)]
        rr = d.row_request.astype(np.int64)
        cat = d.category.astype(np.int64)
        return ParityCase(
            case_name,
            {
                "user_features": np.asarray(ur, dtype=np.float32),
                "history_emb": hist,
                "anchor_emb": anch,
                "row_request": rr,
                "item_features": np.asarray(ir, dtype=np.float32),
                "category": cat,
                "item_emb": item_emb,
            },
            {
                "user_numeric": d.user_numeric.astype(np.float32),
                "history_emb": hist,
                "anchor_emb": anch,
                "row_request": rr,
                "item_numeric": d.item_numeric.astype(np.float32),
                "category": cat,
                "item_emb": item_emb,
                "cross": d.cross.astype(np.float32),
            },
        )

    first = data.select_requests(np.array([0], dtype=np.int64))
    lo, hi = int(data.offsets[0]), int(data.offsets[1])
    return [
        case(name, data, user_raw, item_raw),
        case(f"{name}_one_request", first, user_raw[:1], item_raw[lo:hi]),
    ]


def cases_from_joined(
    table: pa.Table, items: ItemTable, prep: Preprocessing, name: str = "real_rows"
) -> list[ParityCase]:
    """Real-row cases from point-in-time joined rows (``<view>__<feature>`` columns).

    The training reference is :func:`training.preranker.data.encode` of the table (training's
    own path from joined rows to model inputs); the graph gets the raw joined values.
    """
    if table.num_rows == 0:
        raise ExportError("no real rows to check parity on")
    ts = pc.cast(
        table.column("event_timestamp").cast(pa.timestamp("us", tz="UTC")), pa.int64()
    ).to_numpy(zero_copy_only=False)
    req = np.asarray(table.column("request_id").to_pylist(), dtype=str)
    table = table.take(pa.array(np.lexsort((req, ts))))  # encode's order: it keeps this one
    data = encode(table, items, prep, need_pseudo=False)
    heads = table.take(pa.array(data.offsets[:-1]))
    return _cases_from_data(
        data,
        items.embeddings,
        _raw_columns(heads, prep.user_numeric),
        _raw_columns(table, prep.item_numeric),
        name,
    )


def _unstandardize(values: F32, specs: list[NumericSpec]) -> npt.NDArray[np.float64]:
    out = values.astype(np.float64) * np.array([s.std for s in specs]) + np.array(
        [s.mean for s in specs]
    )
    for j, s in enumerate(specs):
        if s.log1p:  # counts: back through the signed log1p, to the integer they were
            out[:, j] = np.round(np.sign(out[:, j]) * np.expm1(np.abs(out[:, j])))
    return out


def cases_from_data(
    data: PrerankData,
    embeddings: F32 | torch.Tensor,
    prep: Preprocessing,
    name: str = "real_rows",
    max_requests: int = 64,
) -> list[ParityCase]:
    """Real-row cases from an encoded dataset (e.g. ``prepare(...).valid``).

    :class:`PrerankData` keeps standardized values only, so the raw values fed to the graph are
    recovered by inverting the standardization (counts rounded back to integers); the training
    reference uses the dataset's own standardized values and cross features.
    """
    if data.n_requests == 0:
        raise ExportError("no real rows to check parity on")
    if data.n_requests > max_requests:
        data = data.select_requests(np.arange(max_requests, dtype=np.int64))
    emb = embeddings.numpy() if isinstance(embeddings, torch.Tensor) else embeddings
    return _cases_from_data(
        data,
        emb,
        _unstandardize(data.user_numeric, prep.user_numeric),
        _unstandardize(data.item_numeric, prep.item_numeric),
        name,
    )


# --- running ---------------------------------------------------------------------------------


def onnx_session(path: Path) -> ort.InferenceSession:
    """An ONNX Runtime session on the CPU execution provider (the one parity is checked on)."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run_onnx(session: ort.InferenceSession, inputs: Arrays) -> tuple[F32, F32]:
    """Probabilities and logits from an exported graph (the service ranks by the logits)."""
    out = session.run(
        ["probability", "logit"], {k: np.ascontiguousarray(v) for k, v in inputs.items()}
    )
    return np.asarray(out[0], dtype=np.float32), np.asarray(out[1], dtype=np.float32)


def _tensors(inputs: Arrays) -> list[torch.Tensor]:
    return [torch.from_numpy(np.ascontiguousarray(v)) for v in inputs.values()]


def run_split(
    item: ort.InferenceSession, score: ort.InferenceSession, inputs: Arrays
) -> tuple[F32, F32]:
    """Probabilities and logits from a split pair: the item graph's state fed to the score graph."""
    item_in = {k: np.ascontiguousarray(inputs[k]) for k in ITEM_INPUT_NAMES}
    state = item.run(["item_state"], item_in)[0]
    score_in = {k: np.ascontiguousarray(inputs[k]) for k in SCORE_INPUT_NAMES if k != "item_state"}
    score_in["item_state"] = state
    out = score.run(["probability", "logit"], score_in)
    return np.asarray(out[0], dtype=np.float32), np.asarray(out[1], dtype=np.float32)


def run_graph(graph: ServingGraph, inputs: Arrays) -> tuple[F32, F32]:
    """Probabilities and logits from the PyTorch graph on raw inputs."""
    graph.eval()
    with torch.no_grad():
        prob, logit = graph(*_tensors(inputs))
    return np.asarray(prob.numpy(), dtype=np.float32), np.asarray(logit.numpy(), dtype=np.float32)


def run_model(model: nn.Module, inputs: Arrays) -> tuple[F32, F32]:
    """Probabilities and logits from the trained model on training-preprocessed inputs."""
    model.eval()
    with torch.no_grad():
        logit = model(*_tensors(inputs))
    return (
        np.asarray(torch.sigmoid(logit).numpy(), dtype=np.float32),
        np.asarray(logit.numpy(), dtype=np.float32),
    )


def _max_diff(a: F32, b: F32) -> float:
    if a.shape != b.shape or not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("inf")
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max(initial=0.0))


def _max_logit_diff(a: F32, b: F32) -> float:
    """Largest logit difference relative to the reference's size (absolute below 1).

    Probabilities saturate: past |logit| ~ 11 a 1e-5 probability tolerance no longer sees a
    wrong logit, and the service ranks by logits.
    """
    if a.shape != b.shape or not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("inf")
    ref = b.astype(np.float64)
    scale = np.maximum(np.abs(ref), 1.0)
    return float((np.abs(a.astype(np.float64) - ref) / scale).max(initial=0.0))


def check_parity(
    graphs: dict[str, ServingGraph],
    onnx_paths: dict[str, Path],
    cases: Sequence[ParityCase],
    tolerance: float = TOLERANCE,
    split_paths: dict[str, tuple[Path, Path]] | None = None,
) -> ParityReport:
    """Compare every exported graph with PyTorch on every case.

    Args:
        graphs: Model kind -> the PyTorch graph that was exported.
        onnx_paths: Model kind -> its ONNX file.
        cases: Random and real cases (:func:`random_cases`, :func:`cases_from_joined`,
            :func:`cases_from_data`).
        tolerance: Largest allowed absolute difference of probabilities.
        split_paths: Model kind -> its (item graph, score graph) files, checked composed.

    Returns:
        The report (all checks passed).

    Raises:
        ExportParityError: naming the worst check, when any difference exceeds ``tolerance``.
    """
    report = ParityReport(tolerance)
    runners: list[tuple[str, str, Any]] = []
    for kind in graphs:
        session = onnx_session(onnx_paths[kind])
        runners.append((kind, kind, lambda x, s=session: run_onnx(s, x)))
        if split_paths is not None and kind in split_paths:
            item, score = (onnx_session(p) for p in split_paths[kind])
            runners.append((kind, f"{kind} (split)", lambda x, i=item, s=score: run_split(i, s, x)))
    for kind, name, run in runners:
        graph = graphs[kind]
        for case in cases:
            prob, logit = run(case.graph_inputs)
            ref_prob, ref_logit = run_graph(graph, case.graph_inputs)
            trained = (
                run_model(graph.model, case.model_inputs) if case.model_inputs is not None else None
            )
            report.checks.append(
                {
                    "model": name,
                    "case": case.name,
                    "requests": case.requests,
                    "rows": case.rows,
                    "vs_graph": _max_diff(prob, ref_prob),
                    "vs_training": None if trained is None else _max_diff(prob, trained[0]),
                    "logit_vs_graph": _max_logit_diff(logit, ref_logit),
                    "logit_vs_training": None
                    if trained is None
                    else _max_logit_diff(logit, trained[1]),
                }
            )
    if not report.passed:
        worst = max(report.failures(), key=report.excess)
        raise ExportParityError(
            f"ONNX parity failed: max |p_onnx - p_torch| = {report.max_abs_diff:.3g} "
            f"(tolerance {tolerance:g}), max relative logit difference "
            f"{report.max_logit_diff:.3g} (tolerance {report.logit_tolerance:g}); worst: "
            f"{worst['model']} model, case {worst['case']}: probabilities vs PyTorch graph "
            f"{worst['vs_graph']:.3g}, vs training pipeline {worst['vs_training']}, logits "
            f"{worst['logit_vs_graph']:.3g} / {worst['logit_vs_training']}; "
            f"{len(report.failures())} of {len(report.checks)} checks over a tolerance",
            report,
        )
    return report
