"""The worker's view of memd's expert pool: one ``[slots, *shape]`` strided tensor per expert parameter.

``shm``: the /dev/shm file mapped once (``torch.from_file``), one view over all slots. ``cuda-ipc``
(``CudaPoolViews``, docs/gpu.md): each chunk's IPC handle opened once through cupy, wrapped without a copy
(DLPack) and viewed the same way, one view set per chunk (``ChunkWindows``). A layer's window of slots inside one
chunk is a view; separate allocations cannot be one strided tensor, so when a layer's slots lie in several
chunks the experts in use (not every slot between them) are gathered into one tensor (a device copy, logged
once). Run on an H200: ``tests/memd/test_cuda_pool.py`` and ``tests/worker/test_cuda_worker.py``
(marker ``cuda``).
"""
from __future__ import annotations

import math

import logging

import torch

from common import messages as m

log = logging.getLogger("moeinf.worker.pool")
IPC_LAZY_PEER = 1  # cudaIpcMemLazyEnablePeerAccess


def open_views(hello: m.HelloReply):
    if hello.backend == "shm":
        return PoolViews(hello)
    if hello.backend == "cuda-ipc":
        return CudaPoolViews(hello)
    raise RuntimeError(f"pool backend {hello.backend!r} is not supported by this worker")


def slot_params(by_slot: torch.Tensor, tensors: list[m.TensorSpec]) -> dict[str, torch.Tensor]:
    """``[slots, *shape]`` views of every parameter of ``by_slot`` (``[slots, slot_bytes]`` uint8)."""
    params = {}
    for spec in tensors:
        dtype = getattr(torch, spec.dtype)
        if spec.row_stride:  # rows spread apart (services/memd/spread.py): a view of each row's first bytes
            rows, width = math.prod(spec.shape[:-1]), spec.row_stride // dtype.itemsize
            wide = by_slot[:, spec.offset:spec.offset + rows * spec.row_stride].view(dtype)
            params[spec.name] = wide.unflatten(1, (*spec.shape[:-1], width))[..., :spec.shape[-1]]
            continue
        nbytes = math.prod(spec.shape) * dtype.itemsize
        params[spec.name] = by_slot[:, spec.offset:spec.offset + nbytes].view(dtype).unflatten(1, spec.shape)
    return params


class PoolViews:
    """The worker's mapping of memd's shared-memory pool and one ``[num_slots, *shape]`` view per parameter."""

    read_events = None  # (a GPU pool's: the worker's "done reading" events, device.ReadEvents)

    def __init__(self, hello: m.HelloReply, host_tier: bool = False):
        """``host_tier``: map the host tier memd shares for CPU experts (``HelloReply.host_pool_name``, a GPU pool
        with --cpu-experts auto|always) instead of the pool."""
        if hello.backend != "shm" and not host_tier:
            raise RuntimeError(f"pool backend {hello.backend!r} is not a shared-memory pool")
        if host_tier:
            name, self.num_slots, nbytes = hello.host_pool_name, hello.host_slots, hello.host_slots * hello.slot_bytes
        else:
            name, self.num_slots, nbytes = hello.pool_name, hello.num_slots, hello.pool_bytes
        raw = torch.from_file(f"/dev/shm/{name}", shared=True, size=nbytes, dtype=torch.uint8)
        self.hello, self.by_slot = hello, raw.view(self.num_slots, hello.slot_bytes)
        self.contiguous = False  # (CUDA only: the experts' windows copied before the matmul, ExpertBinding.grouped)
        self.quantized = {spec.name for spec in hello.tensors if spec.format}  # dequantized by quant.py
        self.params = slot_params(self.by_slot, hello.tensors)

    def window(self, lo: int, hi: int) -> dict[str, torch.Tensor]:
        return {n: t[lo:hi] for n, t in self.params.items()}

    def crosses(self, lo: int, hi: int) -> bool:
        return False  # one mapping: every window is a view

    def wait(self, ring: list[int]) -> None:
        raise RuntimeError(f"memd named copy events {ring} for a shared-memory pool, which has none")


class ChunkWindows:
    """Views of a pool held in chunks of ``chunk_slots`` slots: ``chunks[i]`` maps each parameter to a
    ``[slots of chunk i, *shape]`` view."""

    chunks: list[dict[str, torch.Tensor]]
    chunk_slots: int
    params: dict[str, torch.Tensor]
    _gathered = False
    read_events = None  # the worker's "done reading" events (device.ReadEvents), set by the worker once made

    def crosses(self, lo: int, hi: int) -> bool:
        """Slots ``lo..hi-1`` lie in more than one chunk (no single view holds them)."""
        return lo // self.chunk_slots != (hi - 1) // self.chunk_slots

    def window(self, lo: int, hi: int) -> dict[str, torch.Tensor]:
        """Slots ``lo..hi-1`` as one view when one chunk holds them, else every slot between them copied."""
        if not self.crosses(lo, hi):
            first = lo // self.chunk_slots
            return {n: t[lo - first * self.chunk_slots:hi - first * self.chunk_slots]
                    for n, t in self.chunks[first].items()}
        return self.gather(list(range(lo, hi)))

    def gather(self, slots: list[int]) -> dict[str, torch.Tensor]:
        """The experts of ``slots`` (in that order) copied into one ``[len(slots), *shape]`` tensor each."""
        if not self._gathered:
            log.warning("a layer's experts lie in several pool chunks: the ones in use are gathered into one tensor"
                        " (a device copy) for the matmul")
            self._gathered = True
        cs = self.chunk_slots
        return {name: torch.cat([self.chunks[s // cs][name][s % cs:s % cs + 1] for s in slots])
                for name in self.params}


class CudaPoolViews(ChunkWindows):
    """memd's device pool opened by CUDA IPC: per chunk, ``[chunk slots, *shape]`` views on this GPU."""

    def __init__(self, hello: m.HelloReply, device: int | None = None, ptrs: list[int] | None = None):
        """``ptrs``: the chunks' device addresses when the pool lives in this process (the self-test; an IPC
        handle cannot be opened by the process that made it); otherwise the handles are opened here."""
        import cupy

        self.cupy = cupy
        self.device = torch.cuda.current_device() if device is None else device
        mine = str(torch.cuda.get_device_properties(self.device).uuid)
        from common.devices import same_device

        if not same_device(mine, hello.device):
            raise RuntimeError(f"memd's pool is on GPU {hello.device}, this worker on GPU-{mine}: CUDA IPC maps memory"
                               " on its own device only")
        if any(spec.format for spec in hello.tensors):
            raise RuntimeError("quantized experts (MXFP4, FP8, or --expert-format) in a CUDA pool are not supported"
                               " yet: serve them on the CPU (memd --pool-backend shm and worker --device cpu; serve"
                               " --device cpu)")
        self.hello, self.num_slots, self.quantized = hello, hello.num_slots, set()
        self.contiguous = False  # the grouped matmul refused the strided views: windows copied (ExpertBinding.grouped)
        self.chunk_slots = hello.chunk_bytes // hello.slot_bytes
        self.opened = ptrs is None  # ours to close
        self.by_slot = None  # no single tensor spans the chunks
        with cupy.cuda.Device(self.device):
            self.ptrs = list(ptrs) if ptrs is not None else [
                cupy.cuda.runtime.ipcOpenMemHandle(handle, IPC_LAZY_PEER) for handle in hello.chunk_handles]
            self.chunks = [slot_params(self._chunk(i), hello.tensors) for i in range(len(self.ptrs))]
        self.params = self.chunks[0]  # shapes, for the binding's layout check
        # memd's copy-event ring (--copy-events ipc), opened once; empty in memd's own process (the self-test)
        self.events = [] if ptrs is not None else [torch.cuda.Event.from_ipc_handle(self.device, handle)
                                                   for handle in hello.event_handles]

    def wait(self, ring: list[int]) -> None:
        """The current stream waits, on the GPU, for memd's copies recorded at these ring entries."""
        stream = torch.cuda.current_stream(self.device)
        for i in ring:
            stream.wait_event(self.events[i])

    def _chunk(self, i: int) -> torch.Tensor:
        cp, h = self.cupy, self.hello
        slots = min(self.chunk_slots, h.num_slots - i * self.chunk_slots)
        nbytes = slots * h.slot_bytes
        mem = cp.cuda.UnownedMemory(self.ptrs[i], nbytes, self, self.device)
        array = cp.ndarray((nbytes,), dtype=cp.uint8, memptr=cp.cuda.MemoryPointer(mem, 0))
        return torch.from_dlpack(array).view(slots, h.slot_bytes)

    def close(self) -> None:
        torch.cuda.synchronize(self.device)
        self.chunks, self.params, self.events = [], {}, []
        if self.opened:
            with self.cupy.cuda.Device(self.device):
                for p in self.ptrs:
                    self.cupy.cuda.runtime.ipcCloseMemHandle(p)
        self.ptrs = []

