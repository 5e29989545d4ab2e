"""`molmo-edge demo`: the whole path on any machine. With no MODEL it builds a tiny random-weight
MolmoE checkpoint in the real layout (UNTRAINED: its answers are noise), exports it to a bundle,
and asks about a generated image; with a checkpoint folder or hub id it does the same for real."""
from __future__ import annotations

import json
import os
import sys

import cv2
import numpy as np

from molmo_edge.export.bundle import export_bundle
from molmo_edge.export.synthetic import make_random_checkpoint


def demo_image(path: str) -> np.ndarray:
    """A 640x480 scene with three red cups and a blue box (RGB), also saved to `path`."""
    img = np.full((480, 640, 3), (235, 230, 220), np.uint8)
    cv2.rectangle(img, (0, 330), (640, 480), (150, 110, 70), -1)                 # table
    for x in (140, 320, 500):
        cv2.rectangle(img, (x - 30, 250), (x + 30, 340), (210, 30, 30), -1)       # cups (RGB red)
    cv2.rectangle(img, (40, 120), (140, 200), (30, 60, 200), -1)
    cv2.imwrite(path, cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    return img


def run_demo(model: str | None, workdir: str, image: str | None, prompts: list[str], max_new_tokens: int) -> int:
    from molmo_edge.runtime.overlay import save_overlay
    from molmo_edge.runtime.preprocess import load_image
    from molmo_edge.runtime.session import Molmo

    os.makedirs(workdir, exist_ok=True)
    untrained = model is None
    if untrained:
        model = make_random_checkpoint(os.path.join(workdir, "random-molmoe-tiny"), "molmoe-1b", size="tiny")
        print("NOTE: no MODEL given, so this demo uses a tiny UNTRAINED random-weight MolmoE checkpoint "
              f"({model}); its answers are meaningless. Pass a real checkpoint folder or hub id for real answers.",
              file=sys.stderr)
    bundle = os.path.join(workdir, "bundle")
    export_bundle(model, bundle, force=True)
    rgb = load_image(image) if image else demo_image(os.path.join(workdir, "demo.jpg"))
    m = Molmo.load(bundle)
    last = None
    for prompt in prompts:
        ans = m.ask(prompt, rgb, max_new_tokens=max_new_tokens)
        out = ans.to_dict()
        out["untrained_random_weights"] = untrained
        print(json.dumps(out))
        last = ans
    overlay = os.path.join(workdir, "overlay.jpg")
    save_overlay(overlay, rgb, last.points, last.text)
    print(f"bundle: {bundle}\noverlay: {overlay}", file=sys.stderr)
    return 0
