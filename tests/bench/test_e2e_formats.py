"""services/bench/e2e_formats.py: the slot images every moeinf system reads lie on the checkpoint's disk, the one the
baselines read and the disk probes measure: asked for elsewhere, the bench refuses before measuring anything; the
default cache elsewhere, the run reads the checkpoint and says so."""
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from services.bench import e2e_formats
from services.memd.slot_images import LosslessImages

from helpers import write_family


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """A cache directory on another device than the temp directory (tmpfs), kept whatever memd would decide about
    O_DIRECT there (this test is about the device)."""
    path = Path("/dev/shm") / f"moeinf-test-images-{os.getpid()}"
    if Path("/dev/shm").stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("/dev/shm and the temp directory are one file system here")
    monkeypatch.setattr(e2e_formats, "_kept_images",
                        lambda opts: LosslessImages.of(opts.model, e2e_formats.expert_cache(opts)))
    yield path
    assert not path.exists()


def _opts(model, cache_dir, slot_cache="auto", formats=()):
    return SimpleNamespace(model=model, slot_cache=slot_cache, expert_cache_dir=cache_dir, disk_read_limit="",
                           run_systems=("moeinf-ondemand-lru", "moeinf"), formats=formats)


def test_images_asked_for_on_another_disk_are_refused(tmp_path, elsewhere, monkeypatch):
    model = write_family("mixtral", tmp_path / "m", dtype="bfloat16")
    monkeypatch.setattr(e2e_formats, "expert_cache", lambda opts: opts.expert_cache_dir or elsewhere)
    for opts in (_opts(model, elsewhere), _opts(model, None, "on")):  # --expert-cache-dir there; --slot-cache on
        with pytest.raises(ValueError, match=r"another device .* give --expert-cache-dir on the checkpoint's disk"):
            e2e_formats.check_slot_images(opts)
    with pytest.raises(ValueError, match=r"--formats: the compressed experts would be read from .* another device"):
        e2e_formats.check_slot_images(_opts(model, None, "off", formats=("fp8",)))  # no checkpoint to fall back to


def test_the_default_cache_on_another_disk_reads_the_checkpoint(tmp_path, elsewhere, monkeypatch):
    import dataclasses

    from services.bench.e2e import Options

    model = write_family("mixtral", tmp_path / "m", dtype="bfloat16")
    monkeypatch.setattr(e2e_formats, "expert_cache", lambda opts: opts.expert_cache_dir or elsewhere)
    opts = dataclasses.replace(Options(model, ("25%",), 4, None, 1, (1,), 1, 1, None, ("moeinf",)), slot_cache="auto")
    checked, note = e2e_formats.check_slot_images(opts)
    assert checked.slot_cache == "off" and "lies on another device" in note and "--expert-cache-dir" in note
    assert str(elsewhere) in note  # the cache directory itself, not the parent that exists
    on_disk = dataclasses.replace(opts, expert_cache_dir=tmp_path / "images")  # the checkpoint's disk: kept, filled
    assert e2e_formats.check_slot_images(on_disk) == (on_disk, None)
    note, image_file = e2e_formats.fill_slot_images(on_disk)
    assert "every moeinf system reads them" in note and image_file.is_relative_to(tmp_path / "images")
    assert image_file.stat().st_size > 0  # (the file memd reads: the moeinf systems' disk probes read it)
    from services.bench.e2e_sweep import Sweep
    sweep = Sweep.__new__(Sweep)
    sweep.image_file, sweep.sizes = image_file, type("S", (), {"files": [model / "model.safetensors"]})
    assert sweep.probe_paths("moeinf") == [image_file] == sweep.probe_paths("moeinf-ondemand-lru")
    assert sweep.probe_paths("transformers-resident") == [model / "model.safetensors"]
