"""`molmo-edge doctor` and the Jetson readers: recorded outputs of Jetson tools, judged machines (recorded
facts of machines this CI does not have), and the real probe of this machine."""
import json
import os
import shutil

import pytest
from conftest import export_tiny_bundles

from molmo_edge.runtime import machine as ji
from molmo_edge.runtime.tensorrt.check import check_bundle
from molmo_edge.runtime.device.doctor import Facts, diagnose, diagnose_bundle, exit_code, format_findings, gather_facts

JP62_RELEASE = ("# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, DATE: Wed Jan  8 01:49:37 "
                "UTC 2025\n# KERNEL_VARIANT: oot\nTARGET_USERSPACE_LIB_DIR=nvidia\n")
ORIN_NANO_TEGRASTATS = ("09-26-2024 10:32:41 RAM 2934/7620MB (lfb 7x4MB) SWAP 0/3810MB (cached 0MB) CPU [1%@729,0%@729,"
                        "3%@729,0%@729,off,off] GR3D_FREQ 37% cpu@47.875C soc2@46.937C soc0@47.125C gpu@46.625C tj@47.875C "
                        "soc1@46.187C VDD_IN 4903mW/4903mW VDD_CPU_GPU_CV 484mW/484mW VDD_SOC 1452mW/1452mW")
AGX_JP5_TEGRASTATS = ("RAM 3009/30536MB (lfb 6566x4MB) SWAP 0/15268MB (cached 0MB) CPU [0%@729,2%@729] EMC_FREQ 4%@2133 "
                      "GR3D_FREQ 99%@[1300,1300] VIC_FREQ 115 APE 174 CV0@-256C CPU@44.625C GPU@43.9C "
                      "VDD_GPU_SOC 9394mW/8394mW VDD_CPU_CV 399mW/399mW VIN_SYS_5V0 2322mW/2322mW VDDQ_VDD2_1V8AO 401mW/401mW")


# --- Jetson fact parsers (runtime/machine.py) ---------------------------------------------------------------------------
def test_l4t_and_jetpack():
    assert ji.parse_nv_tegra_release(JP62_RELEASE) == "36.4.3"
    assert ji.parse_nv_tegra_release("# R38 (release), REVISION: 2.0, GCID: 1, BOARD: generic") == "38.2.0"
    assert ji.parse_nv_tegra_release("# R35 (release), REVISION: 4.1") == "35.4.1"
    assert ji.parse_nv_tegra_release("garbage") is None
    assert ji.parse_l4t_core_version("36.4.3-20250107174145") == "36.4.3"
    table = {"36.3.0": "6.0", "36.4.0": "6.1", "36.4.3": "6.2", "36.4.4": "6.2.1", "36.4.7": "6.2.1", "36.5.0": "6.2.2",
             "38.2.0": "7.0", "38.2.1": "7.0", "38.4.0": "7.1", "39.2.0": "7.2", "35.4.1": "5.1.2"}
    for l4t, jp in table.items():
        assert ji.jetpack_for_l4t(l4t) == jp, l4t
    assert ji.jetpack_for_l4t("34.1.0") is None and ji.jetpack_for_l4t(None) is None
    assert ji.jetpack_line("6.2.1") == "6.2" and ji.JETPACK_STACK["6.2"]["tensorrt"] == "10.3"
    assert ji.JETPACK_STACK["7.1"]["tensorrt"] == "10.13" and ji.jetpack_line("9.9") is None


def test_power_mode():
    assert ji.parse_nvpmodel("NV Power Mode: MAXN\n0\n") == {"name": "MAXN", "id": 0}
    assert ji.parse_nvpmodel("NVPM WARN: fan mode is not set!\nNV Power Mode: MAXN_SUPER\n2\n") == {"name": "MAXN_SUPER", "id": 2}
    assert ji.parse_nvpmodel("nvpmodel: not found") is None


def test_tegrastats():
    s = ji.parse_tegrastats(ORIN_NANO_TEGRASTATS)
    assert (s["ram_used_mb"], s["ram_total_mb"], s["swap_used_mb"], s["gpu_load_pct"]) == (2934, 7620, 0, 37)
    assert s["cpu_load_pct"] == 1.0 and s["temp_c"]["gpu"] == 46.625
    assert s["power_mw"] == {"VDD_IN": 4903, "VDD_CPU_GPU_CV": 484, "VDD_SOC": 1452}
    a = ji.parse_tegrastats(AGX_JP5_TEGRASTATS)
    assert (a["gpu_load_pct"], a["gpu_mhz"], a["emc_load_pct"]) == (99, 1300, 4)
    assert a["power_mw"]["VDD_GPU_SOC"] == 9394 and a["power_mw"]["VDDQ_VDD2_1V8AO"] == 401
    assert ji.parse_tegrastats("") is None
    summ = ji.summarize_tegrastats([s, a])
    assert summ["samples"] == 2 and summ["ram_peak_mb"] == 3009 and summ["gpu_load_pct"] == {"mean": 68.0, "max": 99}
    assert summ["power_mw"]["VDD_IN"] == {"mean": 4903.0, "max": 4903}
    assert ji.summarize_tegrastats([]) == {"samples": 0}


def test_off_jetson_snapshot_and_recorder_are_empty():
    if os.path.exists(ji.NV_TEGRA_RELEASE):
        pytest.skip("this machine is a Jetson")
    assert ji.snapshot() == {}
    with ji.TegrastatsRecorder() as r:
        pass
    if not shutil.which("tegrastats"):
        assert r.summary() == {"samples": 0}


# --- judging machines ------------------------------------------------------------------------------
def nano_jp62(**kw) -> Facts:
    f = Facts(python="3.10.12", platform="Linux-5.15.148-tegra-aarch64", machine="aarch64", memory_bytes=int(7.4 * 2**30),
              l4t="36.4.3", jetpack="6.2", model="NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super",
              power_mode={"name": "15W", "id": 0}, gpu="Orin", compute_capability="8.7", gpu_memory_bytes=int(7.4 * 2**30),
              cuda_runtime="12.6", cuda_bindings={"cuda-python": "12.6.2"}, tensorrt="10.3.0.30", onnxruntime="1.20.0",
              ort_providers=["CPUExecutionProvider"], cameras=["/dev/video0"])
    for k, v in kw.items():
        setattr(f, k, v)
    return f


def _by_area(findings):
    out = {}
    for x in findings:
        out.setdefault(x.area, []).append(x)
    return out


def test_healthy_jetson_with_cpu_only_onnxruntime():
    fs = _by_area(diagnose(nano_jp62()))
    assert fs["jetpack"][0].status == "ok" and "TensorRT 10.3" in fs["jetpack"][0].message
    assert fs["tensorrt"][0].status == "ok" and fs["gpu"][0].status == "ok"
    assert fs["power"][0].status == "info" and "nvpmodel -m 0" in fs["power"][0].fix
    assert fs["onnxruntime"][0].status == "warn" and "jp6/cu126" in fs["onnxruntime"][0].fix
    assert exit_code(diagnose(nano_jp62())) == 0


def test_jetson_without_tensorrt_fails_with_the_apt_fix():
    fs = diagnose(nano_jp62(tensorrt=None, tensorrt_error="ModuleNotFoundError: No module named 'tensorrt'"))
    trt = _by_area(fs)["tensorrt"][0]
    assert trt.status == "fail" and "python3-libnvinfer" in trt.fix and exit_code(fs) == 1


def test_wrong_versions_are_flagged():
    fs = _by_area(diagnose(nano_jp62(cuda_bindings={"cuda-python": "13.4.4"}, tensorrt="10.7.0")))
    assert any(x.status == "warn" and "'cuda-python>=12,<13'" in x.fix for x in fs["cuda-bindings"])
    assert fs["tensorrt"][0].status == "warn" and "ships 10.3" in fs["tensorrt"][0].message
    old = _by_area(diagnose(nano_jp62(l4t="36.3.0", jetpack="6.0", tensorrt="8.6.2")))
    assert old["jetpack"][0].status == "warn" and "not a supported target" in old["jetpack"][0].message
    thor = _by_area(diagnose(nano_jp62(l4t="38.2.0", jetpack="7.0", tensorrt="10.13.0", cuda_bindings={})))
    assert thor["jetpack"][0].status == "ok" and "'cuda-python>=13,<14'" in thor["cuda-bindings"][0].fix
    assert "jp7/cu130" in thor["onnxruntime"][0].fix


def test_plain_pc_is_informational_only():
    f = Facts(python="3.11", platform="Linux-x86_64", machine="x86_64", gpu_error="no CUDA bindings", onnxruntime="1.32.0",
              ort_providers=["CPUExecutionProvider"], tensorrt_error="No module named 'tensorrt'")
    fs = diagnose(f)
    assert exit_code(fs) == 0 and {x.status for x in fs} <= {"ok", "info"}
    assert "not a Jetson" in format_findings(fs)


# --- judging a bundle --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bundles(tiny_checkpoints, tmp_path_factory):
    return export_tiny_bundles(tiny_checkpoints, tmp_path_factory.mktemp("doc"), ("molmo-7b-d", "molmoe-1b"), check=False)


def test_bundle_on_a_jetson(bundles, tmp_path):
    from molmo_edge.runtime.bundle import load_bundle
    from molmo_edge.runtime.backends.trt_engines import (TrtEnv, decoder_profiles, engine_key, vision_profiles, write_record)
    from molmo_edge.runtime.tensorrt.build import build_plan
    folder = str(tmp_path / "b")
    shutil.copytree(bundles["molmo-7b-d"], folder)
    facts = nano_jp62()
    fs = _by_area(diagnose_bundle(facts, folder, check_bundle))
    assert fs["bundle"][0].status == "ok"
    assert [x.status for x in fs["check-trt 10.3"]] == ["ok", "ok"] and "check-trt 10.13" not in fs
    assert fs["engines"][0].status == "warn" and f"molmo-edge build {folder}" in fs["engines"][0].fix
    assert fs["memory"][0].status == "ok" and "Orin Nano" in fs["memory"][0].message

    b = load_bundle(folder)
    env = TrtEnv("10.3.0.30", "Orin", "8.7", "36.4.3", "6.2")

    def store(env):
        plan = build_plan(b.manifest, "fp16", trt_version=env.tensorrt)
        profiles = {"vision": vision_profiles(b.config, 2), "decoder": decoder_profiles(b.config, 128, 2)}
        key = engine_key(folder, b.manifest, plan, profiles, env, "fp16", None)
        path = os.path.join(folder, "engines", key.dirname())
        os.makedirs(path)
        for role in ("vision", "decoder"):
            open(os.path.join(path, f"{role}.plan"), "wb").write(b"12345678")
        write_record(path, key, {r: {"file": f"{r}.plan", "bytes": 8, "sha256": ""} for r in ("vision", "decoder")}, {})
        return path

    store(TrtEnv("10.13.3.9", "NVIDIA Thor", "11.0", "38.4.0", "7.1"))
    fs = _by_area(diagnose_bundle(facts, folder, check_bundle))
    fp16 = next(x for x in fs["engines"] if x.message.startswith("fp16"))
    assert fp16.status == "warn" and "built for TensorRT 10.13.3.9 on NVIDIA Thor" in fp16.message
    store(env)
    fs = _by_area(diagnose_bundle(facts, folder, check_bundle))
    assert next(x for x in fs["engines"] if x.message.startswith("fp16")).status == "ok"


def test_check_trt_failure_matters_only_where_tensorrt_runs(bundles, tmp_path):
    import json
    import shutil
    folder = str(tmp_path / "b")
    shutil.copytree(bundles["molmoe-1b"], folder)
    man = json.load(open(os.path.join(folder, "manifest.json")))
    # pass the onnxruntime-only fused decoder off as the TensorRT one: check-trt must object
    man["graphs"]["decoder"] = {**man["graphs"]["decoder.fused"], "targets": ["onnxruntime", "tensorrt"]}
    json.dump(man, open(os.path.join(folder, "manifest.json"), "w"))
    on_jetson = _by_area(diagnose_bundle(nano_jp62(), folder, check_bundle))["check-trt 10.3"]
    assert [x.status for x in on_jetson] == ["ok", "fail"] and "GroupQueryAttention" in on_jetson[1].message
    assert "--backend onnxruntime" in on_jetson[1].fix
    pc = _by_area(diagnose_bundle(Facts(), folder, check_bundle))
    assert {x.status for x in pc["check-trt 10.3"] + pc["check-trt 10.13"]} == {"ok", "warn"}
    assert {x.status for x in _by_area(diagnose_bundle(nano_jp62(), bundles["molmoe-1b"], check_bundle))["check-trt 10.3"]} == {"ok"}


def test_missing_bundle_is_one_failure(tmp_path):
    fs = diagnose_bundle(Facts(), str(tmp_path))
    assert len(fs) == 1 and fs[0].status == "fail" and "not a molmo-edge bundle" in fs[0].message


def test_real_probe_and_cli(bundles, capsys):
    f = gather_facts()
    assert f.python and f.onnxruntime and "CPUExecutionProvider" in f.ort_providers
    from molmo_edge.runtime.cli.main import main
    rc = main(["doctor", bundles["molmo-7b-d"], "--json"])
    d = json.loads(capsys.readouterr().out)
    assert {x["area"] for x in d["findings"]} >= {"python", "tensorrt", "onnxruntime", "bundle"}
    assert rc == (1 if any(x["status"] == "fail" for x in d["findings"]) else 0)


# --- jetson/setup.sh (dry run: detection and the install plan, no Jetson needed) ----------------------
@pytest.mark.parametrize("release,expect,refuse", [
    (JP62_RELEASE, ["TensorRT 10.3", "python3.10 -m venv --system-site-packages", "cuda-python>=12.6,<13",
                    "jp6/cu126", "python3-libnvinfer"], None),
    ("# R38 (release), REVISION: 2.0, GCID: 1\n", ["TensorRT 10.13", "python3.12", "cuda-python>=13,<14", "jp7/cu130"], None),
    ("# R36 (release), REVISION: 3.0\n", [], "JetPack 6.0 (TensorRT 8.6)"),
    ("# R35 (release), REVISION: 4.1\n", [], "not supported"),
])
def test_setup_script_dry_run(tmp_path, release, expect, refuse):
    import subprocess
    rel = tmp_path / "nv_tegra_release"
    rel.write_text(release)
    script = os.path.join(os.path.dirname(__file__), "..", "jetson", "setup.sh")
    r = subprocess.run(["bash", script, "--dry-run", "--venv", str(tmp_path / "venv")], capture_output=True, text=True,
                       env={**os.environ, "NV_TEGRA_RELEASE": str(rel)})
    out = r.stdout + r.stderr
    if refuse:
        assert r.returncode == 1 and refuse in out
    else:
        assert r.returncode == 0, out
        assert all(e in out for e in expect), out
        assert "molmo-edge doctor" in out and "pip install -e" in out
