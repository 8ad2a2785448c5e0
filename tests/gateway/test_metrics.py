"""``GET /metrics``: valid Prometheus text, request counters, TTFT/TPOT histograms; memd's own endpoint
(``--metrics-port``, set by the ``served`` stack) matches its STATS (its unit tests: tests/memd/test_prometheus.py)."""
import http.client
import json
import time
import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from common import messages as m

M = "demo"


def scrape(served, url: str | None = None) -> dict:
    """``{sample name: {frozenset(labels): value}}`` of one scrape (of the gateway, or of ``url``)."""
    with urllib.request.urlopen(url or f"{served.url}/metrics", timeout=10) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=")
        text = resp.read().decode()
    samples: dict = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, {})[frozenset(s.labels.items())] = s.value
    return samples


def value(samples, name, **labels) -> float:
    return samples.get(name, {}).get(frozenset({k: str(v) for k, v in labels.items()}.items()), 0.0)


def post(served, path, body) -> tuple[int, dict]:
    req = urllib.request.Request(f"{served.url}{path}", json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_metrics_is_prometheus_text_with_every_family(served):
    s = scrape(served)
    for name in ("moeinf_gateway_requests_total", "moeinf_gateway_time_to_first_token_seconds_count",
                 "moeinf_gateway_time_per_output_token_seconds_bucket", "moeinf_gateway_queue_depth",
                 "moeinf_gateway_queue_limit", "moeinf_gateway_streams_in_flight", "moeinf_gateway_worker_ready",
                 "moeinf_gateway_prompt_tokens_total", "moeinf_gateway_generation_tokens_total"):
        assert name in s, f"{name} missing from /metrics"
    assert not [name for name in s if name.startswith("moeinf_memd")]  # memd serves its own (--metrics-port)
    assert value(s, "moeinf_gateway_worker_ready") == 1
    assert value(s, "moeinf_gateway_queue_limit") == 4
    assert not any(name.endswith("_created") for name in s)
    with urllib.request.urlopen(f"{served.url}/openapi.json", timeout=10) as resp:
        assert "/metrics" in json.loads(resp.read())["paths"]


def test_every_response_is_counted_by_endpoint_and_status(served):
    before = scrape(served)
    assert post(served, "/v1/completions", {"model": M, "prompt": [1, 5, 9], "max_tokens": 2})[0] == 200
    assert post(served, "/v1/completions", {"model": M, "prompt": "x", "bogus": 1})[0] == 400
    assert post(served, "/v1/nowhere", {})[0] == 404
    after = scrape(served)
    name = "moeinf_gateway_requests_total"
    for endpoint, status in (("/v1/completions", 200), ("/v1/completions", 400), ("unmatched", 404)):
        grown = value(after, name, endpoint=endpoint, status=status) - value(before, name, endpoint=endpoint,
                                                                              status=status)
        assert grown == 1, (endpoint, status)
    assert value(after, name, endpoint="/metrics", status=200) >= 1


def test_stream_observes_ttft_and_time_per_token(served):
    before = scrape(served)
    body = {"model": M, "prompt": [1, 5, 9], "max_tokens": 8, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=120)
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.readline().startswith(b"data: ")
    during = scrape(served)  # the stream is open: one SSE response, one admitted request
    assert value(during, "moeinf_gateway_streams_in_flight") == 1
    assert value(during, "moeinf_gateway_queue_depth") == 1
    events = [line[6:] for line in resp.read().split(b"\n") if line.startswith(b"data: {")]
    conn.close()
    completion = json.loads(events[-1])["usage"]["completion_tokens"]
    assert completion >= 2, "the demo model stopped too early for a time per token"
    after = scrape(served)
    for hist in ("moeinf_gateway_time_to_first_token_seconds", "moeinf_gateway_time_per_output_token_seconds"):
        assert value(after, f"{hist}_count") - value(before, f"{hist}_count") == 1, hist
        assert value(after, f"{hist}_sum") > value(before, f"{hist}_sum")
    grown = value(after, "moeinf_gateway_generation_tokens_total") - value(before,
                                                                           "moeinf_gateway_generation_tokens_total")
    assert grown == completion
    assert value(after, "moeinf_gateway_streams_in_flight") == 0
    assert value(after, "moeinf_gateway_queue_depth") == 0


def test_memd_metrics_match_its_stats(served):
    assert post(served, "/v1/completions", {"model": M, "prompt": [1, 5, 9], "max_tokens": 4})[0] == 200
    time.sleep(0.2)  # the last step trace (leased layers count their hits there) and the idle RETURN_LEASES land
    s = scrape(served, served.memd_metrics_url)
    stats = memd_stats(served)
    assert value(s, "moeinf_memd_up") == 1
    for name in ("moeinf_memd_evictions_total", "moeinf_memd_stall_seconds_total", "moeinf_memd_pool_bytes",
                 "moeinf_memd_pinned_experts"):
        assert name in s, f"{name} missing from memd's /metrics"
    assert value(s, "moeinf_memd_hits_total") + value(s, "moeinf_memd_misses_total") > 0
    assert value(s, "moeinf_memd_hits_total") == stats.hits and value(s, "moeinf_memd_misses_total") == stats.misses
    assert value(s, "moeinf_memd_bytes_read_total") == stats.bytes_read > 0
    assert value(s, "moeinf_memd_pool_slots") == stats.num_slots > 0
    assert 0 < value(s, "moeinf_memd_resident_experts") <= stats.num_slots
    per_layer = [value(s, "moeinf_memd_layer_resident_experts", layer=i) for i in range(len(stats.resident_per_layer))]
    assert sum(per_layer) == value(s, "moeinf_memd_resident_experts")
    assert 0 < value(s, "moeinf_memd_pool_occupancy_ratio") <= 1
    (labels,) = s["moeinf_memd_info"]
    assert dict(labels)["pid"] == str(stats.pid)


def memd_stats(served) -> m.StatsReply:
    from services.worker.memd_client import MemdClient

    state = served.state_dir.resolve()
    client = MemdClient(f"ipc://{state}/memd.sock", f"ipc://{state}/memd-trace.sock", timeout_s=10)
    try:
        return client.stats()
    finally:
        client.close()
