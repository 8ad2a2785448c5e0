"""``--attention-kernel``: one-token decode steps attend with moeinf's kernels, not torch's.

torch's CPU attention for a single bfloat16 query (sdpa's flash kernel) multiplies each head's query by its keys
in general matrix products whose cost per call dominates (on this VM MKL takes its generic code): on the bench
preset's shapes (16 query heads over 4 key-value heads of 128) ~0.1 ms per layer at 32 cached tokens, ~0.9 ms at
256, ~7 ms at 2048, which is ~4 MiB of keys and values read at ~0.6 GB/s. Two kernels read each cached key and
value once for every query head that shares it:

- ``exact`` (``attention_exact.c``; ``auto``, the default, takes it where its check holds): torch's own bits. It
  computes what sdpa computes, in sdpa's order (MKL's sums, ATen's fast exponential and its sums), and is used only
  after ``check_exact`` found its output equal to sdpa's bit for bit on this machine (another torch, MKL or CPU:
  ``auto`` keeps torch's attention, ``exact`` fails at start). It takes a step only where the model's own attention
  is transformers' sdpa and would call the flash kernel one head at a time: no mask (a mask, even one that hides
  nothing, makes transformers pack a group's heads into one product of several rows, summed in another order) and,
  for grouped heads, a head size of at most 256.
- ``fast`` (``attention.c``): float32 sums in another order, so logits differ from eager's in their last bits and a
  close greedy choice can go the other way: opt-in, and ``moeinf bench overhead --attention-kernel torch fast``
  prints the tokens' agreement and the largest logit difference against transformers.

Either takes a step only where its result means the same: one request's single query, bfloat16 on the CPU, every
cached token visible (no mask, or, for ``fast``, one that hides nothing), no dropout, a scale given, and no
attention extras it does not compute (sinks, soft-capping, ALiBi, a head mask, ...: any keyword argument beyond the
plain ones, when set, declines); everything else goes to the model's own attention (so GPT-OSS's sinks and
DeepSeek's latent attention, whose values are narrower than its keys, keep theirs). The key-value heads are split
over ``--threads`` (in C where the kernels share torch's OpenMP runtime) when there are at least two per thread.
"""
from __future__ import annotations

import ctypes
import logging

import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from services.worker import dequant_kernel
from services.worker.dequant_kernel import KernelError

log = logging.getLogger("moeinf.worker")
PLAIN_KWARGS = {"dropout", "scaling", "sliding_window", "is_causal", "position_ids", "cache_position",
                "output_attentions", "use_cache", "past_key_values", "cache"}  # (the window is in the mask)
TOLERANCE = 1e-2  # against float64 attention, relative to the output's largest value: a bfloat16 rounding
EXACT_CASES = ((16, 4, 128, 45), (16, 4, 128, 600), (8, 8, 64, 17), (6, 3, 80, 33), (4, 1, 256, 7), (2, 2, 66, 5),
               (8, 2, 128, 1))  # check_exact's (heads, kv heads, head size, tokens): two blocks of 512; d % 4 != 0
MODES = ("auto", "torch", "exact", "fast")


class DecodeAttention:
    def __init__(self, kernels, exact: bool = False):
        self.kernels, self.exact = kernels, exact  # exact: attention_exact.c (sdpa's bits), else attention.c
        self.used = 0  # decode attentions computed by the kernel (the tests read it)

    def __call__(self, module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask, kwargs: dict,
                 own=None) -> torch.Tensor | None:
        """The attention output as transformers' attention functions return it (``[1, 1, heads, d]``), or None
        where the kernel does not apply (the caller runs the model's own attention, ``own``)."""
        if not self.applies(module, query, key, value, mask, kwargs):
            return None
        if self.exact and not self.gives_sdpas_bits(module, query, key, mask, own):
            return None
        out = torch.empty(1, 1, query.shape[1], query.shape[-1], dtype=torch.bfloat16)
        try:
            (attend_exact if self.exact else attend)(self.kernels, query[0, :, 0], key[0], value[0],
                                                     float(kwargs["scaling"]), out[0, 0])
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


    @staticmethod
    def gives_sdpas_bits(module, query: torch.Tensor, key: torch.Tensor, mask, own) -> bool:
        """Whether the model's own attention (``own``) is transformers' sdpa calling the flash kernel once per head,
        whose bits ``attention_exact.c`` computes."""
        if own is not sdpa_attention_forward or mask is not None:  # (a mask: a group's heads as one product)
            return False
        grouped = query.shape[1] != key.shape[1]
        return not grouped or (getattr(module, "num_key_value_groups", 1) > 1 and key.shape[-1] <= 256)


def _hides_nothing(mask: torch.Tensor, tokens: int) -> bool:
    if not isinstance(mask, torch.Tensor) or mask.shape[-1] != tokens:
        return False
    return bool(mask.all()) if mask.dtype == torch.bool else bool((mask == 0).all())


def load(mode: str, state_dir, threads: int) -> DecodeAttention | None:
    """``--attention-kernel`` (checked by ``WorkerConfig``): None for torch's attention; for ``exact`` or ``fast``
    the compiled, checked kernel (or a start-up error that names the flag); for ``auto`` the exact kernel where it
    builds and checks out, else None (said in the log)."""
    if mode not in MODES:
        raise ValueError(f"--attention-kernel must be one of {', '.join(MODES)}, not {mode!r}")
    if mode == "torch":
        return None
    exact = mode != "fast"
    kernels = dequant_kernel.load("auto" if mode == "auto" else "c", state_dir, threads,
                                  check=check_exact if exact else check, flag=f"--attention-kernel {mode}",
                                  advice="pass --attention-kernel torch",
                                  fallback="decode steps attend with the model's own attention")
    if kernels is None:
        return None
    log.info("--attention-kernel %s: one-token decode steps attend with %s", mode,
             "attention_exact.c (sdpa's bits, checked)" if exact else "attention.c (not eager's bits)")
    return DecodeAttention(kernels, exact)


def check(kernels) -> None:
    """The kernel within a bfloat16 rounding of float64 attention: grouped and plain heads, head sizes 64 to 128
    (multiples of 16 or not), 1 to 300 tokens, key-value views with spare room (a cache's)."""
    _declare(kernels.lib)
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


def check_exact(kernels) -> None:
    """``attention_exact.c`` against torch's sdpa as transformers calls it, bit for bit: grouped and plain heads,
    head sizes 64 to 256 (multiples of 4 or not), 1 to 600 tokens (two blocks), key-value views with spare room."""
    _declare(kernels.lib)
    gen = torch.Generator().manual_seed(0)
    for heads, kv_heads, d, tokens in EXACT_CASES:
        query = torch.randn(1, heads, 1, d, generator=gen).bfloat16()
        room = (2 * torch.randn(2, 1, kv_heads, tokens + 9, d, generator=gen)).bfloat16()
        key, value = room[0, :, :, :tokens], room[1, :, :, :tokens]
        want = F.scaled_dot_product_attention(query, key, value, scale=d ** -0.5, enable_gqa=heads != kv_heads)
        out = torch.empty(heads, d, dtype=torch.bfloat16)
        attend_exact(kernels, query[0, :, 0], key[0], value[0], d ** -0.5, out)
        if not torch.equal(out.view(torch.int16), want[0, :, 0].contiguous().view(torch.int16)):
            raise KernelError(f"attention_exact.c does not give torch's sdpa bits here ({heads} heads over"
                              f" {kv_heads}, {d} wide, {tokens} tokens; another torch, MKL or CPU)")


def attend_exact(kernels, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float,
                 out: torch.Tensor) -> None:
    """``attention_exact.c``, as ``attend`` calls ``attention.c``; the key-value heads shared among the kernels'
    threads in C (``Kernels.rows``)."""
    _validate(query, key, value, out)
    (hq, d), (hkv, s, _) = query.shape, key.shape
    fn, failed = kernels.lib.moeinf_attn_exact, []
    q, k, v, o = (t.data_ptr() for t in (query, key, value, out))

    def run(lo: int, hi: int, threads: int) -> None:
        if fn(q, query.stride(0), k, key.stride(0), key.stride(1), v, value.stride(0), value.stride(1), hq, hkv, s, d,
              scale, o, out.stride(0), lo, hi, threads):
            failed.append(lo)
    kernels.rows(hkv, run)
    if failed:
        raise MemoryError("attention_exact.c: no memory for its buffers")


def _declare(lib) -> None:
    """The kernels' signatures (declared here: a check runs before any use)."""
    p, i = ctypes.c_void_p, ctypes.c_int64
    lib.moeinf_attn_decode.argtypes = [p, i, p, i, i, p, i, i, i, i, i, i, ctypes.c_float, p, i, i, i]
    lib.moeinf_attn_decode.restype = ctypes.c_int
    lib.moeinf_attn_exact.argtypes = [*lib.moeinf_attn_decode.argtypes, i]
    lib.moeinf_attn_exact.restype = ctypes.c_int


def _validate(query, key, value, out) -> None:
    tensors = (query, key, value, out)
    if any(t.dtype != torch.bfloat16 or t.stride(-1) != 1 for t in tensors) or query.shape[0] % key.shape[0] \
            or value.shape != key.shape or key.shape[-1] != query.shape[-1] or out.shape != query.shape:
        raise ValueError("decode attention kernel: " + ", ".join(f"{list(t.shape)} {t.dtype}" for t in tensors))


def attend(kernels, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float,
           out: torch.Tensor) -> None:
    """``attention.c`` (in ``kernels``' library): ``query`` [heads, d], ``key`` / ``value`` [kv heads, tokens, d]
    (any head and token strides: a cache's views), bfloat16, into ``out`` [heads, d] (bfloat16, rows contiguous);
    the key-value heads split over the kernels' threads."""
    _validate(query, key, value, out)
    (hq, d), (hkv, s, _) = query.shape, key.shape
    fn, failed = kernels.lib.moeinf_attn_decode, []
    q, k, v, o = (t.data_ptr() for t in (query, key, value, out))

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
