"""memd's Prometheus endpoint (``--metrics-port``): its ``StatsReply`` as metric families, at ``/metrics``.

prometheus-client's HTTP server answers in its own thread; each scrape asks the event loop for a fresh
``StatsReply`` (built there, where the counters change) with a short timeout, so nothing is read mid-update and
no scrape blocks the loop. Every numeric field of the reply is exported generically (``memd_families``), so
fields memd gains later appear on their own. docs/deploy.md lists the names.
"""
from __future__ import annotations

import asyncio
import logging
from concurrent.futures import TimeoutError as FutureTimeout

import prometheus_client
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

from common import messages as m

log = logging.getLogger("moeinf.memd.metrics")
SCRAPE_TIMEOUT_S = 1.0

# StatsReply fields that only grow: exported as counters (``<name>_total``). Every other number is a gauge.
MEMD_COUNTERS = frozenset({
    "hits", "misses", "evictions", "bytes_read", "read_seconds", "stall_seconds", "tokens",
    "prefetch_issued", "prefetch_used", "prefetch_wasted", "prefetch_cancelled", "prefetch_late", "trace_steps",
    "trace_lost", "predicted", "correct", "routed", "acquires", "acquires_partial", "leased_layers", "layer_notes",
    "notes_dropped", "notes_unattached",
    "prefetch_deferred", "prefetch_declined", "reader_busy_seconds", "host_hits", "host_misses", "copy_bytes",
    "copy_seconds", "ring_reuse_waits", "cpu_experts", "read_events", "images_written", "cancelled_bytes",
})
MEMD_RENAMED = {"num_slots": "pool_slots", "resident": "resident_experts", "pinned": "pinned_experts",
                "read_bandwidth": "read_bandwidth_bytes_per_second",  # (the unit in the name)
                "layer_notes": "notes", "layer_seconds": "layer_compute_seconds"}  # (not per-layer families)
MEMD_SKIPPED = frozenset({"next_gate"})  # StatsReply's next_gate is speculation's distance 1: exported once
MEMD_LABELS = frozenset({"pid"})  # numbers that identify rather than measure: labels of moeinf_memd_info
MEMD_HELP = {
    "pool_bytes": "bytes of the expert pool", "num_slots": "expert slots in the pool",
    "resident": "experts resident in the pool", "pinned": "experts pinned: a worker's acquire or lease, or the admin",
    "acquires": "ACQUIRE messages from workers",
    "acquires_partial": "acquires answered while some of their loads ran (the worker computed the others meanwhile)",
    "leased_layers": "MoE layers a worker computed from its leased experts, with no message to memd",
    "hits": "experts acquired that were already resident", "misses": "experts loaded on demand",
    "evictions": "experts evicted from the pool",
    "bytes_read": "bytes read from the disk (compressed images: their packed bytes)",
    "cancelled_bytes": "of the bytes read, those of loads cancelled before they finished",
    "read_seconds": "seconds spent reading experts", "stall_seconds": "seconds acquires waited for loads",
    "reader_busy_seconds": "wall seconds during which at least one expert was loading",
    "direct_io": "1 when experts are read with O_DIRECT", "prefetch": "1 when prefetching is on",
    "prefetch_used": "prefetched experts acquired before eviction",
    "prefetch_wasted": "prefetched experts evicted or cancelled before any acquire",
    "resident_per_layer": "experts of each MoE layer resident in the pool",
    "host_hits": "GPU pool: loads served from the pinned host tier",
    "host_misses": "GPU pool: loads read from disk into the host tier first",
    "copy_bytes": "GPU pool: bytes copied from the host tier to the device",
    "copy_seconds": "GPU pool: seconds the host-to-device copies took, summed",
    "ring_reuse_waits": "GPU pool: copies that waited for a busy entry of the copy-event ring",
    "cpu_experts": "GPU pool: host-tier experts the workers were told to compute on their CPU instead of copying them",
    "read_events": "GPU pool: released slots whose rewrite waits for a worker's done-reading event",
    "slot_cache": "1 when experts are read from their slot images where written (--slot-cache)",
    "slot_images": "experts whose slot image is on disk (read straight into their slot)",
    "images_written": "slot images written behind reads from the checkpoint",
    "slot_images_share": "--slot-compression: bytes read per slot byte of the written images (0: not compressed)",
}


def start_metrics(cfg, stats) -> MetricsEndpoint | None:
    """memd's endpoint when ``--metrics-port`` is set: Prometheus text of the StatsReply ``stats()`` builds (the
    one the STATS RPC answers)."""
    return MetricsEndpoint(cfg.metrics_host, cfg.metrics_port, stats) if cfg.metrics_port else None


class StatsCollector:
    """Collects memd's stats on each scrape: ``stats()`` runs on the event loop ``loop``."""

    def __init__(self, loop: asyncio.AbstractEventLoop, stats, timeout_s: float = SCRAPE_TIMEOUT_S):
        self.loop, self.stats, self.timeout_s = loop, stats, timeout_s

    def collect(self):
        up = GaugeMetricFamily("moeinf_memd_up", "1 when memd's event loop answered this scrape")
        future = asyncio.run_coroutine_threadsafe(self._stats(), self.loop)
        try:
            stats = future.result(self.timeout_s)
        except (FutureTimeout, RuntimeError) as exc:  # a loop stuck or closing: say so, export nothing stale
            future.cancel()
            log.warning("metrics scrape: no stats within %gs (%s)", self.timeout_s, exc or "timeout")
            stats = None
        up.add_metric([], 0.0 if stats is None else 1.0)
        yield up
        if stats is not None:
            yield from memd_families(stats)

    async def _stats(self) -> m.StatsReply:
        return self.stats()


class MetricsEndpoint:
    """``http://HOST:PORT/metrics`` (prometheus-client's server thread) for as long as memd serves."""

    def __init__(self, host: str, port: int, stats):
        prometheus_client.disable_created_metrics()
        self.registry = CollectorRegistry()
        self.registry.register(StatsCollector(asyncio.get_running_loop(), stats))
        try:
            self.httpd, self.thread = prometheus_client.start_http_server(port, host, self.registry)
        except OSError as exc:
            raise RuntimeError(f"--metrics-port {port}: cannot listen on {host}:{port} ({exc.strerror});"
                               " pick a free port or set --metrics-host") from None
        self.port = self.httpd.server_address[1]
        log.info("Prometheus metrics on http://%s:%d/metrics", host, self.port)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


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
    - a list of records (``layers``, ``lookahead``, ``speculation``) is one family per field,
      ``moeinf_memd_<list>_<field>`` (``layers`` named ``layer``), labelled by the record's first field (``layer``,
      ``distance``); an empty list emits nothing; ``MEMD_SKIPPED`` fields (a copy of another) are not exported.
    """
    info = {}
    for name in m.field_names(stats):
        if name in MEMD_SKIPPED:
            continue
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

