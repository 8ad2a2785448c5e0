"""``moeinf demo-model``: it never overwrites a real checkpoint, an interrupted build leaves nothing behind, and a
shape that could not be served is refused before anything is written."""
import os
from pathlib import Path

import pytest

from common import demo_model
from common.demo_model import MARKER, DemoSize, write_demo_model
from services.cli import main

TINY = DemoSize(layers=1, hidden=64, intermediate=128, heads=4, kv_heads=2)


def test_a_real_checkpoint_is_never_overwritten(tmp_path, capsys):
    real = tmp_path / "Mixtral"
    real.mkdir()
    (real / "model-00001-of-00002.safetensors").write_bytes(b"weights")
    assert main(["demo-model", str(real), "--layers", "1", "--hidden", "64", "--intermediate", "128",
                 "--heads", "4", "--kv-heads", "2"]) == 2
    assert "is not a moeinf demo model" in capsys.readouterr().err
    assert sorted(p.name for p in real.iterdir()) == ["model-00001-of-00002.safetensors"]


def test_an_earlier_demo_model_is_replaced_and_an_interrupted_build_leaves_nothing(tmp_path, monkeypatch):
    out = write_demo_model(tmp_path / "demo", TINY)
    assert (out / MARKER).is_file() and (out / "config.json").is_file()
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # (not the staging directory's 0700)
    write_demo_model(out, TINY)  # (a demo model: replaced)

    def interrupted(staging: Path, size, build_in_dtype):
        (staging / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(demo_model, "_write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_demo_model(tmp_path / "fresh", TINY)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]  # no half checkpoint, no staging directory


@pytest.mark.parametrize("flags,message", [
    (["--heads", "0"], "--heads must be at least 1"),
    (["--experts", "2", "--top-k", "5"], "--top-k 5 is more than --experts 2"),
    (["--hidden", "64", "--heads", "3"], "multiple of --heads"),
    (["--heads", "8", "--kv-heads", "3"], "multiple of"),
])
def test_a_shape_that_cannot_be_served_is_refused(tmp_path, capsys, flags, message):
    assert main(["demo-model", str(tmp_path / "demo"), *flags]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "demo").exists()
