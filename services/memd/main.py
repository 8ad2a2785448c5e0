"""``moeinf memd``: start the expert-memory daemon.

Order matters for failing fast and clean: validate the checkpoint and the size first (nothing created yet),
then take the state lock, then create the pool; every exit path unlinks the pool and the socket files.
"""
from __future__ import annotations

import asyncio
import logging
import signal

from common.access import Access
from common.config import MemdConfig
from common.config_checks import format_cpus, pin_cpus
from common.expert_index import ExpertIndex
from common.sizes import format_bytes, parse_size
from services.memd.core import ExpertCache, CacheSettings
from services.memd.eamc import FILE_NAME as EAMC_FILE
from services.memd.eamc import load_or_empty
from services.memd.indexer import load_index, save_index
from services.memd.eamc_share import pull
from services.memd.leases import ControlPage
from services.memd.backend import open_backend
from services.memd.host_compute import SPARE_HOST_SLOTS, HostCompute
from services.memd.pool import SHM_DIR, StateLock, pool_name
from services.memd.pool_memory import PoolMemory
from services.memd.server import MemdServer
from services.memd.spread import SPREAD_BYTES, spread_rows

log = logging.getLogger("moeinf.memd")


def plan_pool(cfg: MemdConfig, store: ExpertIndex) -> int:
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


def open_store(cfg: MemdConfig):
    """``(store, index)``: the checkpoint's expert index as stored (built by the indexer child, cached: memd itself
    imports neither torch nor transformers; for a shared-memory pool, with rows spread apart, ``spread.py``), read
    from the checkpoint or from its lossless slot images (``--slot-cache``), or with ``--expert-format`` the
    compressed cache over it (converted with NumPy); ``index`` is the index to save in the state directory, None
    when the cached one was used."""
    index, fresh = load_index(cfg.model, cfg.state_dir, cfg.index_cache_dir)
    if not cfg.expert_format:  # a CPU worker's kernels read rows spread apart faster (spread.py); a GPU's do not
        return slot_images(cfg, spread_rows(index) if cfg.pool_backend == "shm" else index), index if fresh else None
    from services.memd.compressed import CompressedStore, cache_root

    if cfg.slot_cache == "on":
        log.warning("--slot-cache on changes nothing with --expert-format %s: its cache already keeps each expert as"
                    " its slot image", cfg.expert_format)

    store = CompressedStore(index, cfg.model, cfg.expert_format, cache_root(cfg.state_dir, cfg.expert_cache_dir))
    return store, index if fresh else None


def slot_images(cfg: MemdConfig, served: ExpertIndex):
    """``served``, or its lossless slot-image cache (``--slot-cache``: services/memd/slot_images.py)."""
    if cfg.slot_cache == "off":
        return served
    from services.memd.slot_images import LosslessImages, auto_reason, cache_root, direct_io_refused

    if cfg.slot_compression == "zstd":
        from services.memd.packed_images import PackedImages as Images
    else:
        Images = LosslessImages
    images = Images(served, cfg.model, cache_root(cfg.state_dir, cfg.expert_cache_dir))
    reason = auto_reason(images, cfg.direct_io) if cfg.slot_cache == "auto" else ""
    if cfg.slot_cache == "on" and cfg.direct_io:
        if refused := direct_io_refused(images.where):
            raise ValueError(f"--slot-cache on: {refused}; give --expert-cache-dir on a disk file system, or"
                             " --slot-cache auto (declines) or off")
    if reason:
        log.info("slot cache: off, the experts are read from the checkpoint (%s)", reason)
        return served
    log.info("slot cache: each expert is kept as its slot image in %s (%s once all are read), so that reads go"
             " straight into slots; --slot-cache off reads the checkpoint as stored", images.directory,
             format_bytes(images.file_bytes))
    return images


def run(cfg: MemdConfig) -> int:
    from services.memd.testhooks import install_from_env  # TEST ONLY: MOEINF_TEST_READ_LATENCY_MS (tests/fault)

    install_from_env()
    if cpus := pin_cpus(cfg.io_cpus, "--io-cpus"):  # before the reader threads start: they inherit it
        log.info("memd's threads run on CPUs %s (--io-cpus)", format_cpus(cpus))
    for sig in (signal.SIGTERM, signal.SIGHUP):  # until _serve's handlers: a stop unwinds through ``finally``
        signal.signal(sig, _stop_before_serving)  # (indexing included: its child is killed), removing what is made
    store, new_index = open_store(cfg)
    num_slots = plan_pool(cfg, store)
    log.info("checkpoint %s: %s, %d MoE layers x %d experts, %s each, %s of experts in all", cfg.model,
             store.model_type, store.num_layers, store.num_experts, format_bytes(store.expert_bytes),
             format_bytes(store.total_expert_bytes))
    spread = [spec.name for spec in store.tensors if spec.row_stride]
    if spread:
        log.info("slots: the rows of %s spread %d bytes further apart for the worker's CPU kernels (%s slots)",
                 ", ".join(spread), SPREAD_BYTES, format_bytes(store.slot_bytes))
    access = Access(cfg.group)
    access.makedirs(cfg.state_dir)  # a new state directory is 0700 (0770 with --group), whatever the umask
    lock = StateLock(cfg.state_dir)
    backend = control = None
    try:
        if new_index is not None:
            save_index(cfg.state_dir, new_index, cfg.index_cache_dir)
        if hasattr(store, "open"):  # a slot-image cache opens its files
            store.open()
        backend = open_backend(cfg, store, num_slots, pool_name(cfg.state_dir))
        control = ControlPage(pool_name(cfg.state_dir, "control"))
        if backend.path is not None:
            access.apply(backend.path)  # born 0600; the group's too with --group (a worker of another user maps it)
        access.apply(control.region.path)
        host = None
        if backend.host_name:  # --cpu-experts: workers map the host tier and compute some experts on their CPU
            access.apply(SHM_DIR / backend.host_name)
            host = HostCompute(backend.reader, backend.host_name, backend.host_slots, store.slot_bytes,
                               SPARE_HOST_SLOTS * cfg.read_threads, always=cfg.cpu_experts == "always")
        log.info("pool %s: %d slots, %s (%.0f%% of all experts)", backend.path or cfg.pool_backend, num_slots,
                 format_bytes(backend.pool.nbytes), 100 * num_slots / (store.num_layers * store.num_experts))
        memory = PoolMemory(backend.pool, store.slot_bytes, getattr(backend.reader, "settle", None))  # admin resize
        core = build_core(cfg, store, num_slots, on_retire=memory.retired)
        asyncio.run(_serve(MemdServer(cfg, store, core, backend.reader, memory, control, host)))
    finally:
        if backend is not None:
            backend.close()
        if control is not None:
            control.close()
        if hasattr(store, "close"):  # a slot-image cache closes its files
            store.close()
        lock.release()
    log.info("memd stopped")
    return 0


def build_core(cfg: MemdConfig, store: ExpertIndex, num_slots: int, on_retire=None) -> ExpertCache:
    """The decision core, with the EAMC saved in the state directory (if any, and if it fits this model)."""
    knobs = CacheSettings.from_config(cfg, num_slots * store.slot_bytes)
    if knobs.prefetch and knobs.budget_bytes is not None and knobs.budget_bytes < store.expert_bytes:
        one = format_bytes(store.expert_bytes)
        raise ValueError(f"--prefetch-budget {cfg.prefetch_budget} is {format_bytes(knobs.budget_bytes)}, less than one"
                         f" expert ({one}): no prefetch could ever start; give at least {one}, auto, or --prefetch off")
    eamc = load_or_empty(cfg.state_dir / EAMC_FILE, store.num_layers, store.num_experts, knobs.eamc_capacity,
                         model=cfg.model.resolve().name)
    if cfg.eamc_from:  # a replica starting cold learns what its fleet saw (services/memd/eamc_share.py)
        pull(eamc, cfg.eamc_from, cfg.admin_token)
    core = ExpertCache(num_slots, store.num_layers, store.num_experts, store.top_k, store.expert_bytes, knobs, eamc,
                       on_retire)
    core.fetchable = store.ready  # (--expert-format: an expert not converted yet is never prefetched)
    return core


def _stop_before_serving(signum, frame) -> None:
    raise SystemExit(128 + signum)


async def _serve(server: MemdServer) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, server.stop)
    await server.serve()
