"""`molmo-edge`: run Molmo vision-language models offline.

Heavy modules (torch, onnxruntime) are imported inside the command that needs them, so
`molmo-edge --help` and `preprocess` start fast and never load torch.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from molmo_edge.runtime.errors import MolmoEdgeError
from molmo_edge.runtime.files import say

EPILOG = """\
examples:
  molmo-edge preprocess allenai/MolmoE-1B-0924 --image cat.jpg --prompt "Point to the cat" -o inputs.npz
  molmo-edge forward ./MolmoE-1B-0924 --inputs inputs.npz -o logits.npz
  molmo-edge ask ./MolmoE-1B-0924 --image cat.jpg "How many cats are there?" --json
  molmo-edge export ./MolmoE-1B-0924 -o molmoe-bundle
  molmo-edge ask molmoe-bundle --image cat.jpg --prompt "Point to the cat" --prompt "Count the cats" --overlay out.jpg

MODEL is a Hugging Face checkpoint folder (config.json, tokenizer.json, weights), a hub id
(downloaded only when online; offline, download it elsewhere and pass the folder), or a bundle
folder made by `molmo-edge export` (runs on onnxruntime, no torch needed).
"""


def _model_folder(model: str) -> str:
    from molmo_edge.runtime.model_path import resolve_model
    return resolve_model(model)


def _processor(folder: str):
    from molmo_edge.runtime.processor import MolmoProcessor
    return MolmoProcessor(folder)


def _load_inputs(path: str) -> dict[str, Any]:
    import numpy as np
    if not os.path.exists(path):
        raise MolmoEdgeError(f"{path} does not exist; make it with `molmo-edge preprocess MODEL --prompt TEXT -o {path}`")
    try:
        with np.load(path) as f:
            data = {k: f[k] for k in f.files}
    except Exception as e:
        raise MolmoEdgeError(f"{path} is not a readable .npz ({type(e).__name__}); re-create it with `molmo-edge preprocess`") from None
    if "input_ids" not in data:
        raise MolmoEdgeError(f"{path} has no `input_ids`; it must come from `molmo-edge preprocess` (HF processor names)")
    for pixels, pooling in (("pixel_values", "image_token_pooling"), ("pixel_values_videos", "video_token_pooling")):
        if pixels in data and pooling not in data:
            raise MolmoEdgeError(f"{path} has `{pixels}` but lacks `{pooling}`; re-create it with `molmo-edge preprocess`")
    if "images" in data and not {"image_input_idx", "image_masks"} <= set(data):
        raise MolmoEdgeError(f"{path} has `images` but lacks `image_input_idx`/`image_masks`; re-create it with `molmo-edge preprocess`")
    return data


MOLMO2_MODEL_INPUTS = ("pixel_values", "image_token_pooling", "pixel_values_videos", "video_token_pooling",
                       "mm_token_type_ids")


def _backend_for(folder: str, backend: str | None) -> str:
    """torch for checkpoints, onnxruntime for bundles, unless told otherwise (and it makes sense)."""
    from molmo_edge.runtime.bundle import is_bundle
    bundle = is_bundle(folder)
    backend = backend or ("onnxruntime" if bundle else "torch")
    if bundle and backend == "torch":
        raise MolmoEdgeError(f"{folder} is a bundle; the torch backend needs the checkpoint folder it was exported from "
                             "(or use --backend onnxruntime)")
    if not bundle and backend != "torch":
        raise MolmoEdgeError(f"{folder} is a checkpoint; --backend {backend} needs a bundle: run "
                             f"`molmo-edge export {folder} -o BUNDLE` first")
    return backend


def _runtime(folder: str, backend: str, precision: str = "auto"):
    """Load a bundle (the library checks memory first) and say which graphs run and why."""
    from molmo_edge.runtime.session import Molmo
    t0 = time.perf_counter()
    m = Molmo.load(folder, backend, precision=precision)
    d = m.describe()
    graphs = ", ".join(f"{role} {key}" for role, key in d["graphs"].items())
    why = f" ({d['reason']})" if d.get("reason") else ""
    est = f", estimated peak {d['estimated_peak_gib']:.1f} GiB" if "estimated_peak_gib" in d else ""
    say(f"loaded {folder} in {time.perf_counter() - t0:.1f} s: {d['backend']} {d['device']}, {d['precision']}: "
              f"{graphs}{why}{est}")
    for note in d.get("notes", []):
        say(f"  note: {note}")
    return m


def _torch_model(folder: str):
    try:
        from molmo_edge.export.checkpoint import load_reference_model
    except ImportError as e:
        raise MolmoEdgeError(f"the torch backend needs the export extra ({e.name} is missing): "
                             "pip install 'molmo-edge[export]'") from None
    t0 = time.perf_counter()
    say(f"loading {folder} (torch reference, float32) ...")
    model, cfg, _ = load_reference_model(folder)
    say(f"loaded in {time.perf_counter() - t0:.1f} s")
    return model, cfg


def cmd_preprocess(a: argparse.Namespace) -> int:
    from molmo_edge.runtime.molmo2_processor import is_molmo2_folder
    folder = _model_folder(a.model)
    images = a.image or []
    if is_molmo2_folder(folder):
        from molmo_edge.runtime.molmo2_processor import process_inputs
        out = process_inputs(folder, a.prompt, images, a.video, max_crops=a.max_crops)
    else:
        if a.video:
            raise MolmoEdgeError(f"--video needs a Molmo2 model; {folder} is a Molmo (v1) model, which takes one image")
        if len(images) > 1:
            raise MolmoEdgeError(f"{folder} is a Molmo (v1) model, which takes one image; pass a single --image "
                                 "(several images need Molmo2)")
        out = _processor(folder).process(a.prompt, images[0] if images else None, max_crops=a.max_crops)
    _save_npz(a.output, out)
    shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in out.items())
    say(f"wrote {a.output}: {shapes}")
    return 0


def _save_npz(path: str, arrays: dict[str, Any]) -> None:
    """Write atomically: a crash never leaves a half-written file under the final name."""
    import numpy as np

    from molmo_edge.runtime.files import atomic_path
    with atomic_path(path) as tmp:
        np.savez(tmp, **arrays)


def cmd_forward(a: argparse.Namespace) -> int:
    import numpy as np
    data = _load_inputs(a.inputs)
    folder = _model_folder(a.model)
    if _backend_for(folder, a.backend) != "torch":
        res = _runtime(folder, a.backend or "onnxruntime", a.precision).forward(data)
        _save_npz(a.output, res)
        say(f"wrote {a.output}: logits {list(res['logits'].shape)}")
        return 0
    import torch
    model, cfg = _torch_model(folder)
    kw = {}
    if cfg.is_molmo2:  # the HF Molmo2 processor's names, passed as they are
        kw = {k: data[k] for k in MOLMO2_MODEL_INPUTS if k in data}
        data = {"input_ids": data["input_ids"]}
    elif "images" in data:
        kw = {k: torch.from_numpy(np.asarray(data[k])) for k in ("images", "image_masks", "image_input_idx")}
    with torch.no_grad():
        out = model(torch.from_numpy(data["input_ids"].astype(np.int64)), **kw)
    res = {"logits": out.logits[0].float().numpy()}
    if out.image_features is not None:
        res["image_features"] = out.image_features[0].float().numpy()
    _save_npz(a.output, res)
    say(f"wrote {a.output}: logits {list(res['logits'].shape)}")
    return 0


def cmd_ask(a: argparse.Namespace) -> int:
    folder = _model_folder(a.model)
    prompts = ([a.prompt] if a.prompt else []) + (a.prompts or [])
    if not prompts:
        raise MolmoEdgeError("no question given: molmo-edge ask MODEL [--image IMG] \"What is in the picture?\"")
    backend = _backend_for(folder, a.backend)
    images = a.image or []
    molmo2 = _is_molmo2(folder)
    if not molmo2 and (len(images) > 1 or a.video):
        raise MolmoEdgeError("several --image or a --video need a Molmo2 model; Molmo (v1) takes one image per question")
    if backend == "torch":
        return _ask_torch_molmo2(a, folder, prompts) if molmo2 else _ask_torch(a, folder, prompts)
    from molmo_edge.runtime.preprocess import load_image
    m = _runtime(folder, backend, a.precision)
    rgb = load_image(images[0]) if images else None
    media = {}
    if molmo2:  # preprocessed once for all the questions
        from molmo_edge.runtime.molmo2_session import processor
        proc = processor(m)
        media = {"images": [proc.image(i, max_crops=a.max_crops) for i in images],
                 "video": proc.video(a.video) if a.video else None}
    stream = a.stream and not a.json
    last = None
    for prompt in prompts:
        if len(prompts) > 1 and not a.json:
            print(f"Q: {prompt}\nA: ", end="", flush=True)
        on_text = (lambda piece: print(piece, end="", flush=True)) if stream else None
        ans = m.ask(prompt, None if molmo2 else rgb, max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                    top_p=a.top_p, seed=a.seed, stop=a.stop or (), max_crops=a.max_crops, on_text=on_text, **media)
        last = ans
        if a.json:
            d = ans.to_dict()
            d.update(m.describe())
            print(json.dumps(d))
        elif stream:
            print()
        else:
            print(ans.text)
    if a.overlay:
        if rgb is None:
            raise MolmoEdgeError("--overlay needs --image: there is nothing to draw on")
        from molmo_edge.runtime.overlay import save_overlay
        shown = [p for p in last.points if getattr(p, "image", None) in (None, 0)]  # the first image's points
        save_overlay(a.overlay, rgb, shown, last.text)
        say(f"wrote {a.overlay} ({len(shown)} points)")
    return 0


def _is_molmo2(folder: str) -> bool:
    from molmo_edge.runtime.bundle import is_bundle, load_bundle
    from molmo_edge.runtime.config import load_config
    if is_bundle(folder):
        return load_bundle(folder).config.is_molmo2
    return load_config(folder).is_molmo2


def _ask_torch_molmo2(a: argparse.Namespace, folder: str, prompts: list[str]) -> int:
    """The torch reference on a Molmo2 checkpoint: the Molmo2 processor's arrays -> greedy generation."""
    from molmo_edge.runtime.molmo2_processor import Molmo2Processor
    from molmo_edge.runtime.pointing import parse_count
    proc = Molmo2Processor(folder)
    model, cfg = _torch_model(folder)
    t0 = time.perf_counter()
    images = [proc.image(i, max_crops=a.max_crops) for i in a.image or []]
    video = proc.video(a.video) if a.video else None
    t_pre = time.perf_counter() - t0
    for prompt in prompts:
        req = proc.prepare(prompt, images, video)
        arrays = dict(req.arrays)
        t1 = time.perf_counter()
        tokens = model.generate(arrays.pop("input_ids"), max_new_tokens=a.max_new_tokens, eos_token_id=cfg.eos_token_id,
                                **arrays)
        t_gen = time.perf_counter() - t1
        text = proc.tokenizer.decode(tokens).strip()
        points = req.parse_points(text)
        if a.json:
            print(json.dumps({"prompt": prompt, "text": text, "token_ids": tokens, "points": [p.to_dict() for p in points],
                              "count": parse_count(text, points), "prompt_tokens": int(req.arrays["input_ids"].size),
                              "backend": "torch",
                              "timings": {"preprocess": round(t_pre * 1e3, 2), "generate": round(t_gen * 1e3, 2)}}))
        else:
            print(text if len(prompts) == 1 else f"Q: {prompt}\nA: {text}")
    return 0


def _ask_torch(a: argparse.Namespace, folder: str, prompts: list[str]) -> int:
    import numpy as np
    import torch
    proc = _processor(folder)
    model, cfg = _torch_model(folder)
    t0 = time.perf_counter()
    crops = proc.image(a.image[0], max_crops=a.max_crops) if a.image else None
    t_pre = time.perf_counter() - t0
    for prompt in prompts:
        inputs = proc.process(prompt, crops=crops)
        kw = {}
        if crops is not None:
            kw = {k: torch.from_numpy(inputs[k]) for k in ("images", "image_masks", "image_input_idx")}
        t1 = time.perf_counter()
        tokens = model.generate(torch.from_numpy(inputs["input_ids"].astype(np.int64)), max_new_tokens=a.max_new_tokens,
                                eos_token_id=proc.tokenizer.eos_id, **kw)
        t_gen = time.perf_counter() - t1
        text = proc.tokenizer.decode(tokens).strip()
        if a.json:
            print(json.dumps({"prompt": prompt, "text": text, "token_ids": tokens,
                              "prompt_tokens": int(inputs["input_ids"].shape[0]), "backend": "torch",
                              "timings": {"preprocess": round(t_pre * 1e3, 2), "generate": round(t_gen * 1e3, 2)}}))
        else:
            print(text if len(prompts) == 1 else f"Q: {prompt}\nA: {text}")
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    try:
        from molmo_edge.export.bundle import export_bundle
    except ImportError as e:
        raise MolmoEdgeError(f"export needs the export extra ({e.name} is missing): pip install 'molmo-edge[export]'") from None
    from molmo_edge.runtime.tensorrt.check import check_for_export
    quantizer = None
    if a.weights:  # export may not import calibration: the CLI hands it the quantizer
        from molmo_edge.calibration.weight_quant import make_quantizer
        quantizer = make_quantizer(int(a.weights[3:]), a.block_size, head=a.head, scales=a.scales, experts=a.experts)
    export_bundle(a.model, a.output, dtype=a.dtype, opset=a.opset, max_crops=a.max_crops, check=not a.no_check, force=a.force,
                  fused=a.fused, trt_check=None if a.no_trt_check else check_for_export, quantizer=quantizer)
    print(os.path.abspath(a.output))
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    try:
        from molmo_edge.export.demo import run_demo
    except ImportError as e:
        raise MolmoEdgeError(f"demo needs the export extra ({e.name} is missing): pip install 'molmo-edge[export]'") from None
    prompts = a.prompts or ["Point to the red cups.", "How many red cups are there?"]
    return run_demo(a.model, a.workdir, a.image, prompts, a.max_new_tokens)


# Commands that live next to their subsystem: each module has `add_commands(subparsers)` and keeps
# its heavy imports inside the command functions.
COMMAND_MODULES = ("stream", "calibrate", "device", "bench")


def _add_module_commands(sub) -> None:
    import importlib
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(f"{__package__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__package__}.{name}":
                raise
            continue
        mod.add_commands(sub)


def add_runtime_options(s: argparse.ArgumentParser, backends: tuple[str, ...] = ("torch", "onnxruntime")) -> None:
    """--backend and --precision, shared by every command that runs a model."""
    s.add_argument("--backend", choices=list(backends), default=None,
                   help=f"{' or '.join(backends)}; default: torch for checkpoints, onnxruntime for bundles")
    s.add_argument("--precision", choices=["auto", "fp32", "int8", "int4"], default="auto",
                   help="bundle graphs to run: auto (default: float graphs, or on CPU the quantized decoder of a large model "
                        "when the bundle has one), fp32 (float graphs), int8 (calibrated vision + INT8 decoder), int4 "
                        "(INT4 decoder); a missing graph is an error that says how to make it")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="molmo-edge", description=__doc__.splitlines()[0], epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("demo", help="end to end in one command: checkpoint -> bundle -> answer about an image",
                       description="Export MODEL to a bundle and ask about an image, printing JSON answers (points, count, "
                                   "timings) and writing an overlay. Without MODEL it builds a tiny UNTRAINED random-weight "
                                   "MolmoE checkpoint in the real layout, so the whole path runs anywhere, offline.")
    s.add_argument("model", metavar="MODEL", nargs="?", help="checkpoint folder or hub id (default: tiny random checkpoint)")
    s.add_argument("--workdir", default="molmo-edge-demo", help="where the checkpoint, bundle and overlay go")
    s.add_argument("--image", help="image to ask about (default: a generated scene with red cups)")
    s.add_argument("--prompt", dest="prompts", action="append", metavar="TEXT", help="question (repeatable)")
    s.add_argument("--max-new-tokens", type=int, default=48)
    s.set_defaults(fn=cmd_demo)

    s = sub.add_parser("preprocess", help="turn a prompt (and images or a video) into model inputs (.npz, HF processor names)",
                       description="Run the model's processor and write its arrays exactly as the HF processor does: for "
                                   "Molmo, input_ids, images, image_input_idx and image_masks (AI2's processor); for "
                                   "Molmo2, input_ids, attention_mask, mm_token_type_ids, and pixel_values, "
                                   "image_token_pooling, image_grids, image_num_crops (images) or pixel_values_videos, "
                                   "video_token_pooling, video_grids (video), as transformers' Molmo2Processor.")
    s.add_argument("model", metavar="MODEL", help="checkpoint folder, hub id, or bundle folder")
    s.add_argument("--image", action="append", metavar="IMG",
                   help="image file (jpg/png/...); repeat for several images (Molmo2); omit for a text-only prompt")
    s.add_argument("--video", metavar="V", help="Molmo2 only: a video file (decoded with OpenCV) or an .npz with "
                                                "`frames` uint8 [T, H, W, 3] RGB and `fps`")
    s.add_argument("--prompt", required=True, help="the user's question, e.g. \"Point to the red cup\"")
    s.add_argument("--max-crops", type=int, default=None,
                   help="most high-res crops per image (default: the model's, 12 for Molmo, 8 for Molmo2)")
    s.add_argument("-o", "--output", required=True, help="where to write the .npz")
    s.set_defaults(fn=cmd_preprocess)

    s = sub.add_parser("forward", help="run the model on a preprocessed .npz and write the logits",
                       description="One forward pass over every position; writes `logits` [T, V] float32 and, when the "
                                   "inputs have an image, `image_features` [crops, 144, d].")
    s.add_argument("model", metavar="MODEL")
    s.add_argument("--inputs", required=True, help=".npz from `molmo-edge preprocess`")
    s.add_argument("-o", "--output", required=True, help="where to write the .npz of logits")
    add_runtime_options(s, ("torch", "onnxruntime", "tensorrt"))
    s.set_defaults(fn=cmd_forward)

    s = sub.add_parser("ask", help="ask a question (about an image) and print the answer",
                       description="Greedy generation with a KV cache, stopping at EOS. With --json prints one JSON object "
                                   "per question with `text` and `token_ids`.")
    s.add_argument("model", metavar="MODEL")
    s.add_argument("prompt", nargs="?", help="the question")
    s.add_argument("--prompt", dest="prompts", action="append", metavar="TEXT",
                   help="another question about the same image (repeatable; the image is preprocessed once)")
    s.add_argument("--image", action="append", metavar="IMG",
                   help="image file; omit for a text-only question (Molmo2: repeat for several images)")
    s.add_argument("--video", metavar="V", help="Molmo2: a video file, or an .npz with `frames` [T, H, W, 3] uint8 and `fps`")
    s.add_argument("--max-new-tokens", type=int, default=200, help="stop after this many tokens (default 200)")
    s.add_argument("--max-crops", type=int, default=None, help="most high-res crops per image (fewer = faster)")
    add_runtime_options(s, ("torch", "onnxruntime", "tensorrt"))
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    s.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass when sampling (default 1.0)")
    s.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    s.add_argument("--stop", action="append", metavar="TEXT", help="stop when the answer contains TEXT (repeatable)")
    s.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    s.add_argument("--overlay", metavar="OUT.jpg", help="draw the answer's points on the image and save it")
    s.add_argument("--json", action="store_true",
                   help="print one JSON object per question: text, token_ids, points, count, timings (ms)")
    s.set_defaults(fn=cmd_ask)

    s = sub.add_parser("export", help="turn a checkpoint into a bundle (ONNX graphs, tokenizer, embeddings, manifest)",
                       description="Stream a Hugging Face Molmo checkpoint into a bundle: vision.onnx (ViT + connector), "
                                   "decoder.onnx (LLM with KV cache), embeddings.npy, tokenizer, manifest.json. The bundle "
                                   "is checked against the torch model before it is put in place.")
    s.add_argument("model", metavar="MODEL", help="checkpoint folder or hub id")
    s.add_argument("-o", "--output", required=True, metavar="BUNDLE", help="bundle folder to create")
    s.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32", help="weight storage (fp16 halves the size; compute stays fp32)")
    s.add_argument("--opset", type=int, default=18, help="ONNX opset, 17..20 (TensorRT 10.3 parses <= 20; default 18)")
    s.add_argument("--max-crops", type=int, default=None, help="default crops per image for this bundle")
    s.add_argument("--no-check", action="store_true", help="skip the ONNX-vs-torch self-check (not recommended)")
    s.add_argument("--force", action="store_true", help="replace BUNDLE if it exists")
    fused = s.add_mutually_exclusive_group()
    fused.add_argument("--fused", dest="fused", action="store_const", const=True, default=None,
                       help="also write decoder.fused for MoE models (default: only dense models, where onnxruntime selects it)")
    fused.add_argument("--no-fused", dest="fused", action="store_const", const=False,
                       help="skip decoder.fused (onnxruntime contrib ops); saves disk when only TensorRT will run the bundle; "
                            "with --weights: the quantized decoder in the portable graph's layout")
    s.add_argument("--no-trt-check", action="store_true", help="skip checking the graphs against TensorRT 10.3/10.13 op support")
    s.add_argument("--weights", choices=["int4", "int8"], default=None,
                   help="write the weight-only quantized decoder straight from the checkpoint instead of the float ones "
                        "(no float decoder on disk; runs with --precision int4/int8)")
    from molmo_edge.runtime.cli.calibrate import add_weight_options
    add_weight_options(s, "with --weights: ")
    s.set_defaults(fn=cmd_export)
    _add_module_commands(sub)
    return p


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Positionals may come after options (`ask B --image IMG "question" --json`, the README's order): each
    command's parser reads its arguments intermixed (argparse cannot do that through subparsers itself)."""
    commands = next((act.choices for act in parser._actions if isinstance(act, argparse._SubParsersAction)), {})
    if argv and argv[0] in commands:
        sub = commands[argv[0]]
        if not any(isinstance(act, argparse._SubParsersAction) for act in sub._actions):
            ns = sub.parse_intermixed_args(argv[1:])
            ns.command = argv[0]
            return ns
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = _parse(parser, sys.argv[1:] if argv is None else list(argv))
    if not getattr(a, "fn", None):
        parser.print_help()
        return 0
    if getattr(a, "max_crops", None) is not None and not 1 <= a.max_crops <= 64:
        parser.error(f"--max-crops must be between 1 and 64 (got {a.max_crops})")
    if getattr(a, "max_new_tokens", 1) < 1:
        parser.error("--max-new-tokens must be at least 1")
    try:
        return a.fn(a)
    except MolmoEdgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:
        from molmo_edge.runtime.deps import as_missing
        missing = as_missing(e)
        if missing is None:
            raise
        print(f"error: {missing}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130

