"""An EAMC that travels: a memd started with --eamc-from takes in a peer's collection, from the peer's TCP admin
socket (two real memd processes) or from a file; its own members stay, near-duplicates merge, --eamc-capacity
bounds the result, and a peer that cannot be asked leaves memd starting with what it has."""
import numpy as np
import pytest
from helpers import spawn, stop, wait_for_log
from serving import free_port

from common import admin_messages as a
from common.protocol import Op
from services.admin_cli import AdminConfig, call
from services.memd.eamc import Eamc

TOKEN = "t" * 20


def member(layers: int, experts: int, seed: int) -> np.ndarray:
    """A distinct activation pattern: each layer routes to two experts picked by ``seed``."""
    eam = np.zeros((layers, experts), np.float32)
    rng = np.random.default_rng(seed)
    for layer in range(layers):
        eam[layer, rng.choice(experts, 2, replace=False)] = 5
    return eam


def test_merge_keeps_ours_averages_duplicates_and_fills_by_the_peers_matches():
    ours, peer = Eamc(4, 8, 4, "m"), Eamc(4, 8, 8, "m")
    ours.add(member(4, 8, 0))
    for seed in (0, 1, 2, 3, 4):  # seed 0: a near-duplicate of ours
        peer.add(member(4, 8, seed))
    peer.hits[:5] = [9, 1, 5, 7, 3]
    merged, added = ours.merge(peer)
    assert (merged, added, len(ours)) == (1, 3, 4)  # capacity 4: ours + the peer's 3 most matched others
    assert ours.weight[0] == 2.0
    kept = {tuple(np.flatnonzero(ours.prob[i].ravel())) for i in range(1, 4)}
    wanted = {tuple(np.flatnonzero(peer.prob[i].ravel())) for i in (3, 2, 4)}  # hits 7, 5, 3 (not 1)
    assert kept == wanted and ours.dirty


def eamc_in(state, mixtral, seeds, capacity=16) -> None:
    from services.memd.store import ExpertStore
    from common.checkpoint import Checkpoint

    store = ExpertStore(Checkpoint(mixtral))
    eamc = Eamc(store.num_layers, store.num_experts, capacity, mixtral.resolve().name)
    for seed in seeds:
        eamc.add(member(store.num_layers, store.num_experts, seed))
    state.mkdir(parents=True)
    eamc.save(state / "eamc.bin")


def memd(mixtral, state, log_name, *extra):
    state.mkdir(parents=True, exist_ok=True)
    log = state / log_name
    proc = spawn(["memd", "--model", str(mixtral), "--state-dir", str(state), "--expert-memory", "25%", *extra], log)
    wait_for_log(proc, log, "memd ready", timeout=60)
    return proc, log


def eamc_size(state) -> int:
    return call(AdminConfig(state_dir=state), Op.ADMIN_STATS, a.AdminStatsRequest("")).stats.eamc_size


def test_a_cold_memd_pulls_a_peers_eamc_over_tcp_and_from_a_file(mixtral, tmp_path):
    peer_state, cold_state, file_state = tmp_path / "peer", tmp_path / "cold", tmp_path / "file"
    eamc_in(peer_state, mixtral, range(6))
    port = free_port()
    peer, _ = memd(mixtral, peer_state, "memd.log", "--admin-tcp", f"127.0.0.1:{port}", "--admin-token", TOKEN)
    try:
        eamc_in(cold_state, mixtral, [0, 100])  # one near-duplicate of the peer's, one of its own
        cold, log = memd(mixtral, cold_state, "memd.log", "--eamc-from", f"tcp://127.0.0.1:{port}",
                         "--admin-token", TOKEN, "--eamc-capacity", "5")
        try:
            text = log.read_text()  # the peer's 6, at most --eamc-capacity of them (its most matched) considered
            assert "5 patterns from tcp://" in text and "3 added, 1 merged into near-duplicates, 1 left out" in text
            assert eamc_size(cold_state) == 5  # 2 of its own + 3 of the peer's: --eamc-capacity
        finally:
            assert stop(cold) == 0
        refused, log = memd(mixtral, tmp_path / "wrong", "memd.log", "--eamc-from", f"tcp://127.0.0.1:{port}",
                            "--admin-token", "x" * 20)
        try:  # a wrong token: memd starts anyway, cold, and says why
            assert "not used" in log.read_text() and "wrong admin token" in log.read_text()
            assert eamc_size(tmp_path / "wrong") == 0
        finally:
            assert stop(refused) == 0
    finally:
        assert stop(peer) == 0
    from_file, _ = memd(mixtral, file_state, "memd.log", "--eamc-from", str(peer_state / "eamc.bin"))
    try:
        assert eamc_size(file_state) == 6
    finally:
        assert stop(from_file) == 0


def test_eamc_from_tcp_needs_a_token():
    from common.config import MemdConfig

    with pytest.raises(ValueError, match="--eamc-from tcp://h:1 needs --admin-token"):
        MemdConfig(model="/m", eamc_from="tcp://h:1")
