"""Tiny quantized checkpoints with the released checkpoints' tensor names and config fields, and transformers'
own dequantized model of them (the oracle: ``from_pretrained`` with the quantization config's ``dequantize=True``)."""
from __future__ import annotations

from pathlib import Path

from helpers import write_family

from common.quant_write import quantize_checkpoint

# name -> (family, format, fp8 weight_block_size): blocks smaller than the released [128, 128] so the tiny
# matrices hold several of them (the dequantization is per block)
QUANTIZED = {
    "gpt_oss-mxfp4": ("gpt_oss", "mxfp4", (128, 128)),
    "deepseek_v3-fp8": ("deepseek_v3", "fp8", (8, 16)),
    "qwen3_moe-fp8": ("qwen3_moe", "fp8", (16, 32)),  # sharded, with model.safetensors.index.json
}


def write_quantized(name: str, out: Path) -> Path:
    family, fmt, block = QUANTIZED[name]
    write_family(family, out)
    return quantize_checkpoint(out, fmt, block)


def dequantized_reference(path: Path):
    """transformers' model of a quantized checkpoint, dequantized on load (its CPU reference path)."""
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config, Mxfp4Config

    import json

    method = json.loads((Path(path) / "config.json").read_text())["quantization_config"]["quant_method"]
    config = Mxfp4Config(dequantize=True) if method == "mxfp4" else FineGrainedFP8Config(dequantize=True)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=config)
