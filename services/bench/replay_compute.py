"""The per-layer compute ``bench replay`` waits between acquires, when ``--layer-compute-ms`` is not given.

Measured now, on this machine, for the store memd serves (its ``config.json``: a Mixtral config, whether a real
checkpoint or the generated store): one decode token through one MoE layer's routed experts (``top_k`` SwiGLU
experts of ``hidden x intermediate``, float32 torch matmuls: the worker's expert path), the median of ``REPEATS``
timed runs. Attention and the dense parts of a layer are not counted, so this is a lower bound on a layer's time:
the stall ``bench replay`` reports is, if anything, pessimistic for prefetching (less compute to hide reads under).
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
    experts = [(torch.randn(inter, hidden, generator=gen), torch.randn(inter, hidden, generator=gen),
                torch.randn(hidden, inter, generator=gen)) for _ in range(top_k)]
    x = torch.randn(1, hidden, generator=gen)
    times = []
    with torch.inference_mode():
        for i in range(WARMUP + REPEATS):
            start = time.perf_counter()
            out = torch.zeros_like(x)
            for w1, w3, w2 in experts:
                out += (torch.nn.functional.silu(x @ w1.T) * (x @ w3.T)) @ w2.T
            if i >= WARMUP:
                times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return LayerCompute(seconds, f"measured now: {top_k} experts of {hidden}x{inter}, one decode token, float32 torch"
                                 f" on this CPU, median of {REPEATS} (experts only: a lower bound on a layer)")
