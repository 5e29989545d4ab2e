"""The torch reference model against AI2's outputs (golden) and against an independent numpy model."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from molmo_edge.export.checkpoint import CheckpointError, WeightSource, load_reference_model, open_checkpoint  # noqa: E402
from molmo_edge.export.synthetic import FAMILIES, make_random_checkpoint  # noqa: E402
from molmo_edge.runtime.config import load_config  # noqa: E402

from numpy_reference import llm_logits  # noqa: E402


def _run(model, pre):
    kw = {}
    if "images" in pre.files:
        kw = {k: torch.from_numpy(pre[k]) for k in ("images", "image_masks", "image_input_idx")}
    trace = {}
    with torch.no_grad():
        out = model(torch.from_numpy(pre["input_ids"].astype(np.int64)), trace=trace, **kw)
    return out, trace, kw


@pytest.fixture(scope="module")
def golden_model(golden):
    model, cfg, _ = load_reference_model(str(golden / "molmoe-tiny"))
    return model, cfg


@pytest.mark.parametrize("case", ["astronaut_default", "text_only"])
def test_golden_forward(golden, golden_model, case):
    model, cfg = golden_model
    pre = np.load(golden / "cases" / f"{case}.preprocess.npz")
    ref = np.load(golden / "cases" / f"{case}.forward.npz")
    out, trace, kw = _run(model, pre)
    logits = out.logits[0].numpy()
    tol = 1e-3
    assert np.abs(logits[-1] - ref["logits_last"]).max() < tol
    assert np.abs(logits.max(-1) - ref["logits_max"]).max() < tol
    assert np.array_equal(logits.argmax(-1), ref["logits_argmax"])
    lse = torch.logsumexp(out.logits[0], -1).numpy()
    assert np.abs(lse - ref["logits_logsumexp"]).max() < tol
    assert np.abs(logits[:, ref["vocab_probe_ids"]] - ref["logits_at_probe_ids"]).max() < tol
    assert np.abs(logits[ref["probe_positions"]] - ref["logits_at_probe_positions"]).max() < tol
    hs = torch.stack(trace["hidden_states"])[:, 0]
    hs[-1] = model.ln_f(hs[-1])  # HF reports the last hidden state after ln_f
    assert np.abs(hs.numpy() - ref["hidden_states"]).max() < 1e-4
    assert np.abs(torch.stack(trace["router_logits"])[:, 0].numpy() - ref["router_logits"]).max() < 1e-4
    if kw:
        assert np.abs(trace["vit_hidden"][:, 0].numpy() - ref["vit_hidden_crop0"]).max() < 1e-4
        assert np.abs(out.image_features[0].numpy() - ref["image_features"]).max() < 1e-4
    ids = torch.from_numpy(pre["input_ids"].astype(np.int64))
    tokens = model.generate(ids, max_new_tokens=8, eos_token_id=cfg.eos_token_id, **kw)
    assert tokens == ref["greedy_tokens"].tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_families_match_numpy_reference(tiny_checkpoints, family):
    from safetensors.numpy import load_file

    folder = tiny_checkpoints[family]
    model, cfg, _ = load_reference_model(folder)
    ids = [0, 5, 17, 300, 42, 511, 7, 99, 3]
    with torch.no_grad():
        got = model(torch.tensor(ids)).logits[0].numpy()
    want = llm_logits(load_file(f"{folder}/model.safetensors"), cfg, ids)
    assert np.abs(got - want).max() < 1e-3 * max(1.0, np.abs(want).max())
    assert (got.argmax(-1) == want.argmax(-1)).mean() > 0.9


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_cache_generation_equals_full_recompute(tiny_checkpoints, family):
    model, cfg, _ = load_reference_model(tiny_checkpoints[family])
    ids = torch.tensor([0, 11, 22, 33, 44])
    tokens = model.generate(ids, max_new_tokens=6)
    seq = ids.tolist()
    with torch.no_grad():
        for _ in range(6):
            seq.append(int(model(torch.tensor(seq)).logits[0, -1].argmax()))
    assert tokens == seq[len(ids):]


def test_generation_stops_at_eos(tiny_checkpoints):
    model, cfg, _ = load_reference_model(tiny_checkpoints["molmoe-1b"])
    ids = torch.tensor([0, 11, 22])
    first = model.generate(ids, max_new_tokens=3)
    assert model.generate(ids, max_new_tokens=10, eos_token_id=first[1]) == first[:2]


def test_image_features_are_added_not_replaced(tiny_checkpoints):
    """x[idx] += feature (HF), unlike vLLM's replacement; dropped features (-100) change nothing."""
    from molmo_edge.runtime.processor import MolmoProcessor

    folder = tiny_checkpoints["molmo-7b-d"]
    model, cfg, _ = load_reference_model(folder)
    rng = np.random.default_rng(0)
    pre = MolmoProcessor(folder).process("What is this?", rng.integers(0, 255, (200, 300, 3), dtype=np.uint8))
    ids = torch.from_numpy(pre["input_ids"].astype(np.int64))
    imgs = {k: torch.from_numpy(pre[k]) for k in ("images", "image_masks", "image_input_idx")}
    trace = {}
    with torch.no_grad():
        out = model(ids, trace=trace, **imgs)
    x0 = trace["hidden_states"][0][0]
    base = model.embed(ids[None])[0]
    idx = imgs["image_input_idx"].reshape(-1)
    feats = out.image_features[0].reshape(-1, cfg.d_model)
    keep = idx >= 0
    assert torch.allclose(x0[idx[keep].long()], base[idx[keep].long()] + feats[keep], atol=1e-6)
    others = torch.ones(len(ids), dtype=torch.bool)
    others[idx[keep].long()] = False
    assert torch.equal(x0[others], base[others])


def test_checkpoint_formats_agree(tmp_path):
    outs = []
    for fmt, dtype in (("safetensors", "float32"), ("sharded", "float32"), ("bin", "float32"), ("safetensors", "bfloat16"),
                       ("bin", "float16")):
        folder = make_random_checkpoint(str(tmp_path / f"{fmt}-{dtype}"), "molmo-7b-d", fmt=fmt, dtype=dtype, seed=3)
        model, _, _ = load_reference_model(folder)
        with torch.no_grad():
            outs.append(model(torch.tensor([0, 1, 2, 3])).logits)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    assert (outs[3] - outs[0]).abs().max() < 0.5 and (outs[4] - outs[0]).abs().max() < 0.5  # low-precision sources load


def test_checkpoint_errors_list_every_problem(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = make_random_checkpoint(str(tmp_path / "c"), "molmoe-1b")
    sd = load_file(f"{folder}/model.safetensors")
    sd.pop("model.transformer.ln_f.weight")
    sd.pop("model.transformer.blocks.0.mlp.experts.3.up_proj.weight")
    sd["model.transformer.extra.weight"] = torch.zeros(2)
    sd["model.transformer.blocks.1.attn.attn_out.weight"] = torch.zeros(3, 3)
    save_file(sd, f"{folder}/model.safetensors")
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(folder)
    msg = str(e.value)
    assert "2 missing" in msg and "ln_f.weight" in msg and "experts.3.up_proj" in msg
    assert "1 unexpected" in msg and "extra.weight" in msg
    assert "1 mis-shaped" in msg and "attn_out.weight [3, 3]" in msg
    assert "\n" not in msg


def test_checkpoint_read_errors(tmp_path):
    folder = make_random_checkpoint(str(tmp_path / "c"), "molmo-7b-o")
    with open(f"{folder}/model.safetensors", "r+b") as f:
        f.truncate(100)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        WeightSource(folder)
    import os
    os.remove(f"{folder}/model.safetensors")
    with pytest.raises(CheckpointError, match="no weights"):
        WeightSource(folder)
    with pytest.raises(CheckpointError, match="neither a folder nor"):
        open_checkpoint(str(tmp_path / "no-such-dir"))
    # a model from another family's config: names don't match
    other = make_random_checkpoint(str(tmp_path / "d"), "molmo-7b-d")
    import shutil
    shutil.copy(f"{tmp_path}/d/model.safetensors", f"{tmp_path}/d2.safetensors")
    os.makedirs(tmp_path / "mix")
    shutil.copy(f"{other}/model.safetensors", tmp_path / "mix")
    make_random_checkpoint(str(tmp_path / "e"), "molmoe-1b")
    shutil.copy(f"{tmp_path}/e/config.json", tmp_path / "mix")
    with pytest.raises(CheckpointError, match="missing.*unexpected"):
        open_checkpoint(str(tmp_path / "mix"))
    assert load_config(str(tmp_path / "mix")).family == "molmoe"


def test_offline_hub_id_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(CheckpointError, match="offline|huggingface_hub is not installed"):
        open_checkpoint("allenai/MolmoE-1B-0924")
