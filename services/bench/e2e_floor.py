"""``bench e2e``'s compute floor: the weights one decode token reads, over the best matrix-vector bandwidth measured on
this machine at the run's start.

No system decodes a token faster than it can stream the weights the token uses once: the dense weights (all but the
input embedding, of which a token reads one row; a tied embedding is the LM head's and counts whole) and ``top_k``
experts of every MoE layer, as the checkpoint stores them. The bandwidth is ``bench profile``'s floor
(``profile_parts.bandwidth_floor``: the fastest of ``F.linear``, oneDNN on a weight packed once and moeinf's own
kernels over a weight twice the largest CPU cache) on the threads the systems compute with. Where a count is
uncertain it is low (a quantized dense weight the worker widens counts as stored; the embedding's one row is left
out), so the floor stays a floor. An encoder-decoder model's encoder does not run per decode token: no floor there.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

FLOOR_RUNS = 5


@dataclass(frozen=True, slots=True)
class ComputeFloor:
    bytes_per_token: int
    gbps: float  # the best matrix-vector bandwidth measured
    threads: int

    @property
    def ms(self) -> float:
        return self.bytes_per_token / (self.gbps * 1e9) * 1e3

    def describe(self) -> str:
        return (f"{self.bytes_per_token / 2**20:.1f} MiB of weights per decode token at {self.gbps:.2f} GB/s"
                f" ({self.threads} thread(s)) = {self.ms:.1f} ms")

    def as_json(self) -> dict:
        return {"bytes_per_token": self.bytes_per_token, "gbps": self.gbps, "threads": self.threads, "ms": self.ms}


def decode_bytes(model: Path) -> int | None:
    """The weights one decode token reads, from the checkpoint's headers (None for an encoder-decoder model)."""
    from common.checkpoint import Checkpoint
    from services.memd.store import ExpertStore

    checkpoint = Checkpoint(model)
    store = ExpertStore(checkpoint)
    text = checkpoint.load_config()
    if getattr(text, "is_encoder_decoder", False):
        return None
    text = text.get_text_config()
    dense = sum(entry.nbytes for entry in checkpoint.tensors.values()) - store.total_expert_bytes
    vocab, hidden = getattr(text, "vocab_size", None), getattr(text, "hidden_size", None)
    tables = [e.nbytes for e in checkpoint.tensors.values() if e.shape == (vocab, hidden)]
    if len(tables) > 1:  # an input embedding apart from the LM head: one row of it is read
        dense -= min(tables)
    per_expert = store.total_expert_bytes // (store.num_layers * store.num_experts)
    return dense + store.top_k * store.num_layers * per_expert


def measure(model: Path, threads: int, buffer_bytes: int) -> ComputeFloor | None:
    """The floor for ``model`` on ``threads`` torch threads (0: torch's default), measured now over a weight of
    ``buffer_bytes`` (``--floor-probe``: larger than the CPU's caches, so that it streams from memory)."""
    import torch

    from services.bench.profile import floor_kernels
    from services.bench.profile_parts import bandwidth_floor

    nbytes = decode_bytes(model)
    if nbytes is None:
        return None
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        used = torch.get_num_threads()
        floor = bandwidth_floor(buffer_bytes, FLOOR_RUNS, kernels=floor_kernels(used))
    finally:
        torch.set_num_threads(before)
    return ComputeFloor(nbytes, floor.gb_per_s, used)
