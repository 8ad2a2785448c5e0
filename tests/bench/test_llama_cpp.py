"""``bench e2e``'s llama.cpp system (``services/bench/llama_cpp.py``, ``e2e_llama.py``) against a stand-in server
(``fake_llama_server.py``: llama-server's flags, ``/health``, streamed ``/completion``): what it is sent, how its
tokens are read (a held-back token, a short or failed generation), why it is skipped, the GGUF's header checked
against the checkpoint, and how its tokens are compared with the reference's."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import gguf_of, moeinf_cmd, write_family, write_gguf
from services.bench.e2e_llama import compare_tokens, environment_note, same_tokens
from services.bench.llama_cpp import (LLAMA, LlamaCppSystem, agreement, find_server, gguf_metadata, gguf_mismatch,
                                      llama_missing)

FAKE = Path(__file__).with_name("fake_llama_server.py")


@pytest.fixture
def fake_server(tmp_path) -> Path:
    script = tmp_path / "llama-server"
    script.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FAKE}" "$@"\n')
    script.chmod(0o755)
    return script


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return write_family("mixtral", tmp_path_factory.mktemp("llama") / "m")


def test_agreement_counts_tokens_up_to_each_requests_first_difference():
    assert agreement([[1, 2, 3], [4, 5, 6]], [[1, 2, 3], [4, 5, 6]]) == 1.0
    assert agreement([[1, 9, 3], [4, 5, 6]], [[1, 2, 3], [4, 5, 6]]) == 4 / 6  # 3 after the difference: not counted
    assert agreement([[7, 2, 3]], [[1, 2, 3]]) == 0.0
    assert agreement([[1, -1, 3]], [[1, 2, 3]]) == 1 / 3  # a held-back token's unknown id ends the match
    assert agreement([[1, 2]], [[1, 2], [3]]) is None and agreement([], []) is None  # not the same requests


def test_compare_tokens_prefers_transformers_then_moeinf_at_the_same_memory():
    rows = [{"system": LLAMA, "expert_memory": "25%", "concurrency": 1},
            {"system": LLAMA, "expert_memory": "50%", "concurrency": 1},
            {"system": LLAMA, "expert_memory": "12.5%", "concurrency": 1, "error": "killed"}]
    outputs = {(LLAMA, "25%", 0): [[1, 2, 3]], (LLAMA, "25%", 1): [[4, 5]],
               (LLAMA, "50%", 0): [[1, 2, 3]], (LLAMA, "12.5%", 0): [[1]],
               ("moeinf", "25%", 0): [[1, 2, 0]], ("moeinf", "25%", 1): [[4, 5]],
               ("moeinf", "50%", 0): [[1, 0, 0]]}
    compare_tokens(rows, outputs)
    assert (rows[0]["tokens_reference"], rows[0]["tokens_agreement"]) == ("moeinf", 4 / 5)  # both repeats
    assert (rows[1]["tokens_reference"], rows[1]["tokens_agreement"]) == ("moeinf", 1 / 3)
    assert "tokens_reference" not in rows[2]
    outputs[("transformers-resident", None, 0)] = [[1, 2, 3]]
    compare_tokens(rows, outputs)
    assert (rows[0]["tokens_reference"], rows[0]["tokens_agreement"]) == ("transformers-resident", 1.0)


def test_moeinf_rows_must_generate_the_references_tokens(monkeypatch):
    """bench e2e checks moeinf's greedy tokens (transformers' when it ran, else the other moeinf system's) and says
    which MOEINF_* variables the services read, so a lossy knob in the environment cannot pass unnoticed."""
    rows = [{"system": "moeinf", "expert_memory": "25%", "concurrency": 1},
            {"system": "moeinf-ondemand-lru", "expert_memory": "25%", "concurrency": 1}]
    outputs = {("moeinf", "25%", 0): [[1, 2]], ("moeinf-ondemand-lru", "25%", 0): [[1, 2]],
               ("moeinf", "25%", 1): [[3]], ("moeinf-ondemand-lru", "25%", 1): [[3]]}
    assert same_tokens(rows, outputs) == [] and rows[0]["tokens_identical"] and rows[1]["tokens_identical"]
    outputs[("transformers-resident", None, 1)] = [[4]]
    notes = same_tokens(rows, outputs)
    assert [r["tokens_identical_to"] for r in rows] == ["transformers-resident"] * 2
    assert not rows[0]["tokens_identical"] and len(notes) == 2 and notes[0].startswith("MISMATCH: moeinf at 25%")
    monkeypatch.setenv("MOEINF_MATVEC_KERNEL", "fast")
    monkeypatch.setenv("MOEINF_ADMIN_TOKEN", "secret")
    note = environment_note()
    assert "MOEINF_MATVEC_KERNEL=fast" in note and "secret" not in note


def test_the_gguf_header_is_checked_against_the_checkpoint(tmp_path, model):
    good = gguf_of(model, tmp_path / "good.gguf")
    meta = gguf_metadata(good)
    assert meta["llama.block_count"] > 0 and meta["tokenizer.ggml.tokens"] is None  # arrays skipped, keys after read
    assert gguf_mismatch(good, model) is None
    wrong = gguf_of(model, tmp_path / "wrong.gguf", **{"llama.expert_count": 3})
    assert "not a conversion of --model" in gguf_mismatch(wrong, model) \
        and "expert_count 3" in gguf_mismatch(wrong, model)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"PK\x03\x04 not a gguf")
    assert "not a GGUF file" in gguf_mismatch(junk, model)


def test_why_it_is_skipped(tmp_path, fake_server, monkeypatch, model):
    monkeypatch.delenv("MOEINF_LLAMA_SERVER", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    monkeypatch.setattr("services.bench.llama_cpp.BUILT", tmp_path / "not-built")
    assert find_server(None) is None and "make llama-cpp" in llama_missing(None, None)
    gguf = tmp_path / "m.gguf"
    assert "not an executable file" in llama_missing(tmp_path / "m.gguf", gguf)
    assert "give --gguf FILE" in llama_missing(fake_server, None)
    assert "no such file" in llama_missing(fake_server, gguf)
    gguf_of(model, gguf)
    assert llama_missing(fake_server, gguf) is None and llama_missing(fake_server, gguf, model) is None
    monkeypatch.setenv("MOEINF_LLAMA_SERVER", str(fake_server))
    assert find_server(None) == fake_server and find_server("/x/llama-server") == Path("/x/llama-server")


def test_server_is_driven_greedily_one_slot_no_prompt_cache(tmp_path, fake_server, monkeypatch):
    log = tmp_path / "log.jsonl"
    monkeypatch.setenv("FAKE_LLAMA_LOG", str(log))
    gguf = write_gguf(tmp_path / "m.gguf", {})
    system = LlamaCppSystem(fake_server, gguf, 1, 512).start()
    try:
        client = system.client()
        assert list(client.stream([5, 7], 3)) == [[8], [9], [10]]
        assert list(client.stream([300, 319], 2)) == [[0], [1]]  # the next request: a connection of its own
        assert system.runtime_bytes() > 1 << 20  # a Python process's heap at least
        assert system.pss_bytes() > 0 and system.counters() is None
    finally:
        system.stop()
    assert system.process.proc.poll() is not None and not system.temp_dir.exists()
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    argv = entries[0]["argv"]
    assert argv[argv.index("-m") + 1] == str(gguf) and argv[argv.index("-c") + 1] == "512"
    assert argv[argv.index("-np") + 1] == "1" and argv[argv.index("-t") + 1] == "1"
    assert argv[argv.index("--cache-ram") + 1] == "0"  # no host-memory prompt cache growing inside the limit
    body = entries[1]["request"]
    assert body["prompt"] == [5, 7] and body["n_predict"] == 3 and body["stream"] and body["return_tokens"]
    assert body["cache_prompt"] is False and body["ignore_eos"] is True
    assert body["samplers"] == ["top_k"] and body["top_k"] == 1


@pytest.mark.parametrize("env, outcome", [
    ({"FAKE_LLAMA_HOLD": "1"}, [[8], [-1, 10]]),  # a held-back token arrives with the next, its id unknown
    ({"FAKE_LLAMA_SHORT": "1"}, "generated 2 tokens, not 3"),
    ({"FAKE_LLAMA_ERROR": "the model failed"}, "llama-server: error: .*the model failed"),
])
def test_held_back_short_and_failed_generations(tmp_path, fake_server, monkeypatch, env, outcome):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    system = LlamaCppSystem(fake_server, write_gguf(tmp_path / "m.gguf", {}), 1, 256).start()
    try:
        if isinstance(outcome, list):
            assert list(system.client().stream([5, 7], 3)) == outcome
        else:
            with pytest.raises(RuntimeError, match=outcome):
                list(system.client().stream([5, 7], 3))
    finally:
        system.stop()


def test_a_server_that_dies_is_reported_and_its_log_kept(tmp_path, capfd):
    script = tmp_path / "llama-server"
    script.write_text("#!/bin/sh\necho 'error: failed to load model'\nexit 3\n")
    script.chmod(0o755)
    system = LlamaCppSystem(script, tmp_path / "m.gguf", 1, 256)
    with pytest.raises(RuntimeError, match="(?s)llama-server exited with 3.*failed to load model"):
        system.start()
    assert system.process.log_path.exists() and str(system.process.log_path) in capfd.readouterr().err
    system.stop()


def test_e2e_gets_a_llama_row_beside_moeinf_on_the_same_prompts(tmp_path, fake_server, bench_tmp, model):
    from services.bench.e2e_workload import Workloads

    gguf = gguf_of(model, tmp_path / "m.gguf")
    out, log = tmp_path / "e2e.json", tmp_path / "log.jsonl"
    cmd = moeinf_cmd("bench", "e2e", "--model", str(model), "--runtime-allowance", "1GiB", "--systems", "moeinf",
                     "llama.cpp", "--expert-memory", "100%", "--requests", "2", "--max-tokens", "4", "--threads", "1",
                     "--repeats", "2", "--llama-server", str(fake_server), "--gguf", str(gguf), "--json", str(out),
                     "--floor-probe", "64MiB")
    env = {**os.environ, "TMPDIR": str(bench_tmp), "FAKE_LLAMA_LOG": str(log)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    rows = {r["system"]: r for r in json.loads(out.read_text())["systems"]}
    llama = rows[LLAMA]
    assert llama["generated_tokens"] == 2 * 4 and llama["repeats"] == 2 and llama["decode_ms_per_token_p50"] > 0
    # (the reference: plain transformers' tokens, made untimed after the systems when it is not one of them)
    assert llama["tokens_reference"] == "transformers-resident" and isinstance(llama["tokens_agreement"], float)
    assert rows["moeinf"]["tokens_identical"] and rows["moeinf"]["tokens_identical_to"] == "transformers-resident"
    assert "llama.cpp (llama-server on a GGUF" in proc.stdout and "x llama.cpp's time" in proc.stdout
    sent = [json.loads(line)["request"]["prompt"] for line in log.read_text().splitlines() if "request" in line]
    w = Workloads(model, 2, 0, False, ("moeinf", LLAMA), 2, 1, vocab=json.loads((model / "config.json").read_text())[
        "vocab_size"])
    # a fresh server per repeat (interleaved with moeinf's): its warm-up, then moeinf's prompts of that repeat
    assert sent == [w.warmup(), *w.prompts("moeinf", 0), w.warmup(), *w.prompts("moeinf", 1)]


def test_e2e_refuses_a_gguf_of_another_model_and_notes_a_missing_server(tmp_path, fake_server, monkeypatch, model):
    from services.bench.e2e import Options
    from services.bench.e2e_sweep import Sweep

    monkeypatch.delenv("MOEINF_LLAMA_SERVER", raising=False)
    monkeypatch.setattr("services.bench.llama_cpp.BUILT", tmp_path / "not-built")
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    sweep = Sweep(Options(model, ("25%",), 4, None, 1, (1,), 1, 1, None, systems=(LLAMA,)))
    assert not sweep.available(LLAMA) and "make llama-cpp" in sweep.notes[-1]
    with pytest.raises(ValueError, match="make llama-cpp"):  # --gguf given: llama.cpp was asked for
        Options(model, ("25%",), 4, None, 1, (1,), 1, 1, None, gguf=gguf_of(model, tmp_path / "m.gguf")).validate()
    wrong = gguf_of(model, tmp_path / "w.gguf", **{"llama.block_count": 99})
    with pytest.raises(ValueError, match="block_count 99"):
        Options(model, ("25%",), 4, None, 1, (1,), 1, 1, None, llama_server=fake_server, gguf=wrong).validate()
