"""The memory limits of ``moeinf bench e2e``, the same for every system at one setting.

``--expert-memory`` settings (a share of the experts, the same for every system):

    limit = dense weights + expert memory + runtime allowance

* dense weights: every checkpoint tensor that is not an expert's (attention, norms, router, embeddings, LM head),
  which every system keeps in memory;
* expert memory: ``--expert-memory`` resolved as memd resolves it (whole pool slots of one expert each), so
  moeinf's pool and accelerate's ``max_memory`` budget beyond the dense weights are the same bytes;
* runtime allowance (``--runtime-allowance``; default ``measured``): the interpreters, torch and transformers,
  activations, the KV cache, and transient buffers: the larger of moeinf's and the baselines' runtimes measured in
  the same run (``services/bench/e2e_runtime.py``), with a margin; the allowance is the same for all. Whatever a
  system leaves of it unused is page cache it may keep.

``--memory-limit-total`` settings (one total, each system uses it as it likes): every system runs under the total;
what remains after the dense weights and the system's own measured runtime (with the margin) is its expert memory,
moeinf's pool in whole slots, accelerate's ``max_memory`` beyond the dense weights. A leaner runtime leaves more
for experts.

The limit counts the page cache too (a cgroup's), so a system cannot use more memory by mapping files.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from common.sizes import format_bytes, parse_bytes, parse_size


@dataclass(frozen=True, slots=True)
class Budget:
    expert_memory: str  # the setting's label in rows: "25%", or "total 3GiB"
    dense_bytes: int
    expert_total_bytes: int
    expert_budget_bytes: int  # memd's pool: whole slots of one expert each (4 KiB-aligned parameters)
    slots: int
    allowance_bytes: int
    total: str | None = None  # --memory-limit-total: the limit as given
    runtime_bytes: int = 0  # --memory-limit-total: the system's measured runtime with its margin
    num_experts: int = 0  # every layer's experts (0: unknown, the share is then one of bytes)

    @property
    def memd_memory(self) -> str:
        """memd's --expert-memory: the setting as given, or the pool's bytes under a total."""
        return str(self.expert_budget_bytes) if self.total else self.expert_memory

    @property
    def limit_bytes(self) -> int:
        return self.dense_bytes + self.expert_budget_bytes + self.allowance_bytes

    @property
    def accelerate_cpu_bytes(self) -> int:
        """accelerate's ``max_memory["cpu"]``: the dense weights plus the expert budget."""
        return self.dense_bytes + self.expert_budget_bytes

    @property
    def fraction(self) -> float:
        """The share of the experts in memory (a slot holds one, a little larger than its bytes where memd spreads
        its rows apart, so a share of bytes would read 101% for every expert)."""
        if self.num_experts:
            return self.slots / self.num_experts
        return self.expert_budget_bytes / self.expert_total_bytes

    def describe(self) -> str:
        if self.total:
            spare = self.allowance_bytes - self.runtime_bytes
            return (f"total memory limit {self.total}: {format_bytes(self.limit_bytes)} = dense weights"
                    f" {format_bytes(self.dense_bytes)} + measured runtime with margin"
                    f" {format_bytes(self.runtime_bytes)}"
                    f" + expert memory {format_bytes(self.expert_budget_bytes)} ({self.slots} experts,"
                    f" {100 * self.fraction:.1f}%) {'+' if spare >= 0 else '-'} {format_bytes(abs(spare))}"
                    f" {'left over' if spare >= 0 else 'short'}; page cache included")
        return (f"memory limit for --expert-memory {self.expert_memory}: {format_bytes(self.limit_bytes)}"
                f" ({self.limit_bytes} bytes) = dense weights {format_bytes(self.dense_bytes)}"
                f" + expert memory {format_bytes(self.expert_budget_bytes)} ({self.slots} experts,"
                f" {100 * self.fraction:.1f}% of them; {format_bytes(self.expert_total_bytes)} in all)"
                f" + runtime allowance {format_bytes(self.allowance_bytes)}; page cache included")


@dataclass(frozen=True, slots=True)
class ModelBytes:
    dense_bytes: int
    expert_total_bytes: int
    slot_bytes: int
    num_experts: int  # all layers
    layer_experts: int  # one MoE layer's
    files: tuple[Path, ...]


def model_bytes(model: Path) -> ModelBytes:
    """Dense and expert bytes of a checkpoint, from its safetensors headers (as memd indexes them)."""
    from common.checkpoint import Checkpoint
    from services.memd.spread import served_slot_bytes
    from services.memd.store import ExpertStore

    checkpoint = Checkpoint(model)
    store = ExpertStore(checkpoint)
    total = sum(entry.nbytes for entry in checkpoint.tensors.values())
    return ModelBytes(total - store.total_expert_bytes, store.total_expert_bytes, served_slot_bytes(store.index()),
                      store.num_layers * store.num_experts, store.num_experts, tuple(checkpoint.files))


def derive(sizes: ModelBytes, expert_memory: str, allowance: str | None) -> Budget:
    """``--expert-memory``'s budget; ``allowance`` None: no runtime measured (``--memory-limit off``: the budget only
    sizes the pool, no limit is set from it)."""
    spec = parse_size(expert_memory, what="--expert-memory")
    # a share is of every expert's served slot, as memd resolves it (main.plan_pool): a share of the packed bytes
    # would count one slot fewer than memd holds where its slots are larger (rows spread apart, spread.py)
    slots = min(spec.resolve(sizes.slot_bytes * sizes.num_experts) // sizes.slot_bytes, sizes.num_experts)
    return Budget(expert_memory, sizes.dense_bytes, sizes.expert_total_bytes, slots * sizes.slot_bytes, slots,
                  0 if allowance is None else parse_bytes(allowance, what="--runtime-allowance"),
                  num_experts=sizes.num_experts)


def derive_total(sizes: ModelBytes, total: str, runtime_bytes: int) -> Budget:
    """One system's budget under ``--memory-limit-total total``: its expert memory is what the total leaves after
    the dense weights and ``runtime_bytes`` (whole slots; 0 when nothing is left). The limit is the total."""
    limit = parse_size(total, what="--memory-limit-total").resolve(0)
    room = max(0, limit - sizes.dense_bytes - runtime_bytes)
    slots = min(room // sizes.slot_bytes, sizes.num_experts)
    experts = slots * sizes.slot_bytes
    return Budget(f"total {total}", sizes.dense_bytes, sizes.expert_total_bytes, experts, slots,
                  limit - sizes.dense_bytes - experts, total, runtime_bytes, sizes.num_experts)
