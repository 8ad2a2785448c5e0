"""``moeinf serve``'s supervisor with real child processes (stand-ins for the services, so each test takes seconds):
children start at once and are awaited in dependency order, the restart budget is a sliding window that refills,
giving up removes the stale socket files of the dead, and SIGTERM stops every child in parallel (issue 12, items 7
and 9)."""
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from common.serve_config import ServeConfig
from services import supervisor as sv
from services.supervisor import Child, Supervisor, stop_children


def py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


SLEEPER = py("import time; time.sleep(120)")
CRASHER = py("import sys; sys.exit(3)")
# exits 2 s after SIGTERM (a service finishing its streams), or ignores it
SLOW_STOP = py("import signal, sys, time\n"
               "signal.signal(signal.SIGTERM, lambda *a: (time.sleep(2), sys.exit(0)))\n"
               "print('up', flush=True); time.sleep(120)")
DEAF = py("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True);"
          " time.sleep(120)")


def supervisor(tmp_path: Path, worker_cmd, **cfg) -> Supervisor:
    sup = Supervisor(ServeConfig(state_dir=tmp_path / "state", **cfg), tmp_path / "model")
    for child, cmd in ((sup.memd, SLEEPER), (sup.workers[0], worker_cmd), (sup.gateway, SLEEPER)):
        child.cmd = cmd
        child.start()
        child.was_ready = True
    sup.memd_ready = sup.gateway_ready = lambda: True
    sup.worker_ready = lambda worker: lambda: True
    return sup


def test_crashes_within_the_window_give_up_and_remove_the_stale_worker_socket(tmp_path):
    sup = supervisor(tmp_path, CRASHER, max_restarts=2, restart_window_s=60)
    stale = tmp_path / "state" / "worker.sock"
    stale.parent.mkdir(parents=True)
    stale.touch()  # what a worker killed by SIGKILL leaves behind
    try:
        with pytest.raises(RuntimeError, match="worker crashed 3 times within 60s; giving up"):
            sup.supervise()
    finally:
        sup.stop_all()
    assert not stale.exists()
    assert not any(c.alive() for c in (sup.memd, sup.workers[0], sup.gateway))


def test_a_restarted_child_that_dies_before_it_is_ready_again_is_a_crash_not_the_end(tmp_path):
    """A worker killed again while serve waits for it to come back (it never answers here) is restarted within the
    budget, and serve gives up only when the budget is spent, never with a start-up failure."""
    sup = supervisor(tmp_path, CRASHER, max_restarts=2, restart_window_s=60)
    sup.worker_ready = lambda worker: lambda: False
    try:
        with pytest.raises(RuntimeError, match="worker crashed 3 times within 60s; giving up"):
            sup.supervise()
    finally:
        sup.stop_all()
    assert sup.workers[0].total_crashes == 3


def test_memd_dying_while_a_worker_restarts_is_noticed_at_once(tmp_path):
    """A worker waiting for memd's handshake never becomes ready once memd is gone: serve sees memd die and goes
    back to restart it (and its workers), instead of waiting --startup-timeout-s for the worker."""
    sup = supervisor(tmp_path, SLEEPER, startup_timeout_s=60)
    sup.memd.proc.kill()
    sup.memd.proc.wait()
    start = time.monotonic()
    try:
        assert sup.wait_ready(sup.workers[0], lambda: False, restarting=True) is False
        with pytest.raises(RuntimeError, match="memd exited"):  # a first start: fatal, with memd named
            sup.wait_ready(sup.gateway, lambda: False)
    finally:
        sup.stop_all()
    assert time.monotonic() - start < 10


def test_a_stop_asked_for_during_a_start_is_a_clean_exit(tmp_path):
    sup = supervisor(tmp_path, SLEEPER)
    import signal

    sup.start_all = lambda: (setattr(sup, "stopping", True), sup.wait_ready(sup.memd, lambda: False))
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        assert sup.run() == 0
    finally:  # (run installs serve's own handlers: this test process keeps its)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert not any(c.alive() for c in (sup.memd, sup.workers[0], sup.gateway))


def test_the_restart_budget_refills(tmp_path):
    """Crashes farther apart than the window never add up: the sixth crash of a long life is restarted."""
    sup = supervisor(tmp_path, CRASHER, max_restarts=2, restart_window_s=0.3)  # the loop polls every 0.5 s
    errors = []

    def run():
        try:
            sup.supervise()
        except RuntimeError as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while sup.workers[0].total_crashes < 6:
            assert time.monotonic() < deadline and thread.is_alive(), f"gave up: {errors}"
            time.sleep(0.1)
    finally:
        sup.stopping = True
        thread.join()
        sup.stop_all()
    assert not errors and sup.workers[0].total_crashes >= 6 and len(sup.workers[0].crashes) <= 2


def test_the_window_counts_only_recent_crashes():
    child = Child("worker", [])
    assert [child.crashed(10, t) for t in (0, 1, 2)] == [1, 2, 3]
    assert child.crashed(10, 11.5) == 2  # the crashes at 0 and 1 aged out
    assert child.crashed(10, 100) == 1


def test_children_start_at_once_and_are_awaited_in_order(tmp_path):
    """A worker loads its model while memd indexes: serve starts every child at once, the workers told to wait for
    memd's handshake as long as serve's start-up timeout, then awaits memd, the worker and the gateway in order."""
    sup = Supervisor(ServeConfig(state_dir=tmp_path / "state", startup_timeout_s=300), tmp_path / "model")
    for child in (sup.memd, *sup.workers, sup.gateway):
        child.cmd = SLEEPER
    t0, order = time.monotonic(), []

    def ready_after(name: str, seconds: float):
        def probe() -> bool:
            if time.monotonic() - t0 < seconds:
                return False
            order.append(name)
            return True
        return probe

    sup.memd_ready = ready_after("memd", 1.5)
    sup.worker_ready = lambda worker: ready_after("worker", 0.0)
    sup.gateway_ready = ready_after("gateway", 0.0)
    try:
        sup.start_all()
    finally:
        sup.stop_all()
    assert order == ["memd", "worker", "gateway"]
    assert all(c.started - t0 < 1.0 for c in (sup.memd, *sup.workers, sup.gateway)), "a child waited for memd"
    args = sup.workers[0].args
    assert args[args.index("--handshake-timeout-s") + 1] == "300"


def test_sigterm_stops_the_children_in_parallel(tmp_path):
    children = [Child(name, [], cmd=SLOW_STOP) for name in ("gateway", "worker", "memd")]
    for c in children:
        c.start()
    time.sleep(1.0)  # their handlers are installed
    start = time.monotonic()
    assert stop_children(children) == []
    took = time.monotonic() - start
    assert all(c.proc.returncode == 0 for c in children)
    assert took < 4.5, f"stopping took {took:.1f}s: one after another would be 6 s"


def test_a_child_that_ignores_sigterm_is_killed_at_the_deadline(tmp_path, monkeypatch):
    deaf, slow = Child("worker", [], cmd=DEAF), Child("memd", [], cmd=SLOW_STOP)
    deaf.start()
    slow.start()
    time.sleep(1.0)
    start = time.monotonic()
    assert stop_children([deaf, slow], timeout=3.0) == ["worker"]
    assert time.monotonic() - start < 5 and not deaf.alive() and slow.proc.returncode == 0
    assert sv.STOP_TIMEOUT_S < 10  # serve's own deadline keeps every exit under 10 s


@pytest.mark.parametrize("how", ["file", "flag", "env"])
def test_serve_hands_the_api_key_to_the_gateway_only_and_never_on_a_command_line(tmp_path, monkeypatch, how):
    """`moeinf serve --api-key-file F` (or --api-key, or MOEINF_API_KEY): the gateway gets the key in its environment
    (readable by its owner only), not in its argv (which `ps` shows to every local user); memd and the worker get
    no key at all."""
    from common.config import build_config

    key = "sk-" + "k" * 29
    monkeypatch.delenv("MOEINF_API_KEY_FILE", raising=False)
    monkeypatch.delenv("MOEINF_API_KEY", raising=False)
    given = {}
    if how == "file":
        (tmp_path / "key").write_text(key + "\n")
        given = {"api_key_file": str(tmp_path / "key")}
    elif how == "flag":
        given = {"api_key": key}
    else:
        monkeypatch.setenv("MOEINF_API_KEY", key)
    cfg = build_config(ServeConfig, state_dir=str(tmp_path / "state"), **given)
    sup = Supervisor(cfg, tmp_path / "model")
    show_env = py("import os, sys; print(os.environ.get('MOEINF_API_KEY', '-'), ' '.join(sys.argv))")
    for child in (sup.memd, *sup.workers, sup.gateway):
        assert not any(key in arg for arg in child.args), child.args
        child.cmd = [*show_env, *child.args]
        out = subprocess.run(child.cmd, env=child.env, capture_output=True, text=True, timeout=30).stdout.split()
        assert out[0] == (key if child is sup.gateway else "-"), (child.name, out)
        assert key not in out[1:]
    assert key not in repr(cfg)


def test_serve_refuses_both_api_key_flags(tmp_path):
    (tmp_path / "key").write_text("secret-key")
    with pytest.raises(ValueError, match="give one of --api-key and --api-key-file"):
        ServeConfig(api_key="x", api_key_file=tmp_path / "key")
    with pytest.raises(ValueError, match="is empty"):
        (tmp_path / "empty").write_text("\n")
        ServeConfig(api_key_file=tmp_path / "empty")


def test_serve_refuses_a_port_another_server_holds(tmp_path):
    """A clear error before anything starts, not a gateway that cannot bind while serve probes the other server."""
    import socket

    with socket.create_server(("127.0.0.1", 0)) as held:
        port = held.getsockname()[1]
        with pytest.raises(RuntimeError, match=f"cannot listen on 127.0.0.1:{port}.*pick another --port"):
            sv.port_free("127.0.0.1", port)
    with pytest.raises(ValueError, match="1-65535"):
        ServeConfig(port=0)
    if socket.has_ipv6:  # an IPv6 address is checked in its own family (it was refused as not IPv4)
        try:
            with socket.create_server(("::1", 0), family=socket.AF_INET6) as v6:
                free = v6.getsockname()[1]
        except OSError:
            return  # (no IPv6 loopback here)
        sv.port_free("::1", free)
        supervisor = sv.Supervisor.__new__(sv.Supervisor)
        supervisor.cfg = ServeConfig(host="::1", port=free)
        assert supervisor.url == f"http://[::1]:{free}"


def test_one_worker_gets_its_socket_name_from_serve_not_from_the_environment(tmp_path, monkeypatch):
    """A MOEINF_WORKER_ID=auto left in serve's environment (as compose sets it) would make the lone worker serve
    worker-<host>.sock while serve probes worker.sock: serve always passes the id."""
    from common.config import WorkerConfig, build_config
    from services.cli import build_parser

    monkeypatch.setenv("MOEINF_WORKER_ID", "auto")
    (worker,) = Supervisor(ServeConfig(state_dir=tmp_path), tmp_path / "model").workers
    cfg = build_config(WorkerConfig, build_parser().parse_args(worker.args), model=str(tmp_path))
    assert cfg.worker_id == "" and worker.sockets[0].endswith("/worker.sock")


def test_serve_hands_slot_compression_to_memd(tmp_path):
    from common.config import MemdConfig, build_config
    from services.cli import build_parser

    sup = Supervisor(ServeConfig(state_dir=tmp_path, slot_compression="zstd"), tmp_path / "model")
    cfg = build_config(MemdConfig, build_parser().parse_args(sup.memd.args), model=str(tmp_path))
    assert cfg.slot_compression == "zstd"
    plain = Supervisor(ServeConfig(state_dir=tmp_path), tmp_path / "model")
    assert "--slot-compression" not in plain.memd.args
    with pytest.raises(ValueError, match="not with --expert-format"):
        ServeConfig(state_dir=tmp_path, slot_compression="zstd", expert_format="fp8")
    with pytest.raises(ValueError, match="off or zstd"):
        ServeConfig(state_dir=tmp_path, slot_compression="lz4")
