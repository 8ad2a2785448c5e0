"""The expert pool in GPU memory, shared with workers by CUDA IPC (``--pool-backend cuda``; docs/gpu.md).

Run on one H200 (docs/gpu.md): ``tests/memd/test_cuda_pool.py`` and ``tests/worker/test_cuda_worker.py`` (marker
``cuda``) and ``moeinf selftest --device cuda``. The CPU suite runs the same tier logic against ``standin.py``.

Device memory comes from ``cudaMalloc`` through cupy's runtime bindings, not from cupy's or torch's caching
allocators: an IPC handle names a whole allocation, so each chunk is its own allocation. A chunk holds
``chunk_slots`` whole slots (one MoE layer's experts by default, so a layer placed at its home slots lies in one
chunk and the worker's window over it is one strided view). Each chunk is exported once, at the handshake, with
``cudaIpcGetMemHandle``. Shrinking frees the chunks whose every slot was released; growing back into a freed
chunk would hand workers a new handle, which this version does not do (it says so and the resize is refused).

Writes are ``cudaMemcpyAsync`` host-to-device from a pinned host buffer on non-blocking copy streams, one per
issuing thread (a reader thread whose disk read just landed, or memd's loop for a host-tier hit) and kind of load:
a demand copy never queues behind a prefetch copy, and copies from different threads do not queue behind each
other (each stream runs in order; the GPU's copy engines serve them all).
A write first makes its stream wait on the events it is
given (a worker's "done reading this slot", write-after-read; the slot's previous write, write-after-write
across the streams) and records an event after the copy (read-after-write), returned as its ``Completion``.
With ``--copy-events ipc`` (the default) the write also records the next entry of an ``EventRing``: interprocess
events every worker opens once at the handshake, so an acquire reply can name the copies still in flight and the
worker's compute stream waits on them on the GPU, instead of memd waiting for them on the host.
cupy is imported here only, when the backend is chosen.
"""
from __future__ import annotations

import ctypes
import logging
import threading
import time

from services.memd.chunks import Chunks
from services.memd.pools import Completion, Pool, PoolExport

log = logging.getLogger("moeinf.memd.cuda")
H2D = 1  # cudaMemcpyHostToDevice
IPC_LAZY_PEER = 1  # cudaIpcMemLazyEnablePeerAccess
HOST_REGISTER_PORTABLE = 1  # cudaHostRegisterPortable
RING_EVENTS = 256  # interprocess events in the copy-event ring: an entry is reused once its last copy is done


def import_cupy():
    try:
        import cupy
    except ImportError as exc:
        raise RuntimeError("--pool-backend cuda needs cupy: install moeinf with the [cuda] extra"
                           f" (pip install 'moeinf[cuda]'); importing it failed: {exc}") from None
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except cupy.cuda.runtime.CUDARuntimeError as exc:
        raise RuntimeError(f"no CUDA device: {exc}") from None
    if count == 0:
        raise RuntimeError("no CUDA device")
    return cupy


def device_uuid(cupy, index: int) -> str:
    """``GPU-xxxxxxxx-xxxx-...`` as nvidia-smi prints it (what workers send in HELLO)."""
    props = cupy.cuda.runtime.getDeviceProperties(index)
    if "uuid" in props:
        return format_uuid(bytes(props["uuid"]))
    import torch  # cupy < 13 leaves the UUID out of the properties

    return format_uuid(bytes.fromhex(str(torch.cuda.get_device_properties(index).uuid).replace("-", "")))


def format_uuid(raw: bytes) -> str:
    h = raw.hex()
    return f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


class CudaEvent(Completion):
    """An event recorded on a stream: done when the GPU has run everything before it on that stream; ``ring``: the
    event-ring entry recorded with it (-1: none)."""

    def __init__(self, event, ring: int = -1):
        self.event, self.ring = event, ring

    def done(self) -> bool:
        return self.event.done

    def wait(self) -> None:
        self.event.synchronize()


class WorkerEvent(Completion):
    """A worker's interprocess "done reading" event, opened from its handle: done once the worker's GPU work
    recorded before it (a layer's expert matmuls) has run. The worker re-records it for later layers, so a
    write waits for that record or a later one: never less (its stream is in order). Once its worker is gone the
    event is closed (``CudaPool.close_events``, under ``lock``): done, and no longer touched."""

    def __init__(self, cupy, handle: bytes, lock: threading.Lock):
        self.rt, self.lock, self.closed = cupy.cuda.runtime, lock, False
        self.ptr = self.rt.ipcOpenEventHandle(handle)

    def done(self) -> bool:
        with self.lock:
            return self.closed or self.rt.eventQuery(self.ptr) == 0  # cudaSuccess; cudaErrorNotReady while pending

    def wait(self) -> None:
        while not self.done():
            time.sleep(0.0005)  # (not eventSynchronize: the event may be closed meanwhile)

    def gpu_wait(self, stream) -> None:
        """``stream`` waits for it on the GPU, unless it is done (or closed) already."""
        with self.lock:
            if not self.closed and self.rt.eventQuery(self.ptr) != 0:
                self.rt.streamWaitEvent(stream.ptr, self.ptr, 0)


class EventRing:
    """Interprocess events (CUDA IPC event handles, exported once in HELLO) recorded in turn after device writes.

    An entry is re-recorded only after its last record completed, so a worker told to wait on entry ``i`` waits
    for that copy or, if memd reused the entry meanwhile, for a later copy on memd's streams: never less, and never
    on anything a worker does (memd's streams wait only on memd's own events)."""

    def __init__(self, cupy, size: int = RING_EVENTS):
        self.events = [cupy.cuda.Event(block=False, disable_timing=True, interprocess=True) for _ in range(size)]
        self.handles = [bytes(cupy.cuda.runtime.ipcGetEventHandle(e.ptr)) for e in self.events]
        self.next, self.reuse_waits = 0, 0  # reuse_waits: entries whose last copy was still running when reused
        self._lock = threading.Lock()

    def record(self, stream) -> int:
        with self._lock:
            i, self.next = self.next, (self.next + 1) % len(self.events)
        event = self.events[i]
        if not event.done:  # 256 copies in flight: wait for this entry's last one, without holding the others up
            self.reuse_waits += 1
            if self.reuse_waits == 1:
                log.warning("the copy-event ring is full (%d copies in flight): a copy waits for an older one",
                            len(self.events))
            event.synchronize()
        event.record(stream)
        return i


class CudaPool(Pool):
    backend = "cuda-ipc"

    def __init__(self, nbytes: int, slot_bytes: int, chunk_slots: int, device: int = 0, *, events: bool = True):
        """``events``: share a ring of copy events with the workers (``--copy-events ipc``)."""
        self.cupy = cp = import_cupy()
        self.nbytes, self.slot_bytes, self.index = nbytes, slot_bytes, device
        self.device = cp.cuda.Device(device)
        self.uuid = device_uuid(cp, device)
        self.streams: dict[tuple[bool, int], object] = {}  # (demand, issuing thread) -> its copy stream
        self._streams_lock = threading.Lock()
        self._events_lock = threading.Lock()  # the workers' read events: queried, waited on, closed
        with self.device:
            self.chunks = Chunks(nbytes, slot_bytes, chunk_slots, self._malloc, self._free)
            self.handles = [bytes(cp.cuda.runtime.ipcGetMemHandle(p)) for p in self.chunks.mem]
            self.ring = EventRing(cp) if events else None

    def _malloc(self, n: int) -> int:
        try:
            return self.cupy.cuda.runtime.malloc(n)
        except self.cupy.cuda.runtime.CUDARuntimeError as exc:
            raise RuntimeError(f"GPU {self.uuid} cannot hold a {n}-byte chunk of the expert pool ({exc}):"
                               " lower --expert-memory") from None

    def _free(self, ptr: int) -> None:
        with self.device:
            self.cupy.cuda.runtime.free(ptr)

    def export(self) -> PoolExport:
        """A chunk a shrink freed exports an empty handle (``pools.refusal`` turns a new worker away)."""
        handles = [h if m is not None else b"" for h, m in zip(self.handles, self.chunks.mem)]
        return PoolExport(self.backend, "", self.nbytes, self.uuid, self.chunks.chunk_bytes, handles,
                          self.ring.handles if self.ring else [])

    def write(self, offset: int, src: memoryview, after: tuple[Completion, ...] = (), *,
              demand: bool = False) -> Completion:
        """``src`` must be writable pinned host memory (the host tier or a staging buffer), untouched until the
        returned completion is done. ``demand``: on the on-demand copy stream."""
        cp = self.cupy
        ptr, within = self.chunks.locate(offset, len(src))
        host = ctypes.addressof(ctypes.c_char.from_buffer(src))
        with self.device:
            stream = self._stream(demand)
            for c in after:
                if isinstance(c, CudaEvent):
                    stream.wait_event(c.event)  # on the GPU: the host does not block
                elif isinstance(c, WorkerEvent):
                    c.gpu_wait(stream)
                elif not c.done():
                    c.wait()  # a host-side completion: wait here
            cp.cuda.runtime.memcpyAsync(ptr + within, host, len(src), H2D, stream.ptr)
            event = cp.cuda.Event(block=False, disable_timing=True)  # memd's own: the ring's entries get reused
            event.record(stream)
            ring = self.ring.record(stream) if self.ring else -1
        return CudaEvent(event, ring)

    def open_events(self, handles: list[bytes]) -> list[Completion]:
        opened: list[WorkerEvent] = []
        with self.device:
            try:
                for h in handles:
                    opened.append(WorkerEvent(self.cupy, h, self._events_lock))
            except BaseException:
                self.close_events(opened)
                raise
        return opened

    def close_events(self, events: list[Completion]) -> None:
        with self.device, self._events_lock:
            for event in events:
                if isinstance(event, WorkerEvent) and not event.closed:
                    event.closed = True
                    self.cupy.cuda.runtime.eventDestroy(event.ptr)

    def _stream(self, demand: bool):
        key = (demand, threading.get_ident())
        stream = self.streams.get(key)
        if stream is None:
            with self._streams_lock:
                stream = self.streams[key] = self.cupy.cuda.Stream(non_blocking=True)
        return stream

    def synchronize(self) -> None:
        with self._streams_lock:
            streams = list(self.streams.values())
        for stream in streams:
            stream.synchronize()

    def ensure(self, offset: int, length: int) -> None:
        self.chunks.ensure(offset, length)

    def release(self, offset: int, length: int) -> None:
        """Frees a chunk once every slot of it is released (CUDA frees whole allocations only)."""
        for i in self.chunks.release(offset, length, before_free=self.synchronize):
            log.info("freed chunk %d of the CUDA pool (%d bytes)", i, self.chunks.size(i))

    def resident_bytes(self) -> int:
        return self.chunks.resident_bytes()

    def close(self) -> None:
        chunks = getattr(self, "chunks", None)
        if chunks is not None:
            self.synchronize()
            chunks.close()


class PinnedHost:
    """Page-locked host memory (the host tier, staging buffers): ``view`` is a writable memoryview of it.

    ``shm_name``: the memory is a /dev/shm region (``pool.SharedPool``) page-locked in place (``cudaHostRegister``),
    so a worker can map it too and compute host-tier experts on its CPU (``--cpu-experts auto|always``); otherwise it is
    ``cudaHostAlloc``'d, private to memd."""

    def __init__(self, nbytes: int, shm_name: str = ""):
        self.cupy = import_cupy()
        self.nbytes, self.name, self.region = nbytes, shm_name, None
        rt = self.cupy.cuda.runtime
        try:
            if shm_name:
                from services.memd.pool import SharedPool

                try:
                    self.region = SharedPool(shm_name, nbytes)
                except RuntimeError as exc:  # (its advice names the pool's knob)
                    raise RuntimeError(f"--cpu-experts puts the {nbytes}-byte host tier in /dev/shm, which cannot"
                                       f" hold it ({exc}): lower --host-memory, enlarge /dev/shm (docker:"
                                       " shm_size) or leave --cpu-experts off") from None
                self.ptr = ctypes.addressof(ctypes.c_char.from_buffer(self.region.view))
                rt.hostRegister(self.ptr, nbytes, HOST_REGISTER_PORTABLE)
            else:
                self.ptr = rt.hostAlloc(nbytes, 0)
        except rt.CUDARuntimeError as exc:
            if self.region is not None:
                self.region.close()
            raise RuntimeError(f"cannot pin {nbytes} bytes of host memory ({exc}): lower --host-memory") from None
        self.view = memoryview((ctypes.c_char * nbytes).from_address(self.ptr)).cast("B")

    def close(self) -> None:
        if self.ptr:
            self.view.release()
            if self.region is not None:
                self.cupy.cuda.runtime.hostUnregister(self.ptr)
                self.region.close()
            else:
                self.cupy.cuda.runtime.freeHost(self.ptr)
            self.ptr = 0
