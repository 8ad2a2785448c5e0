"""The activation-aware knobs: defaults, validation naming the flag, and ``serve`` passing them to its children."""
from pathlib import Path

import pytest

from common.config import GatewayConfig, MemdConfig, WorkerConfig, build_config
from common.serve_config import ServeConfig
from services.memd.core import CacheSettings
from services.supervisor import Supervisor


def test_defaults_and_env():
    cfg = build_config(MemdConfig, env={}, model="/m")
    assert (cfg.policy, cfg.prefetch, cfg.prefetch_window, cfg.eamc_capacity) == ("activation", True, 4, 256)
    knobs = CacheSettings.from_config(cfg)
    assert knobs == CacheSettings() and knobs.budget_bytes is None
    env = {"MOEINF_POLICY": "lfu", "MOEINF_PREFETCH": "off", "MOEINF_PREFETCH_BUDGET": "64MiB",
           "MOEINF_EAMC_CAPACITY": "32"}
    knobs = CacheSettings.from_config(build_config(MemdConfig, env=env, model="/m"))
    assert (knobs.policy, knobs.prefetch, knobs.budget_bytes, knobs.eamc_capacity) == ("lfu", False, 64 << 20, 32)
    worker = build_config(WorkerConfig, env={"MOEINF_RECORD_TRACE": "/tmp/t.jsonl", "MOEINF_NEXT_GATE": "off"},
                          model="/m")
    assert worker.record_trace == Path("/tmp/t.jsonl") and worker.next_gate is False
    assert build_config(WorkerConfig, env={}, model="/m").record_trace is None


@pytest.mark.parametrize("field, value, words", [
    ("policy", "mru", "--policy 'mru': choose one of lru, lfu, activation"),
    ("prefetch_threshold", "0", "--prefetch-threshold must be in"),
    ("prefetch_window", "0", "--prefetch-window"),
    ("eamc_capacity", "0", "--eamc-capacity"),
    ("read_chunk", "big", "--read-chunk 'big' is not a size"),
    ("read_chunk", "25%", "--read-chunk '25%': give a size in bytes"),  # (a share of nothing: it meant 1 MiB)
    ("expert_memory", "lots", "--expert-memory 'lots' is not a size"),
    ("prefetch_budget", "lots", "--prefetch-budget 'lots' is not a size"),
])
def test_bad_values_name_the_flag(field, value, words):
    with pytest.raises(ValueError, match=words):
        build_config(MemdConfig, env={}, model="/m", **{field: value})


@pytest.mark.parametrize("config, field", [(WorkerConfig, "handshake_timeout_s"), (WorkerConfig, "memd_timeout_s"),
                                           (GatewayConfig, "step_timeout_s")])
@pytest.mark.parametrize("value", ["0", "-1"])
def test_timeouts_must_be_positive(config, field, value):
    """0 was taken as "use the other timeout" (the worker's handshake) or failed every request at once (a step)."""
    with pytest.raises(ValueError, match=f"--{field.replace('_', '-')}.* must be > 0"):
        build_config(config, env={}, model="/m", **{field: value})


def test_a_prefetch_budget_below_one_expert_is_refused(tmp_path):
    """No prefetch could ever start (the planner queues whole experts), yet memd said "prefetch on"."""
    from types import SimpleNamespace

    from services.memd.main import build_core

    store = SimpleNamespace(num_layers=2, num_experts=4, top_k=2, expert_bytes=336 << 20, slot_bytes=336 << 20,
                            ready=lambda key: True)
    cfg = build_config(MemdConfig, env={}, model=str(tmp_path), state_dir=str(tmp_path), prefetch_budget="64MiB")
    with pytest.raises(ValueError, match=r"--prefetch-budget 64MiB is 64.0 MiB, less than one expert \(336.0 MiB\)"):
        build_core(cfg, store, 4)
    assert build_core(build_config(MemdConfig, env={}, model=str(tmp_path), state_dir=str(tmp_path),
                                   prefetch_budget="64MiB", prefetch="off"), store, 4).knobs.budget_bytes == 64 << 20
    assert build_core(build_config(MemdConfig, env={}, model=str(tmp_path), state_dir=str(tmp_path),
                                   prefetch_budget="50%"), store, 4).knobs.budget_bytes == 672 << 20


def test_serve_passes_policy_prefetch_and_record_trace(tmp_path):
    cfg = build_config(ServeConfig, env={}, policy="lru", prefetch="off", record_trace=str(tmp_path / "t.jsonl"))
    sup = Supervisor(cfg, tmp_path)
    memd, worker = sup.memd.args, sup.workers[0].args
    assert memd[memd.index("--policy") + 1] == "lru" and memd[memd.index("--prefetch") + 1] == "off"
    assert worker[worker.index("--record-trace") + 1] == str(tmp_path / "t.jsonl")
    default = Supervisor(build_config(ServeConfig, env={}), tmp_path)
    assert default.memd.args[default.memd.args.index("--policy") + 1] == "activation"
    assert "--record-trace" not in default.workers[0].args
    assert "--expert-format" not in default.memd.args
    compressed = Supervisor(build_config(ServeConfig, env={}, expert_format="mxfp4"), tmp_path).memd.args
    assert compressed[compressed.index("--expert-format") + 1] == "mxfp4"
    with pytest.raises(ValueError, match="--expert-format 'int4': choose fp8 or mxfp4"):
        build_config(ServeConfig, env={}, expert_format="int4")
    with pytest.raises(ValueError, match="--policy"):
        build_config(ServeConfig, env={}, policy="fifo")


def test_serve_workers_get_their_own_ids_and_sockets(tmp_path):
    one = Supervisor(build_config(ServeConfig, env={}), tmp_path)
    assert len(one.workers) == 1 and "--worker-id=" in one.workers[0].args  # (empty: worker.sock, never the env's)
    assert one.workers[0].sockets[0].endswith("/worker.sock")
    three = Supervisor(build_config(ServeConfig, env={}, workers="3"), tmp_path)
    ids = [next(a for a in w.args if a.startswith("--worker-id="))[len("--worker-id="):] for w in three.workers]
    assert ids == ["0", "1", "2"] and [w.sockets[0].rsplit("/", 1)[1] for w in three.workers] == [
        "worker-0.sock", "worker-1.sock", "worker-2.sock"]
    # each worker's KV cache budget is its share of the memory all of them see (auto: 80% each, 240% in all)
    assert all(w.args[w.args.index("--kv-cache-memory") + 1] == "26.6667%" for w in three.workers)
    assert "--kv-cache-memory" not in one.workers[0].args
    with pytest.raises(ValueError, match="--record-trace writes one file"):
        build_config(ServeConfig, env={}, workers="2", record_trace=str(tmp_path / "t"))


def test_serve_device_puts_the_pool_and_the_worker_on_one_gpu(tmp_path):
    cpu = Supervisor(build_config(ServeConfig, env={}), tmp_path)
    worker = cpu.workers[0].args
    assert "--pool-backend" not in cpu.memd.args and worker[worker.index("--device") + 1] == "cpu"
    gpu = Supervisor(build_config(ServeConfig, env={}, device="cuda:1", workers="2"), tmp_path)
    memd = gpu.memd.args
    assert memd[memd.index("--pool-backend") + 1] == "cuda" and memd[memd.index("--cuda-device") + 1] == "1"
    assert all(w.args[w.args.index("--device") + 1] == "cuda:1" for w in gpu.workers)
    with pytest.raises(ValueError, match="--device must be cpu, cuda or cuda:N"):
        build_config(ServeConfig, env={}, device="gpu")
    with pytest.raises(ValueError, match="quantized experts in a GPU pool.*--device cpu"):
        build_config(ServeConfig, env={}, device="cuda", expert_format="fp8")
