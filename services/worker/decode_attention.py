"""``--attention-kernel fast``: one-token decode steps attend with moeinf's kernel (``attention.c``), not torch's.

torch's CPU attention for a single query (sdpa's flash kernel, or eager's matmuls) multiplies each head's query
by its keys in small bfloat16 matrix products whose fixed cost per call dominates: on the bench preset's shapes
(16 query heads over 4 key-value heads of 128) ~7 ms per layer at 2048 cached tokens, which is ~4 MiB of keys and
values, read at ~0.6 GB/s. The kernel reads each cached key and value once, in float32, for every query head that
shares it. Its sums run in another order than torch's, so logits differ from eager's in their last bits and a
close greedy choice can go the other way: off by default, and ``moeinf bench overhead --attention-kernel torch
fast`` prints the tokens' agreement and the largest logit difference against transformers.

It takes a step only where its result means the same: one request's single query, bfloat16 on the CPU, every
cached token visible (no mask, or one that hides nothing), no dropout, a scale given, and no attention extras it
does not compute (sinks, soft-capping, ALiBi, a head mask, ...: any keyword argument beyond the plain ones, when
set, declines); everything else goes to the model's own attention (so GPT-OSS's sinks and DeepSeek's latent
attention, whose values are narrower than its keys, keep theirs). The key-value heads are split over ``--threads``
only when there are at least two per thread.
"""
from __future__ import annotations

import ctypes
import logging

import torch

from services.worker import dequant_kernel
from services.worker.dequant_kernel import KernelError

log = logging.getLogger("moeinf.worker")
PLAIN_KWARGS = {"dropout", "scaling", "sliding_window", "is_causal", "position_ids", "cache_position",
                "output_attentions", "use_cache", "past_key_values", "cache"}  # (the window is in the mask)
TOLERANCE = 1e-2  # against float64 attention, relative to the output's largest value: a bfloat16 rounding


class DecodeAttention:
    def __init__(self, kernels):
        self.kernels = kernels
        self.used = 0  # decode attentions computed by the kernel (the tests read it)

    def __call__(self, module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask,
                 kwargs: dict) -> torch.Tensor | None:
        """The attention output as transformers' attention functions return it (``[1, 1, heads, d]``), or None
        where the kernel does not apply (the caller runs the model's own attention)."""
        if not self.applies(module, query, key, value, mask, kwargs):
            return None
        out = torch.empty(1, 1, query.shape[1], query.shape[-1], dtype=torch.bfloat16)
        try:
            attend(self.kernels, query[0, :, 0], key[0], value[0], float(kwargs["scaling"]), out[0, 0])
        except MemoryError:
            return None  # (its few buffers could not be allocated: the model's own attention runs)
        self.used += 1
        return out

    @staticmethod
    def applies(module, query, key, value, mask, kwargs: dict) -> bool:
        if query.shape[0] != 1 or query.shape[2] != 1 or key.shape[0] != 1 or query.device.type != "cpu":
            return False
        if any(t.dtype != torch.bfloat16 or t.stride(-1) != 1 for t in (query, key, value)) \
                or value.shape != key.shape or key.shape[-1] != query.shape[-1] or query.shape[1] % key.shape[1]:
            return False
        if kwargs.get("dropout") or getattr(module, "sinks", None) is not None or kwargs.get("scaling") is None:
            return False  # (no scale given: sdpa and eager each default their own way)
        if any(v is not None and v is not False for k, v in kwargs.items() if k not in PLAIN_KWARGS):
            return False  # an extra the kernel does not compute (softcap, s_aux, ...)
        return mask is None or _hides_nothing(mask, key.shape[-2])


def _hides_nothing(mask: torch.Tensor, tokens: int) -> bool:
    if not isinstance(mask, torch.Tensor) or mask.shape[-1] != tokens:
        return False
    return bool(mask.all()) if mask.dtype == torch.bool else bool((mask == 0).all())


def load(mode: str, state_dir, threads: int) -> DecodeAttention | None:
    """``--attention-kernel`` (checked by ``WorkerConfig``): None for torch's attention; for ``fast`` the compiled,
    checked kernel (or a start-up error that names the flag)."""
    if mode == "torch":
        return None
    kernels = dequant_kernel.load("c", state_dir, threads, check=check, flag="--attention-kernel fast",
                                  advice="pass --attention-kernel torch")
    log.info("--attention-kernel fast: one-token decode steps attend with attention.c (not eager's bits)")
    return DecodeAttention(kernels)


def check(kernels) -> None:
    """The kernel within a bfloat16 rounding of float64 attention: grouped and plain heads, head sizes 64 to 128
    (multiples of 16 or not), 1 to 300 tokens, key-value views with spare room (a cache's)."""
    p, i = ctypes.c_void_p, ctypes.c_int64  # (the kernel's signature, declared here: check runs before any use)
    kernels.lib.moeinf_attn_decode.argtypes = [p, i, p, i, i, p, i, i, i, i, i, i, ctypes.c_float, p, i, i, i]
    kernels.lib.moeinf_attn_decode.restype = ctypes.c_int
    gen = torch.Generator().manual_seed(0)
    for heads, kv_heads, d, tokens in ((16, 4, 128, 300), (8, 8, 64, 1), (4, 2, 64, 65), (6, 3, 80, 7), (2, 1, 72, 9)):
        query = torch.randn(heads, d, generator=gen).bfloat16()
        room = torch.randn(2, kv_heads, tokens + 9, d, generator=gen).bfloat16()
        key, value = room[0, :, :tokens], room[1, :, :tokens]
        out = torch.empty(heads, d, dtype=torch.bfloat16)
        attend(kernels, query, key, value, d ** -0.5, out)
        want = reference(query, key, value, d ** -0.5)
        if (out.double() - want).abs().max() > TOLERANCE * want.abs().max():
            raise KernelError(f"attention.c differs from float64 attention here ({heads} heads over {kv_heads},"
                              f" {d} wide, {tokens} tokens)")


def attend(kernels, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float,
           out: torch.Tensor) -> None:
    """``attention.c`` (in ``kernels``' library): ``query`` [heads, d], ``key`` / ``value`` [kv heads, tokens, d]
    (any head and token strides: a cache's views), bfloat16, into ``out`` [heads, d] (bfloat16, rows contiguous);
    the key-value heads split over the kernels' threads."""
    (hq, d), (hkv, s, _) = query.shape, key.shape
    tensors = (query, key, value, out)
    if any(t.dtype != torch.bfloat16 or t.stride(-1) != 1 for t in tensors) or hq % hkv or value.shape != key.shape \
            or key.shape[-1] != d or out.shape != query.shape:
        raise ValueError("decode attention kernel: " + ", ".join(f"{list(t.shape)} {t.dtype}" for t in tensors))
    fn, failed = kernels.lib.moeinf_attn_decode, []
    q, k, v, o = (t.data_ptr() for t in tensors)

    def run(lo: int, hi: int) -> None:
        if fn(q, query.stride(0), k, key.stride(0), key.stride(1), v, value.stride(0), value.stride(1), hq, hkv, s, d,
              scale, o, out.stride(0), lo, hi):
            failed.append(lo)
    kernels.split(hkv, run)
    if failed:
        raise MemoryError("attention.c: no memory for its buffers")


def reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    """float64 attention of ``query`` [heads, d] over ``key`` / ``value`` [kv heads, tokens, d]."""
    rep = query.shape[0] // key.shape[0]
    k, v = key.double().repeat_interleave(rep, 0), value.double().repeat_interleave(rep, 0)
    weights = torch.softmax(torch.einsum("hd,htd->ht", query.double(), k) * scale, dim=-1)
    return torch.einsum("ht,htd->hd", weights, v)
