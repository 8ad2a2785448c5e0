"""The expert pool behind one interface, whatever memory holds it (docs/gpu.md).

A ``Pool`` is ``num_slots`` equal slots of ``slot_bytes``. memd writes experts into slots (``write``: from a host
buffer, asynchronously, returning a ``Completion``), gives a range's memory back and takes it again for a live
resize (``release``/``ensure``), reports what it holds (``resident_bytes``) and tells a worker how to map it
(``export``: the fields of ``HelloReply``). Two backends:

- ``ShmPool`` (``--pool-backend shm``, the default): one POSIX shared-memory region (``pool.SharedPool``). The
  reader writes into it directly through ``host_view``; ``write`` is a ``memmove`` that is complete on return.
- ``CudaPool`` (``--pool-backend cuda``, ``services/memd/cuda_pool.py``): device memory in chunks, exported with
  CUDA IPC handles; ``write`` is an H2D copy on a copy stream whose completion is a CUDA event.

``services/memd/standin.py`` is a host-memory stand-in for the device backend, with a stream the tests drive,
so the tier logic (``tiers.py``) runs in the CPU suite.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

from common.devices import same_device
from services.memd.pool import SHM_DIR, SharedPool, allocate_range, release_range, resident_bytes

BACKENDS = ("shm", "cuda")


class Completion(ABC):
    """The end of an asynchronous write (or of a reader's use of a slot): poll it, or wait for it. ``ring``: the
    entry of the pool's event ring recorded with it, which a worker's stream can wait on (-1: none)."""

    ring = -1

    @abstractmethod
    def done(self) -> bool: ...

    @abstractmethod
    def wait(self) -> None: ...


class Done(Completion):
    """Already complete (a synchronous write)."""

    def done(self) -> bool:
        return True

    def wait(self) -> None:
        return None


DONE = Done()


@dataclass(frozen=True, slots=True)
class PoolExport:
    """What a worker needs to map the pool (the HELLO reply's pool fields)."""

    backend: str  # "shm" or "cuda-ipc"
    name: str  # /dev/shm name ("shm"); "" for "cuda-ipc"
    nbytes: int
    device: str = "cpu"  # "cpu" or the GPU's UUID
    chunk_bytes: int = 0  # "cuda-ipc": bytes per chunk (whole slots), the last one may be shorter
    handles: list[bytes] = field(default_factory=list)  # "cuda-ipc": one IPC memory handle per chunk
    event_handles: list[bytes] = field(default_factory=list)  # "cuda-ipc" with --copy-events ipc: the event ring


def device_mismatch(pool: PoolExport, worker_device: str) -> str:
    """Why a worker on ``worker_device`` ("cpu" or a GPU UUID) cannot use this pool; "" when it can."""
    if pool.device == "cpu":
        if worker_device == "cpu":
            return ""
        return (f"the worker computes on GPU {worker_device}, memd's expert pool is host shared memory (--pool-backend"
                f" {pool.backend}): run memd with --pool-backend cuda on that GPU, or the worker with --device cpu")
    if same_device(pool.device, worker_device):
        return ""
    if worker_device == "cpu":
        return (f"memd's expert pool is on GPU {pool.device} (--pool-backend {pool.backend}), the worker computes on"
                " the CPU: run the worker with --device cuda on that GPU, or memd with --pool-backend shm")
    return (f"memd's expert pool is on GPU {pool.device}, the worker is on GPU {worker_device}: CUDA IPC maps memory"
            " on its own device only; give both the same GPU (CUDA_VISIBLE_DEVICES, memd --cuda-device, worker"
            " --device cuda:N)")


def refusal(pool: PoolExport, worker_device: str) -> tuple[str, str] | None:
    """``(error code, message)`` when a worker on ``worker_device`` may not attach to this pool, else None."""
    if any(not h for h in pool.handles):
        return "capacity", ("a live shrink freed chunks of memd's device pool, and a new worker cannot map them:"
                            " restart memd at the size you want")
    problem = device_mismatch(pool, worker_device)
    return ("device", problem) if problem else None


class Pool(ABC):
    backend: str
    nbytes: int
    slot_bytes: int

    @property
    def num_slots(self) -> int:
        return self.nbytes // self.slot_bytes

    @abstractmethod
    def export(self) -> PoolExport: ...

    def host_view(self) -> memoryview | None:
        """A writable host view of the whole pool when the reader may write slots directly (shm), else None."""
        return None

    def open_events(self, handles: list[bytes]) -> list[Completion]:
        """A worker's "done reading" events (``HelloRequest.read_events``), opened for ``write``'s ``after``; a
        pool the worker reads synchronously (shm) has none."""
        return []

    def close_events(self, events: list[Completion]) -> None:
        """The events of a worker that is gone."""

    @abstractmethod
    def write(self, offset: int, src: memoryview, after: tuple[Completion, ...] = (), *,
              demand: bool = False) -> Completion:
        """Copy ``src`` to pool byte ``offset`` once every completion in ``after`` is done (write-after-read);
        the returned completion ends the write (read-after-write). ``src`` must stay untouched until then.
        ``demand``: an on-demand load's write, which no prefetch's write may hold back."""

    @abstractmethod
    def ensure(self, offset: int, length: int) -> None:
        """Memory for ``[offset, offset + length)`` again after ``release``; RuntimeError when it does not fit."""

    @abstractmethod
    def release(self, offset: int, length: int) -> None:
        """Give the memory of ``[offset, offset + length)`` back (what the backend can free of it)."""

    @abstractmethod
    def resident_bytes(self) -> int: ...

    @abstractmethod
    def close(self) -> None: ...


class ShmPool(Pool):
    """Today's pool: one /dev/shm region (``pool.SharedPool``), mapped by the worker as a file."""

    backend = "shm"

    def __init__(self, name: str, nbytes: int, slot_bytes: int):
        self.region = SharedPool(name, nbytes)
        self.name, self.nbytes, self.slot_bytes = name, nbytes, slot_bytes
        self.path: Path = SHM_DIR / name

    def export(self) -> PoolExport:
        return PoolExport("shm", self.name, self.nbytes)

    def host_view(self) -> memoryview | None:
        return self.region.view

    def write(self, offset: int, src: memoryview, after: tuple[Completion, ...] = (), *,
              demand: bool = False) -> Completion:
        for c in after:
            c.wait()
        self.region.view[offset:offset + len(src)] = src
        return DONE

    def ensure(self, offset: int, length: int) -> None:
        allocate_range(self.path, offset, length)

    def release(self, offset: int, length: int) -> None:
        release_range(self.path, offset, length)

    def resident_bytes(self) -> int:
        return resident_bytes(self.path)

    def close(self) -> None:
        self.region.close()
