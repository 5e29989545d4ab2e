"""Where a MODEL argument points: a local folder (checkpoint or bundle) or a Hugging Face hub id."""
from __future__ import annotations

import os

from molmo_edge.runtime.errors import MolmoEdgeError


class CheckpointError(MolmoEdgeError):
    """The checkpoint cannot be found, read, or does not match its config."""


def resolve_model(model: str) -> str:
    """A local folder as is; otherwise a hub id, fetched through the local HF cache (download only when online)."""
    if os.path.isdir(model):
        return model
    if os.path.exists(model):
        raise CheckpointError(f"{model} is a file; pass the checkpoint folder that holds config.json")
    if model.count("/") != 1 or model.startswith((".", "/")) or model.endswith("/"):
        raise CheckpointError(f"{model} is neither a folder nor a Hugging Face hub id like allenai/MolmoE-1B-0924")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(f"{model} is not a local folder and huggingface_hub is not installed: "
                              "`pip install huggingface_hub`, or download the checkpoint elsewhere and pass its folder") from None
    try:
        return snapshot_download(model, local_files_only=True)
    except Exception:  # not cached yet: try the network
        pass
    try:
        return snapshot_download(model)
    except Exception as e:
        raise CheckpointError(f"cannot download {model} ({type(e).__name__}); this machine looks offline: run "
                              f"`huggingface-cli download {model} --local-dir DIR` on a connected machine and pass DIR") from None
