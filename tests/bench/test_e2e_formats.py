"""services/bench/e2e_formats.py: the slot images every moeinf system reads lie on the checkpoint's disk, the one the
baselines read and the disk probes measure, or the bench refuses to start."""
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from services.bench.e2e_formats import fill_slot_images

from helpers import write_family


def test_slot_images_on_another_disk_than_the_checkpoint_are_refused(tmp_path):
    model = write_family("mixtral", tmp_path / "m", dtype="bfloat16")
    elsewhere = Path("/dev/shm") / f"moeinf-test-images-{os.getpid()}"  # tmpfs: another device than the tmp dir's
    if Path("/dev/shm").stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("/dev/shm and the temp directory are one file system here")
    opts = SimpleNamespace(model=model, slot_cache="on", expert_cache_dir=elsewhere, disk_read_limit="")
    with pytest.raises(ValueError, match=r"another device .* give --expert-cache-dir on the checkpoint's disk"):
        fill_slot_images(opts)
    assert not elsewhere.exists()
    opts.expert_cache_dir = tmp_path / "images"  # the checkpoint's disk: filled
    assert "every moeinf system reads them" in fill_slot_images(opts)
