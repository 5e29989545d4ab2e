"""Molmo runtime: config, tokenizer, preprocessing, bundles, backends and the CLI. Never imports torch.

    from molmo_edge.runtime import Molmo
    answer = Molmo.load("bundle/").ask("Point to the red cup", image="frame.jpg")
"""
from typing import Any

__all__ = ["Molmo", "Answer", "load_bundle"]


def __getattr__(name: str) -> Any:  # lazy: `molmo-edge --help` should not pay for OpenCV and onnxruntime
    if name in ("Molmo", "Answer"):
        from molmo_edge.runtime import session
        return getattr(session, name)
    if name == "load_bundle":
        from molmo_edge.runtime.bundle import load_bundle
        return load_bundle
    raise AttributeError(name)
