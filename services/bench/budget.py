"""The memory limit of ``moeinf bench e2e``: one number per expert-memory setting, the same for every system.

    limit = dense weights + expert memory + runtime allowance

* dense weights: every checkpoint tensor that is not an expert's (attention, norms, router, embeddings, LM head),
  which every system keeps in memory;
* expert memory: ``--expert-memory`` resolved as memd resolves it (whole pool slots of one expert each), so
  moeinf's pool and accelerate's ``max_memory`` budget beyond the dense weights are the same bytes;
* runtime allowance (``--runtime-allowance``, default 1 GiB): the interpreters, torch and transformers (a python
  process with them imported holds about 250 MiB), activations, the KV cache, and transient buffers. moeinf runs
  two such processes (memd and the worker: about 560 MiB beyond its dense weights and pool, measured on the bench
  model), the baselines one (accelerate also materialises one offloaded decoder layer at a time); the allowance is
  the same for all. Whatever a system leaves of it unused is page cache it may keep.

The limit counts the page cache too (a cgroup's), so a system cannot use more memory by mapping files.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from common.sizes import format_bytes, parse_size


@dataclass(frozen=True, slots=True)
class Budget:
    expert_memory: str
    dense_bytes: int
    expert_total_bytes: int
    expert_budget_bytes: int  # memd's pool: whole slots of one expert each (4 KiB-aligned parameters)
    slots: int
    allowance_bytes: int

    @property
    def limit_bytes(self) -> int:
        return self.dense_bytes + self.expert_budget_bytes + self.allowance_bytes

    @property
    def accelerate_cpu_bytes(self) -> int:
        """accelerate's ``max_memory["cpu"]``: the dense weights plus the expert budget."""
        return self.dense_bytes + self.expert_budget_bytes

    @property
    def fraction(self) -> float:
        return self.expert_budget_bytes / self.expert_total_bytes

    def describe(self) -> str:
        return (f"memory limit for --expert-memory {self.expert_memory}: {format_bytes(self.limit_bytes)}"
                f" ({self.limit_bytes} bytes) = dense weights {format_bytes(self.dense_bytes)}"
                f" + expert memory {format_bytes(self.expert_budget_bytes)} ({self.slots} experts,"
                f" {100 * self.fraction:.1f}% of {format_bytes(self.expert_total_bytes)})"
                f" + runtime allowance {format_bytes(self.allowance_bytes)}; page cache included")


@dataclass(frozen=True, slots=True)
class ModelBytes:
    dense_bytes: int
    expert_total_bytes: int
    slot_bytes: int
    num_experts: int  # all layers
    files: tuple[Path, ...]


def model_bytes(model: Path) -> ModelBytes:
    """Dense and expert bytes of a checkpoint, from its safetensors headers (as memd indexes them)."""
    from common.checkpoint import Checkpoint
    from services.memd.store import ExpertStore

    checkpoint = Checkpoint(model)
    store = ExpertStore(checkpoint)
    total = sum(entry.nbytes for entry in checkpoint.tensors.values())
    return ModelBytes(total - store.total_expert_bytes, store.total_expert_bytes, store.slot_bytes,
                      store.num_layers * store.num_experts, tuple(checkpoint.files))


def derive(sizes: ModelBytes, expert_memory: str, allowance: str) -> Budget:
    spec = parse_size(expert_memory, what="--expert-memory")
    slots = min(spec.resolve(sizes.expert_total_bytes) // sizes.slot_bytes, sizes.num_experts)
    return Budget(expert_memory, sizes.dense_bytes, sizes.expert_total_bytes, slots * sizes.slot_bytes, slots,
                  parse_size(allowance, what="--runtime-allowance").resolve(0))
