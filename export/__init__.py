"""ONNX export of the pre-rankers: graphs, numerical parity, and the model bundle.

``gpl export`` turns a trained ``RUN_DIR/preranker/`` into a self-describing bundle directory
that the pre-ranking service loads:

* :mod:`export.onnx_export` wraps each model with the preprocessing that belongs inside the
  graph (numeric standardization, the user x candidate cross features, the sigmoid) and writes
  ``light.onnx`` / ``expressive.onnx`` with dynamic request and candidate axes;
* :mod:`export.parity` runs PyTorch and ONNX Runtime on random and real rows and fails the
  export when probabilities differ by more than ``1e-5``;
* :mod:`export.bundle` writes the bundle atomically (models, ``manifest.json``,
  ``checksums.sha256``) and verifies it (:func:`export.bundle.verify_bundle`).

See docs/export.md for the bundle layout and the graphs' inputs and outputs.

Importing this package (and :func:`export.bundle.verify_bundle`) does not import torch or
ONNX Runtime, so the service can verify bundles cheaply; exporting imports them lazily.
"""

from export.bundle import BundleError, ExportError, ExportResult, export_bundle, verify_bundle

__all__ = ["BundleError", "ExportError", "ExportResult", "export_bundle", "verify_bundle"]
