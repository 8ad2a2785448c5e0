"""The runtime's own memory, measured: what a system holds beyond its weights, for ``bench e2e``'s memory limits.

A system's runtime is everything its limit must hold besides the weights it keeps: interpreters, torch and
transformers (their libraries' pages included: under a cgroup limit they are page cache the system keeps using),
activations, the KV cache, buffers. Measured, not assumed, after the system has served a warm-up request and one
request of the workload's longest prompt and ``--max-tokens``. Pages of the checkpoint's own files are never
runtime: weights mapped from them are weights, and a mapping left over after the weights were copied is clean page
cache the limit reclaims.

* moeinf: memd and one worker started apart (no limit, the smallest pool memd accepts: one layer's experts):
  their anonymous memory less the worker's dense weights, plus the larger of their file-backed resident sets
  outside the checkpoint (the libraries both map are one set of page-cache pages);
* the baselines: ``transformers-resident``'s child: its anonymous memory less the parameters it holds there (those
  not mapped from the checkpoint), plus its file-backed resident set outside the checkpoint. accelerate's runtime
  is taken to be the same (one process, the same libraries; it also materialises one offloaded layer at a time,
  which its own limit holds).

The allowance a limit gives a runtime is the measured bytes times ``MARGIN`` (the heap grows with more clients and
longer runs), rounded up to whole MiB.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

MARGIN = 1.15
SHARED_MEMORY = ("/dev/shm/", "/memfd:", "/dev/")  # mappings of shared memory and devices, not of files
MIB = 1 << 20


@dataclass(frozen=True, slots=True)
class ProcMemory:
    anon: int  # RssAnon
    file: int  # resident pages of mapped files outside ``skip`` (the checkpoint's files); shared memory left out

    @classmethod
    def of(cls, pid: int | str = "self", skip: frozenset[str] = frozenset()) -> ProcMemory:
        """A live process's anonymous memory (``/proc/PID/status``) and its file-backed resident pages
        (``/proc/PID/smaps``), those of files in ``skip`` left out."""
        anon = 0
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                anon = int(line.split()[1]) * 1024
        file, path = 0, None
        for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
            head = line.split(maxsplit=5)
            if "-" in head[0] and ":" not in head[0]:  # a mapping's header: range perms offset dev inode [path]
                path = head[5] if len(head) == 6 and head[5].startswith("/") and head[4] != "0" else None
                if path is not None and path.startswith(SHARED_MEMORY):
                    path = None  # memd's pool and control page: shared memory, counted as such, not as runtime
            elif head[0] in ("Rss:", "Anonymous:") and path is not None and path not in skip:
                sign = 1 if head[0] == "Rss:" else -1  # a mapping's copy-on-write pages are in RssAnon already
                file += sign * int(head[1]) * 1024
        return cls(anon, file)


def mapped_ranges(paths: frozenset[str], pid: int | str = "self") -> list[tuple[int, int]]:
    """Address ranges where ``paths`` are mapped in a live process (``/proc/PID/maps``)."""
    ranges = []
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5] in paths:
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            ranges.append((lo, hi))
    return ranges


def checkpoint_files(model: Path) -> frozenset[str]:
    return frozenset(str(p.resolve()) for p in Path(model).glob("*.safetensors"))


def anonymous_parameter_bytes(model, mapped: list[tuple[int, int]]) -> int:
    """Bytes of ``model``'s CPU parameters that are not views of a mapped checkpoint file."""
    total = 0
    for p in model.parameters():
        if p.device.type == "cpu" and not any(lo <= p.data_ptr() < hi for lo, hi in mapped):
            total += p.numel() * p.element_size()
    return total


@dataclass(slots=True)
class Runtimes:
    """Measured runtime bytes per kind of system: "baselines", "moeinf", "moeinf-fp8", ... (absent: not measured)."""

    measured: dict[str, int] = field(default_factory=dict)

    def allowance(self, kind: str | None = None) -> int:
        """The allowance for ``kind``'s runtime (None: the largest measured), with the margin; 0 if unmeasured."""
        value = self.measured.get(kind, 0) if kind else max(self.measured.values(), default=0)
        return math.ceil(value * MARGIN / MIB) * MIB

    def describe(self) -> str:
        parts = [f"{kind} {value / MIB:.0f} MiB" for kind, value in self.measured.items()]
        return "measured runtime (beyond weights): " + (", ".join(parts) or "none") + f"; allowance x{MARGIN}"


def moeinf_runtime(memd_pid: int, worker_pids: list[int], dense_bytes: int, skip: frozenset[str]) -> int:
    """memd + workers: anonymous memory less each worker's dense weights, plus the larger file-backed set outside
    the checkpoint (``skip``)."""
    procs = [ProcMemory.of(pid, skip) for pid in (memd_pid, *worker_pids)]
    return max(0, sum(p.anon for p in procs) - dense_bytes * len(worker_pids) + max(p.file for p in procs))


def baseline_runtime(memory: ProcMemory, anonymous_weight_bytes: int) -> int:
    """The resident baseline's child: anonymous memory less the parameters held there, plus its file-backed set
    outside the checkpoint."""
    return max(0, memory.anon - anonymous_weight_bytes + memory.file)
