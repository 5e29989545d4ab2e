"""Shared fixtures: where the golden reference lives, and tiny random checkpoints of every family."""
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(os.environ.get("MOLMO_GOLDEN", REPO.parent / "shared" / "golden"))


def golden_or_skip() -> Path:
    if not (GOLDEN / "molmoe-tiny" / "model.safetensors").exists():
        pytest.skip(f"golden reference outputs not found at {GOLDEN} (set MOLMO_GOLDEN to the shared/golden folder)")
    return GOLDEN


@pytest.fixture(scope="session")
def golden() -> Path:
    return golden_or_skip()


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """family -> folder of a tiny random checkpoint in that family's real HF layout."""
    pytest.importorskip("torch")
    from molmo_edge.export.synthetic import FAMILIES, make_random_checkpoint

    root = tmp_path_factory.mktemp("ckpt")
    return {fam: make_random_checkpoint(str(root / fam), fam, seed=i) for i, fam in enumerate(FAMILIES)}


def export_tiny_bundles(tiny_checkpoints: dict, root, families=None, **options) -> dict:
    """family -> a fresh bundle exported (quietly) from the tiny checkpoint into `root`.
    Each caller gets its own folders: some tests add graphs or engines to theirs."""
    from molmo_edge.export.bundle import export_bundle
    from molmo_edge.runtime.tensorrt.check import check_for_export

    out = {}
    options.setdefault("trt_check", check_for_export)  # what `molmo-edge export` runs
    for fam in families or tiny_checkpoints:
        export_bundle(tiny_checkpoints[fam], str(root / fam), progress=lambda *_: None, **options)
        out[fam] = str(root / fam)
    return out
