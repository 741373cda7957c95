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

# The split graphs (see export.onnx_export): an *item graph* per model computes what depends on
# the candidate alone, once per item, and a *score graph* takes that state in place of the raw
# item inputs. A server caches the item state of every item and runs only the score graph per
# request; composed, the two equal the full graph.
ITEM_INPUT_NAMES: Final = ("item_features", "category", "item_emb")
ITEM_OUTPUT_NAMES: Final = ("item_state",)
SCORE_INPUT_NAMES: Final = (
    "user_features",
    "history_emb",
    "anchor_emb",
    "row_request",
    "item_state",
    "item_emb",
)
