"""``moeinf bench overhead`` on a tiny checkpoint: the table and the JSON have the promised shape (timings are not
checked), and every memd it starts is stopped, with nothing left in /dev/shm or the temp directory, on success,
on an error and on Ctrl-C."""
import json
import os
import signal
import subprocess
import time

import pytest
from helpers import moeinf_cmd, write_family

JSON_KEYS = {"system", "decode_ms_p50", "decode_ms_p90", "prefill_ms", "ratio_vs_transformers",
             "bytes_read_per_token", "hits", "misses"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_family("mixtral", tmp_path_factory.mktemp("bench") / "m")


@pytest.fixture
def tmpdir_env(bench_tmp):
    """The bench's memd state directories land here, so a leftover one is seen."""
    return bench_tmp, {**os.environ, "TMPDIR": str(bench_tmp)}


def bench(model, *extra, env=None, timeout=300):
    cmd = moeinf_cmd("bench", "overhead", "--model", str(model), "--tokens", "3", "--prompt-len", "5",
                     "--repeats", "2", "--threads", "1", *extra)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


def test_table_and_json(tiny, tmp_path, tmpdir_env):
    tmp, env = tmpdir_env
    out = tmp_path / "overhead.json"
    proc = bench(tiny, "--memory", "100%", "25%", "--json", str(out), env=env)
    assert proc.returncode == 0, proc.stderr

    lines = proc.stdout.splitlines()
    header = next(line for line in lines if line.startswith("system"))
    for column in ("prefill ms", "decode p50", "decode p90", "vs transf.", "miss/tok", "MiB rd/tok", "same tokens"):
        assert column in header
    rows = {line.split()[0]: line for line in lines[lines.index(header) + 1:] if line.strip()}
    assert {"transformers", "moeinf-100%", "moeinf-25%"} <= set(rows)
    assert all(row.split()[-1] == "yes" for name, row in rows.items() if name in ("moeinf-100%", "moeinf-25%"))

    doc = json.loads(out.read_text())
    assert doc["model"] == str(tiny) and doc["threads"] == 1
    systems = {s["system"]: s for s in doc["systems"]}
    assert list(systems) == ["transformers", "moeinf-100%", "moeinf-25%"]
    for s in systems.values():
        assert JSON_KEYS <= set(s)
        assert s["decode_ms_p50"] > 0 and s["decode_ms_p90"] >= s["decode_ms_p50"] and s["prefill_ms"] > 0
        assert s["identical_to_transformers"] is True
    assert systems["transformers"]["ratio_vs_transformers"] == 1.0
    assert systems["transformers"]["hits"] is None and systems["transformers"]["bytes_read_per_token"] is None
    full, quarter = systems["moeinf-100%"], systems["moeinf-25%"]
    assert full["hits"] > 0 and full["misses"] == 0  # the warm-up ran the same tokens: every expert is resident
    assert quarter["misses"] > 0 and quarter["pool"]["slots"] < quarter["pool"]["experts"]
    expert_bytes = 3 * 128 * 64 * 4  # w1, w3, w2 of the float32 test model
    full_read = round(full["bytes_read_per_token"] * full["decode_steps"])  # no miss: only prefetches into free slots
    assert full_read % expert_bytes == 0 and full_read <= full["prefetch_issued"] * expert_bytes  # (or cancelled)
    assert full["pool"]["slots"] == full["pool"]["experts"]
    read = round(quarter["bytes_read_per_token"] * quarter["decode_steps"])
    misses, issued = quarter["misses"], quarter["prefetch_issued"]
    assert read % expert_bytes == 0 and misses * expert_bytes <= read <= (misses + issued) * expert_bytes  # whole
    # memd heard every generation start and end, as from the worker: its EAMC holds the warm-up and both repeats
    assert full["eamc_size"] == quarter["eamc_size"] == 3 and systems["transformers"]["eamc_size"] is None
    assert list(tmp.iterdir()) == [], "a memd state directory was left behind"


def test_memd_failure_is_an_error_and_cleans_up(tiny, tmpdir_env):
    tmp, env = tmpdir_env
    proc = bench(tiny, "--memory", "100%", "1%", env=env)  # 1% cannot hold one layer: the second memd fails
    assert proc.returncode == 2
    assert "too small to hold one layer" in proc.stderr
    assert list(tmp.iterdir()) == []


@pytest.mark.slow  # CI's time: test_memd_failure_is_an_error_and_cleans_up checks the same cleanup path
def test_ctrl_c_stops_memd(tiny, tmpdir_env):
    tmp, env = tmpdir_env
    cmd = moeinf_cmd("bench", "overhead", "--model", str(tiny), "--tokens", "400", "--prompt-len", "5",
                     "--repeats", "50", "--threads", "1", "--memory", "100%")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while not any(tmp.iterdir()) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        memd_logs = [d / "memd.log" for d in tmp.iterdir()]
        while time.monotonic() < deadline and proc.poll() is None and not any(
                "worker pid" in p.read_text(errors="replace") for p in memd_logs if p.exists()):
            time.sleep(0.1)  # the worker attached: the run is under way
        assert proc.poll() is None, proc.communicate()[1]
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert list(tmp.iterdir()) == [], "memd's state directory was left behind"


def test_bad_arguments(tiny):
    proc = bench(tiny, "--memory", "lots")
    assert proc.returncode == 2 and "--memory" in proc.stderr
    proc = subprocess.run(moeinf_cmd("bench", "overhead", "--model", str(tiny), "--tokens", "0"),
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "--tokens" in proc.stderr


def test_logit_agreement_compares_until_the_first_differing_token():
    import torch

    from services.bench.overhead import Run, logit_agreement

    ref = Run(0.0, [], [1, 2, 3, 4], logits=[torch.zeros(5) for _ in range(4)])
    same = Run(0.0, [], [1, 2, 3, 4], logits=[torch.zeros(5) for _ in range(4)])
    off = [torch.zeros(5), torch.tensor([0, 0, 0.25, 0, 0]), torch.full((5,), 9.0), torch.full((5,), 9.0)]
    diverged = Run(0.0, [], [1, 7, 3, 4], logits=off)  # token 2 differs: later steps had other inputs
    assert logit_agreement(same, ref) == (0.0, 4, 4)
    assert logit_agreement(diverged, ref) == (0.25, 4, 2)


def test_every_round_decodes_a_prompt_of_its_own_checked_against_its_own_reference():
    """memd's EAMC learns every finished request: a round on the warm-up's prompt, or an earlier round's, would be
    predicted from its own past. Each round's tokens are compared with transformers' on that round's prompt."""
    from types import SimpleNamespace

    from services.bench.overhead import Run, round_prompts
    from services.bench.report import summarize

    warmup, prompts = round_prompts(32000, 16, 3)
    assert len(prompts) == 3 and len({tuple(warmup), *map(tuple, prompts)}) == 4
    assert all(len(p) == 16 and min(p) >= 3 for p in [warmup, *prompts])
    assert round_prompts(32000, 16, 3) == (warmup, prompts)  # the same for every system and every run
    system = SimpleNamespace(name="moeinf-25%", expert_memory="25%", pool=(1, 2, 3))
    runs = [Run(0.1, [0.01], [r, r + 1]) for r in range(3)]
    assert summarize(system, runs, [[0, 1], [1, 2], [2, 3]]).identical
    assert not summarize(system, runs, [[0, 1], [0, 1], [0, 1]]).identical  # one reference for all: not its round's
    assert not summarize(system, runs, [[0, 1], [1, 2]]).identical
