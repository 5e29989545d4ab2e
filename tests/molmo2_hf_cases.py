"""Inputs outside the golden set, and the writer of data/molmo2_hf_cases.npz: what transformers 5.24.0's
Molmo2Processor returns for them (other sizes and aspect ratios, reduced max_crops, several images, video at
other frame rates, images plus video, a multi-turn prompt) and what its apply_chat_template writes for other
message shapes, with the golden tiny checkpoint. Written once with transformers==5.24.0, torch 2.13 CPU and
torchvision (for its resize), one thread, in an environment of its own; the tests import only the helpers here
and read the .npz (no torch, no transformers):

    python tests/molmo2_hf_cases.py GOLDEN/molmo2 tests/data/molmo2_hf_cases.npz

Pixels are stored as uint8 levels (x * 127.5 + 127.5) at 8000 seeded positions per tensor (`sample_positions`):
enough for the golden README's "one level for <= 0.5 %" rule without storing megabytes.
"""
import json
import sys
import zlib

import numpy as np
from PIL import Image

SAMPLES = 8000


def sample_positions(key: str, size: int) -> np.ndarray:
    """The stored pixel positions of tensor `key` ("case/name"), rebuilt by the tests from the same seed."""
    rng = np.random.default_rng(zlib.crc32(key.encode()))
    return np.sort(rng.choice(size, size=min(SAMPLES, size), replace=False))


def rand_image(h, w, seed=0):
    """Smooth content plus noise (rounding ties and structure both occur); the tests rebuild the same images."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = (127 + 100 * np.sin(xx / 7.0)[..., None] * np.cos(yy / 5.0)[..., None]) * np.ones(3)
    return np.clip(base + rng.integers(-20, 21, (h, w, 3)), 0, 255).astype(np.uint8)


# name -> images ("chelsea" or (h, w, seed)), video ((n_frames, fps) of 90x160 frames seeded 10+i), prompt, ...
CASES = {
    "wide": dict(images=[(720, 1280, 1)], prompt="Describe."),
    "portrait": dict(images=[(512, 300, 2)], prompt="What is it?"),
    "tie": dict(images=[(872, 1000, 3)], prompt="Count."),
    "tiny": dict(images=[(20, 33, 4)], prompt="Tiny."),
    "maxcrops2": dict(images=[(512, 512, 5)], prompt="Max 2.", max_crops=2),
    "maxcrops4_multi": dict(images=[(300, 451, 6), "chelsea", (900, 200, 7)], prompt="Compare.", max_crops=4),
    "two_same_shape": dict(images=[(400, 600, 8), (400, 600, 9)], prompt="Differences?"),
    "chelsea_crops1": dict(images=["chelsea"], prompt="One crop.", max_crops=1),
    "video30_fps7": dict(video=(30, 7.0), prompt="What happens?"),
    "video10_fps1": dict(video=(10, 1.0), prompt="Slow."),
    "image_and_video": dict(images=[(200, 300, 11)], video=(13, 3.3), prompt="Both."),
    "text_history": dict(prompt="And Germany?", history=[["Capital of France?", "Paris."]]),
}

TEMPLATES = {
    "subtitle_style_history": [
        {"role": "subtitle", "content": "[0.0] hello"},
        {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What is said?", "style": "x_style"},
                                     {"type": "text", "text": "Be brief.", "style": "user_qa"}]},
        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Again?"}],
    "images_in_later_turn": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "A?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "B."}]},
        {"role": "user", "content": [{"type": "image", "image": "x.jpg"}, {"type": "text", "text": "C?"}]}],
    "string_content": [{"role": "user", "content": "Just text."}],
    "image_url_and_video": [{"role": "user", "content": [{"type": "image_url", "image_url": "u"},
                                                         {"type": "video", "video": "v.mp4"},
                                                         {"type": "text", "text": "Q"}]}],
}


def images_of(case, golden):
    chel = np.array(Image.open(f"{golden}/inputs/chelsea.png").convert("RGB"))
    return [chel if i == "chelsea" else rand_image(*i) for i in case.get("images", [])]


def frames_of(case):
    n, fps = case["video"]
    return np.stack([rand_image(90, 160, 10 + i) for i in range(n)]), fps


def main(golden, out_path):
    import torch
    from transformers import AutoProcessor

    torch.set_num_threads(1)  # the goldens' setting: torch's 3-channel bilinear kernel
    proc = AutoProcessor.from_pretrained(f"{golden}/ckpt-qwen3-tiny")
    out = {"cases": json.dumps(CASES)}
    for name, c in CASES.items():
        media = [{"type": "image"}] * len(c.get("images", [])) + ([{"type": "video"}] if "video" in c else [])
        msgs = []
        for q, a in c.get("history", []):
            msgs += [{"role": "user", "content": [{"type": "text", "text": q}]},
                     {"role": "assistant", "content": [{"type": "text", "text": a}]}]
        msgs.append({"role": "user", "content": [{"type": "text", "text": c["prompt"]}]})
        msgs[0]["content"] = media + msgs[0]["content"]
        text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        kw = {"text": text, "return_tensors": "pt"}
        if c.get("images"):
            kw["images"] = [Image.fromarray(i) for i in images_of(c, golden)]
            if "max_crops" in c:
                kw["max_crops"] = c["max_crops"]
        if "video" in c:
            frames, fps = frames_of(c)
            kw["videos"] = [frames]
            kw["video_metadata"] = [{"fps": fps, "total_num_frames": len(frames)}]
        res = {k: v.numpy() for k, v in proc(**kw).items()}
        out[f"{name}/prompt_text"] = np.array(text)
        for k, v in res.items():
            if k.startswith("pixel_values"):
                flat = v.reshape(-1)
                at = sample_positions(f"{name}/{k}", flat.size)
                out[f"{name}/{k}.levels"] = np.rint(flat[at].astype(np.float64) * 127.5 + 127.5).astype(np.uint8)
                out[f"{name}/{k}.shape"] = np.array(v.shape)
            else:
                out[f"{name}/{k}"] = v
    for name, msgs in TEMPLATES.items():
        out[f"template/{name}"] = np.array(json.dumps({
            "messages": msgs, "gen": proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False),
            "nogen": proc.apply_chat_template(msgs, add_generation_prompt=False, tokenize=False)}))
    np.savez_compressed(out_path, **out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
