"""Expert caches a new one supersedes: removed when it opens, so an upgrade does not leave gigabytes behind.

A cache directory's name hashes everything that decides its bytes (``SlotImageCache._name``): the checkpoint's
identity, the indexing and encoding code, the layout. When any of it changes, memd writes a new directory beside the
old one, which nothing reads again. Opening a cache removes its siblings whose ``manifest.json`` names the same
checkpoint path, format and slot size: the same cache as written by other code or from other checkpoint contents.
One with another slot size is left alone (another memd may serve the same checkpoint in another layout: a GPU pool's
rows packed, a CPU pool's spread apart), as is anything that is not a cache of ours or cannot be read. A memd of the
older code still running (a rolling upgrade) keeps reading the files it has open; restarted, it writes its own again.
"""
from __future__ import annotations

import glob
import json
import logging
import shutil
from pathlib import Path

log = logging.getLogger("moeinf.memd.slot_images")


def sweep(directory: Path, manifest: dict) -> list[Path]:
    """Remove the caches ``directory`` (just opened, described by ``manifest``) supersedes; returns them."""
    same = ("checkpoint", "format", "slot_bytes")
    prefix = f"{glob.escape(Path(manifest['checkpoint']).name)}-{glob.escape(manifest['format'])}-"
    removed = []
    for other in sorted(directory.parent.glob(prefix + "*")):
        if other == directory or other.is_symlink() or not other.is_dir():
            continue
        try:
            theirs = json.loads((other / "manifest.json").read_text())
        except (OSError, ValueError):
            continue
        if isinstance(theirs, dict) and all(theirs.get(k) == manifest[k] for k in same):
            shutil.rmtree(other, ignore_errors=True)  # (a memd still reading it keeps its open files)
            if not other.exists():
                removed.append(other)
                log.info("expert cache %s superseded by %s: removed", other.name, directory.name)
    return removed
