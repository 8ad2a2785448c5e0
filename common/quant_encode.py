"""Encoding float weights into the quantized formats moeinf serves, as the released checkpoints store them.

- MXFP4 (OCP microscaling, GPT-OSS): 32 values share one power-of-two scale. ``*_blocks`` is uint8
  ``[..., K / 32, 16]`` (two E2M1 values per byte, the even element in the low nibble), ``*_scales`` is uint8
  ``[..., K / 32]`` holding the biased exponent (``2 ** (byte - 127)``).
- Block FP8 (DeepSeek-V3, Qwen3 "-FP8"): ``weight`` is float8_e4m3fn, ``weight_scale_inv`` is float32 with one
  value per ``weight_block_size`` block, by which the FP8 values are multiplied to dequantize.

Used by the demo-model writer, the tests' checkpoint writers and ``moeinf convert``. The decoders live with
the worker (``services/worker/quant.py``).
"""
from __future__ import annotations

import torch

MXFP4_BLOCK = 32
FP4_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # E2M1 codes 0..7; code | 8 is the negative
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def mxfp4_encode(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight [..., K]`` (K a multiple of 32) -> ``(blocks uint8 [..., K/32, 16], scales uint8 [..., K/32])``."""
    *prefix, k = weight.shape
    if k % MXFP4_BLOCK:
        raise ValueError(f"MXFP4 needs the last dimension to be a multiple of {MXFP4_BLOCK}, got {k}")
    x = weight.float().reshape(*prefix, k // MXFP4_BLOCK, MXFP4_BLOCK)
    amax = x.abs().amax(dim=-1, keepdim=True)
    # shared exponent: floor(log2(amax)) - 2, so the block's largest value lands in [4, 8) (E2M1's top is 6)
    exponent = torch.where(amax > 0, torch.floor(torch.log2(amax.clamp_min(2.0 ** -126))) - 2,
                           torch.full_like(amax, -127.0)).clamp(-127, 127)
    scaled = (x / torch.exp2(exponent)).clamp(-6.0, 6.0)
    midpoints = torch.tensor([(a + b) / 2 for a, b in zip(FP4_MAGNITUDES, FP4_MAGNITUDES[1:])])
    # the nearest magnitude, ties to the smaller
    codes = torch.bucketize(scaled.abs().contiguous(), midpoints).to(torch.uint8)
    codes = codes | ((scaled < 0).to(torch.uint8) << 3)
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    scales = (exponent.squeeze(-1) + 127).to(torch.uint8)
    return packed.contiguous(), scales.contiguous()


def fp8_encode(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight [R, C]`` -> ``(float8_e4m3fn [R, C], weight_scale_inv float32 [ceil(R/br), ceil(C/bc)])``."""
    rows, cols = weight.shape
    br, bc = block
    grid_r, grid_c = -(-rows // br), -(-cols // bc)
    padded = torch.zeros(grid_r * br, grid_c * bc)
    padded[:rows, :cols] = weight.float()
    tiles = padded.reshape(grid_r, br, grid_c, bc)
    scale = (tiles.abs().amax(dim=(1, 3)) / FP8_MAX).clamp_min(2.0 ** -40)
    q = (tiles / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).reshape(grid_r * br, grid_c * bc)
    return q[:rows, :cols].to(torch.float8_e4m3fn).contiguous(), scale.float().contiguous()
