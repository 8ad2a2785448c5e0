"""The gateway's typed aiohttp keys: what handlers and middlewares read from the app (``web.AppKey``) and from a
request (``web.RequestKey``, aiohttp 3.14)."""
from __future__ import annotations

from aiohttp import web

from common.config import GatewayConfig

CFG = web.AppKey("cfg", GatewayConfig)
GATEWAY = web.AppKey("gateway")  # services.gateway.app.Gateway
METRICS = web.AppKey("metrics")  # services.gateway.metrics.GatewayMetrics
RECEIVED = web.RequestKey("received", float)  # when the metrics middleware saw the request (perf_counter)
