"""The expert pool in GPU memory, shared with workers by CUDA IPC (``--pool-backend cuda``; docs/gpu.md).

Run on one H200 (docs/gpu.md): ``tests/memd/test_cuda_pool.py`` and ``tests/worker/test_cuda_worker.py`` (marker
``cuda``) and ``moeinf selftest --device cuda``. The CPU suite runs the same tier logic against ``standin.py``.

Device memory comes from ``cudaMalloc`` through cupy's runtime bindings, not from cupy's or torch's caching
allocators: an IPC handle names a whole allocation, so each chunk is its own allocation. A chunk holds
``chunk_slots`` whole slots (one MoE layer's experts by default, so a layer placed at its home slots lies in one
chunk and the worker's window over it is one strided view). Each chunk is exported once, at the handshake, with
``cudaIpcGetMemHandle``. Shrinking frees the chunks whose every slot was released; growing back into a freed
chunk would hand workers a new handle, which this version does not do (it says so and the resize is refused).

Writes are ``cudaMemcpyAsync`` host-to-device from a pinned host buffer on one of two non-blocking copy streams:
on-demand loads on one, prefetches on the other, so a demand copy never queues behind a prefetch copy (each
stream runs in order; the GPU's copy engines serve both). A write first makes its stream wait on the events it is
given (a worker's "done reading this slot", write-after-read; the slot's previous write, write-after-write
across the streams) and records an event after the copy (read-after-write), returned as its ``Completion``.
cupy is imported here only, when the backend is chosen.
"""
from __future__ import annotations

import ctypes
import logging

from services.memd.chunks import Chunks
from services.memd.pools import Completion, Pool, PoolExport

log = logging.getLogger("moeinf.memd.cuda")
H2D = 1  # cudaMemcpyHostToDevice
IPC_LAZY_PEER = 1  # cudaIpcMemLazyEnablePeerAccess


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
    """An event recorded on a stream: done when the GPU has run everything before it on that stream."""

    def __init__(self, event):
        self.event = event

    def done(self) -> bool:
        return self.event.done

    def wait(self) -> None:
        self.event.synchronize()


class CudaPool(Pool):
    backend = "cuda-ipc"

    def __init__(self, nbytes: int, slot_bytes: int, chunk_slots: int, device: int = 0):
        self.cupy = cp = import_cupy()
        self.nbytes, self.slot_bytes, self.index = nbytes, slot_bytes, device
        self.device = cp.cuda.Device(device)
        self.uuid = device_uuid(cp, device)
        with self.device:
            self.streams = {True: cp.cuda.Stream(non_blocking=True), False: cp.cuda.Stream(non_blocking=True)}
            self.chunks = Chunks(nbytes, slot_bytes, chunk_slots, self._malloc, self._free)
            self.handles = [bytes(cp.cuda.runtime.ipcGetMemHandle(p)) for p in self.chunks.mem]

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
        return PoolExport(self.backend, "", self.nbytes, self.uuid, self.chunks.chunk_bytes, handles)

    def write(self, offset: int, src: memoryview, after: tuple[Completion, ...] = (), *,
              demand: bool = False) -> Completion:
        """``src`` must be writable pinned host memory (the host tier or a staging buffer), untouched until the
        returned completion is done. ``demand``: on the on-demand copy stream."""
        cp = self.cupy
        ptr, within = self.chunks.locate(offset, len(src))
        host = ctypes.addressof(ctypes.c_char.from_buffer(src))
        stream = self.streams[demand]
        with self.device:
            for c in after:
                if isinstance(c, CudaEvent):
                    stream.wait_event(c.event)  # on the GPU: the host does not block
                elif not c.done():
                    c.wait()  # a host-side completion: wait here
            cp.cuda.runtime.memcpyAsync(ptr + within, host, len(src), H2D, stream.ptr)
            event = cp.cuda.Event(block=False, disable_timing=True)
            event.record(stream)
        return CudaEvent(event)

    def synchronize(self) -> None:
        for stream in self.streams.values():
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
    """Page-locked host memory (the host tier, staging buffers): ``view`` is a writable memoryview of it."""

    def __init__(self, nbytes: int):
        self.cupy = import_cupy()
        try:
            self.ptr = self.cupy.cuda.runtime.hostAlloc(nbytes, 0)
        except self.cupy.cuda.runtime.CUDARuntimeError as exc:
            raise RuntimeError(f"cannot pin {nbytes} bytes of host memory ({exc}): lower --host-memory") from None
        self.nbytes = nbytes
        self.view = memoryview((ctypes.c_char * nbytes).from_address(self.ptr)).cast("B")

    def close(self) -> None:
        if self.ptr:
            self.view.release()
            self.cupy.cuda.runtime.freeHost(self.ptr)
            self.ptr = 0
