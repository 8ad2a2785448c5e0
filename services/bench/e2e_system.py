"""The moeinf systems of ``moeinf bench e2e``: a real ``moeinf memd`` and ``--workers`` ``moeinf worker`` processes,
started with a prefix (a cgroup's); clients talk to the workers' sockets."""
from __future__ import annotations

import itertools
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from common.config import MEMD_SOCKET, MEMD_TRACE_SOCKET, state_socket
from common.config_checks import format_cpus
from services.bench.e2e_formats import expert_cache
from services.bench.e2e_quality import stats_counters
from services.bench.memd_proc import MemdProcess
from services.bench.worker_proc import WorkerProcess

if TYPE_CHECKING:
    from services.bench.e2e import Options

MEMD_FLAGS = {"moeinf-ondemand-lru": ["--policy", "lru", "--prefetch", "off", "--preload", "off"], "moeinf": []}


def cpu_sets(threads: int, workers: int) -> tuple[list[str], str]:
    """``--pin``: each worker's --cpus (``threads`` CPUs of its own, in order) and memd's --io-cpus (the rest), as
    CPU lists, from the CPUs this process may run on."""
    cpus = sorted(os.sched_getaffinity(0))
    own = [format_cpus(cpus[k * threads:(k + 1) * threads]) for k in range(workers)]
    return own, format_cpus(cpus[workers * threads:])


def check_pin(threads: int, workers: int, systems) -> None:
    if not any(s.startswith("moeinf") for s in systems):
        raise ValueError("--pin places the moeinf systems' processes: add one to --systems")
    if not 0 < threads * workers < len(os.sched_getaffinity(0)):
        raise ValueError(f"--pin: --threads x --workers must be between 1 and {len(os.sched_getaffinity(0)) - 1}"
                         " (the workers' CPUs; memd runs on the others)")


class MoeinfSystem:
    """memd + worker processes (started with ``prefix``: a cgroup's); clients talk to the worker's socket."""

    def __init__(self, opts: Options, name: str, expert_memory: str, prefix: list[str] = (),
                 expert_format: str = ""):
        self.name, self.opts, self.prefix = name, opts, list(prefix)
        self.flags = list(MEMD_FLAGS.get(name, []))
        self.flags += ["--slot-cache", opts.slot_cache, "--expert-cache-dir", str(expert_cache(opts))]  # filled ahead
        if opts.slot_compression != "off" and not expert_format:
            self.flags += ["--slot-compression", opts.slot_compression]
        self.flags += ["--read-threads", str(opts.read_threads), "--read-chunk", opts.read_chunk]  # the probes' depth
        if expert_format:  # the same checkpoint through memd's compressed cache (filled ahead: format_system)
            self.flags += ["--expert-format", expert_format]
        # pinned or not as --pin says, whatever MOEINF_CPUS / MOEINF_IO_CPUS the caller exported
        self.worker_cpus, memd_cpus = cpu_sets(opts.threads, opts.workers) if opts.pin else ([""] * opts.workers, "")
        self.flags += ["--io-cpus", memd_cpus]
        self.expert_memory = expert_memory  # memd's --expert-memory
        self.memd: MemdProcess | None = None
        self.workers: list[WorkerProcess] = []
        self._clients = itertools.count()  # client k talks to worker k mod N
        self._stats_client = None  # one MemdClient for STATS, kept for the run (never used by two threads at once)

    def start(self) -> MoeinfSystem:
        self.memd = MemdProcess(self.opts.model, self.expert_memory, extra=self.flags, prefix=self.prefix)
        self.memd.start()
        ids = [str(i) for i in range(self.opts.workers)] if self.opts.workers > 1 else [""]
        for worker_id in ids:
            flags = ["--threads", str(self.opts.threads), "--cpus", self.worker_cpus[len(self.workers)]]
            self.workers.append(WorkerProcess(self.opts.model, self.memd.state_dir, flags,
                                              prefix=self.prefix, worker_id=worker_id))
            self.workers[-1].start()
        self.wait_preloaded()
        return self

    def wait_preloaded(self, timeout_s: float = 600.0) -> None:
        """A pool of every expert reads them all at start (memd ``--preload auto``): the runs begin once it is full
        or its residency stops growing (a smaller pool, or ``--preload off``), so no run counts those reads."""
        deadline, last = time.monotonic() + timeout_s, -1
        while (stats := self.stats()).resident < stats.num_slots and stats.resident != last:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: memd's preload still reading after {timeout_s:.0f} s")
            last = stats.resident
            time.sleep(1.0)

    def stop(self) -> None:
        if self._stats_client is not None:
            self._stats_client.close()
            self._stats_client = None
        for worker in self.workers:
            worker.stop()
        if self.memd is not None:
            self.memd.stop()

    def client(self):
        from common.worker_client import WorkerClient

        worker = self.workers[next(self._clients) % len(self.workers)]
        return _TokenStream(WorkerClient(worker.addr, timeout_s=600, gone=worker.gone))

    def pss_bytes(self) -> int | None:
        """Proportional set size of memd + workers: what they hold, memory they share (the pool) counted once."""
        return pss([p.pid for p in (self.memd, *self.workers) if p is not None and p.pid is not None])

    def stats(self):
        from services.worker.memd_client import MemdClient

        if self._stats_client is None:
            self._stats_client = MemdClient(state_socket(self.memd.state_dir, MEMD_SOCKET),
                                            state_socket(self.memd.state_dir, MEMD_TRACE_SOCKET), timeout_s=30)
        return self._stats_client.stats()

    def counters(self) -> dict[str, float]:
        return stats_counters(self.stats())


def pss(pids: list[int]) -> int | None:
    total = 0
    try:
        for pid in pids:
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
            total += 1024 * int(next(ln.split()[1] for ln in rollup.splitlines() if ln.startswith("Pss:")))
    except (OSError, StopIteration):
        return None
    return total


class _TokenStream:
    def __init__(self, client):
        self.client = client

    def stream(self, prompt: list[int], max_tokens: int):
        for reply in self.client.stream(prompt, max_tokens):
            if reply.tokens:
                yield reply.tokens

    def close(self) -> None:
        self.client.close()
