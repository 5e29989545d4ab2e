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


def test_int8_precision_setting_only_where_int8_pairs_saturate():
    """session.x64quantprecision fixes saturation on x86 without VNNI and costs 7x INT8 speed on VNNI CPUs."""
    amd_avx2 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n"
    xeon_vnni = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_vnni amx_int8\n"
    assert ji.int8_pairs_saturate(amd_avx2, "x86_64")
    assert not ji.int8_pairs_saturate(xeon_vnni, "x86_64")
    assert not ji.int8_pairs_saturate("flags : avx2 avx_vnni", "x86_64")  # Alder Lake and later client CPUs
    assert not ji.int8_pairs_saturate("", "aarch64")   # Jetson: ARM dot products
    assert ji.int8_pairs_saturate("", "x86_64")        # unknown x86 flags: keep accuracy
    from molmo_edge.runtime.backends.ort import session_options
    entry = session_options().get_session_config_entry
    try:
        value = entry("session.x64quantprecision")
    except RuntimeError:  # onnxruntime raises when the key is unset
        value = ""
    assert (value == "1") == ji.int8_pairs_saturate()


FRAGMENTED_FREE = """
import sys
import numpy as np
from molmo_edge.runtime.machine import return_large_frees
def anon():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("RssAnon")) / 1024
if sys.argv[1] == "1":
    assert return_large_frees()
first = np.ones(8 << 20, np.uint8); del first  # freeing an mmapped block raises glibc's dynamic threshold
blocks, live = [], []
for _ in range(16):  # each freed block ends up between two live ones
    blocks.append(np.ones(6 << 20, np.uint8))
    live.append(np.ones(256 << 10, np.uint8))
held = anon(); del blocks
print(round(held - anon()))
"""


def test_return_large_frees_gives_freed_blocks_back():
    """glibc keeps freed blocks below its dynamic mmap threshold in the heap when live ones sit above them: the
    export check's fragmentation. With return_large_frees() the 96 MiB freed here goes back to the kernel."""
    import platform
    import subprocess
    import sys
    if platform.system() != "Linux" or not platform.libc_ver()[0] == "glibc":
        pytest.skip("glibc's malloc only")
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    returned = [int(subprocess.run([sys.executable, "-c", FRAGMENTED_FREE, arg], env=env, capture_output=True, text=True,
                                   check=True).stdout) for arg in ("0", "1")]
    assert returned[0] < 32 and returned[1] >= 90, returned
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"  # the user's own setting is left alone
    out = subprocess.run([sys.executable, "-c", "from molmo_edge.runtime.machine import return_large_frees as r; print(r())"],
                         env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


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
    return export_tiny_bundles(tiny_checkpoints, tmp_path_factory.mktemp("doc"), ("molmo-7b-d", "molmoe-1b"), check=False,
                               fused=True)  # MoE decoder.fused is written only when asked for


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
    path = store(env)
    fs = _by_area(diagnose_bundle(facts, folder, check_bundle))
    old = next(x for x in fs["engines"] if x.message.startswith("fp16"))     # no parity record: built before checks
    assert old.status == "warn" and "--force" in old.fix
    rec = json.load(open(os.path.join(path, "engine.json")))
    rec["parity"] = {r: {"ok": True, "worst": {"max_rel": 0.004}} for r in ("vision", "decoder")}
    json.dump(rec, open(os.path.join(path, "engine.json"), "w"))
    fs = _by_area(diagnose_bundle(facts, folder, check_bundle))
    ok = next(x for x in fs["engines"] if x.message.startswith("fp16"))
    assert ok.status == "ok" and "matched onnxruntime (worst max relative error 0.004)" in ok.message


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
SETUP = os.path.join(os.path.dirname(__file__), "..", "jetson", "setup.sh")
JP7_RELEASE = "# R38 (release), REVISION: 2.0, GCID: 1\n"


def _dry_run(tmp_path, release, *args, **env):
    import subprocess
    rel = tmp_path / "nv_tegra_release"
    rel.write_text(release)
    r = subprocess.run(["bash", SETUP, "--dry-run", "--venv", str(tmp_path / "venv"), *args], capture_output=True,
                       text=True, env={**os.environ, "NV_TEGRA_RELEASE": str(rel), "MOLMO_EDGE_SYSTEM_CV2": "", **env})
    return r, r.stdout + r.stderr


def _pip_installs(out):
    """What each planned `pip install` would install (arguments after the options)."""
    got = []
    for line in out.splitlines():
        if line.startswith("+ ") and " -m pip install " in line:
            words = line.split(" -m pip install ", 1)[1].split()
            skip = {"-c", "--extra-index-url"}
            keep, i = [], 0
            while i < len(words):
                if words[i] in skip:
                    i += 2
                    continue
                if not words[i].startswith("-") or words[i] == "-e":
                    keep.append(words[i])
                i += 1
            got.append(keep)
    return got


@pytest.mark.parametrize("release,expect,refuse", [
    (JP62_RELEASE, ["TensorRT 10.3", "python3.10 -m venv --system-site-packages", "cuda-python>=12.6,<13",
                    "jp6/cu126", "python3-libnvinfer"], None),
    (JP7_RELEASE, ["TensorRT 10.13", "python3.12", "cuda-python>=13,<14", "jp7/cu130"], None),
    ("# R36 (release), REVISION: 3.0\n", [], "JetPack 6.0 (TensorRT 8.6)"),
    ("# R35 (release), REVISION: 4.1\n", [], "not supported"),
])
def test_setup_script_dry_run(tmp_path, release, expect, refuse):
    r, out = _dry_run(tmp_path, release)
    if refuse:
        assert r.returncode == 1 and refuse in out
    else:
        assert r.returncode == 0, out
        assert all(e in out for e in expect), out
        assert "molmo-edge doctor" in out and "pip install" in out


@pytest.mark.parametrize("release,numpy,pinned", [(JP62_RELEASE, "", True), (JP62_RELEASE, "1.21.5", True),
                                                  (JP7_RELEASE, "1.26.4", True), (JP7_RELEASE, "2.1.0", False)])
def test_install_plan_keeps_jetpacks_packages(tmp_path, release, numpy, pinned):
    """The pip plan for JetPack 6 and 7: onnxruntime-gpu only from jetson-ai-lab (the CPU distribution removed
    first, never installed), no pip OpenCV (removed from the venv), molmo-edge with [jetson], numpy held at 1.x
    where the system's modules need it, every pip call constrained."""
    r, out = _dry_run(tmp_path, release, MOLMO_EDGE_SYSTEM_NUMPY=numpy)
    assert r.returncode == 0, out
    installs = _pip_installs(out)
    flat = [w for ws in installs for w in ws]
    assert "onnxruntime-gpu" in flat and "onnxruntime" not in flat
    assert not any(w.startswith("opencv") for w in flat)
    assert any(w.endswith("[jetson]") for w in flat) and flat[flat.index("-e") + 1].endswith("[jetson]")
    constrained = [line for line in out.splitlines() if " -m pip install " in line and "--upgrade pip" not in line]
    assert constrained and all("-c " in line for line in constrained)
    assert ("write " + str(tmp_path / "venv" / "molmo-edge-constraints.txt") + ": numpy<2" in out) == pinned
    lines = out.splitlines()
    uninstall_cpu = next(i for i, x in enumerate(lines) if x.endswith("pip uninstall -y onnxruntime onnxruntime-gpu"))
    install_gpu = next(i for i, x in enumerate(lines) if " -m pip install " in x and "onnxruntime-gpu" in x)
    assert uninstall_cpu < install_gpu
    assert any("pip uninstall -y opencv-python opencv-python-headless" in x for x in lines)
    assert "pip plan: install onnxruntime-gpu" in out and "keep JetPack's TensorRT, OpenCV" in out


def test_install_plan_with_cpu_onnxruntime(tmp_path):
    r, out = _dry_run(tmp_path, JP62_RELEASE, "--cpu-onnxruntime", "--no-apt")
    flat = [w for ws in _pip_installs(out) for w in ws]
    assert r.returncode == 0 and "onnxruntime" in flat and "onnxruntime-gpu" not in flat
    assert any(x.endswith("pip uninstall -y onnxruntime-gpu onnxruntime") for x in out.splitlines()) and "apt-get" not in out


def _requirements(extras, python):
    """The requirements pip would resolve for `molmo-edge[extras]` on a Python version (markers evaluated),
    self-references expanded."""
    import tomllib

    from packaging.requirements import Requirement
    proj = tomllib.load(open(os.path.join(os.path.dirname(__file__), "..", "pyproject.toml"), "rb"))["project"]
    env = {"python_version": python, "python_full_version": python + ".0", "extra": ""}
    todo, seen, out = [(r, None) for r in proj["dependencies"]], set(), {}
    for e in extras:
        todo += [(r, e) for r in proj["optional-dependencies"][e]]
    while todo:
        text, _ = todo.pop()
        req = Requirement(text)
        if req.marker and not req.marker.evaluate(env):
            continue
        if req.name == "molmo-edge":
            for e in req.extras - seen:
                seen.add(e)
                todo += [(r, e) for r in proj["optional-dependencies"][e]]
            continue
        out.setdefault(req.name, []).append(str(req.specifier))
    return out


def test_extras_choose_the_flavour():
    jp6, jp7 = _requirements(["jetson"], "3.10"), _requirements(["jetson"], "3.12")
    for reqs in (jp6, jp7, _requirements([], "3.11")):
        assert not {n for n in reqs if n.startswith(("onnxruntime", "opencv"))}, reqs
    assert "<2" in ",".join(jp6["numpy"]) and "<2" not in ",".join(jp7["numpy"])
    cpu, gpu, test = _requirements(["cpu"], "3.11"), _requirements(["gpu"], "3.11"), _requirements(["test"], "3.11")
    assert {"onnxruntime", "opencv-python-headless"} <= set(cpu) and "onnxruntime-gpu" not in cpu
    assert {"onnxruntime-gpu", "opencv-python-headless"} <= set(gpu) and "onnxruntime" not in gpu
    assert {"onnxruntime", "opencv-python-headless", "pytest"} <= set(test)       # CI on x86: the CPU flavours


def test_missing_onnxruntime_or_opencv_is_one_line_naming_the_extra(monkeypatch, capsys):
    import sys

    from molmo_edge.runtime.deps import MissingDependency, as_missing, require
    monkeypatch.setitem(sys.modules, "onnxruntime", None)          # import raises ImportError
    with pytest.raises(MissingDependency) as e:
        require("onnxruntime")
    msg = str(e.value)
    assert "\n" not in msg and "[cpu]" in msg and "[gpu]" in msg and "jetson/setup.sh" in msg
    err = ModuleNotFoundError("No module named 'cv2'", name="cv2")
    assert "OpenCV is not installed" in str(as_missing(err)) and as_missing(ModuleNotFoundError("x", name="yaml")) is None
    from molmo_edge.runtime.bundle import Bundle
    from molmo_edge.runtime.backends.ort import OrtBackend
    with pytest.raises(MissingDependency, match=r"\[cpu\]"):
        OrtBackend(Bundle("x", {}, None))


# --- installs that break the device's stack -----------------------------------------------------------
CV2_PIP = dict(opencv="4.10.0", opencv_path="/home/u/.venvs/molmo-edge/lib/python3.10/site-packages/cv2/__init__.py",
               opencv_gstreamer=False, opencv_distributions={"opencv-python-headless": "4.10.0.84 at /home/u/.venvs"})
CV2_JETPACK = dict(opencv="4.8.0", opencv_path="/usr/lib/python3/dist-packages/cv2/__init__.py", opencv_gstreamer=True)
BUILD_INFO = """
  Video I/O:
    DC1394:                      NO
    FFMPEG:                      YES
      avcodec:                   YES (58.134.100)
    GStreamer:                   YES (1.20.3)
    v4l/v4l2:                    YES (linux/videodev2.h)
"""


def test_two_onnxruntime_distributions_fail_with_the_fix():
    fs = _by_area(diagnose(nano_jp62(ort_distributions={"onnxruntime": "1.20.1 at /venv", "onnxruntime-gpu": "1.20.0 at /venv"})))
    two = next(x for x in fs["onnxruntime"] if "distributions" in x.message)
    assert two.status == "fail" and "onnxruntime 1.20.1" in two.message and "onnxruntime-gpu 1.20.0" in two.message
    assert two.fix.startswith("pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu") and \
        "jp6/cu126" in two.fix
    assert not any("distributions" in x.message for x in _by_area(diagnose(nano_jp62(
        ort_distributions={"onnxruntime-gpu": "1.20.0 at /venv"}))).get("onnxruntime", []))


def test_csi_source_needs_gstreamer_opencv():
    fs = _by_area(diagnose(nano_jp62(sources=["csi://0"], **CV2_PIP)))
    cv = fs["opencv"][0]
    assert cv.status == "fail" and "csi://0" in cv.message and "no GStreamer" in cv.message
    assert cv.fix.startswith("pip uninstall -y opencv-python-headless")
    assert _by_area(diagnose(nano_jp62(sources=["csi://0"], **CV2_JETPACK)))["opencv"][0].status == "ok"
    missing = _by_area(diagnose(nano_jp62(sources=["csi://1"], opencv_error="ModuleNotFoundError: No module named 'cv2'")))
    assert missing["opencv"][0].status == "fail" and "libopencv-python" in missing["opencv"][0].fix
    no_csi = _by_area(diagnose(nano_jp62(sources=["/dev/video0"], **CV2_PIP)))   # USB camera: V4L2 works without it
    assert no_csi["opencv"][0].status == "warn" and "opencv-python-headless" in no_csi["opencv"][0].fix
    pc = _by_area(diagnose(Facts(sources=["csi://0"], onnxruntime="1.32", **CV2_PIP)))["opencv"][0]
    assert pc.status == "fail" and "/dev/videoN" in pc.fix
    from molmo_edge.runtime.device.install_probes import opencv_has_gstreamer
    assert opencv_has_gstreamer(BUILD_INFO) is True
    assert opencv_has_gstreamer(BUILD_INFO.replace("YES (1.20.3)", "NO")) is False and opencv_has_gstreamer("") is None


def test_numpy_abi_mismatch_fails_with_the_fix():
    err = ("ImportError: numpy.core.multiarray failed to import (A module that was compiled using NumPy 1.x cannot be "
           "run in NumPy 2.1.3 as it may crash.)")
    fs = _by_area(diagnose(nano_jp62(numpy="2.1.3", opencv_error=err, numpy_abi_errors={"cv2": err},
                                     numpy_distributions=["2.1.3 at /venv", "1.21.5 at /usr/lib/python3/dist-packages"])))
    n = fs["numpy"][0]
    assert n.status == "fail" and "cv2" in n.message and "1.21.5 at /usr/lib" in n.message and "'numpy<2'" in n.fix
    assert "opencv" not in fs                                      # one finding for one cause
    newer = "ValueError: numpy.dtype size changed, may indicate binary incompatibility. Expected 96 from C header, got 88"
    up = _by_area(diagnose(nano_jp62(numpy="1.21.5", numpy_abi_errors={"onnxruntime": newer}, ort_error=newer,
                                     onnxruntime=None)))["numpy"][0]
    assert up.status == "fail" and "--upgrade numpy" in up.fix
    shadow = _by_area(diagnose(nano_jp62(numpy="2.1.3", numpy_distributions=["2.1.3 at /venv", "1.21.5 at /usr"])))
    assert shadow["numpy"][0].status == "warn"


def test_numpy_abi_error_is_recognised_on_import(tmp_path, monkeypatch):
    """A module that prints numpy's ABI warning and fails like cv2 does under numpy 2 (a stand-in module)."""
    import sys

    from molmo_edge.runtime.device.install_probes import NUMPY_ABI, import_error
    (tmp_path / "fake_cv2_abi.py").write_text(
        "import sys\nsys.stderr.write('A module that was compiled using NumPy 1.x cannot be run in NumPy 2.1.3\\n')\n"
        "raise ImportError('numpy.core.multiarray failed to import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    mod, err = import_error("fake_cv2_abi")
    assert mod is None and NUMPY_ABI.search(err) and "fake_cv2_abi" not in sys.modules


def test_configured_sources_from_doctor_env_and_service_files(tmp_path):
    from molmo_edge.runtime.device.install_probes import configured_sources, sources_in
    f = tmp_path / "molmo-edge"
    f.write_text("# comment\nMOLMO_EDGE_BUNDLE=/opt/b\nMOLMO_EDGE_ARGS=--source csi://0 --max-crops 6\nMOLMO_EDGE_API_KEY=s3cret\n")
    w = tmp_path / "molmo-edge-watch"
    w.write_text('MOLMO_EDGE_SOURCE=csi://1\nMOLMO_EDGE_WATCH_ARGS="--every 2 --source=rtsp://cam/1"\n')
    got = configured_sources(["/dev/video2"], env={"MOLMO_EDGE_SOURCE": "/dev/video0"}, files=(str(f), str(w), "/nope"))
    assert got == ["/dev/video2", "/dev/video0", "csi://0", "csi://1", "rtsp://cam/1"]
    assert sources_in("MOLMO_EDGE_API_KEY=--source x") == []
    assert configured_sources(["rtsp://admin:pw@10.0.0.2/s1"], env={}, files=()) == ["rtsp://***@10.0.0.2/s1"]


def test_doctor_cli_takes_a_source(capsys):
    from molmo_edge.runtime.cli.main import main
    main(["doctor", "--source", "csi://0", "--json"])
    d = json.loads(capsys.readouterr().out)
    assert "csi://0" in d["facts"]["sources"]
    assert any(x["area"] == "opencv" for x in d["findings"])


# --- service units: onnxruntime until a device has spoken --------------------------------------------------
@pytest.mark.parametrize("unit", ["molmo-edge-serve.service", "molmo-edge-watch.service"])
def test_service_units_default_to_onnxruntime(unit):
    text = open(os.path.join(os.path.dirname(__file__), "..", "jetson", unit)).read()
    defaults = [line.split("=", 2)[2] for line in text.splitlines() if line.startswith("Environment=MOLMO_EDGE_BACKEND=")]
    assert defaults == ["onnxruntime"]
    assert '--backend "$MOLMO_EDGE_BACKEND"' in text and "MOLMO_EDGE_BACKEND=tensorrt" in text   # the documented switch
    assert "EnvironmentFile=-/etc/default/molmo-edge" in text


@pytest.mark.parametrize("name,index", [("Dockerfile.r36", "jp6/cu126"), ("Dockerfile.r38", "jp7/cu130")])
def test_dockerfiles_keep_jetpacks_packages(name, index):
    """The containers install like setup.sh: constrained pip, onnxruntime-gpu from jetson-ai-lab with no silent
    CPU fallback (ORT=cpu chooses it), molmo-edge with [jetson], no pip OpenCV."""
    text = open(os.path.join(os.path.dirname(__file__), "..", "jetson", name)).read()
    run = text[text.index("ARG ORT=gpu"):]
    assert f"onnxruntime-gpu --extra-index-url https://pypi.jetson-ai-lab.io/{index}" in run
    assert "|| /opt/molmo-edge/venv/bin/pip install onnxruntime" not in text and 'if [ "$ORT" = cpu ]' in run
    import re
    assert '$PIP "/opt/molmo-edge[jetson]"' in run and not re.search(r"(?<!lib)opencv-python", text)
    assert 'PIP="/opt/molmo-edge/venv/bin/pip install -c /opt/molmo-edge/constraints.txt"' in run
    assert ("printf 'numpy<2\\n' > /opt/molmo-edge/constraints.txt" in run) == (name == "Dockerfile.r36")


def test_cli_names_the_extra_when_onnxruntime_or_opencv_is_missing(bundles, tmp_path, monkeypatch, capsys):
    import sys

    from molmo_edge.runtime.cli.main import main
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert main(["ask", bundles["molmo-7b-d"], "hello", "--max-new-tokens", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]          # after the "loading bundle" progress line
    assert err.startswith("error: onnxruntime is not installed") and "[cpu]" in err
    monkeypatch.delitem(sys.modules, "onnxruntime")
    monkeypatch.setitem(sys.modules, "cv2", None)
    (tmp_path / "frames").mkdir()
    rc = main(["watch", bundles["molmo-7b-d"], "--source", str(tmp_path / "frames"), "--prompt", "hi", "--max-frames", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: OpenCV is not installed") and "jetson/setup.sh" in err[-1]


def test_probe_sees_a_second_onnxruntime_distribution(tmp_path, monkeypatch):
    """installed_distributions() over a second site folder (what a venv over system site-packages sees): a
    dist-info of onnxruntime-gpu next to this venv's onnxruntime makes gather_facts report both."""
    from molmo_edge.runtime.device.doctor import gather_facts
    info = tmp_path / "onnxruntime_gpu-1.20.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: onnxruntime-gpu\nVersion: 1.20.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    f = gather_facts()
    assert "onnxruntime-gpu" in f.ort_distributions and f.ort_distributions["onnxruntime-gpu"].startswith("1.20.0 at ")
    assert "onnxruntime" in f.ort_distributions               # this venv's CPU wheel
    two = [x for x in diagnose(f) if x.area == "onnxruntime" and "distributions" in x.message]
    assert two and two[0].status == "fail"
