"""``moeinf memd``: start the expert-memory daemon.

Order matters for failing fast and clean: validate the checkpoint and the size first (nothing created yet),
then take the state lock, then create the pool; every exit path unlinks the pool and the socket files.
"""
from __future__ import annotations

import asyncio
import logging
import signal

from common.access import Access
from common.checkpoint import Checkpoint
from common.config import MemdConfig
from common.sizes import format_bytes, parse_size
from services.memd.compressed import CompressedStore, cache_root
from services.memd.core import ExpertManager, Knobs
from services.memd.eamc import FILE_NAME as EAMC_FILE
from services.memd.eamc import load_or_empty
from services.memd.leases import ControlPage
from services.memd.pool import SharedPool, StateLock, pool_name
from services.memd.reader import ExpertReader
from services.memd.server import MemdServer
from services.memd.store import ExpertStore

log = logging.getLogger("moeinf.memd")


def plan_pool(cfg: MemdConfig, store: ExpertStore) -> int:
    """Number of slots the ``--expert-memory`` budget buys; raises ValueError when it cannot hold one layer."""
    spec = parse_size(cfg.expert_memory, what="--expert-memory")
    budget = spec.resolve(store.slot_bytes * store.num_layers * store.num_experts)
    num_slots = min(budget // store.slot_bytes, store.num_layers * store.num_experts)
    minimum = store.num_experts * store.slot_bytes
    if num_slots < store.num_experts:
        given = f"{spec} ({format_bytes(budget)})" if spec.fraction is not None else str(spec)
        raise ValueError(f"--expert-memory {given} is too small to hold one layer's {store.num_experts} experts:"
                         f" the minimum is {format_bytes(minimum)} ({minimum} bytes)")
    return num_slots


def open_store(cfg: MemdConfig) -> ExpertStore:
    """The checkpoint's experts as stored, or (``--expert-format``) through the compressed cache."""
    store = ExpertStore(Checkpoint(cfg.model))
    if not cfg.expert_format:
        return store
    return CompressedStore(store, cfg.expert_format, cache_root(cfg.state_dir, cfg.expert_cache_dir))


def run(cfg: MemdConfig) -> int:
    store = open_store(cfg)
    num_slots = plan_pool(cfg, store)
    log.info("checkpoint %s: %s, %d MoE layers x %d experts, %s each, %s of experts in all", cfg.model,
             store.model_type, store.num_layers, store.num_experts, format_bytes(store.expert_bytes),
             format_bytes(store.total_expert_bytes))
    access = Access(cfg.group)
    access.makedirs(cfg.state_dir)  # a new state directory is 0700 (0770 with --group), whatever the umask
    lock = StateLock(cfg.state_dir)
    pool = reader = control = None
    try:
        if isinstance(store, CompressedStore):
            store.open()
        pool = SharedPool(pool_name(cfg.state_dir), num_slots * store.slot_bytes)
        control = ControlPage(pool_name(cfg.state_dir, "control"))
        access.apply(pool.path)  # born 0600; the group's too with --group (a worker of another user maps them)
        access.apply(control.region.path)
        log.info("pool %s: %d slots, %s (%.0f%% of all experts)", pool.path, num_slots, format_bytes(pool.nbytes),
                 100 * num_slots / (store.num_layers * store.num_experts))
        reader = ExpertReader(store, pool.view, store.slot_bytes, cfg.direct_io, threads=cfg.read_threads,
                              chunk=parse_size(cfg.read_chunk, what="--read-chunk").resolve(0))
        core = build_core(cfg, store, num_slots)
        asyncio.run(_serve(MemdServer(cfg, store, core, reader, pool.name, pool.nbytes, control)))
    finally:
        if reader is not None:
            reader.close()
        if pool is not None:
            pool.close()
        if control is not None:
            control.close()
        if isinstance(store, CompressedStore):
            store.close()
        lock.release()
    log.info("memd stopped")
    return 0


def build_core(cfg: MemdConfig, store: ExpertStore, num_slots: int) -> ExpertManager:
    """The decision core, with the EAMC saved in the state directory (if any, and if it fits this model)."""
    knobs = Knobs.from_config(cfg, num_slots * store.slot_bytes)
    eamc = load_or_empty(cfg.state_dir / EAMC_FILE, store.num_layers, store.num_experts, knobs.eamc_capacity,
                         model=cfg.model.resolve().name)
    top_k = getattr(store.config.get_text_config(), "num_experts_per_tok", None) or 2
    return ExpertManager(num_slots, store.num_layers, store.num_experts, top_k, store.expert_bytes, knobs, eamc)


async def _serve(server: MemdServer) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, server.stop)
    await server.serve()
