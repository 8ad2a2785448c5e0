"""Opening an expert cache removes the caches it supersedes (services/memd/superseded.py): the same checkpoint,
format and slot size under another name (other code, other checkpoint contents); nothing else."""
import json

from common.checkpoint import Checkpoint
from services.memd.packed_images import PackedImages
from services.memd.slot_images import LosslessImages
from services.memd.spread import spread_rows
from services.memd.store import ExpertStore
from test_slot_images import wide  # noqa: F401 (the fixture)


def sibling(root, name: str, manifest: dict | None):
    path = root / name
    path.mkdir()
    (path / "experts.bin").write_bytes(b"\0" * 4096)
    if manifest is not None:
        (path / "manifest.json").write_text(json.dumps(manifest))
    return path


def test_a_new_cache_removes_the_ones_it_supersedes_and_nothing_else(wide, tmp_path):  # noqa: F811
    index = spread_rows(ExpertStore(Checkpoint(wide)).index())
    images = LosslessImages(index, wide, tmp_path)
    mine = {"checkpoint": str(images.model_dir), "format": "slots", "slot_bytes": images.slot_bytes}
    old = sibling(tmp_path, "m-slots-0000000000000000", mine)  # other code or contents: superseded
    packed_layout = sibling(tmp_path, "m-slots-1111111111111111", {**mine, "slot_bytes": images.slot_bytes + 4096})
    elsewhere = sibling(tmp_path, "m-slots-2222222222222222", {**mine, "checkpoint": "/another/m"})
    zstd = sibling(tmp_path, "m-slots-zstd-3333333333333333", {**mine, "format": "slots-zstd"})
    foreign = sibling(tmp_path, "m-slots-4444444444444444", None)
    unreadable = sibling(tmp_path, "m-slots-5555555555555555", None)
    (unreadable / "manifest.json").write_text("{not json")
    images.open()
    try:
        assert not old.exists()
        assert all(p.exists() for p in (packed_layout, elsewhere, zstd, foreign, unreadable, images.directory))
        assert json.loads((images.directory / "manifest.json").read_text())["slot_bytes"] == images.slot_bytes
    finally:
        images.close()
    packed = PackedImages(index, wide, tmp_path)  # a compressed cache sweeps its own format only
    packed.open()
    packed.close()
    assert not zstd.exists() and images.directory.exists()
