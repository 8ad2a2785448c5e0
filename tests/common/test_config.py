"""``build_config``: explicit values > ``MOEINF_*`` variables > defaults, with errors that name the flag."""
import argparse
import os
import re
from pathlib import Path

import pytest

from common.config import GatewayConfig, MemdConfig, WorkerConfig, add_config_args, build_config, env_name
from common.config_checks import format_cpus, parse_cpus
from common.serve_config import ServeConfig


def parse(argv, cls=MemdConfig):
    parser = argparse.ArgumentParser()
    add_config_args(parser, cls)
    return parser.parse_args(argv)


def test_defaults():
    cfg = build_config(MemdConfig, env={}, model="/m")
    assert cfg.model == Path("/m")
    assert cfg.expert_memory == "100%"
    assert cfg.read_threads == 4 and cfg.direct_io is True
    assert cfg.log_level == "info" and cfg.max_clients == 16
    assert isinstance(cfg.state_dir, Path)


def test_env_overrides_default_and_is_converted():
    env = {"MOEINF_MODEL": "/env/model", "MOEINF_READ_THREADS": "7", "MOEINF_DIRECT_IO": "off",
           "MOEINF_MAX_CLIENTS": "3", "MOEINF_STATE_DIR": "/tmp/st", "MOEINF_EXPERT_MEMORY": "25%"}
    cfg = build_config(MemdConfig, env=env)
    assert cfg.model == Path("/env/model")
    assert cfg.read_threads == 7 and type(cfg.read_threads) is int
    assert cfg.direct_io is False
    assert cfg.max_clients == 3
    assert cfg.state_dir == Path("/tmp/st")
    assert cfg.expert_memory == "25%"


def test_explicit_args_override_env():
    env = {"MOEINF_MODEL": "/env/model", "MOEINF_READ_THREADS": "7", "MOEINF_DIRECT_IO": "off"}
    args = parse(["--model", "/flag/model", "--read-threads", "2", "--direct-io"])
    cfg = build_config(MemdConfig, args, env=env)
    assert cfg.model == Path("/flag/model") and cfg.read_threads == 2 and cfg.direct_io is True
    # a flag left out falls back to the env variable, then to the default
    cfg = build_config(MemdConfig, parse(["--read-threads", "3"]), env=env)
    assert cfg.model == Path("/env/model") and cfg.read_threads == 3 and cfg.direct_io is False
    assert cfg.max_clients == 16


def test_keyword_overrides_win_over_args_and_env():
    env = {"MOEINF_MODEL": "/env/model", "MOEINF_READ_THREADS": "7"}
    cfg = build_config(MemdConfig, parse(["--read-threads", "2"]), env=env, read_threads=5, model="/kw")
    assert cfg.read_threads == 5 and cfg.model == Path("/kw")


def test_env_defaults_to_os_environ(monkeypatch):
    monkeypatch.setenv("MOEINF_MODEL", "/from/os/environ")
    monkeypatch.setenv("MOEINF_MAX_CLIENTS", "3")
    cfg = build_config(MemdConfig)
    assert cfg.model == Path("/from/os/environ") and cfg.max_clients == 3


@pytest.mark.parametrize("raw, value", [("on", True), ("off", False), ("ON", True), ("Off", False), ("1", True),
                                        ("0", False), ("true", True), ("false", False), ("yes", True),
                                        ("no", False), (" on ", True)])
def test_bool_parsing(raw, value):
    assert build_config(MemdConfig, env={"MOEINF_DIRECT_IO": raw}, model="/m").direct_io is value
    assert build_config(MemdConfig, parse(["--direct-io", raw]), env={}, model="/m").direct_io is value


def test_bare_bool_flag_means_on():
    assert build_config(MemdConfig, parse(["--direct-io"]), env={"MOEINF_DIRECT_IO": "off"}, model="/m").direct_io


def test_bad_bool_names_the_flag():
    with pytest.raises(ValueError, match=r"--direct-io: 'maybe' is not a boolean \(use on/off"):
        build_config(MemdConfig, env={"MOEINF_DIRECT_IO": "maybe"}, model="/m")


@pytest.mark.parametrize("name, raw, kind", [("read_threads", "four", "int"), ("read_threads", "2.5", "int"),
                                             ("max_clients", "", "int"), ("prefetch_threshold", "soon", "float")])
def test_bad_number_names_the_flag(name, raw, kind):
    flag = "--" + name.replace("_", "-")
    with pytest.raises(ValueError) as info:
        build_config(MemdConfig, env={env_name(name): raw}, model="/m")
    assert str(info.value) == f"{flag}: {raw!r} is not a valid {kind}"
    with pytest.raises(ValueError, match=f"^{flag}: "):
        build_config(MemdConfig, parse([flag, raw]), env={}, model="/m")


def test_model_is_required():
    with pytest.raises(ValueError, match=r"--model is required.*MOEINF_MODEL"):
        build_config(MemdConfig, env={})
    with pytest.raises(ValueError, match="--model is required"):
        MemdConfig()
    with pytest.raises(ValueError, match="--model is required"):
        build_config(WorkerConfig, env={"MOEINF_READ_THREADS": "2"})


def test_read_threads_must_be_positive():
    with pytest.raises(ValueError, match="--read-threads and --max-clients must be >= 1"):
        build_config(MemdConfig, env={"MOEINF_READ_THREADS": "0"}, model="/m")
    with pytest.raises(ValueError, match="--read-threads and --max-clients must be >= 1"):
        build_config(MemdConfig, env={"MOEINF_MAX_CLIENTS": "0"}, model="/m")


@pytest.mark.parametrize("cls, env, message", [
    (GatewayConfig, {"MOEINF_PORT": "70000"}, "--port 70000: a TCP port is 0-65535"),
    (ServeConfig, {"MOEINF_PORT": "-1"}, "--port -1: serve's gateway port is 1-65535"),
    (ServeConfig, {"MOEINF_PORT": "0"}, "--port 0: serve's gateway port is 1-65535"),
    (GatewayConfig, {"MOEINF_MAX_BODY_BYTES": "0"}, "--max-body-bytes 0: at least 1"),
    (GatewayConfig, {"MOEINF_STREAM_WRITE_TIMEOUT_S": "0"}, "--stream-write-timeout-s must be > 0"),
    (GatewayConfig, {"MOEINF_API_KEY": " \n"}, "whitespace alone"),
    (GatewayConfig, {"MOEINF_LOG_LEVEL": "debgu"}, "--log-level 'debgu': one of debug, info, warning, warn, error"),
    (MemdConfig, {"MOEINF_LOG_LEVEL": "verbose"}, "--log-level 'verbose'"),
    (WorkerConfig, {"MOEINF_MAX_MODEL_LEN": "-1"}, "--max-model-len must be >= 0"),
    (ServeConfig, {"MOEINF_STARTUP_TIMEOUT_S": "0"}, "--startup-timeout-s > 0"),
    (MemdConfig, {"MOEINF_CUDA_DEVICE": "1"}, "--cuda-device picks the cuda backend's GPU"),
])
def test_values_that_would_mean_something_surprising_are_refused(cls, env, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build_config(cls, env={"MOEINF_MODEL": "/m", **env})


def test_an_empty_path_variable_is_unset_and_a_key_is_stripped():
    memd = build_config(MemdConfig, env={"MOEINF_EAMC_DIR": "", "MOEINF_EXPERT_CACHE_DIR": ""}, model="/m")
    assert memd.eamc_dir is None and memd.expert_cache_dir is None  # (not the working directory)
    gateway = build_config(GatewayConfig, env={"MOEINF_API_KEY": "k3y\n", "MOEINF_LOG_LEVEL": "WARNING"}, model="/m")
    assert gateway.api_key == "k3y"


def test_env_names_and_addresses(tmp_path):
    assert env_name("expert_memory") == "MOEINF_EXPERT_MEMORY"
    cfg = build_config(MemdConfig, env={}, model="/m", state_dir=str(tmp_path))
    assert cfg.rpc_addr == f"ipc://{tmp_path.resolve()}/memd.sock"
    assert cfg.trace_addr == f"ipc://{tmp_path.resolve()}/memd-trace.sock"
    worker = build_config(WorkerConfig, env={}, model="/m", state_dir=str(tmp_path))
    assert worker.memd_rpc_addr == cfg.rpc_addr and worker.memd_trace_addr == cfg.trace_addr


@pytest.mark.parametrize("cls", [MemdConfig, WorkerConfig])
def test_help_names_env_variable_and_default(cls):
    parser = argparse.ArgumentParser()
    add_config_args(parser, cls)
    text = " ".join(parser.format_help().split())  # "%" in help texts must not break argparse's %-formatting
    assert "--state-dir" in text and "[env MOEINF_STATE_DIR; default" in text
    if cls is MemdConfig:
        assert "all expert bytes (25%) [env MOEINF_EXPERT_MEMORY; default 100%]" in text
        assert "%%" not in text


def test_memd_cli_help_renders():
    from services.cli import build_parser

    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["memd", "--help"])
    assert info.value.code == 0


def test_matvec_kernel_names_its_choices():
    assert build_config(WorkerConfig, env={}, model="/m").matvec_kernel == "auto"
    with pytest.raises(ValueError, match="--matvec-kernel must be auto, exact, fast, off, not 'on'"):
        build_config(WorkerConfig, env={"MOEINF_MATVEC_KERNEL": "on"}, model="/m")


def test_cpu_lists_parse_and_name_what_is_wrong():
    first = min(os.sched_getaffinity(0))
    assert parse_cpus("") == frozenset() and parse_cpus(f" {first} ") == {first}
    assert format_cpus({0, 1, 2, 5, 7, 8}) == "0-2,5,7-8" and format_cpus([3]) == "3"
    for bad in ("x", "3-1", "0-", "-1", "1;2", "0-70000", ",", "0,", "\u00b2", "0-7:2"):
        with pytest.raises(ValueError, match="give CPU numbers and ranges such as 0-3,8"):
            parse_cpus(bad)
    outside = max(os.sched_getaffinity(0)) + 1
    with pytest.raises(ValueError, match=f"--io-cpus '{outside}': CPUs {outside} are not among those"):
        parse_cpus(str(outside), "--io-cpus")


def test_worker_threads_need_as_many_cpus(tmp_path):
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 CPUs")
    first = str(min(os.sched_getaffinity(0)))
    with pytest.raises(ValueError, match="--threads 2 on --cpus"):
        WorkerConfig(model=tmp_path, threads=2, cpus=first)
    assert WorkerConfig(model=tmp_path, threads=1, cpus=first).cpus == first
    with pytest.raises(ValueError, match="--io-cpus"):
        MemdConfig(model=tmp_path, io_cpus="a")


@pytest.mark.parametrize("build, match", [
    (lambda: build_config(WorkerConfig, env={}, model="/m", threads="-2"), "--threads -2"),
    (lambda: build_config(MemdConfig, env={}, model="/m", pool_backend="cuda", cuda_device="-1"), "--cuda-device -1"),
    (lambda: ServeConfig(restart_window_s=float("nan")), "--restart-window-s"),
    (lambda: ServeConfig(startup_timeout_s=float("nan")), "--startup-timeout-s"),
])
def test_values_that_would_fail_later_are_refused_at_the_start(build, match):
    """A negative thread count failed in torch after the model loaded (not naming --threads); a NaN restart window
    never aged a crash out; a negative GPU index started."""
    with pytest.raises(ValueError, match=re.escape(match)):
        build()


def test_health_refuses_a_port_outside_tcps_range():
    from services.health import HealthConfig

    with pytest.raises(ValueError, match="--port 99999"):
        HealthConfig(port=99999)
