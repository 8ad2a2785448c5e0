"""Prometheus metrics at ``GET /metrics``: the gateway's own (requests, latencies, tokens, admission).

They live in one registry per app (tests build several apps in one process). memd serves its own metrics
(``moeinf memd --metrics-port``, services/memd/prometheus.py). docs/deploy.md lists the names.
"""
from __future__ import annotations

import time

import prometheus_client
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from services.gateway.app_keys import METRICS, RECEIVED

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0)
CLIENT_GONE = "499"  # status label of requests whose client disconnected (nginx's code for it)


class GatewayMetrics:
    """The gateway's registry: requests, latencies, tokens, admission."""

    def __init__(self, gateway):
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

    def worker_gone(self, name: str) -> None:
        """A worker's socket is gone: its series goes too (a recreated worker would otherwise add one more each
        time, and the vanished ones stay forever)."""
        try:
            self.worker_requests.remove(name)
        except KeyError:  # it never got a request
            pass

    def clock(self, started: float) -> RequestClock:
        return RequestClock(self, started)

    async def handle(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


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
    request[RECEIVED] = time.perf_counter()
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
        request.app[METRICS].requests.labels(endpoint, status).inc()

