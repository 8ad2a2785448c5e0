"""``moeinf selftest --device cuda`` on a host without CUDA says so and fails; the link-peak arithmetic."""
import pytest

from services.cli import main
from services import selftest


@pytest.mark.skipif(not selftest.cuda_missing(), reason="this host has CUDA: the GPU checks run instead")
def test_without_cuda_it_says_no_cuda_device_and_exits_2(capsys):
    assert main(["selftest", "--device", "cuda"]) == 2
    out = capsys.readouterr().out
    assert out.startswith("moeinf selftest: no CUDA device: ")


@pytest.mark.parametrize("flags,message", [(["--repeats", "0"], "must be at least 1"),
                                           (["--memory", "lots"], "is not a size"),
                                           (["--model", "/nonexistent"], "no config.json")])
def test_flags_are_checked_before_any_work(capsys, flags, message):
    assert main(["selftest", "--device", "cuda", *flags]) == 2
    assert message in capsys.readouterr().err


def test_only_cuda_is_a_device(capsys):
    with pytest.raises(SystemExit):
        main(["selftest", "--device", "cpu"])
    assert "invalid choice: 'cpu'" in capsys.readouterr().err


def test_link_peak_reads_nvidia_smi(monkeypatch):
    class Done:
        stdout = "4, 16\n"

    monkeypatch.setattr(selftest.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    monkeypatch.setattr(selftest.subprocess, "run", lambda *a, **k: Done())
    name, gbps = selftest.link_peak(0)
    assert name == "PCIe 4.0 x16" and gbps == pytest.approx(31.5, abs=0.1)
    monkeypatch.setattr(selftest.shutil, "which", lambda name: None)
    assert selftest.link_peak(0) is None
