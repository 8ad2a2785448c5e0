"""``moeinf bench profile`` on a tiny checkpoint: the table and the JSON have the promised shape, the parts add
up to the hooked step, the floor is measured, and the tokens are transformers' (timings are not checked)."""
import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import gguf_of, moeinf_cmd, write_family

ROWS = ("attention", "norms", "router", "experts", "embed", "final norm", "lm head", "python/dispatch",
        "step (hooked)", "step (no hooks, p50)", "vs floor", "vs floor, same rounds", "same tokens")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_family("mixtral", tmp_path_factory.mktemp("profile") / "m")


def profile(model, *extra):
    cmd = moeinf_cmd("bench", "profile", "--model", str(model), "--tokens", "3", "--prompt-len", "5", "--threads",
                     "1", "--floor-mib", "64", "--floor-runs", "2", *extra)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # two memds, a worker process and two models: minutes on a loaded 2-core machine
def test_table_and_json(tiny, tmp_path):
    out = tmp_path / "profile.json"
    server = tmp_path / "llama-server"  # llama.cpp's stand-in (tests/bench/fake_llama_server.py)
    server.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{Path(__file__).with_name("fake_llama_server.py")}" "$@"\n')
    server.chmod(0o755)
    gguf = gguf_of(tiny, tmp_path / "m.gguf")
    proc = profile(tiny, "--json", str(out), "--service", "--gguf", str(gguf), "--llama-server", str(server))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    header = next(line for line in lines if line.startswith("ms per decode token"))
    assert header.split()[-2:] == ["transformers", "moeinf-100%"]
    for row in ROWS:
        assert any(line.startswith(row) for line in lines), row
    assert next(line for line in lines if line.startswith("same tokens")).split()[-2:] == ["yes", "yes"]
    floor = ("bandwidth floor: bf16 matrix-vector (F.linear, packed, matvec.c or matvec_exact.c) over 64 MiB, the"
             " fastest in this run:")
    assert any(line.startswith(floor) for line in lines)
    service = next(line for line in lines if line.startswith("service path"))
    assert service.endswith("same tokens: yes")

    doc = json.loads(out.read_text())
    assert [s["system"] for s in doc["systems"]] == ["transformers", "moeinf-100%"]
    for s in doc["systems"]:
        kinds = s["hooked"]["kinds"]
        assert kinds["attention"] > 0 and kinds["experts"] > 0 and kinds["router"] > 0 and kinds["norms"] > 0
        assert sum(kinds.values()) == pytest.approx(s["hooked"]["step_ms"])
        assert [row["layer"] for row in s["hooked"]["layers"]] == [0, 1, 2, 3]
        assert s["decode_ms_p50"] > 0 and s["identical"] is True
    b = doc["bytes_per_token"]
    expert_bytes = 3 * 128 * 64 * 4  # w1, w3, w2 of the float32 test model
    assert b["experts"] == 2 * 4 * expert_bytes  # top-2 in each of 4 MoE layers
    assert b["dense"] > 0 and b["weights"] == b["dense"] + b["experts"] and b["kv_cache"] > 0
    assert doc["floor"]["gb_per_s"] > 0 and doc["floor"]["buffer_bytes"] == 64 << 20
    f = doc["floor"]  # the fastest of the end's best and the fastest round, never weaker than either
    assert f["gb_per_s"] == max(f["end_gb_per_s"], f["rounds_best_gb_per_s"])
    assert f["rounds_best_gb_per_s"] >= f["rounds_gb_per_s"]
    assert doc["floor"]["ms_per_token"] == pytest.approx(b["weights"] / doc["floor"]["gb_per_s"] / 1e6)
    rounds, rounds_gb = doc["floor"]["rounds_ms_per_token"], doc["floor"]["rounds_gb_per_s"]  # between the rounds
    assert rounds_gb > 0 and rounds == pytest.approx(b["weights"] / rounds_gb / 1e6)
    assert all(s["vs_floor_rounds"] == pytest.approx(s["decode_ms_p50"] / rounds) for s in doc["systems"])
    assert doc["service"]["identical"] is True and doc["service"]["decode_ms_p50"] > 0
    llama = doc["llama_cpp"]  # the stand-in's tokens: the prompt's last + 1, + 2, ...
    assert llama["decode_ms_p50"] > 0 and llama["tokens_agreement"] is not None
    assert f"{llama['tokens_agreement']:.0%} of its tokens equal transformers'" in proc.stdout
    assert llama["moeinf_vs_llama"] == pytest.approx(doc["systems"][-1]["decode_ms_p50"] / llama["decode_ms_p50"])
    assert any(line.startswith("llama.cpp (llama-server on the GGUF") for line in lines)


def test_bad_arguments(tiny, tmp_path):
    proc = profile(tiny, "--tokens", "0")
    assert proc.returncode == 2 and "--tokens" in proc.stderr
    proc = profile(tiny, "--gguf", str(tmp_path / "none.gguf"), "--llama-server", "/bin/true")
    assert proc.returncode == 2 and "--gguf" in proc.stderr and "make gguf" in proc.stderr


def test_floor_step_keeps_the_fastest_product_and_times_each_run(monkeypatch):
    import time

    from services.bench import profile_parts
    from services.bench.profile_parts import FloorStep
    from services.worker.layouts import SPREAD_BYTES

    def products(weight, x, kernels):  # stand-ins of known speeds: the spread layout's second is the fastest
        spread = weight.stride(0) != weight.shape[1]
        return [functools.partial(time.sleep, ms / 1e3) for ms in ((6, 0.5, 3) if spread else (4, 2, 8))]

    monkeypatch.setattr(profile_parts, "_products", products)
    chosen = FloorStep(1 << 20, None, probe=2)
    assert chosen.choice == (SPREAD_BYTES // 2, 1) and chosen.product.args == (0.5e-3,)
    monkeypatch.undo()

    step = FloorStep(8 << 20, None, probe=1)  # torch's products only (no kernels)
    assert step.nbytes == 8 << 20 and step.seconds == []
    for _ in range(3):
        step.run()
    assert len(step.seconds) == 3 and all(t > 0 for t in step.seconds)
    assert step.gb_per_s() == pytest.approx(step.nbytes / sorted(step.seconds)[1] / 1e9)
    assert step.best_gb_per_s() == pytest.approx(step.nbytes / min(step.seconds) / 1e9)
