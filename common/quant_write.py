"""Rewriting a float checkpoint directory in a quantized format, with the tensor names and config fields of the
released checkpoints (GPT-OSS for MXFP4; DeepSeek-V3 and Qwen3 "-FP8" for block FP8).

- ``mxfp4``: every stacked expert tensor ``*.mlp.experts.gate_up_proj`` / ``down_proj`` (``[E, in, out]``) becomes
  ``*_blocks`` + ``*_scales`` of its ``[E, out, in]`` transpose, as transformers' mxfp4 integration reads them;
  biases, attention, router and embeddings keep their dtype. ``quantization_config = {"quant_method": "mxfp4"}``.
- ``fp8``: every linear weight inside the decoder layers (``*_proj.weight``, Mixtral's ``w1/w2/w3``) becomes
  float8_e4m3fn plus ``weight_scale_inv`` per ``weight_block_size`` block; routers, norms, embeddings and the LM
  head stay. ``quantization_config = {"quant_method": "fp8", "weight_block_size": [...], ...}``.

Used by tests and ``moeinf demo-model --format``; the encoders are in ``common/quant_encode.py`` (NumPy, shared
with memd's compressed cache); ``mxfp4_tensors`` and ``fp8_tensors`` apply them to torch tensors.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch

from common.quant_encode import fp8_encode, mxfp4_encode

FORMATS = ("mxfp4", "fp8")
_MXFP4_KEY = re.compile(r"\.mlp\.experts\.(gate_up_proj|down_proj)$")
_FP8_KEY = re.compile(r"\.layers\.\d+\..*(_proj|\.w[123])\.weight$")


def mxfp4_tensors(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``mxfp4_encode`` of a torch tensor: ``(blocks, scales)`` as uint8 tensors."""
    blocks, scales = mxfp4_encode(weight.detach().float().numpy())
    return torch.from_numpy(blocks), torch.from_numpy(scales)


def fp8_tensors(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``fp8_encode`` of a torch tensor: ``(float8_e4m3fn values, float32 weight_scale_inv)``."""
    values, scale = fp8_encode(weight.detach().float().numpy(), block)
    return torch.from_numpy(values.view(np.uint8)).view(torch.float8_e4m3fn), torch.from_numpy(scale)


def quantize_tensors(tensors: dict, fmt: str, block: tuple[int, int] = (128, 128)) -> dict:
    """One safetensors file's tensors, with the quantized ones replaced by their serialized parts."""
    out = {}
    for key, value in tensors.items():
        if fmt == "mxfp4" and value.dim() == 3 and _MXFP4_KEY.search(key):
            blocks, scales = mxfp4_tensors(value.transpose(1, 2))
            out[f"{key}_blocks"], out[f"{key}_scales"] = blocks, scales
        elif fmt == "fp8" and value.dim() == 2 and value.is_floating_point() and _FP8_KEY.search(key):
            out[key], out[f"{key}_scale_inv"] = fp8_tensors(value, block)
        else:
            out[key] = value
    return out


def quantization_config(fmt: str, block: tuple[int, int] = (128, 128)) -> dict:
    if fmt == "mxfp4":
        return {"quant_method": "mxfp4", "modules_to_not_convert": [
            "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    if fmt == "fp8":
        return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(block)}
    raise ValueError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")


def quantize_checkpoint(directory: Path | str, fmt: str, block: tuple[int, int] = (128, 128)) -> Path:
    """Rewrite ``directory``'s safetensors files and config.json in ``fmt``, in place."""
    from safetensors.torch import load_file, save_file

    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"] = quantization_config(fmt, block)
    index_path = directory / "model.safetensors.index.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else None
    for path in sorted(directory.glob("*.safetensors")):
        tensors = quantize_tensors(load_file(path), fmt, block)
        save_file(tensors, path, metadata={"format": "pt"})
        if index is not None:
            for key in tensors:
                index["weight_map"][key] = path.name
    if index is not None:
        index_path.write_text(json.dumps(index, indent=2))
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return directory
