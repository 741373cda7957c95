"""The exported graphs' signature: input and output names, in order (no torch import here).

The service checks every bundle it loads against it; :mod:`export.onnx_export` exports with it.
See that module's docstring for each input's shape, dtype and meaning.
"""

from typing import Final

INPUT_NAMES: Final = (
    "user_features",
    "history_emb",
    "anchor_emb",
    "row_request",
    "item_features",
    "category",
    "item_emb",
)
OUTPUT_NAMES: Final = ("probability", "logit")
