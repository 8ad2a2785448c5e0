"""Experts the worker computes on its CPU from the host tier (``--cpu-experts auto|always``; docs/gpu.md,
"Computing host-tier experts on the CPU").

A routed expert that the device pool neither holds nor is loading, but the pinned host tier holds, can be
computed by the worker on its CPU instead of being copied to the GPU first: for a decode token's few rows the
CPU reads the expert's bytes once from DRAM, which can cost less than moving them over PCIe (the Fiddler
result). memd decides per expert, at the acquire that needs it: the CPU when the worker's measured time for the
expert's tokens (``ReadyRequest.cpu_expert_seconds``: a fixed part, the activations' round trip to the GPU
included, and a part per token) is below the measured time of a copy (slot bytes over the host-to-device rate of
the copies, ``TieredReader.copy_rate``). Nothing goes to the CPU before both are measured, and never the host
tier's last unpinned slots (two per reader thread: loads need them). ``always`` skips the comparison (every such
expert goes to a worker that computes host-tier experts), to compare the two paths.

The chosen experts' host slots stay pinned until the worker is done with them: its next message about a later
(step, layer) (a layer note or an acquire: it computes a layer's experts before it moves on), a release of that
layer (leases off), its returned leases, a failure of that acquire, or its end. At most one layer's experts per
worker are held.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from common import messages as m
from services.memd.policy import Key
from services.memd.tiers import TieredReader

SPARE_HOST_SLOTS = 2  # host slots never pinned for the CPU, per reader thread (its staging: tiers' loads need them)


@dataclass(frozen=True, slots=True)
class CpuCost:
    """One worker's measured time to compute one expert on its CPU for ``tokens`` tokens."""

    fixed: float
    per_token: float

    def seconds(self, tokens: int) -> float:
        return self.fixed + self.per_token * tokens


@dataclass(slots=True)
class Held:
    at: tuple[int, int]  # (step, layer) of the acquire
    keys: list[Key] = field(default_factory=list)


class HostCompute:
    def __init__(self, reader: TieredReader, name: str, slots: int, slot_bytes: int, spare: int = SPARE_HOST_SLOTS,
                 *, always: bool = False):
        """``name``/``slots``: the host tier's /dev/shm region, for the workers' HELLO."""
        self.reader, self.name, self.slots, self.slot_bytes, self.spare = reader, name, slots, slot_bytes, spare
        self.always = always
        self.costs: dict[int, CpuCost] = {}  # by worker pid (bounded by --max-clients: forget() at detach)
        self.held: dict[int, Held] = {}
        self.computed = 0  # experts the workers were told to compute on their CPU (a counter: a failed acquire's too)

    def worker_ready(self, pid: int, seconds: list[float]) -> None:
        """A worker's READY: its CPU cost (two numbers), or none (it computes everything on the GPU)."""
        if len(seconds) == 2:
            self.costs[pid] = CpuCost(*seconds)
        else:
            self.costs.pop(pid, None)

    def copy_seconds(self) -> float | None:
        rate = self.reader.copy_rate
        return self.slot_bytes / rate if rate else None

    def choose(self, pid: int, req: m.AcquireRequest, on_device) -> dict[int, int]:
        """Positions of ``req.experts`` the worker computes on its CPU -> their host slots, pinned for it.
        ``on_device(key)``: the device pool holds or is loading ``key`` (then it is not a candidate)."""
        self.moved_on(pid, req.step, req.layer)
        held = self.held.get(pid)
        if held is not None and held.at == (req.step, req.layer):  # the same layer again (a retry): replace it
            self.failed(pid, req)
        cost, copy = self.costs.get(pid), self.copy_seconds()
        if cost is None or (copy is None and not self.always) or len(req.counts) != len(req.experts):
            return {}
        chosen = {}
        for j, (expert, tokens) in enumerate(zip(req.experts, req.counts)):
            key = (req.layer, expert)
            if on_device(key) or not (self.always or cost.seconds(tokens) < copy):
                continue
            slot = self.reader.hold_host(key, self.spare)
            if slot is not None:
                chosen[j] = slot
                self.held.setdefault(pid, Held((req.step, req.layer))).keys.append(key)
        self.computed += len(chosen)
        return chosen

    def moved_on(self, pid: int, step: int, layer: int) -> None:
        """``pid`` sent a message about (step, layer): the host slots it held for an earlier layer are free."""
        held = self.held.get(pid)
        if held is not None and (step, layer) > held.at:
            self.forget(pid, keep_cost=True)

    def failed(self, pid: int, req: m.AcquireRequest) -> None:
        """``pid``'s acquire ``req`` failed: what ``choose`` gave its CPU for it is let go, uncounted."""
        held = self.held.get(pid)
        if held is not None and held.at == (req.step, req.layer):
            self.forget(pid, keep_cost=True)

    def released(self, pid: int, layer: int) -> None:
        """``pid`` released ``layer``'s experts (leases off): it is done with that layer's host slots too."""
        held = self.held.get(pid)
        if held is not None and held.at[1] == layer:
            self.forget(pid, keep_cost=True)

    def forget(self, pid: int, *, keep_cost: bool = False) -> None:
        """Unpin what ``pid`` holds (it moved on, returned its leases, or is gone)."""
        held = self.held.pop(pid, None)
        for key in held.keys if held else ():
            self.reader.drop_host(key)
        if not keep_cost:
            self.costs.pop(pid, None)


class NoHostCompute:
    """``--cpu-experts off`` (or a pool without a host tier): every expert comes from the device pool."""

    name, slots, computed = "", 0, 0

    def choose(self, pid: int, req: m.AcquireRequest, on_device) -> dict[int, int]:
        return {}

    def worker_ready(self, pid: int, seconds: list[float]) -> None: ...

    def moved_on(self, pid: int, step: int, layer: int) -> None: ...

    def failed(self, pid: int, req: m.AcquireRequest) -> None: ...

    def released(self, pid: int, layer: int) -> None: ...

    def forget(self, pid: int, *, keep_cost: bool = False) -> None: ...


__all__ = ["CpuCost", "HostCompute", "NoHostCompute", "SPARE_HOST_SLOTS"]
