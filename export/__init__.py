"""ONNX export of the pre-rankers (not built yet)."""
