"""memd's Prometheus endpoint: every StatsReply field exported by one generic rule, and the endpoint itself
(prometheus-client's server thread asking the event loop for the stats). The whole stack's check that the
endpoint matches memd's STATS is tests/gateway/test_metrics.py::test_memd_metrics_match_its_stats."""
import asyncio
import socket
import typing
import urllib.request

import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families

from common import messages as m
from helpers import free_port
from common.config import MemdConfig, build_config
from services.memd.prometheus import MEMD_LABELS, MEMD_RENAMED, MetricsEndpoint, StatsCollector, memd_families


class Record(m.Message):
    layer: int
    hits: int
    fresh_gauge: float


class FutureStats(m.Message):
    """A StatsReply with kinds of fields memd may grow: each must be exported without code changes."""

    pid: int = 42
    num_slots: int = 8
    resident: int = 6
    hits: int = 5
    stall_seconds: float = 0.5
    direct_io: bool = True
    policy: str = "lru"
    brand_new_level: float = 2.5
    resident_per_layer: list = msgspec.field(default_factory=lambda: [2, 4])
    layers: list = msgspec.field(default_factory=lambda: [Record(0, 3, 0.1), Record(1, 2, 0.2)])
    empty: list = msgspec.field(default_factory=list)


def test_every_stats_field_is_exported_generically():
    families = {f.name: f for f in memd_families(FutureStats())}
    assert families["moeinf_memd_hits"].type == "counter"
    assert families["moeinf_memd_stall_seconds"].type == "counter"
    assert families["moeinf_memd_pool_slots"].type == "gauge"
    assert families["moeinf_memd_resident_experts"].samples[0].value == 6
    assert families["moeinf_memd_direct_io"].samples[0].value == 1
    assert families["moeinf_memd_brand_new_level"].type == "gauge"
    assert [(s.labels, s.value) for s in families["moeinf_memd_layer_resident_experts"].samples] == [
        ({"layer": "0"}, 2), ({"layer": "1"}, 4)]
    assert families["moeinf_memd_layer_hits"].type == "counter"
    assert [s.labels for s in families["moeinf_memd_layer_fresh_gauge"].samples] == [{"layer": "0"}, {"layer": "1"}]
    assert families["moeinf_memd_pool_occupancy_ratio"].samples[0].value == 0.75
    assert families["moeinf_memd"].samples[0].labels == {"pid": "42", "policy": "lru"}


def test_the_real_stats_reply_exports_every_numeric_field():
    hints = typing.get_type_hints(m.StatsReply, vars(m))
    sample = {int: 3, float: 0.5, bool: True, str: "lru", list[int]: [1, 2]}
    plain = [f for f in msgspec.structs.fields(m.StatsReply) if f.default_factory is msgspec.NODEFAULT]
    names = {f.name for f in memd_families(m.StatsReply(**{f.name: sample[hints[f.name]] for f in plain}))}
    for f in plain:
        if hints[f.name] in (int, float, bool) and f.name not in MEMD_LABELS:
            assert f"moeinf_memd_{MEMD_RENAMED.get(f.name, f.name)}" in names, f"StatsReply.{f.name} is not exported"
    assert "moeinf_memd_layer_resident_experts" in names


def fetch(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.headers["Content-Type"].startswith("text/plain; version=")
        return {f.name: f for f in text_string_to_metric_families(resp.read().decode())}


async def test_the_endpoint_serves_the_loops_stats():
    calls = []

    def stats():
        calls.append(asyncio.get_running_loop())  # built on the event loop, not in the HTTP thread
        return FutureStats()

    endpoint = MetricsEndpoint("127.0.0.1", free_port(), stats)
    try:
        families = await asyncio.to_thread(fetch, f"http://127.0.0.1:{endpoint.port}/metrics")
    finally:
        await asyncio.to_thread(endpoint.close)
    assert calls == [asyncio.get_running_loop()]
    assert families["moeinf_memd_up"].samples[0].value == 1
    assert families["moeinf_memd_resident_experts"].samples[0].value == 6
    assert not any(name.endswith("_created") for name in families)


def test_a_stuck_loop_is_up_zero():
    """The loop never runs the request (stuck): after the timeout the scrape says memd is not up, and nothing else."""
    loop = asyncio.new_event_loop()
    try:
        families = list(StatsCollector(loop, FutureStats, timeout_s=0.1).collect())
        loop.run_until_complete(asyncio.sleep(0))  # the abandoned request is dropped, not left un-awaited
    finally:
        loop.close()
    assert [(f.name, f.samples[0].value) for f in families] == [("moeinf_memd_up", 0.0)]


async def test_a_busy_port_is_a_clear_error():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(RuntimeError, match=f"--metrics-port {port}: cannot listen on 127.0.0.1:{port}"):
            MetricsEndpoint("127.0.0.1", port, FutureStats)


def test_metrics_port_knob():
    assert build_config(MemdConfig, env={}, model="/m").metrics_port == 0  # off by default
    cfg = build_config(MemdConfig, env={"MOEINF_METRICS_PORT": "9464", "MOEINF_METRICS_HOST": "0.0.0.0"}, model="/m")
    assert (cfg.metrics_port, cfg.metrics_host) == (9464, "0.0.0.0")
    with pytest.raises(ValueError, match="--metrics-port 70000"):
        build_config(MemdConfig, env={}, model="/m", metrics_port=70000)


def test_names_carry_their_unit_and_no_family_is_exported_twice():
    """The read rate says its unit; the notes counter and a layer's compute time are not per-layer families (they
    sat among moeinf_memd_layer_*{layer} without the label); next_gate, speculation's distance 1, is exported once."""
    stats = m.StatsReply(**{f.name: (0.5 if hint is float else 3 if hint is int else True if hint is bool else "x")
                            for f, hint in ((f, typing.get_type_hints(m.StatsReply, vars(m))[f.name])
                                            for f in msgspec.structs.fields(m.StatsReply))
                            if f.default_factory is msgspec.NODEFAULT},
                         speculation=[m.LookaheadStats(1, 4, 3, 5)], next_gate=[m.LookaheadStats(1, 4, 3, 5)])
    names = {f.name for f in memd_families(stats)}
    assert {"moeinf_memd_read_bandwidth_bytes_per_second", "moeinf_memd_notes",
            "moeinf_memd_layer_compute_seconds", "moeinf_memd_speculation_predicted"} <= names
    assert not {n for n in names if n.startswith("moeinf_memd_next_gate")}
    assert not {"moeinf_memd_read_bandwidth", "moeinf_memd_layer_notes", "moeinf_memd_layer_seconds"} & names
