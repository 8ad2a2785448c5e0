"""Encoding float weights into the quantized formats moeinf serves, as the released checkpoints store them.

- MXFP4 (OCP microscaling, GPT-OSS): 32 values share one power-of-two scale. ``*_blocks`` is uint8
  ``[..., K / 32, 16]`` (two E2M1 values per byte, the even element in the low nibble), ``*_scales`` is uint8
  ``[..., K / 32]`` holding the biased exponent (``2 ** (byte - 127)``).
- Block FP8 (DeepSeek-V3, Qwen3 "-FP8"): ``weight`` is float8_e4m3fn, ``weight_scale_inv`` is float32 with one
  value per ``weight_block_size`` block, by which the FP8 values are multiplied to dequantize.

NumPy only (``ml_dtypes`` supplies bfloat16 and float8_e4m3fn), so memd converts experts for ``--expert-format``
without torch; ``common/quant_write.py`` wraps these for torch tensors (the demo-model writer, the tests'
checkpoint writers). The decoders live with the worker (``services/worker/quant.py``).
"""
from __future__ import annotations

import ml_dtypes
import numpy as np

MXFP4_BLOCK = 32
FP4_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # E2M1 codes 0..7; code | 8 is the negative
FP8_MAX = 448.0  # largest finite float8_e4m3fn
_FP4_MIDPOINTS = np.array([(a + b) / 2 for a, b in zip(FP4_MAGNITUDES, FP4_MAGNITUDES[1:])], dtype=np.float32)
_DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float8_e4m3fn": ml_dtypes.float8_e4m3fn, "float16": np.float16,
           "float32": np.float32, "float64": np.float64, "uint8": np.uint8, "int8": np.int8}


def numpy_dtype(name: str) -> np.dtype:
    """The NumPy dtype of a torch dtype name as checkpoints and slot layouts spell it (``"bfloat16"``, ...)."""
    try:
        return np.dtype(_DTYPES[name])
    except KeyError:
        raise ValueError(f"no NumPy dtype for {name!r}; known: {', '.join(_DTYPES)}") from None


def mxfp4_encode(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``weight [..., K]`` (K a multiple of 32) -> ``(blocks uint8 [..., K/32, 16], scales uint8 [..., K/32])``."""
    *prefix, k = weight.shape
    if k % MXFP4_BLOCK:
        raise ValueError(f"MXFP4 needs the last dimension to be a multiple of {MXFP4_BLOCK}, got {k}")
    x = np.asarray(weight, dtype=np.float32).reshape(*prefix, k // MXFP4_BLOCK, MXFP4_BLOCK)
    amax = np.abs(x).max(axis=-1, keepdims=True)
    # shared exponent: floor(log2(amax)) - 2, so the block's largest value lands in [4, 8) (E2M1's top is 6);
    # frexp gives floor(log2) exactly (amax = m * 2**e, m in [0.5, 1))
    exponent = np.where(np.isinf(amax), 127, np.where(amax > 0, np.frexp(amax)[1] - 3, -127)).clip(-127, 127)
    scaled = np.ldexp(x, -exponent).clip(-6.0, 6.0)
    # the nearest magnitude, ties to the smaller: the number of midpoints strictly below the value
    magnitude = np.abs(scaled)
    codes = np.zeros(magnitude.shape, dtype=np.uint8)
    for midpoint in _FP4_MIDPOINTS:
        codes += magnitude > midpoint
    codes |= (scaled < 0).astype(np.uint8) << 3
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    scales = (exponent[..., 0] + 127).astype(np.uint8)
    return np.ascontiguousarray(packed), np.ascontiguousarray(scales)


def fp8_encode(weight: np.ndarray, block: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """``weight [R, C]`` -> ``(float8_e4m3fn [R, C], weight_scale_inv float32 [ceil(R/br), ceil(C/bc)])``."""
    rows, cols = weight.shape
    br, bc = block
    grid_r, grid_c = -(-rows // br), -(-cols // bc)
    padded = np.zeros((grid_r * br, grid_c * bc), dtype=np.float32)
    padded[:rows, :cols] = np.asarray(weight, dtype=np.float32)
    tiles = padded.reshape(grid_r, br, grid_c, bc)
    scale = np.maximum(np.abs(tiles).max(axis=(1, 3)) / np.float32(FP8_MAX), np.float32(2.0 ** -40))
    q = (tiles / scale[:, None, :, None]).clip(-FP8_MAX, FP8_MAX).reshape(grid_r * br, grid_c * bc)
    return np.ascontiguousarray(q[:rows, :cols].astype(ml_dtypes.float8_e4m3fn)), scale.astype(np.float32)
