"""``bench e2e --formats``: the same checkpoint served through memd's compressed expert cache (``--expert-format``),
one row per format (``moeinf-fp8``, ``moeinf-mxfp4``), the cache filled before the timed runs."""
from __future__ import annotations

import sys
from pathlib import Path


def format_system(fmt: str) -> str:
    return f"moeinf-{fmt}"


FORMAT_SYSTEMS = {format_system(f): f for f in ("fp8", "mxfp4")}  # row name -> memd --expert-format


def expert_cache(opts) -> Path:
    from common.config import default_state_dir
    from services.memd.compressed import cache_root

    return cache_root(default_state_dir(), opts.expert_cache_dir)


def fill_expert_cache(opts, fmt: str) -> None:
    """Convert every expert ahead (as ``moeinf convert``), so the timed runs read the cache, not convert."""
    from services.memd.compressed import CompressedStore

    store = CompressedStore.of(opts.model, fmt, expert_cache(opts)).open()
    try:
        missing = store.missing
        for start in range(0, len(missing), store.num_experts):
            store.prepare_many(missing[start:start + store.num_experts])
        print(f"[bench] expert cache {store.directory}: {fmt}, {len(missing)} experts converted now", file=sys.stderr, flush=True)
    finally:
        store.close()
