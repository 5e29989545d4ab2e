"""What the vision graph eats, crop by crop, for either family (the graph is independent per crop).

Molmo: `images` + `image_masks` per crop, features [crops, 144, d]. Molmo2: `pixel_values` per crop and a
pooling index that pools each crop's own patch grid in 2x2 windows (as the processor pools the low-res
view), features [crops * 196, d] regrouped per crop; every ViT and connector layer then sees the
activations real images give it.
"""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from molmo_edge.calibration.stats import crop_batches


class VisionFeeds:
    def __init__(self, bundle_dir: str, cfg: Any):
        self.cfg = cfg
        if cfg.is_molmo2:
            from molmo_edge.runtime.molmo2_preprocess import arange_for_pooling
            from molmo_edge.runtime.molmo2_processor import Molmo2Processor
            self.proc = Molmo2Processor(bundle_dir)
            h, w = cfg.vision.patches_per_side
            self._pool = arange_for_pooling(np.arange(h * w).reshape(h, w), *cfg.image_pooling)[0].astype(np.int64)
        else:
            from molmo_edge.runtime.processor import MolmoProcessor
            self.proc = MolmoProcessor(bundle_dir, cfg)

    def crops(self, rgb: np.ndarray, max_crops: int | None) -> tuple[np.ndarray, np.ndarray | None]:
        """(pixels [crops, patches, 588], masks [crops, patches] or None) of one frame."""
        if self.cfg.is_molmo2:
            return self.proc.image(rgb, max_crops=max_crops).pixel_values, None
        c = self.proc.image(rgb, max_crops=max_crops)
        return c.images, c.image_masks

    def batches(self, pixels: np.ndarray, masks: np.ndarray | None, batch: int) -> Iterator[dict[str, np.ndarray]]:
        if not self.cfg.is_molmo2:
            yield from crop_batches(pixels, masks, batch)
            return
        n_patch = self.cfg.vision.num_patches
        for s in range(0, pixels.shape[0], batch):
            chunk = np.ascontiguousarray(pixels[s:s + batch], np.float32)
            pool = np.concatenate([np.where(self._pool >= 0, self._pool + i * n_patch, -1) for i in range(len(chunk))])
            yield {"pixel_values": chunk, "pooling": pool}

    @staticmethod
    def n_crops(feeds: dict[str, np.ndarray]) -> int:
        return int(feeds["pixel_values" if "pixel_values" in feeds else "images"].shape[0])

    def per_crop(self, features: np.ndarray, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """The graph's image_features grouped [crops, tokens, d] (Molmo2 returns them flat)."""
        return features.reshape(self.n_crops(feeds), -1, features.shape[-1])
