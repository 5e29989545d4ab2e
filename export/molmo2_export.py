"""The export self-check for Molmo2 bundles: the runtime on the new bundle against the torch reference,
on one made-up request (two crops, a pooling index with empty slots, two image blocks between text)."""
from __future__ import annotations

from typing import Callable

import numpy as np

from molmo_edge.runtime.config import MolmoConfig
from molmo_edge.runtime.errors import MolmoEdgeError


def check_request(cfg: MolmoConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """HF-named arrays of a small image request that exercises the prefix mask across two image blocks."""
    rng = np.random.default_rng(seed)
    ids = cfg.image_token_ids()
    block = lambda n: [ids["<im_start>"]] + [ids["<im_patch>"]] * n + [ids["<im_col>"], ids["<im_end>"]]  # noqa: E731
    seq = [cfg.eos_token_id % cfg.vocab_size] + block(5) + [11, 12] + block(4) + list(rng.integers(0, cfg.vocab_size, 6))
    pooling = rng.integers(0, 2 * cfg.vision.num_patches, (9, 4)).astype(np.int32)
    pooling[2, 1] = pooling[7, 3] = -1
    input_ids = np.asarray(seq, np.int64)[None]
    from molmo_edge.runtime.prefix_mask import mm_token_types
    return {"input_ids": input_ids, "mm_token_type_ids": mm_token_types(cfg, input_ids),
            "pixel_values": rng.uniform(-1, 1, (2, cfg.vision.num_patches, cfg.vision.patch_dim)).astype(np.float32),
            "image_token_pooling": pooling}


def self_check_molmo2(bundle_dir: str, folder: str, cfg: MolmoConfig, dtype: str, progress: Callable[[str], None],
                      check_layers: int | None = None, opset: int = 18) -> dict:
    """As the v1 check: models larger than memory are checked on their first decoder layers (all of vision)."""
    import shutil

    import torch

    from molmo_edge.export.bundle import _check_bundle, check_layer_budget
    from molmo_edge.export.checkpoint import WeightSource
    from molmo_edge.export.model import build_model
    from molmo_edge.runtime.session import Molmo

    layers = min(cfg.n_layers, check_layers or check_layer_budget(cfg))
    source = WeightSource(folder)
    target = bundle_dir
    if layers < cfg.n_layers:
        progress(f"[export] the full check needs more memory than this machine has: checking the vision graph and "
                 f"the first {layers} of {cfg.n_layers} decoder layers")
        target = _check_bundle(bundle_dir, cfg, source, np.float16 if dtype == "fp16" else np.float32, opset, layers, progress)
    progress("[export] checking the ONNX graphs against the torch model ...")
    inputs = check_request(cfg)
    runtime = Molmo.load(target, fused=False)
    got = runtime.forward(inputs)
    del runtime
    if target != bundle_dir:
        shutil.rmtree(target)
    model = build_model(cfg.with_(n_layers=layers), source)
    with torch.no_grad():
        ref = model(**inputs)
    del model
    want = ref.logits[0].numpy()
    diff = float(np.abs(got["logits"] - want).max())
    fdiff = float(np.abs(got["image_features"] - ref.image_features[0].numpy()).max())
    scale = max(1.0, float(np.abs(want).max()))
    tol = 1e-3 if dtype == "fp32" else 1e-2 * scale  # as the v1 check
    agree = float((got["logits"].argmax(-1) == want.argmax(-1)).mean())
    progress(f"[export] largest logit difference {diff:.2e} (tolerance {tol:.1e}), image features {fdiff:.2e}, "
             f"argmax agreement {agree:.1%} over {want.shape[0]} positions")
    if not np.isfinite(diff) or diff > tol:
        raise MolmoEdgeError(f"export self-check failed: ONNX logits differ from the torch model by {diff:.3e} "
                             f"(tolerance {tol:.1e}); nothing was written. Please report this with the checkpoint's config.json")
    return {"max_abs_logit_diff": diff, "per_decoder": {"decoder": diff}, "max_abs_feature_diff": fdiff,
            "argmax_agreement": agree, "tolerance": tol, "positions": int(want.shape[0]),
            "decoder_layers_checked": layers, "decoder_layers": cfg.n_layers}
