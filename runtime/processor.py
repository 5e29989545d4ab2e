"""Text + image -> the model's inputs, exactly as AI2's HF `MolmoProcessor.process` builds them."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from molmo_edge.runtime.config import MolmoConfig, load_config
from molmo_edge.runtime.preprocess import ImageCrops, build_inputs, preprocess_image
from molmo_edge.runtime.tokenizer import MolmoTokenizer


class MolmoProcessor:
    def __init__(self, folder: str, cfg: MolmoConfig | None = None):
        if cfg is None:
            from molmo_edge.runtime.bundle import is_bundle, load_bundle
            cfg = load_bundle(folder).config if is_bundle(folder) else load_config(folder)
        self.cfg = cfg
        self.tokenizer = MolmoTokenizer(folder, self.cfg)

    def image(self, image: Any, *, max_crops: int | None = None, bgr: bool = False) -> ImageCrops:
        """Crops, tokens and indices of one image (path, numpy array or PIL image)."""
        return preprocess_image(image, self.cfg, max_crops=max_crops, bgr=bgr)

    def process(self, prompt: str, image: Any = None, *, max_crops: int | None = None, bgr: bool = False,
                history: Sequence[tuple[str, str]] = (), crops: ImageCrops | None = None) -> dict[str, np.ndarray]:
        """`input_ids` (BOS first), and with an image `images`, `image_input_idx`, `image_masks` (HF names and dtypes).
        Pass `crops` from `image()` to reuse one preprocessed frame for several prompts."""
        if crops is None and image is not None:
            crops = self.image(image, max_crops=max_crops, bgr=bgr)
        text = np.asarray(self.tokenizer.encode_prompt(prompt, history), dtype=np.int32)
        return build_inputs(text, crops, self.tokenizer.bos_id)
