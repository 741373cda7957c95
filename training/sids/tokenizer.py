"""The frozen Semantic ID tokenizer: content vector -> ``L`` residual codes.

It holds the trained quantizer and nothing else: for an RQ-VAE the encoder MLP and the ``L``
codebooks, for residual k-means the ``L`` levels of centroids (with an identity encoder). Mapping
is the same for both: ``z = encoder(x)``, then at each level the nearest codeword to the residual,
which is subtracted before the next level.

On disk: ``codebooks.safetensors`` (the tensors) and ``codebooks.json`` (the shapes' source of
truth). Loading derives every expected tensor name and shape from the json and refuses a file
that disagrees, so a codebook from another run or config is never silently used.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors.torch import load_file, save_file

from training.io import atomic_path
from training.sids.kmeans import nearest

CODEBOOKS_FILE = "codebooks.safetensors"
CODEBOOKS_CONFIG = "codebooks.json"


class CodebookFormatError(ValueError):
    """A codebook file does not match its json config (or either is unreadable)."""


class QuantizerSpec(BaseModel):
    """Shapes of a frozen quantizer: the content of ``codebooks.json``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format_version: Literal[1] = Field(default=1, description="File format version.")
    method: Literal["rqvae", "rkmeans"] = Field(description="How the codebooks were built.")
    input_dim: int = Field(ge=1, description="Width of the content vectors it maps.")
    levels: int = Field(ge=1, description="Residual levels (codes per SID, before disambiguation).")
    codebook_size: int = Field(ge=2, description="Codes per level.")
    code_dim: int = Field(ge=1, description="Codeword width (rkmeans: equals input_dim).")
    hidden_dims: tuple[int, ...] = Field(
        default=(), description="RQ-VAE encoder hidden widths (empty for rkmeans)."
    )

    def encoder_dims(self) -> list[int]:
        """Layer widths of the encoder MLP, input to latent."""
        return [self.input_dim, *self.hidden_dims, self.code_dim]


def build_mlp(dims: Sequence[int]) -> torch.nn.Sequential:
    """Linear layers of the given widths with SiLU between them (none after the last)."""
    layers: list[torch.nn.Module] = []
    for i, (width_in, width_out) in enumerate(itertools.pairwise(dims)):
        layers.append(torch.nn.Linear(width_in, width_out))
        if i < len(dims) - 2:
            layers.append(torch.nn.SiLU())
    return torch.nn.Sequential(*layers)


def residual_codes(z: torch.Tensor, codebooks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest-codeword residual quantization.

    Args:
        z: ``(n, d)`` vectors to quantize.
        codebooks: ``(L, K, d)`` codewords.

    Returns:
        ``(n, L)`` codes and ``(n, L, d)`` the chosen codeword of each level.
    """
    residual = z
    codes, words = [], []
    for level in range(codebooks.shape[0]):
        idx, _ = nearest(residual, codebooks[level])
        word = codebooks[level][idx]
        codes.append(idx)
        words.append(word)
        residual = residual - word
    return torch.stack(codes, 1), torch.stack(words, 1)


class SemanticIdTokenizer:
    """A frozen quantizer that maps content vectors to residual codes."""

    def __init__(
        self,
        spec: QuantizerSpec,
        codebooks: torch.Tensor,
        encoder_state: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Build from tensors; raises :class:`CodebookFormatError` on any shape mismatch.

        Args:
            spec: The shapes.
            codebooks: ``(levels, codebook_size, code_dim)`` codewords.
            encoder_state: State dict of the encoder MLP (RQ-VAE only).
        """
        self.spec = spec
        self.encoder: torch.nn.Module = (
            build_mlp(spec.encoder_dims()) if spec.method == "rqvae" else torch.nn.Identity()
        )
        tensors = {"codebooks": codebooks}
        tensors.update({f"encoder.{k}": v for k, v in (encoder_state or {}).items()})
        problems = _shape_problems(spec, self.encoder, tensors)
        if problems:
            raise CodebookFormatError("; ".join(problems))
        if spec.method == "rqvae":
            assert encoder_state is not None  # _shape_problems demands its tensors
            self.encoder.load_state_dict(encoder_state)
        self.encoder.eval().requires_grad_(False)
        self.codebooks = codebooks.detach().to(torch.float32).clone()

    @torch.inference_mode()
    def latent(self, vectors: npt.NDArray[np.float32] | torch.Tensor) -> torch.Tensor:
        """The encoder output (the content vector itself for rkmeans)."""
        x = torch.as_tensor(np.asarray(vectors, dtype=np.float32))
        if x.ndim != 2 or x.shape[1] != self.spec.input_dim:
            raise ValueError(
                f"expected vectors of shape (n, {self.spec.input_dim}), got {tuple(x.shape)}"
            )
        return self.encoder(x)

    @torch.inference_mode()
    def codes(self, vectors: npt.NDArray[np.float32] | torch.Tensor) -> npt.NDArray[np.int32]:
        """``(n, levels)`` int32 codes of ``vectors`` (``(n, input_dim)``)."""
        codes, _ = residual_codes(self.latent(vectors), self.codebooks)
        return codes.numpy().astype(np.int32)

    @torch.inference_mode()
    def codes_and_last_residual(
        self, vectors: npt.NDArray[np.float32] | torch.Tensor
    ) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.float32]]:
        """Nearest codes plus what the first ``levels - 1`` levels left of each latent.

        Returns:
            ``(n, levels)`` int32 codes (those of :meth:`codes`) and ``(n, code_dim)`` float32
            residuals entering the last level, for :func:`training.sids.ids.unique_last_level`.
        """
        latent = self.latent(vectors)
        codes, words = residual_codes(latent, self.codebooks)
        residual = latent
        for level in range(self.spec.levels - 1):
            residual = residual - words[:, level]
        return codes.numpy().astype(np.int32), residual.numpy().astype(np.float32)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Everything saved to ``codebooks.safetensors``, by name."""
        out = {"codebooks": self.codebooks.contiguous()}
        if self.spec.method == "rqvae":
            out.update(
                {
                    f"encoder.{k}": v.detach().contiguous()
                    for k, v in self.encoder.state_dict().items()
                }
            )
        return out

    def save(self, directory: Path) -> tuple[Path, Path]:
        """Write ``codebooks.safetensors`` and ``codebooks.json`` atomically; return both paths."""
        directory.mkdir(parents=True, exist_ok=True)
        weights = directory / CODEBOOKS_FILE
        config = directory / CODEBOOKS_CONFIG
        with atomic_path(weights) as tmp:
            save_file(self.tensors(), str(tmp), metadata={"method": self.spec.method})
        with atomic_path(config) as tmp:
            tmp.write_text(json.dumps(self.spec.model_dump(mode="json"), indent=2) + "\n")
        return weights, config

    @classmethod
    def load(cls, directory: Path) -> SemanticIdTokenizer:
        """Load a tokenizer saved by :meth:`save`.

        Raises:
            FileNotFoundError: when either file is missing.
            CodebookFormatError: when the json is invalid or a tensor's name or shape does not
                match it.
        """
        weights = directory / CODEBOOKS_FILE
        config = directory / CODEBOOKS_CONFIG
        for path in (weights, config):
            if not path.exists():
                raise FileNotFoundError(f"{path}: no such file; run `train_sids` first")
        try:
            spec = QuantizerSpec.model_validate(json.loads(config.read_text()))
        except (json.JSONDecodeError, ValidationError) as exc:
            raise CodebookFormatError(f"{config} is not a valid codebook config: {exc}") from exc
        try:
            tensors = load_file(str(weights))
        except Exception as exc:  # safetensors raises its own error types
            raise CodebookFormatError(
                f"{weights} is not a readable safetensors file: {exc}"
            ) from exc
        if "codebooks" not in tensors:
            raise CodebookFormatError(f"{weights} has no 'codebooks' tensor")
        encoder_state = {
            k.removeprefix("encoder."): v for k, v in tensors.items() if k != "codebooks"
        }
        try:
            return cls(
                spec, tensors["codebooks"], encoder_state if spec.method == "rqvae" else None
            )
        except CodebookFormatError as exc:
            raise CodebookFormatError(f"{weights} does not match {config.name}: {exc}") from exc


def _shape_problems(
    spec: QuantizerSpec, encoder: torch.nn.Module, tensors: dict[str, torch.Tensor]
) -> list[str]:
    """Every tensor missing, unexpected or of the wrong shape, one line each."""
    expected = {"codebooks": (spec.levels, spec.codebook_size, spec.code_dim)}
    if spec.method == "rkmeans" and spec.code_dim != spec.input_dim:
        return [f"rkmeans needs code_dim == input_dim, got {spec.code_dim} != {spec.input_dim}"]
    expected.update({f"encoder.{k}": tuple(v.shape) for k, v in encoder.state_dict().items()})
    problems = []
    for name, shape in expected.items():
        if name not in tensors:
            problems.append(f"missing tensor {name!r} of shape {shape}")
        elif tuple(tensors[name].shape) != shape:
            problems.append(
                f"tensor {name!r} has shape {tuple(tensors[name].shape)}, config says {shape}"
            )
    problems += [f"unexpected tensor {name!r}" for name in sorted(set(tensors) - set(expected))]
    return problems
