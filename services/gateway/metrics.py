"""Prometheus metrics at ``GET /metrics``: the gateway's own, and memd's counters relayed from its STATS RPC.

Gateway metrics live in one registry per app (tests build several apps in one process). memd is asked for a
``StatsReply`` on every scrape, over its RPC socket in the state directory, with a short timeout; every numeric
field of the reply is exported generically (``memd_families``), so fields memd gains later appear on their own.
docs/deploy.md lists the names.
"""
from __future__ import annotations

import logging
import time

import prometheus_client
import zmq
import zmq.asyncio
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

from common import messages as m
from common.codec import ProtocolError, decode, encode
from common.protocol import Op
from common.zmq_utils import make_socket

log = logging.getLogger("moeinf.gateway.metrics")
MEMD_SCRAPE_TIMEOUT_S = 1.0
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0)
CLIENT_GONE = "499"  # status label of requests whose client disconnected (nginx's code for it)

# StatsReply fields that only grow: exported as counters (``<name>_total``). Every other number is a gauge.
MEMD_COUNTERS = frozenset({
    "hits", "misses", "evictions", "bytes_read", "read_seconds", "stall_seconds", "tokens", "decode_tokens",
    "prefetch_issued", "prefetch_used", "prefetch_wasted", "prefetch_cancelled", "prefetch_late", "trace_steps",
    "trace_lost", "predicted", "correct", "routed", "acquires", "leased_layers", "layer_notes", "notes_dropped",
    "prefetch_deferred", "prefetch_declined",
})
MEMD_RENAMED = {"num_slots": "pool_slots", "resident": "resident_experts", "pinned": "pinned_experts"}
MEMD_LABELS = frozenset({"pid"})  # numbers that identify rather than measure: labels of moeinf_memd_info
MEMD_HELP = {
    "pool_bytes": "bytes of the expert pool", "num_slots": "expert slots in the pool",
    "resident": "experts resident in the pool", "pinned": "experts pinned or leased by a worker",
    "acquires": "ACQUIRE messages from workers",
    "leased_layers": "MoE layers a worker computed from its leased experts, with no message to memd",
    "hits": "experts acquired that were already resident", "misses": "experts loaded on demand",
    "evictions": "experts evicted from the pool", "bytes_read": "bytes read from the checkpoint",
    "read_seconds": "seconds spent reading experts", "stall_seconds": "seconds acquires waited for loads",
    "direct_io": "1 when experts are read with O_DIRECT", "prefetch": "1 when prefetching is on",
    "prefetch_used": "prefetched experts acquired before eviction",
    "prefetch_wasted": "prefetched experts evicted or cancelled before any acquire",
    "resident_per_layer": "experts of each MoE layer resident in the pool",
}


class GatewayMetrics:
    """The gateway's registry: requests, latencies, tokens, admission, plus the relayed memd families."""

    def __init__(self, gateway, memd_addr: str):
        prometheus_client.disable_created_metrics()  # no *_created series next to every counter
        self.registry = r = CollectorRegistry()
        self.requests = Counter("moeinf_gateway_requests", "HTTP responses by endpoint and status code (499: the"
                                " client went away)", ["endpoint", "status"], registry=r)
        self.ttft = Histogram("moeinf_gateway_time_to_first_token_seconds", "seconds from receiving a generation"
                              " request to its first token", buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("moeinf_gateway_time_per_output_token_seconds", "per request: seconds between its"
                              " first and last token divided by the tokens after the first", buckets=TPOT_BUCKETS,
                              registry=r)
        self.prompt_tokens = Counter("moeinf_gateway_prompt_tokens", "prompt tokens of admitted requests",
                                     registry=r)
        self.generation_tokens = Counter("moeinf_gateway_generation_tokens", "tokens generated", registry=r)
        self.streams = Gauge("moeinf_gateway_streams_in_flight", "SSE responses being streamed", registry=r)
        self.worker_requests = Counter("moeinf_gateway_worker_requests", "generation requests sent to each worker"
                                        " (its socket's name)", ["worker"], registry=r)
        Gauge("moeinf_gateway_queue_depth", "requests admitted (running or waiting for the worker)",
              registry=r).set_function(lambda: gateway.active)
        Gauge("moeinf_gateway_queue_limit", "--max-queued: admitted requests beyond which the gateway answers 429",
              registry=r).set(gateway.cfg.max_queued)
        Gauge("moeinf_gateway_worker_ready", "1 when the worker and memd are ready (what /health reports)",
              registry=r).set_function(lambda: 0.0 if gateway.health_reason else 1.0)
        self.memd = MemdCollector(memd_addr)
        r.register(self.memd)

    def clock(self, started: float) -> RequestClock:
        return RequestClock(self, started)

    async def handle(self, request: web.Request) -> web.Response:
        await self.memd.refresh()
        return web.Response(body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    def close(self) -> None:
        self.memd.close()


class RequestClock:
    """One generation request's token timing: TTFT at the first token, TPOT once it is over."""

    def __init__(self, metrics: GatewayMetrics, started: float):
        self.metrics, self.started = metrics, started
        self.first = self.last = 0.0
        self.first_tokens = self.tokens = 0

    def add(self, n: int) -> None:
        if not n:
            return
        now = time.perf_counter()
        if not self.tokens:
            self.first, self.first_tokens = now, n
            self.metrics.ttft.observe(now - self.started)
        self.last = now
        self.tokens += n
        self.metrics.generation_tokens.inc(n)

    def done(self) -> None:
        after_first = self.tokens - self.first_tokens
        if after_first > 0:
            self.metrics.tpot.observe((self.last - self.first) / after_first)


@web.middleware
async def metrics_middleware(request: web.Request, handler):
    """Count every response (errors included: this runs outside the error middleware) and stamp arrival."""
    request["received"] = time.perf_counter()
    resource = request.match_info.route.resource
    endpoint = resource.canonical if resource is not None else "unmatched"
    status = CLIENT_GONE
    try:
        response = await handler(request)
        status = str(response.status)
        return response
    except web.HTTPException as exc:
        status = str(exc.status)
        raise
    finally:
        request.app["metrics"].requests.labels(endpoint, status).inc()


class MemdCollector:
    """memd's latest ``StatsReply`` as metric families; ``refresh`` asks memd, ``collect`` only formats."""

    def __init__(self, addr: str, timeout_s: float = MEMD_SCRAPE_TIMEOUT_S):
        self.addr, self.timeout_s = addr, timeout_s
        self.ctx: zmq.asyncio.Context | None = None
        self.stats: m.StatsReply | None = None

    async def refresh(self) -> None:
        """Ask memd for its stats on a fresh socket (no stale replies); ``stats`` is None if it does not answer."""
        if self.ctx is None:
            self.ctx = zmq.asyncio.Context()
        sock = make_socket(self.ctx, zmq.DEALER, self.addr, bind=False)
        try:
            await sock.send(encode(Op.STATS, 1, m.StatsRequest()))
            if not await sock.poll(int(self.timeout_s * 1000)):
                raise TimeoutError(f"no STATS reply within {self.timeout_s:g}s")
            _, _, reply = decode(await sock.recv(), reply=True)
            if isinstance(reply, m.ErrorReply):
                raise ProtocolError(f"{reply.code}: {reply.message}")
            self.stats = reply
        except (TimeoutError, ProtocolError, zmq.ZMQError) as exc:
            log.debug("memd at %s did not give its stats: %s", self.addr, exc)
            self.stats = None
        finally:
            sock.close()

    def close(self) -> None:
        if self.ctx is not None:
            self.ctx.term()

    def collect(self):
        up = GaugeMetricFamily("moeinf_memd_up", "1 when memd answered this scrape's STATS request")
        up.add_metric([], 0.0 if self.stats is None else 1.0)
        yield up
        if self.stats is not None:
            yield from memd_families(self.stats)


def memd_families(stats: m.StatsReply):
    """``_memd_families`` with each name once (a later field whose name clashes is skipped and logged)."""
    seen = set()
    for family in _memd_families(stats):
        if family.name in seen:
            log.warning("memd metric %s exported twice; the second is skipped (rename a StatsReply field)", family.name)
            continue
        seen.add(family.name)
        yield family


def _memd_families(stats: m.StatsReply):
    """Every field of ``StatsReply`` as Prometheus families, by these rules:

    - a number ``x`` is ``moeinf_memd_<x>_total`` (a counter) if ``x`` is in ``MEMD_COUNTERS``, otherwise
      ``moeinf_memd_<x>`` (a gauge); ``MEMD_RENAMED`` gives a few clearer names; a bool is a 0/1 gauge;
    - strings and ``MEMD_LABELS`` become labels of ``moeinf_memd_info``;
    - a list of numbers ``<x>_per_layer`` is ``moeinf_memd_layer_<x>{layer=...}``;
    - a list of records (``layers``, ``lookahead``) is one family per field, ``moeinf_memd_<list>_<field>``,
      labelled by the record's first field (``layer``, ``distance``).
    """
    info = {}
    for name in m.field_names(stats):
        value = getattr(stats, name)
        if isinstance(value, str) or name in MEMD_LABELS:
            info[name] = str(value)
        elif isinstance(value, (bool, int, float)):
            yield _family(f"moeinf_memd_{MEMD_RENAMED.get(name, name)}", name, [([], value)])
        elif isinstance(value, list) and name.endswith("_per_layer"):
            base = name[: -len("_per_layer")]
            samples = [([str(i)], v) for i, v in enumerate(value)]
            yield _family(f"moeinf_memd_layer_{MEMD_RENAMED.get(base, base)}", name, samples, ["layer"])
        elif isinstance(value, list) and value and isinstance(value[0], m.Message):
            yield from _record_families(name, value)
    slots, resident = getattr(stats, "num_slots", 0), getattr(stats, "resident", 0)
    if slots:
        occupancy = GaugeMetricFamily("moeinf_memd_pool_occupancy_ratio", "resident experts / pool slots")
        occupancy.add_metric([], resident / slots)
        yield occupancy
    yield InfoMetricFamily("moeinf_memd", "memd's pid and string settings (eviction policy)", value=info)


def _record_families(name: str, records: list):
    prefix = {"layers": "layer"}.get(name, name)
    key, *fields = m.field_names(records[0])
    for f in fields:
        samples = [([str(getattr(r, key))], getattr(r, f)) for r in records]
        yield _family(f"moeinf_memd_{prefix}_{f}", f"{name}[].{f}", samples, [key])


def _family(name: str, field: str, samples, labels=()):
    text = MEMD_HELP.get(field, f"memd StatsReply.{field}")
    counter = field.rsplit(".", 1)[-1] in MEMD_COUNTERS
    family = (CounterMetricFamily if counter else GaugeMetricFamily)(name, text, labels=list(labels))
    for label_values, value in samples:
        family.add_metric(label_values, float(value))
    return family

