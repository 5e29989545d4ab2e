"""Checkpoint loading, the torch reference model and ONNX export (needs the `export` extra)."""
