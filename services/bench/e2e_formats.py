"""``bench e2e --formats``: the same checkpoint served through memd's compressed expert cache (``--expert-format``),
one row per format (``moeinf-fp8``, ``moeinf-mxfp4``), the cache filled before the timed runs; and the lossless
slot images every moeinf system reads where memd's ``--slot-cache`` keeps them, also filled before."""
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
        print(f"[bench] expert cache {store.directory}: {fmt}, {len(missing)} experts converted now", file=sys.stderr,
              flush=True)
    finally:
        store.close()


def _kept_images(opts):
    """The lossless slot images memd's ``--slot-cache`` would keep for this run's checkpoint, or None."""
    from common.config import MemdConfig
    from services.memd.main import slot_images
    from services.memd.packed_images import PackedImages
    from services.memd.slot_images import LosslessImages

    if opts.slot_cache == "off":
        return None
    kind = PackedImages if opts.slot_compression == "zstd" else LosslessImages
    images = kind.of(opts.model, expert_cache(opts))
    cfg = MemdConfig(model=opts.model, slot_cache=opts.slot_cache, expert_cache_dir=expert_cache(opts),
                     slot_compression=opts.slot_compression)
    return None if slot_images(cfg, images.served) is images.served else images


def _same_disk(model: Path, directory: Path) -> bool:
    """Does ``directory`` (or, before it exists, its nearest parent) lie on the device of ``model``'s files?"""
    from common.checkpoint import Checkpoint

    where = next(p for p in (directory, *directory.parents) if p.exists())
    return where.stat().st_dev == Path(Checkpoint(model).files[0]).stat().st_dev


def check_slot_images(opts):
    """``(opts, note)`` before anything is measured: slot images must lie on the checkpoint's disk, which the
    baselines read and the disk probes (and ``--disk-read-limit``) measure. Asked for (``--slot-cache on`` or an
    ``--expert-cache-dir``) on another disk: an error; the default cache on another disk: this run reads the
    checkpoint (``--slot-cache off``), said in the note."""
    import dataclasses

    if not any(name.startswith("moeinf") for name in opts.run_systems):
        return opts, None
    if opts.formats and not _same_disk(opts.model, expert_cache(opts)):  # compressed caches: nothing to fall back to
        raise ValueError(f"--formats: the compressed experts would be read from {expert_cache(opts)}, on another device"
                         " than the checkpoint the baselines read and the disk probes measure: give --expert-cache-dir"
                         " on the checkpoint's disk")
    images = _kept_images(opts)
    if images is None or _same_disk(opts.model, images.directory):
        return opts, None
    if opts.slot_cache == "on" or opts.expert_cache_dir is not None:
        raise ValueError(f"the slot images would be read from another device ({images.directory}) than the checkpoint"
                         " the baselines read and the disk probes and --disk-read-limit measure: give"
                         " --expert-cache-dir on the checkpoint's disk, or --slot-cache off")
    return dataclasses.replace(opts, slot_cache="off", slot_compression="off"), (
        f"slot images: off in this run: the default expert cache ({images.directory}) lies on another"
        " device than the checkpoint, which the baselines read and the disk probes measure; give --expert-cache-dir"
        " on the checkpoint's disk for images")


def fill_slot_images(opts) -> tuple[str, Path | None]:
    """Fill the lossless slot images ahead where memd's ``--slot-cache`` would keep them (the same decision, made
    here; ``check_slot_images`` has put them on the checkpoint's disk or turned them off); returns the line that says
    what was done, and the images' file (what every moeinf memd reads, so what its disk probes read; None: the
    checkpoint)."""
    if opts.slot_cache == "off":
        return "slot images: off (--slot-cache off): memd reads the checkpoint as stored", None
    images = _kept_images(opts)
    if images is None:
        return ("slot images: not kept (--slot-cache auto decided against them, see memd's log): memd reads the"
                " checkpoint"), None
    images.open()
    try:
        converted = images.fill()
    finally:
        images.close()
    packed = f", compressed to {images.packed_share:.3f} of their bytes" if images.packs else ""
    return (f"slot images {images.directory}{packed}: every moeinf system reads them, and its disk probes too"
            f" ({converted} experts converted now)"), Path(images.path)
