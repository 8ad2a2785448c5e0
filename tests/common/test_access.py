"""Sockets, shared memory and state files are born 0600 (0660 with ``--group``) whatever the umask: under
``umask 000`` nothing a service creates is open to other users (issue 12, item 6)."""
import grp
import os
import stat
import subprocess
from pathlib import Path

import pytest
import zmq
from helpers import moeinf_cmd, stop, wait_for_log, write_family

from common.access import OWNER_ONLY, Access
from common.config import MemdConfig, WorkerConfig
from common.zmq_utils import make_socket
from services.memd.eamc import Eamc
from services.memd.pool import SHM_DIR, pool_name

MY_GROUP = grp.getgrgid(os.getgid()).gr_name


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask_000():
    old = os.umask(0)
    yield
    os.umask(old)


@pytest.mark.parametrize("kind", [zmq.ROUTER, zmq.PULL])
def test_ipc_socket_is_0600_under_umask_000(tmp_path, umask_000, kind):
    ctx = zmq.Context()
    sock = make_socket(ctx, kind, f"ipc://{tmp_path}/s/x.sock", bind=True)
    try:
        assert mode(tmp_path / "s" / "x.sock") == 0o600
        assert mode(tmp_path / "s") == 0o700  # a directory it had to create is the owner's too
    finally:
        sock.close()
        ctx.term()
    assert os.umask(0) == 0  # the bind's strict umask was put back


def test_group_option_gives_0660_to_that_group(tmp_path, umask_000):
    ctx = zmq.Context()
    sock = make_socket(ctx, zmq.ROUTER, f"ipc://{tmp_path}/g.sock", bind=True, access=Access(MY_GROUP))
    try:
        st = os.stat(tmp_path / "g.sock")
        assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == os.getgid()
    finally:
        sock.close()
        ctx.term()


def test_eamc_file_is_0600_under_umask_000(tmp_path, umask_000):
    Eamc(2, 4, 8, "m").save(tmp_path / "eamc.bin")
    assert mode(tmp_path / "eamc.bin") == 0o600
    Eamc(2, 4, 8, "m").save(tmp_path / "group.bin", Access(MY_GROUP))
    assert mode(tmp_path / "group.bin") == 0o660


def test_unknown_group_is_refused_with_its_name():
    with pytest.raises(ValueError, match="--group 'no-such-group-x': no such group"):
        Access("no-such-group-x")
    for cls in (MemdConfig, WorkerConfig):
        with pytest.raises(ValueError, match="no such group"):
            cls(model=Path("/m"), group="no-such-group-x")
    assert OWNER_ONLY.mode == 0o600 and Access(MY_GROUP).mode == 0o660


def test_memd_creates_nothing_open_to_others_under_umask_000(tmp_path):
    """A real memd started under umask 000: its sockets, lock, state directory, shared memory and compressed expert
    cache (``--expert-format``) are owner-only."""
    model = write_family("mixtral", tmp_path / "mixtral")
    state, cache = tmp_path / "state", tmp_path / "experts"  # memd creates them
    log = tmp_path / "memd.log"
    cmd = moeinf_cmd("memd", "--model", str(model), "--state-dir", str(state), "--expert-format", "fp8",
                     "--expert-cache-dir", str(cache))
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, preexec_fn=lambda: os.umask(0),
                                start_new_session=True)
    try:
        wait_for_log(proc, log, "memd ready")
        assert mode(state) == 0o700
        for name in ("memd.sock", "memd-trace.sock", "admin.sock", "memd.lock"):
            assert mode(state / name) == 0o600, name
        for kind in ("pool", "control"):
            assert mode(SHM_DIR / pool_name(state, kind)) == 0o600, kind
        made = [cache, *cache.rglob("*")]
        assert any(p.name == "manifest.json" for p in made), made
        for path in made:
            assert mode(path) == (0o700 if path.is_dir() else 0o600), path
    finally:
        assert stop(proc) == 0
