"""The per-layer compute ``bench replay`` waits between acquires, when ``--layer-compute-ms`` is not given.

Measured now, on this machine, for the store memd serves (its ``config.json``: a Mixtral config, whether a real
checkpoint or the generated store): one decode token through one MoE layer's routed experts (``top_k`` SwiGLU
experts of ``hidden x intermediate``, bfloat16 weights through the worker's matrix-vector kernel, ``matvec.c``,
where it builds here, else torch's ``F.linear``: the bytes a decode step streams, at the worker's speed), the median
of ``REPEATS`` timed runs. Attention and the dense parts of a layer are not counted, so this is a lower bound on a
layer's time: the stall ``bench replay`` reports is, if anything, pessimistic for prefetching (less compute to hide
reads under). (Until 7 December it timed float32 matmuls, twice the bytes: a longer layer, which favoured
prefetching.)
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

REPEATS, WARMUP = 30, 5


@dataclass(frozen=True, slots=True)
class LayerCompute:
    seconds: float
    source: str  # how it was obtained, for the output


def given(ms: float) -> LayerCompute:
    return LayerCompute(ms / 1e3, "--layer-compute-ms")


def measure(store: Path) -> LayerCompute:
    import torch

    cfg = json.loads((Path(store) / "config.json").read_text())
    hidden, inter, top_k = cfg["hidden_size"], cfg["intermediate_size"], cfg.get("num_experts_per_tok", 2)
    gen = torch.Generator().manual_seed(0)
    experts = [tuple(torch.randn(shape, generator=gen).to(torch.bfloat16)
                     for shape in ((2 * inter, hidden), (hidden, inter))) for _ in range(top_k)]
    x = torch.randn(1, hidden, generator=gen).to(torch.bfloat16)
    product, how = _product()
    times = []
    with torch.inference_mode():
        for i in range(WARMUP + REPEATS):
            start = time.perf_counter()
            out = torch.zeros(1, hidden)
            for gate_up, down in experts:
                gate, up = product(gate_up, x).chunk(2, dim=-1)
                out += product(down, (torch.nn.functional.silu(gate) * up).to(torch.bfloat16))
            if i >= WARMUP:
                times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return LayerCompute(seconds, f"measured now: {top_k} experts of {hidden}x{inter}, one decode token, bfloat16 by"
                                 f" {how} on this CPU, median of {REPEATS} (experts only: a lower bound on a layer)")


def _product():
    """``(weight, x) -> float32 x @ weight.T``: the worker's fast matrix-vector kernel where it builds, else torch."""
    import tempfile

    import torch
    import torch.nn.functional as F

    from services.worker import dequant_kernel, matvec_checks

    with tempfile.TemporaryDirectory() as scratch:
        try:
            kernels = dequant_kernel.load("c", Path(scratch), torch.get_num_threads(), check=matvec_checks.check,
                                          flag="bench replay's layer compute")
        except dequant_kernel.KernelError:
            kernels = None
    if kernels is None or not kernels.matvec_fast:
        return (lambda w, x: F.linear(x, w).float()), "torch's F.linear"

    def product(w, x):
        out = torch.empty(x.shape[0], w.shape[0])
        kernels.matvec(w, x, out)
        return out
    return product, "the worker's kernel (matvec.c)"
