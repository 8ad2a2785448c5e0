"""``bench e2e``'s compute floor: the weights one decode token reads, over the best matrix-vector bandwidth measured on
this machine at the run's start.

moeinf's worker decodes no token faster than it can stream the weights the token uses once: the dense weights it
holds (all but the embedding tables, of which a token reads one row; a tied embedding is the LM head's and counts
whole) and ``top_k`` experts of every MoE layer, as the checkpoint stores them. The bandwidth is ``bench profile``'s
floor (``profile_parts.bandwidth_floor``: the fastest of ``F.linear``, oneDNN on a weight packed once and moeinf's own
kernels over a weight larger than the CPU's caches) on the threads the systems compute with. It is a floor for what
moeinf reads: a runtime that reads fewer bytes (llama.cpp on a quantized GGUF) can go below it, and so can a model
whose weights fit in the CPU's caches (the tests' tiny ones). An encoder-decoder model's encoder does not run per
decode token: no floor there.
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
    """The weights one decode token reads (None for an encoder-decoder model), counted on the model transformers
    builds for the checkpoint (on the meta device, in the worker's dtype), so that tensors the model never loads
    (multi-token-prediction layers, another modality's tower) are not counted: its non-expert parameters, less every
    embedding table but the LM head's (a token reads one row of each: the row is left out), plus ``top_k`` experts
    per MoE layer as the checkpoint stores them (memd's index)."""
    import torch

    from common.checkpoint import Checkpoint, find_moe_layers
    from services.memd.store import ExpertStore
    from services.worker.loader import build_skeleton

    checkpoint = Checkpoint(model)
    config = checkpoint.load_config()
    if getattr(config, "is_encoder_decoder", False):
        return None
    skeleton = build_skeleton(config, "grouped_mm")  # (the structure; which kernel runs the experts is moot)
    experts = {id(p) for layer in find_moe_layers(skeleton)
               for p in skeleton.get_submodule(layer.module).parameters()}
    head = skeleton.get_output_embeddings()
    decoder = skeleton.get_decoder()  # the text decoder: no vision or audio tower (Gemma 4's conditional model)
    params = {id(p): p for module in (decoder, head) if module is not None for p in module.parameters()}
    head = head.weight if head is not None else None
    tables = {id(m.weight) for m in decoder.modules() if isinstance(m, torch.nn.Embedding) and m.weight is not head}
    dense = sum(p.numel() * p.element_size() for key, p in params.items() if key not in experts and key not in tables)
    store = ExpertStore(checkpoint)
    return dense + store.top_k * store.num_layers * store.expert_bytes


def measure(model: Path, threads: int, buffer_bytes: int) -> ComputeFloor | None:
    """The floor for ``model`` on ``threads`` torch threads (0: torch's default), measured now over a weight of
    ``buffer_bytes`` (``--floor-probe``: larger than the CPU's caches, so that it streams from memory)."""
    import torch

    from common.checkpoint import CheckpointError
    from services.bench.profile import floor_kernels
    from services.bench.profile_parts import bandwidth_floor

    try:
        nbytes = decode_bytes(model)
    except CheckpointError:  # (no experts to offload: the systems say so themselves)
        return None
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
