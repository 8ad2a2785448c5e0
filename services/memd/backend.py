"""Building memd's pool and its reader for ``--pool-backend`` (docs/gpu.md).

``shm``: one tier, as always: the reader writes straight into the shared-memory pool. ``cuda``: the device pool,
and a pinned host tier behind it of ``--host-memory`` (at least two slots per reader thread, which are then the
pinned staging buffers that let disk reads and H2D copies overlap); the reader writes into the host tier and
``tiers.TieredReader`` copies to the device.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from common.config import MemdConfig
from common.sizes import format_bytes, parse_bytes, parse_size
from services.memd.pool import pool_name
from services.memd.pools import Pool, ShmPool
from services.memd.reader import ExpertReader
from common.expert_index import ExpertIndex

log = logging.getLogger("moeinf.memd")
STAGING_PER_THREAD = 2  # host slots per reader thread at least: one being read while one is copied


@dataclass
class Backend:
    pool: Pool
    reader: object  # ExpertReader, or TieredReader over one
    closers: list = field(default_factory=list)  # closed after the reader and the pool, in order
    path: Path | None = None  # the /dev/shm file, for --group permissions (shm only)
    host_name: str = ""  # the host tier's /dev/shm name, when workers compute from it (--cpu-experts auto|always)
    host_slots: int = 0

    def close(self) -> None:
        self.reader.close()
        self.pool.close()
        for c in self.closers:
            c.close()


def read_chunk(cfg: MemdConfig) -> int:
    return parse_bytes(cfg.read_chunk, what="--read-chunk")


def host_slots(cfg: MemdConfig, store: ExpertIndex) -> int:
    """Slots of the pinned host tier: ``--host-memory``, at least the reader's staging, at most every expert."""
    total = store.num_layers * store.num_experts
    staging = STAGING_PER_THREAD * cfg.read_threads
    if cfg.host_memory.strip() == "0":
        return staging
    budget = parse_size(cfg.host_memory, what="--host-memory").resolve(store.slot_bytes * total)
    return max(staging, min(total, budget // store.slot_bytes))


def open_backend(cfg: MemdConfig, store: ExpertIndex, num_slots: int, name: str) -> Backend:
    nbytes = num_slots * store.slot_bytes
    if cfg.pool_backend == "shm":
        pool = ShmPool(name, nbytes, store.slot_bytes)
        try:
            reader = ExpertReader(store, pool.host_view(), store.slot_bytes, cfg.direct_io, threads=cfg.read_threads,
                                  chunk=read_chunk(cfg))
        except BaseException:
            pool.close()
            raise
        return Backend(pool, reader, path=pool.path)
    return _open_cuda(cfg, store, nbytes)


def _open_cuda(cfg: MemdConfig, store: ExpertIndex, nbytes: int) -> Backend:
    from services.memd.cuda_pool import CudaPool, PinnedHost
    from services.memd.tiers import TieredReader

    done = []
    try:
        pool = CudaPool(nbytes, store.slot_bytes, store.num_experts, cfg.cuda_device,
                        events=cfg.copy_events == "ipc")
        done.append(pool)
        slots = host_slots(cfg, store)
        shared = pool_name(cfg.state_dir, "host") if cfg.cpu_experts != "off" else ""  # workers map it (cpu experts)
        host = PinnedHost(slots * store.slot_bytes, shared)
        done.append(host)
        inner = ExpertReader(store, host.view, store.slot_bytes, cfg.direct_io, threads=cfg.read_threads,
                             chunk=read_chunk(cfg))
    except BaseException:
        for c in reversed(done):
            c.close()
        raise
    table = TieredReader.host_table(slots, store.num_layers, store.num_experts)
    log.info("device pool on %s: %s in chunks of %s; pinned host tier: %d slots (%s)", pool.uuid,
             format_bytes(nbytes), format_bytes(pool.chunks.chunk_bytes), slots, format_bytes(host.nbytes))
    return Backend(pool, TieredReader(inner, table, host.view, pool, store.slot_bytes), [host],
                   host_name=host.name, host_slots=slots if host.name else 0)
