"""Find and read a Hugging Face Molmo checkpoint: a local folder or a hub id; safetensors (single or
sharded with an index) or `pytorch_model.bin` (single or sharded), memory-mapped and read lazily so
that a model larger than RAM can be streamed tensor by tensor."""
from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping

import torch

from molmo_edge.runtime.config import MolmoConfig, load_config
from molmo_edge.runtime.model_path import CheckpointError, resolve_model  # noqa: F401 (re-exported)
from molmo_edge.runtime.hf_names import hf_weight_shapes


class WeightSource(Mapping):
    """name -> torch tensor, read on access from the checkpoint's files (never all at once)."""

    def __init__(self, folder: str):
        self.folder = folder
        self._where: dict[str, str] = {}
        self._open: dict[str, object] = {}
        files = os.listdir(folder)
        for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            if index in files:
                with open(os.path.join(folder, index), encoding="utf-8") as f:
                    self._where = dict(json.load(f)["weight_map"])
                missing = sorted({s for s in self._where.values() if not os.path.exists(os.path.join(folder, s))})
                if missing:
                    raise CheckpointError(f"{index} names shards that are not in {folder}: {', '.join(missing)}; "
                                          "finish the download")
                break
        else:
            for single in ("model.safetensors", "pytorch_model.bin"):
                if single in files:
                    self._where = {k: single for k in self._keys_of(single)}
                    break
            else:
                raise CheckpointError(f"no weights in {folder}: expected model.safetensors, a sharded "
                                      "model.safetensors.index.json, or pytorch_model.bin")

    def _handle(self, shard: str):
        if shard not in self._open:
            path = os.path.join(self.folder, shard)
            try:
                if shard.endswith(".safetensors"):
                    from safetensors import safe_open
                    self._open[shard] = safe_open(path, framework="pt")
                else:
                    # MAP_SHARED, not torch's default MAP_PRIVATE: a private (copy-on-write) mapping counts against the
                    # commit limit, so the kernel refuses to map a 29 GB pytorch_model.bin on a 24 GB machine without
                    # swap ("Cannot allocate memory"). The tensors are only read, never written.
                    import mmap
                    with torch.serialization.set_default_mmap_options(mmap.MAP_SHARED):
                        self._open[shard] = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            except Exception as e:
                raise CheckpointError(f"{path} cannot be read ({str(e).splitlines()[0][:200]}); "
                                      "the file is truncated or corrupt: re-download it") from None
        return self._open[shard]

    def _keys_of(self, shard: str) -> list[str]:
        h = self._handle(shard)
        return list(h.keys())

    def __getitem__(self, name: str) -> torch.Tensor:
        shard = self._where[name]
        h = self._handle(shard)
        t = h.get_tensor(name) if shard.endswith(".safetensors") else h[name]
        return t

    def shape(self, name: str) -> tuple[int, ...]:
        shard = self._where[name]
        h = self._handle(shard)
        if shard.endswith(".safetensors"):
            return tuple(h.get_slice(name).get_shape())
        return tuple(h[name].shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def nbytes(self) -> int:
        return sum(os.path.getsize(os.path.join(self.folder, s)) for s in set(self._where.values()))


def _listing(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" … (+{len(names) - limit} more)" if len(names) > limit else "")


EMBEDDINGS = ("model.transformer.wte.embedding", "model.transformer.wte.new_embedding")


def embedding_resplit(source: Mapping, cfg: MolmoConfig) -> bool:
    """True when a Molmo2 file splits its embedding rows otherwise than [vocab_size] + [additional] with the
    right total: transformers 5.24's save_pretrained writes two equal halves (molmo2-spec.md trap 16). Only
    the concatenation matters; the loader re-splits it."""
    if not cfg.is_molmo2 or not all(n in source for n in EMBEDDINGS):
        return False
    rows = [source.shape(n)[0] if hasattr(source, "shape") else source[n].shape[0] for n in EMBEDDINGS]
    return rows != [cfg.embedding_size, cfg.additional_vocab_size] and sum(rows) == cfg.embedding_size + cfg.additional_vocab_size


def check_weights(source: WeightSource, cfg: MolmoConfig) -> None:
    """One error that lists every missing, unexpected and mis-shaped tensor."""
    want = hf_weight_shapes(cfg)
    have = set(source)
    missing = sorted(set(want) - have)
    unexpected = sorted(have - set(want))
    resplit = embedding_resplit(source, cfg)
    wrong = [f"{n} {list(source.shape(n))} (config says {list(want[n])})"
             for n in sorted(set(want) & have) if source.shape(n) != want[n] and not (resplit and n in EMBEDDINGS)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: {_listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected: {_listing(unexpected)}")
    if wrong:
        problems.append(f"{len(wrong)} mis-shaped: {_listing(wrong)}")
    if problems:
        raise CheckpointError(f"weights in {source.folder} do not match its config.json ({cfg.family}, "
                              f"d_model {cfg.d_model}, {cfg.n_layers} layers): " + "; ".join(problems)
                              + ". Is config.json from the same checkpoint?")


def open_checkpoint(model: str) -> tuple[str, MolmoConfig, WeightSource]:
    """Resolve, read the config and check every tensor's name and shape."""
    folder = resolve_model(model)
    cfg = load_config(folder)
    source = WeightSource(folder)
    check_weights(source, cfg)
    return folder, cfg, source


def load_reference_model(model: str, dtype: torch.dtype = torch.float32):
    """(torch reference model, config, folder) for a checkpoint folder or hub id."""
    from molmo_edge.export.model import build_model

    folder, cfg, source = open_checkpoint(model)
    return build_model(cfg, source, dtype), cfg, folder
