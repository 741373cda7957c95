"""The exported graphs: a trained pre-ranker plus the preprocessing that belongs in the graph.

:class:`ServingGraph` wraps a :class:`~training.preranker.models.LightModel` or
:class:`~training.preranker.models.ExpressiveModel` so that the service feeds *raw* feature
values and gathered content vectors, and gets click probabilities back. Inside the graph:

* numeric preprocessing from :class:`~training.preranker.data.Preprocessing`: NaN -> 0, signed
  ``log1p`` of count features, ``(x - mean) / std``, computed in float64 like the training
  pipeline (constants baked in), then cast to float32;
* the four user x candidate cross features of
  :func:`~training.preranker.data.cross_features` (max cosine of the candidate to the user's
  anchors and to the user's history, and whether each is present), computed from the vectors the
  graph already receives, so the service cannot compute them differently;
* the sigmoid.

Left outside, because they need strings or the service's item cache: mapping the category
string to its id (vocabulary in the manifest, 0 = other) and gathering content vectors by item id
(zeros for padding and unknown items).

Inputs (R requests, N candidate rows; H, A, D, Fu, Fi fixed by the trained model):

================  ==========  =======  =============================================================
name              shape       dtype    meaning
================  ==========  =======  =============================================================
user_features     (R, Fu)     float32  raw user features, manifest ``features.user.columns`` order
history_emb       (R, H, D)   float32  content vectors of recent positives, most recent last,
                                       zero rows = padding
anchor_emb        (R, A, D)   float32  content vectors of the interest anchors, best first,
                                       zero rows = padding
row_request       (N,)        int64    request (0..R-1) of each candidate row
item_features     (N, Fi)     float32  raw candidate features, manifest ``features.item.columns``
category          (N,)        int64    category id: 1 + index in the manifest vocabulary, 0 = other
item_emb          (N, D)      float32  candidate content vector, zeros = unknown item
================  ==========  =======  =============================================================

Outputs: ``probability`` (N,) float32, the click probability, and ``logit`` (N,) float32, its
logit (ties-free ordering where probabilities saturate).

Each model is also exported **split** in two graphs whose composition is the full graph:

* the *item graph* (:class:`ItemGraph`): ``item_features``, ``category``, ``item_emb`` ->
  ``item_state`` (N, S + 1) float32, what depends on the candidate alone: the model's item side
  (standardization and the item tower; for the expressive model also the attention query),
  S = :attr:`~training.preranker.models.LightModel.item_side_width`, then the inverse norm of
  the content vector (for the cross features' cosines);
* the *score graph* (:class:`ScoreGraph`): the full graph's inputs with ``item_state`` in place
  of ``item_features`` and ``category`` (``item_emb`` stays: the cross features need it) ->
  ``probability``, ``logit``.

A server runs the item graph once per item when it fills its item cache and only the score
graph per request; the export's parity check covers the composition too.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import torch
from torch import Tensor, nn

from export.signature import (
    INPUT_NAMES,
    ITEM_INPUT_NAMES,
    ITEM_OUTPUT_NAMES,
    OUTPUT_NAMES,
    SCORE_INPUT_NAMES,
)
from training.preranker.data import NumericSpec, Preprocessing
from training.preranker.models import ExpressiveModel, LightModel

__all__ = [
    "INPUT_NAMES",
    "OUTPUT_NAMES",
    "GraphSpec",
    "ItemGraph",
    "ScoreGraph",
    "ServingGraph",
    "export_graph",
    "export_split",
]
OPSET: Final = 17
MODEL_KINDS: Final = ("light", "expressive")
_PAD_COSINE: Final = -2.0  # below any cosine: masked slots never win the max


class _Standardize(nn.Module):
    """Non-finite -> 0, signed log1p where the spec says so, then (x - mean) / std; float64."""

    log1p: Tensor
    mean: Tensor
    std: Tensor

    def __init__(self, specs: list[NumericSpec]) -> None:
        super().__init__()
        self.register_buffer("log1p", torch.tensor([s.log1p for s in specs], dtype=torch.bool))
        self.register_buffer("mean", torch.tensor([s.mean for s in specs], dtype=torch.float64))
        self.register_buffer("std", torch.tensor([s.std for s in specs], dtype=torch.float64))

    def forward(self, raw: Tensor) -> Tensor:
        """Standardized float32 features, same shape as ``raw``."""
        x = raw.to(torch.float64)
        # NaN and +-inf alike are a missing value (training's _as_float does the same): an
        # infinite feature in the store must not turn into a NaN score.
        x = torch.where(torch.isfinite(x), x, torch.zeros_like(x))
        logged = torch.sign(x) * torch.log1p(torch.abs(x))
        x = torch.where(self.log1p, logged, x)
        return ((x - self.mean) / self.std).to(torch.float32)


def _inverse_norm(emb: Tensor) -> Tensor:
    """1 / max(||emb||, 1e-12) over the last axis, keeping it (so ``emb * _inverse_norm``)."""
    return 1.0 / torch.clamp(torch.sqrt((emb * emb).sum(-1, keepdim=True)), min=1e-12)


def _unit(emb: Tensor) -> Tensor:
    norm = torch.sqrt((emb * emb).sum(-1, keepdim=True))
    return emb / torch.clamp(norm, min=1e-12)


def cross_in_graph(
    item_emb: Tensor, anchor_emb: Tensor, history_emb: Tensor, row_request: Tensor
) -> Tensor:
    """:func:`training.preranker.data.cross_features` from gathered vectors: (N, 4).

    A slot counts as present when its vector is not all zeros (the models' padding rule).
    """
    return cross_from_states(
        item_emb, _inverse_norm(item_emb), anchor_emb, history_emb, row_request
    )


def cross_from_states(
    item_emb: Tensor,
    inverse_norm: Tensor,
    anchor_emb: Tensor,
    history_emb: Tensor,
    row_request: Tensor,
) -> Tensor:
    """:func:`cross_in_graph` with the candidates' inverse norms given.

    The score graph has them precomputed per item. The (N, D) candidate vectors are not
    normalized (each row's cosines are scaled by its inverse norm instead: N x S multiplications
    instead of N x D), and the anchors and the history are matched in one matrix product.
    """
    r, a, d = anchor_emb.shape
    h = history_emb.shape[1]
    slots = torch.cat([anchor_emb, history_emb], dim=1)  # (R, A + H, D)
    s = a + h
    present = slots.abs().sum(-1) > 0  # (R, S)
    keys = _unit(slots).reshape(r * s, d)
    every = (item_emb @ keys.T) * inverse_norm  # (N, R*S)
    cols = row_request.unsqueeze(1) * s + torch.arange(s, device=slots.device).unsqueeze(0)
    cos = torch.gather(every, 1, cols)  # (N, S)
    mask = present[row_request]
    best_of = torch.where(mask, cos, torch.full_like(cos, _PAD_COSINE))
    columns: list[Tensor] = []
    for lo, hi in ((0, a), (a, s)):
        best = best_of[:, lo:hi].max(dim=1).values
        has = mask[:, lo:hi].any(dim=1)
        columns += [torch.where(has, best, torch.zeros_like(best)), has.to(cos.dtype)]
    return torch.stack(columns, dim=1)


class ServingGraph(nn.Module):
    """A trained model with in-graph preprocessing; returns (probability, logit), both (N,)."""

    model: LightModel | ExpressiveModel

    def __init__(self, model: LightModel | ExpressiveModel, prep: Preprocessing) -> None:
        super().__init__()
        self.model = model
        self.user = _Standardize(prep.user_numeric)
        self.item = _Standardize(prep.item_numeric)

    def forward(
        self,
        user_features: Tensor,
        history_emb: Tensor,
        anchor_emb: Tensor,
        row_request: Tensor,
        item_features: Tensor,
        category: Tensor,
        item_emb: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """Click probabilities and logits of every candidate row."""
        cross = cross_in_graph(item_emb, anchor_emb, history_emb, row_request)
        logit: Tensor = self.model(
            self.user(user_features),
            history_emb,
            anchor_emb,
            row_request,
            self.item(item_features),
            category,
            item_emb,
            cross,
        )
        return torch.sigmoid(logit), logit


def state_width(graph: ServingGraph) -> int:
    """Columns of the item graph's ``item_state``: the model's item side, then the inverse norm."""
    return graph.model.item_side_width + 1


class ItemGraph(nn.Module):
    """The item half of a :class:`ServingGraph`: raw item inputs -> the model's item state."""

    model: LightModel | ExpressiveModel

    def __init__(self, graph: ServingGraph) -> None:
        super().__init__()
        self.model = graph.model
        self.item = graph.item

    def forward(self, item_features: Tensor, category: Tensor, item_emb: Tensor) -> Tensor:
        """(N, S + 1): the model's item side, then the content vector's inverse norm."""
        side = self.model.item_side(self.item(item_features), category, item_emb)
        return torch.cat([side, _inverse_norm(item_emb)], dim=1)


class ScoreGraph(nn.Module):
    """The request half of a :class:`ServingGraph`: user inputs + item state -> scores."""

    model: LightModel | ExpressiveModel

    def __init__(self, graph: ServingGraph) -> None:
        super().__init__()
        self.model = graph.model
        self.user = graph.user

    def forward(
        self,
        user_features: Tensor,
        history_emb: Tensor,
        anchor_emb: Tensor,
        row_request: Tensor,
        item_state: Tensor,
        item_emb: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """Click probabilities and logits of every candidate row."""
        side, inverse_norm = item_state[:, :-1], item_state[:, -1:]
        cross = cross_from_states(item_emb, inverse_norm, anchor_emb, history_emb, row_request)
        logit: Tensor = self.model.score_side(
            self.user(user_features), history_emb, anchor_emb, row_request, side, cross
        )
        return torch.sigmoid(logit), logit


@dataclass(frozen=True)
class GraphSpec:
    """Fixed sizes of a graph's inputs (R and N are dynamic)."""

    n_user: int
    n_item: int
    history: int
    anchors: int
    dim: int
    categories: int

    @classmethod
    def of(cls, prep: Preprocessing) -> GraphSpec:
        """The sizes a model trained with ``prep`` expects."""
        return cls(
            n_user=len(prep.user_numeric),
            n_item=len(prep.item_numeric),
            history=prep.history_length,
            anchors=prep.num_anchors,
            dim=prep.embedding_dim,
            categories=len(prep.categories),
        )

    def inputs(self) -> list[dict[str, Any]]:
        """Name, shape (symbolic R and N) and dtype of every input, in order."""
        shapes: dict[str, tuple[list[int | str], str]] = {
            "user_features": (["R", self.n_user], "float32"),
            "history_emb": (["R", self.history, self.dim], "float32"),
            "anchor_emb": (["R", self.anchors, self.dim], "float32"),
            "row_request": (["N"], "int64"),
            "item_features": (["N", self.n_item], "float32"),
            "category": (["N"], "int64"),
            "item_emb": (["N", self.dim], "float32"),
        }
        return [{"name": k, "shape": shapes[k][0], "dtype": shapes[k][1]} for k in INPUT_NAMES]

    @staticmethod
    def outputs() -> list[dict[str, Any]]:
        """Name, shape and dtype of every output."""
        return [{"name": k, "shape": ["N"], "dtype": "float32"} for k in OUTPUT_NAMES]

    def item_inputs(self) -> list[dict[str, Any]]:
        """Inputs of the item graph."""
        return [i for i in self.inputs() if i["name"] in ITEM_INPUT_NAMES]

    def score_inputs(self, width: int) -> list[dict[str, Any]]:
        """Inputs of the score graph, whose item state is ``width`` wide."""
        by_name = {i["name"]: i for i in self.inputs()}
        by_name["item_state"] = {"name": "item_state", "shape": ["N", width], "dtype": "float32"}
        return [by_name[k] for k in SCORE_INPUT_NAMES]


def example_inputs(spec: GraphSpec, r: int = 2, n: int = 5, seed: int = 0) -> dict[str, Tensor]:
    """Small random inputs for tracing (sizes other than 0 and 1 so no axis is specialized)."""
    g = torch.Generator().manual_seed(seed)
    return {
        "user_features": torch.rand(r, spec.n_user, generator=g),
        "history_emb": torch.randn(r, spec.history, spec.dim, generator=g),
        "anchor_emb": torch.randn(r, spec.anchors, spec.dim, generator=g),
        "row_request": torch.arange(n, dtype=torch.int64) % r,
        "item_features": torch.rand(n, spec.n_item, generator=g),
        "category": torch.randint(0, spec.categories + 1, (n,), generator=g),
        "item_emb": torch.randn(n, spec.dim, generator=g),
    }


def _export(
    module: nn.Module,
    args: tuple[Tensor, ...],
    names: tuple[tuple[str, ...], tuple[str, ...]],
    path: Path,
    opset: int,
) -> str:
    """Export ``module`` with dynamic axis 0 everywhere (R for the user inputs, N otherwise)."""
    input_names, output_names = names
    path.parent.mkdir(parents=True, exist_ok=True)
    axes = {
        k: {0: "R" if k in ("user_features", "history_emb", "anchor_emb") else "N"}
        for k in (*input_names, *output_names)
    }
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporters' deprecation and tracer notices
        try:
            torch.onnx.export(
                module,
                args,
                str(path),
                input_names=list(input_names),
                output_names=list(output_names),
                dynamic_axes=axes,
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
            return "torchscript"
        except Exception:  # pragma: no cover - only when the legacy exporter is gone or fails
            path.unlink(missing_ok=True)
        r, n = torch.export.Dim("R"), torch.export.Dim("N")
        shapes = {k: {0: r if v[0] == "R" else n} for k, v in axes.items() if k in input_names}
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_shapes=shapes,
            opset_version=max(opset, 18),
            dynamo=True,
            external_data=False,
            verbose=False,
        )
        return "dynamo"


def export_split(
    graph: ServingGraph, spec: GraphSpec, item_path: Path, score_path: Path, opset: int = OPSET
) -> str:
    """Write the item graph and the score graph of ``graph`` (see the module docstring).

    Returns:
        Which exporter wrote the files.
    """
    graph.eval()
    inputs = example_inputs(spec)
    item = ItemGraph(graph).eval()
    item_args = tuple(inputs[k] for k in ITEM_INPUT_NAMES)
    with torch.no_grad():
        inputs["item_state"] = item(*item_args)
    used = _export(item, item_args, (ITEM_INPUT_NAMES, ITEM_OUTPUT_NAMES), item_path, opset)
    score_args = tuple(inputs[k] for k in SCORE_INPUT_NAMES)
    score = ScoreGraph(graph).eval()
    _export(score, score_args, (SCORE_INPUT_NAMES, OUTPUT_NAMES), score_path, opset)
    return used


def export_graph(graph: ServingGraph, spec: GraphSpec, path: Path, opset: int = OPSET) -> str:
    """Write ``graph`` as one self-contained ONNX file with dynamic R and N axes.

    Uses the TorchScript-based exporter (``dynamo=False``): the graph is plain tensor code,
    which it exports in a fraction of a second and deterministically. Should it fail (it is
    deprecated in recent torch), the ``torch.export``-based exporter is used instead; the parity
    check judges either way.

    Returns:
        Which exporter wrote the file.
    """
    graph.eval()
    args = tuple(example_inputs(spec).values())
    return _export(graph, args, (INPUT_NAMES, OUTPUT_NAMES), path, opset)
