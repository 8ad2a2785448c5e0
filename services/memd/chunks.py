"""A device pool's memory as fixed-size chunks of whole slots: one allocation (and one IPC handle) per chunk.

Shared by ``cuda_pool.CudaPool`` and the host-memory stand-in (``standin.py``), so the CPU suite runs the same
bookkeeping the GPU backend uses. A chunk is freed once every slot of it is released (a live shrink); growing
back into a freed chunk is refused, because the workers mapped the old allocation by its handle and this version
does not hand them a new one.
"""
from __future__ import annotations

from typing import Callable, Generic, TypeVar

M = TypeVar("M")


class Chunks(Generic[M]):
    def __init__(self, nbytes: int, slot_bytes: int, chunk_slots: int, alloc: Callable[[int], M],
                 free: Callable[[M], None]):
        if chunk_slots < 1 or nbytes % slot_bytes:
            raise ValueError(f"chunks of {chunk_slots} slots over {nbytes} bytes of {slot_bytes}-byte slots")
        self.nbytes, self.slot_bytes, self.chunk_bytes = nbytes, slot_bytes, chunk_slots * slot_bytes
        self._free = free
        self.mem: list[M | None] = []
        try:
            for i in range(-(-nbytes // self.chunk_bytes)):
                self.mem.append(alloc(self.size(i)))
        except BaseException:
            self.close()
            raise
        self.released: list[set[int]] = [set() for _ in self.mem]  # per chunk: offsets of released slots

    def size(self, i: int) -> int:
        return min(self.chunk_bytes, self.nbytes - i * self.chunk_bytes)

    def locate(self, offset: int, length: int) -> tuple[M, int]:
        """The chunk holding ``[offset, offset + length)`` and the offset within it."""
        i, within = divmod(offset, self.chunk_bytes)
        if not 0 <= i < len(self.mem) or within + length > self.size(i):
            raise ValueError(f"{length} bytes at {offset} are not inside one chunk of the pool")
        mem = self.mem[i]
        if mem is None:
            raise ValueError(f"{length} bytes at {offset} fall in chunk {i}, which a shrink freed")
        return mem, within

    def _span(self, offset: int, length: int):
        for i in range(offset // self.chunk_bytes, min(len(self.mem), -(-(offset + length) // self.chunk_bytes))):
            lo = max(offset, i * self.chunk_bytes)
            hi = min(offset + length, i * self.chunk_bytes + self.size(i))
            yield i, range(lo - lo % self.slot_bytes, hi, self.slot_bytes)

    def release(self, offset: int, length: int, before_free: Callable[[], None] = lambda: None) -> list[int]:
        """Mark the slots released; free the chunks now wholly released. Returns the chunks freed."""
        freed = []
        for i, slots in self._span(offset, length):
            self.released[i].update(slots)
            if self.mem[i] is not None and len(self.released[i]) * self.slot_bytes >= self.size(i):
                before_free()
                self._free(self.mem[i])
                self.mem[i] = None
                freed.append(i)
        return freed

    def ensure(self, offset: int, length: int) -> None:
        for i, slots in self._span(offset, length):
            if self.mem[i] is None:
                raise RuntimeError(f"chunk {i} of the device pool was freed by a shrink; growing back into it needs"
                                   " the workers to open a new IPC handle, which this version does not do: restart"
                                   " memd with the larger --expert-memory")
            self.released[i].difference_update(slots)

    @property
    def freed(self) -> bool:
        return any(m is None for m in self.mem)

    def resident_bytes(self) -> int:
        return sum(self.size(i) for i, m in enumerate(self.mem) if m is not None)

    def close(self) -> None:
        for i, m in enumerate(self.mem):
            if m is not None:
                self._free(m)
                self.mem[i] = None
