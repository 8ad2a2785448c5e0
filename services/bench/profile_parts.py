"""The measuring parts of ``moeinf bench profile``: per-layer module timers, bytes touched per token, and the
machine's bandwidth floor.

``LayerTimers`` puts a forward pre/post hook pair on the parts of every decoder layer that do the work: its
norms, its attention, its router and its experts module (and the embedding, the final norm and the LM head
outside the layers). The hooks nest nowhere (only direct children of a layer and of its MoE block are timed),
so the parts add up; what the step costs beyond them is Python and dispatch (the layers' own glue, the
engine, sampling). The hooks cost a few microseconds each, which lands in that remainder: the profile also
times the same decode without hooks, and prints both.
"""
from __future__ import annotations

import re
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from services.worker import layouts, prepack

KINDS = ("attention", "norms", "router", "experts")
OUTSIDE = ("embed", "final norm", "lm head")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)$")


def _layer_modules(model) -> dict[int, torch.nn.Module]:
    out = {}
    for name, module in model.named_modules():
        match = _LAYER.search(name)
        if match:
            out[int(match.group(1))] = module
    return out


def layer_indices(model) -> list[int]:
    return sorted(_layer_modules(model))


def _kind(name: str, child, experts: set[int]) -> str | None:
    cls = type(child).__name__
    if id(child) in experts:
        return "experts"
    if "Norm" in cls:
        return "norms"
    if cls.endswith("Attention"):
        return "attention"
    if "Router" in cls or "Gate" in cls or name in ("gate", "router"):
        return "router"
    return None


def classify(model, expert_modules: list[torch.nn.Module]) -> list[tuple[int | None, str, torch.nn.Module]]:
    """``(layer or None, kind, module)`` for every timed part: a decoder layer's norms and attention, its MoE
    block's router and experts; the embedding, final norm and LM head."""
    experts = {id(m) for m in expert_modules}
    parts = []
    for index, layer in sorted(_layer_modules(model).items()):
        for name, child in layer.named_children():
            kind = _kind(name, child, experts)
            if kind is not None and kind != "router":
                parts.append((index, kind, child))
                continue
            for sub_name, sub in child.named_children():  # the MoE block: router and experts
                sub_kind = _kind(sub_name, sub, experts)
                if sub_kind in ("router", "experts"):
                    parts.append((index, sub_kind, sub))
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(base, "model", base)
    for kind, module in (("embed", model.get_input_embeddings()), ("final norm", getattr(inner, "norm", None)),
                         ("lm head", model.get_output_embeddings())):
        if module is not None:
            parts.append((None, kind, module))
    return parts


class LayerTimers:
    """Forward hooks that add each timed part's wall time to ``seconds[(layer, kind)]``."""

    def __init__(self, model, expert_modules: list[torch.nn.Module]):
        self.seconds: dict[tuple[int | None, str], float] = defaultdict(float)
        self.handles = []
        self.parts = classify(model, expert_modules)
        for layer, kind, module in self.parts:
            self._hook(module, (layer, kind))

    def _hook(self, module, key) -> None:
        started = []

        def pre(_module, _args):
            started.append(time.perf_counter())

        def post(_module, _args, _out):
            self.seconds[key] += time.perf_counter() - started.pop()

        self.handles.append(module.register_forward_pre_hook(pre))
        self.handles.append(module.register_forward_hook(post))

    def reset(self) -> None:
        self.seconds.clear()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()



# ---------------------------------------------------------------------------------------------------- bytes
@dataclass(frozen=True)
class TokenBytes:
    """What one decode token reads: the dense weights (one embedding row), the routed experts, the KV cache."""

    dense: int
    experts: int
    kv_cache: int

    @property
    def weights(self) -> int:
        return self.dense + self.experts

    def as_json(self) -> dict:
        return {"dense": self.dense, "experts": self.experts, "kv_cache": self.kv_cache, "weights": self.weights}


def dense_bytes(model, expert_modules: list[torch.nn.Module]) -> int:
    """Resident non-expert weights one decode token reads: all of them, but one row of the input embedding
    (unless it is also the LM head, which reads it whole)."""
    skip = {id(p) for module in expert_modules for p in module.parameters()}
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == embed.data_ptr()
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) in skip or p.is_meta or p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
    if not tied:
        total -= embed.numel() * embed.element_size() - embed.shape[1] * embed.element_size()
    return total


def kv_bytes(model, context: int) -> int:
    """Keys and values of ``context`` tokens in every layer, in the model's dtype."""
    text = model.config.get_text_config()
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return 2 * text.num_hidden_layers * heads * head_dim * context * model.dtype.itemsize


# ---------------------------------------------------------------------------------------------------- the floor
def l3_bytes() -> int:
    """The largest CPU cache on this machine (0 when sysfs does not say)."""
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = path.read_text().strip()
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        sizes.append(int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text))
    return max(sizes, default=0)


@dataclass(frozen=True)
class Floor:
    buffer_bytes: int
    runs: int
    gb_per_s: float  # best of the runs

    def ms_per_token(self, nbytes: int) -> float:
        return nbytes / (self.gb_per_s * 1e9) * 1e3


def bandwidth_floor(buffer_bytes: int, runs: int, dtype=torch.bfloat16, width: int = 4096, kernels=None) -> Floor:
    """The fastest matrix-vector product we have over a ``[rows, width]`` weight of ``buffer_bytes`` (more than
    the largest cache, so it streams from memory): ``F.linear``, and for bfloat16 also oneDNN on the weight packed
    once (``services/worker/prepack.py``: ``F.linear`` repacks at every call, so a floor from it alone is one that
    ``--prepack-dense`` could beat) and ``--matvec-kernel``'s own kernels, fast and exact (``kernels``:
    ``dequant_kernel.Kernels``, where this CPU runs them); each on the weight's rows as stored and spread apart as
    the worker and memd lay such rows (``layouts.spread_rows``: 8 KiB rows read slower packed). Bytes / seconds of
    the best of ``runs`` of each (one untimed first)."""
    rows = max(buffer_bytes // (width * dtype.itemsize), 1)
    x = torch.randn(1, width, dtype=dtype)
    best = float("inf")
    for pad in (0, layouts.SPREAD_BYTES // dtype.itemsize):  # one weight at a time: each is as large as the cache x2
        weight = torch.empty(rows, width + pad, dtype=dtype)[:, :width].normal_()
        best = min(best, _fastest(_products(weight, x, kernels), runs))
        del weight
    return Floor(rows * width * dtype.itemsize, runs, rows * width * dtype.itemsize / best / 1e9)


class FloorStep:
    """The floor's fastest product (``bandwidth_floor``'s candidates, each layout, best of ``probe`` runs), kept to
    run once between the lockstep's steps: the floor measured at the moments the steps ran too, since a shared
    machine's neighbours slow both alike, where the best of a few runs at the end catches its quietest moment."""

    def __init__(self, buffer_bytes: int, kernels, probe: int = 3, dtype=torch.bfloat16, width: int = 4096):
        rows = max(buffer_bytes // (width * dtype.itemsize), 1)
        self.x, self.nbytes, self.seconds = torch.randn(1, width, dtype=dtype), rows * width * dtype.itemsize, []
        weight = lambda pad: torch.empty(rows, width + pad, dtype=dtype)[:, :width].normal_()  # noqa: E731
        best, self.choice = float("inf"), (0, 0)
        for pad in (0, layouts.SPREAD_BYTES // dtype.itemsize):  # one weight at a time, as ``bandwidth_floor``
            products = _products(weight(pad), self.x, kernels)
            for i, product in enumerate(products):
                if (took := _fastest([product], probe)) < best:
                    best, self.choice = took, (pad, i)
            del products, product  # (each holds the weight)
        self.product = _products(weight(self.choice[0]), self.x, kernels)[self.choice[1]]  # (it holds its weight)

    def run(self) -> None:
        with torch.inference_mode():
            start = time.perf_counter()
            self.product()
            self.seconds.append(time.perf_counter() - start)

    def gb_per_s(self) -> float:
        """The median run's throughput."""
        return self.nbytes / statistics.median(self.seconds) / 1e9

    def best_gb_per_s(self) -> float:
        """The fastest run's throughput (a moment of the run the floor at the end may not catch)."""
        return self.nbytes / min(self.seconds) / 1e9


def _products(weight: torch.Tensor, x: torch.Tensor, kernels) -> list:
    products = [lambda: F.linear(x, weight)]
    if weight.dtype == torch.bfloat16 and prepack.available():
        packed = prepack.pack(weight)
        products.append(lambda: prepack.packed_mm(x, packed))
    if weight.dtype == torch.bfloat16 and kernels is not None and kernels.matvec_fast:
        out = torch.empty(1, weight.shape[0])
        products.append(lambda: kernels.matvec(weight, x, out))
        if kernels.matvec_exact_avx2:
            products.append(lambda: kernels.matvec(weight, x, out, exact=True))
        if kernels.matvec_exact_onednn:  # in oneDNN's order (its blocks change the sums, not the speed)
            products.append(lambda: kernels.matvec(weight, x, out, exact=True, block=512))
    return products


def _fastest(products: list, runs: int) -> float:
    """Seconds of the fastest of ``runs`` calls of any of ``products`` (each called once untimed first)."""
    best = float("inf")
    with torch.inference_mode():
        for product in products:
            product()
            for _ in range(runs):
                start = time.perf_counter()
                product()
                best = min(best, time.perf_counter() - start)
    return best
