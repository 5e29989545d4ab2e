"""`molmo-edge plan`: memory fit and latency floors on the Jetson table, with the real model dimensions."""
import json

import pytest

from molmo_edge.runtime.device.targets import DEVICES, get_device, match_device
from molmo_edge.runtime.errors import MolmoEdgeError
from molmo_edge.runtime.device.plan import (GiB, PlanSettings, decoder_shapes, format_plan, make_plan, memory, vision_shapes_used,
                                     weight_bytes)
from molmo_edge.runtime.hf_names import parameter_count


def _cfg(family):
    from molmo_edge.export.synthetic import family_config
    from molmo_edge.runtime.config import config_from_hf
    return config_from_hf(family_config(family, "full", vocab_size=50280 if family == "molmoe-1b" else 152064))


@pytest.fixture(scope="module")
def moe():
    pytest.importorskip("torch")  # family_config lives in the export package
    return _cfg("molmoe-1b")


def test_device_table_matches_the_targets_doc():
    nano, nx, agx, thor = (DEVICES[k] for k in ("orin-nano-8gb", "orin-nx-16gb", "agx-orin-64gb", "thor"))
    assert (nano.memory_gb, nano.bandwidth_gbs, nano.super_bandwidth_gbs) == (8, 68, 102)
    assert (nx.memory_gb, nx.bandwidth_gbs, agx.bandwidth_gbs, thor.bandwidth_gbs) == (16, 102.4, 204.8, 273)
    assert (nano.int8_tops, nano.fp16_tflops, agx.int8_tops, agx.fp16_tflops) == (20, 10, 85, 42)
    assert (agx.sm, thor.sm, thor.tensorrt, nano.tensorrt) == ("8.7", "11.0", "10.13", "10.3")
    with pytest.raises(MolmoEdgeError, match="choose one of"):
        get_device("xavier")
    with pytest.raises(MolmoEdgeError, match="no Super"):
        agx.at(True)
    assert match_device("NVIDIA Jetson AGX Orin Developer Kit", 64 * 2**30) == "agx-orin-64gb"
    assert match_device("NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super", 7.4 * 2**30) == "orin-nano-8gb"
    assert match_device("NVIDIA Jetson Orin NX Engineering Reference Developer Kit", 15.3 * 2**30) == "orin-nx-16gb"
    assert match_device("NVIDIA Jetson Orin NX Engineering Reference Developer Kit", 7.3 * 2**30) is None   # 8 GB NX
    assert match_device("NVIDIA Jetson AGX Thor Developer Kit") == "thor" and match_device("Raspberry Pi 5") is None


def test_weight_bytes_per_precision(moe):
    dec = decoder_shapes(moe)
    n_dec = sum(_n(s) for s in dec.values())
    assert n_dec == parameter_count(moe)["llm"] - (moe.embedding_size + moe.additional_vocab_size) * moe.d_model
    assert weight_bytes(dec, "fp16") == 2 * n_dec
    assert weight_bytes(dec, "int4") < weight_bytes(dec, "int8") < weight_bytes(dec, "fp16")
    assert 0.25 < weight_bytes(dec, "int4") / weight_bytes(dec, "fp16") < 0.3      # 4 bits + fp16 scale per 32
    vis = vision_shapes_used(moe)
    assert not any(".resblocks.22." in k for k in vis) and any(".resblocks.21." in k for k in vis)   # layer -2 of 23


def _n(shape):
    n = 1
    for s in shape:
        n *= s
    return n


def test_molmoe_fp16_does_not_fit_nano_and_the_suggestions_do(moe):
    nano = DEVICES["orin-nano-8gb"]
    p = make_plan(moe, nano, PlanSettings(precision="fp16", workspace_mb=512))
    assert not p.fits and p.total_gib > 8
    assert p.memory_gib["decoder weights (fp16)"] == pytest.approx(weight_bytes(decoder_shapes(moe), "fp16") / GiB, abs=1e-3)
    assert p.memory_gib["KV cache (4096 tokens, fp32)"] == pytest.approx(2 * 16 * 4096 * 16 * 128 * 4 / GiB, abs=1e-3)
    assert p.suggestions, "some precision/crops/sequence combination must fit 8 GB"
    for sgg in p.suggestions:
        s = PlanSettings(**{**p.settings, **sgg["change"]})
        assert make_plan(moe, nano, s).fits and sgg["total_gib"] <= 8
        assert "precision" in sgg["change"]            # MolmoE's 6.9 B parameters need a smaller weight format on 8 GB
    text = format_plan(p)
    assert "DOES NOT FIT" in text and "fits with (runnable combinations only):" in text and "--precision int4" in text


def test_molmoe_fits_agx_and_thor_at_fp16(moe):
    for key in ("agx-orin-64gb", "thor"):
        p = make_plan(moe, DEVICES[key], PlanSettings(precision="fp16"))
        assert p.fits and not p.suggestions and "FITS" in format_plan(p)


def test_knobs_move_memory_the_right_way(moe):
    nx = DEVICES["orin-nx-16gb"]
    base = PlanSettings(precision="int8")
    m = memory(moe, base, nx)[0]
    fewer_crops = memory(moe, PlanSettings(precision="int8", max_crops=4), nx)[0]
    shorter = memory(moe, PlanSettings(precision="int8", max_seq=1024), nx)[0]
    assert fewer_crops["vision activations (5 crops)"] < m["vision activations (13 crops)"]
    assert shorter["KV cache (1024 tokens, fp32)"] == pytest.approx(m["KV cache (4096 tokens, fp32)"] / 4, abs=1e-3)
    assert sum(shorter.values()) < sum(m.values())


def test_floors_are_bandwidth_and_compute_bounds(moe):
    nano = DEVICES["orin-nano-8gb"]
    p = make_plan(moe, nano, PlanSettings(precision="int4"))
    ps = make_plan(moe, nano, PlanSettings(precision="int4", super_mode=True))
    assert ps.floors_ms["decode_per_token"] < p.floors_ms["decode_per_token"]       # Super: 102 vs 68 GB/s
    assert ps.floors_ms["decode_per_token"] == pytest.approx(p.floors_ms["decode_per_token"] * 68 / 102, rel=0.01)
    # onnxruntime runs both INT4 graphs: nothing to build, so no builder memory and no note about it
    assert p.build_host_gib["peak"] == 0 and not any("building the engines" in n for n in p.notes)
    assert make_plan(moe, nano, PlanSettings(precision="fp16")).build_host_gib["peak"] > 0
    agx = make_plan(moe, DEVICES["agx-orin-64gb"], PlanSettings(precision="int4"))
    assert agx.floors_ms["decode_per_token"] == pytest.approx(p.floors_ms["decode_per_token"] * 68 / 204.8, rel=0.01)
    # decode reads the dense weights and top-8 of 64 experts: far less than all decoder weights
    all_w = weight_bytes(decoder_shapes(moe), "int4") / (68e9) * 1e3
    assert p.floors_ms["decode_per_token"] < all_w / 3
    # vision at 13 crops is compute-bound on the Nano: FLOPs / dense INT8 throughput
    assert p.floors_ms["vision_per_frame"] > 100
    fewer = make_plan(moe, nano, PlanSettings(precision="int4", max_crops=4))
    assert fewer.floors_ms["vision_per_frame"] == pytest.approx(p.floors_ms["vision_per_frame"] * 5 / 13, rel=0.05)
    assert p.decode_tokens_per_s_ceiling == pytest.approx(1e3 / p.floors_ms["decode_per_token"], rel=0.01)


def test_dense_7b_plan_runs(moe):
    cfg = _cfg("molmo-7b-d")
    p = make_plan(cfg, DEVICES["orin-nano-8gb"], PlanSettings(precision="fp16"))
    assert not p.fits and not any("MoE" in n for n in p.notes)
    assert make_plan(cfg, DEVICES["agx-orin-64gb"], PlanSettings(precision="fp16")).fits


def test_cli_plan(tiny_checkpoints, tmp_path, capsys):
    from molmo_edge.export.bundle import export_bundle
    from molmo_edge.runtime.cli.main import main
    out = str(tmp_path / "b")
    export_bundle(tiny_checkpoints["molmoe-1b"], out, check=False, progress=lambda *_: None)
    assert main(["plan", out, "--device", "orin-nano-8gb"]) == 0
    assert "FITS" in capsys.readouterr().out
    assert main(["plan", out, "--device", "thor", "--json", "--max-seq", "128"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["fits"] and d["settings"]["max_seq"] == 128 and "decode_per_token" in d["floors_ms"]
    assert main(["plan", tiny_checkpoints["molmoe-1b"], "--device", "agx-orin-64gb"]) == 0   # a checkpoint folder works too
    capsys.readouterr()
    assert main(["plan", str(tmp_path), "--device", "thor"]) == 2
    assert "neither a bundle nor a checkpoint" in capsys.readouterr().err


def test_unrunnable_combination_is_labelled_and_never_suggested(moe):
    nano = DEVICES["orin-nano-8gb"]
    p = make_plan(moe, nano, PlanSettings(precision="int8"))
    assert not p.runnable and not p.fits and "NOT RUNNABLE YET" in format_plan(p)
    assert p.backends == {"vision": "tensorrt", "decoder": "onnxruntime"}
    fp16 = make_plan(moe, nano, PlanSettings(precision="fp16"))
    assert fp16.suggestions and all(sg["change"].get("precision") != "int8" for sg in fp16.suggestions)


def test_plan_sizes_come_from_the_bundle_files(tiny_checkpoints, tmp_path):
    from molmo_edge.calibration.weight_quant import quantize_decoder_weights
    from molmo_edge.export.bundle import export_bundle
    from molmo_edge.runtime.bundle import load_bundle
    from molmo_edge.runtime.memory import resident_weight_bytes
    out = str(tmp_path / "b")
    export_bundle(tiny_checkpoints["molmoe-1b"], out, dtype="fp16", check=False, trt_check=False, progress=lambda *_: None)
    quantize_decoder_weights(out, 4, progress=lambda *_: None, check=False)
    b = load_bundle(out)
    p = make_plan(b.config, DEVICES["orin-nano-8gb"], PlanSettings(precision="int4"), manifest=b.manifest)
    assert p.runnable and p.backends == {"vision": "onnxruntime", "decoder": "onnxruntime"}
    assert p.sizes_from["decoder"].startswith("decoder.int4.onnx.data")
    want = resident_weight_bytes(b.manifest["graphs"]["decoder.int4"], "cuda") / GiB
    assert p.memory_gib["decoder weights (int4)"] == pytest.approx(want, abs=1e-3)
    assert p.sizes_from["vision"].startswith("vision.onnx.data")  # not calibrated: the float vision graph


@pytest.mark.parametrize("scales", ["fp32", "fp16"])
def test_jetson_plan_holds_quantized_weights_as_the_cuda_provider_does(tiny_checkpoints, tmp_path, scales):
    """CUDA kernels read the stored nibbles and scales (no MLAS repacking); fp32-scale QMoE has no CUDA kernel,
    so its experts stay in the CPU layout and the plan says they would run on the CPU cores."""
    from molmo_edge.calibration.weight_quant import quantize_decoder_weights
    from molmo_edge.export.bundle import export_bundle
    from molmo_edge.runtime.bundle import load_bundle
    from molmo_edge.runtime.memory import resident_weight_bytes
    out = str(tmp_path / "b")
    export_bundle(tiny_checkpoints["molmoe-1b"], out, dtype="fp16", check=False, trt_check=False, progress=lambda *_: None)
    quantize_decoder_weights(out, 4, scales=scales, progress=lambda *_: None, check=False)  # block 32: QMoE at tiny width
    b = load_bundle(out)
    entry = b.manifest["graphs"]["decoder.int4"]
    cpu, cuda = resident_weight_bytes(entry, "cpu"), resident_weight_bytes(entry, "cuda")
    p = make_plan(b.config, DEVICES["orin-nano-8gb"], PlanSettings(precision="int4"), manifest=b.manifest)
    assert p.memory_gib["decoder weights (int4)"] == pytest.approx(cuda / GiB, abs=1e-3)
    on_cpu_note = any("run on the CPU cores" in n for n in p.notes)
    if scales == "fp32":
        assert cuda == cpu and on_cpu_note and "--scales fp16" in format_plan(p)
    else:
        stored = sum(entry["weight_bytes_by_dtype"].values())
        assert cuda == stored < cpu and not on_cpu_note
