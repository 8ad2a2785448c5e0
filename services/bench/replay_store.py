"""An on-disk expert store with a trace's shape, for ``moeinf bench replay``: a Mixtral-layout checkpoint.

``config.json`` (a ``MixtralConfig``) and sharded safetensors with Mixtral's key names and shapes
(``model.layers.{i}.block_sparse_moe.experts.{j}.w1/w3.weight [I, H]`` and ``w2.weight [H, I]``), float16,
filled with random bytes (not zeros, not holes: every read moves real data). Only expert tensors are written:
memd's store indexes the experts and ignores the rest, so nothing dense is needed. No torch model is built;
shards are written one at a time (at most ``SHARD_BYTES`` in memory). The store is written once per shape to
``<cache>/<shape>`` (to a temporary directory first, then renamed) and reused afterwards.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

ITEMSIZE = 2  # float16
SHARD_BYTES = 256 * 2**20
MARKER = "replay-store.json"


@dataclass(frozen=True, slots=True)
class StoreShape:
    layers: int
    experts: int
    top_k: int
    hidden: int
    intermediate: int

    @classmethod
    def for_bytes(cls, layers: int, experts: int, top_k: int, expert_bytes: int) -> StoreShape:
        """The shape whose experts (3 matrices of hidden x intermediate, float16) come nearest ``expert_bytes``."""
        hidden = 1024 if expert_bytes >= 6 * 1024 * 256 else 64
        intermediate = max(1, round(expert_bytes / (3 * ITEMSIZE * hidden)))
        return cls(layers, experts, top_k, hidden, intermediate)

    @property
    def expert_bytes(self) -> int:
        return 3 * self.hidden * self.intermediate * ITEMSIZE

    @property
    def name(self) -> str:
        return f"L{self.layers}xE{self.experts}-k{self.top_k}-h{self.hidden}-i{self.intermediate}-f16"


def ensure_store(cache: Path | str, shape: StoreShape, seed: int = 0) -> Path:
    """The store directory for ``shape`` under ``cache``, written now if it is not there yet."""
    final = Path(cache) / shape.name
    if (final / MARKER).is_file():
        return final
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    need, free = shape.layers * shape.experts * shape.expert_bytes, shutil.disk_usage(tmp).free
    if need > free - 2**30:  # keep a GiB for everyone else
        shutil.rmtree(tmp, ignore_errors=True)
        raise ValueError(f"a {shape.layers} x {shape.experts} store of {shape.expert_bytes}-byte experts needs"
                         f" {need / 2**30:.1f} GiB in {cache}, which has {free / 2**30:.1f} GiB free: lower"
                         " --expert-bytes or pick another --store-dir")
    try:
        _write_config(tmp, shape)
        _write_shards(tmp, shape, np.random.default_rng(seed))
        (tmp / MARKER).write_text(json.dumps({"random_weights": True, **asdict(shape)}, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _write_config(out: Path, shape: StoreShape) -> None:
    from transformers import MixtralConfig

    heads = 8 if shape.hidden % 8 == 0 else 1
    MixtralConfig(vocab_size=32, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                  num_hidden_layers=shape.layers, num_attention_heads=heads, num_key_value_heads=heads,
                  num_local_experts=shape.experts, num_experts_per_tok=shape.top_k, max_position_embeddings=4096,
                  tie_word_embeddings=False, dtype="float16").save_pretrained(out)


def expert_tensors(shape: StoreShape, layer: int, expert: int) -> list[tuple[str, tuple[int, int]]]:
    prefix = f"model.layers.{layer}.block_sparse_moe.experts.{expert}"
    h, i = shape.hidden, shape.intermediate
    return [(f"{prefix}.w1.weight", (i, h)), (f"{prefix}.w2.weight", (h, i)), (f"{prefix}.w3.weight", (i, h))]


def _shards(shape: StoreShape) -> list[list[tuple[int, int]]]:
    per_shard = max(1, SHARD_BYTES // shape.expert_bytes)
    keys = [(layer, e) for layer in range(shape.layers) for e in range(shape.experts)]
    return [keys[i:i + per_shard] for i in range(0, len(keys), per_shard)]


def _write_shards(out: Path, shape: StoreShape, rng: np.random.Generator) -> None:
    from safetensors.numpy import save_file

    shards = _shards(shape)
    weight_map = {}
    for n, experts in enumerate(shards, start=1):
        name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for layer, expert in experts:
            for key, dims in expert_tensors(shape, layer, expert):
                nbytes = dims[0] * dims[1] * ITEMSIZE
                tensors[key] = np.frombuffer(rng.bytes(nbytes), dtype=np.float16).reshape(dims)
                weight_map[key] = name
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        del tensors
    total = shape.layers * shape.experts * shape.expert_bytes
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
