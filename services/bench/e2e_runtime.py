"""The runtime's own memory, measured: what a system holds beyond its weights, for ``bench e2e``'s memory limits.

A system's runtime is everything its limit must hold besides the weights it keeps: interpreters, torch and
transformers (their libraries' pages included: under a cgroup limit they are page cache the system keeps using),
activations, the KV cache, buffers. Measured, not assumed, after the system has served a warm-up request and one
request of the workload's longest prompt and ``--max-tokens``:

* moeinf: memd and one worker started apart (no limit, the smallest pool memd accepts: one layer's experts):
  their anonymous memory (the worker's dense weights included, which are subtracted) plus the larger of their
  file-backed resident sets (the libraries both map are one set of page-cache pages);
* the baselines: ``transformers-resident``'s child, which holds the whole model in anonymous memory: its anonymous
  memory minus the model's bytes, plus its file-backed resident set. accelerate's runtime is taken to be the same
  (one process, the same libraries; it also materialises one offloaded layer at a time, which its own limit holds).

The allowance a limit gives a runtime is the measured bytes times ``MARGIN`` (the heap grows with more clients and
longer runs), rounded up to whole MiB.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

MARGIN = 1.15
MIB = 1 << 20


@dataclass(frozen=True, slots=True)
class ProcMemory:
    anon: int
    file: int

    @classmethod
    def of(cls, pid: int | str = "self") -> ProcMemory:
        """RssAnon and RssFile of a live process (``/proc/PID/status``)."""
        fields = {}
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile"):
                fields[key] = int(value.split()[0]) * 1024
        return cls(fields["RssAnon"], fields["RssFile"])


@dataclass(frozen=True, slots=True)
class Runtimes:
    """Measured runtime bytes per kind of system (None: not measured in this run)."""

    moeinf: int | None = None
    baseline: int | None = None

    def allowance(self, measured: int) -> int:
        return math.ceil(measured * MARGIN / MIB) * MIB

    def describe(self) -> str:
        parts = [f"{name} {value / MIB:.0f} MiB" for name, value in (("moeinf", self.moeinf),
                                                                     ("baselines", self.baseline)) if value]
        return "measured runtime (beyond weights): " + (", ".join(parts) or "none") + f"; allowance x{MARGIN}"


def moeinf_runtime(memd_pid: int, worker_pids: list[int], dense_bytes: int) -> int:
    """memd + workers: anonymous memory less each worker's dense weights, plus the larger file-backed set."""
    procs = [ProcMemory.of(pid) for pid in (memd_pid, *worker_pids)]
    return max(0, sum(p.anon for p in procs) - dense_bytes * len(worker_pids) + max(p.file for p in procs))


def baseline_runtime(memory: ProcMemory, weight_bytes: int) -> int:
    """The resident baseline's child: anonymous memory less the model it holds, plus its file-backed set."""
    return max(0, memory.anon - weight_bytes + memory.file)
