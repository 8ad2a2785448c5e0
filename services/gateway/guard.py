"""Who may call the API: API key, JSON-only bodies, CORS.

- With ``--api-key`` (or ``--api-key-file``, env ``MOEINF_API_KEY``), every ``/v1/*`` route needs
  ``Authorization: Bearer <key>``, compared in constant time; ``/metrics`` too with ``--metrics-auth``.
  ``/health`` and ``/openapi.json`` stay open.
- A POST body must be ``application/json`` (415 otherwise): a web page cannot drive the API with a cross-site
  "simple" request (text/plain, form data), which a browser sends without asking the server first.
- CORS: no ``Access-Control-Allow-Origin`` unless ``--cors-origins`` lists the origin (or is ``*``); listed
  origins get their preflight (OPTIONS) answered.
"""
from __future__ import annotations

import hmac
import ipaddress

from aiohttp import web

from common.config import GatewayConfig
from services.gateway.app_keys import CFG
from services.gateway.errors import ApiError

PREFLIGHT_MAX_AGE_S = 600
ALLOWED_HEADERS = "Authorization, Content-Type"


def exposure_warning(cfg: GatewayConfig) -> str | None:
    """What to warn about at start-up: a gateway listening beyond loopback with no API key (the container image's
    ``--host 0.0.0.0`` behind a published port) serves anyone who can reach it."""
    if cfg.api_key:
        return None
    try:
        if cfg.host == "localhost" or ipaddress.ip_address(cfg.host).is_loopback:
            return None
    except ValueError:  # a host name: it may resolve to anything
        pass
    return (f"listening on {cfg.host}:{cfg.port} without an API key: anyone who can reach this port can generate;"
            " set --api-key (or --api-key-file, env MOEINF_API_KEY), or listen on 127.0.0.1")


def unauthorized(message: str) -> ApiError:
    return ApiError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def needs_key(cfg: GatewayConfig, path: str) -> bool:
    return bool(cfg.api_key) and (path.startswith("/v1/") or (path == "/metrics" and cfg.metrics_auth))


def check_key(cfg: GatewayConfig, request: web.Request) -> None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if not header:
        raise unauthorized("this server needs an API key: send 'Authorization: Bearer <key>'")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), cfg.api_key.encode()):
        raise unauthorized("incorrect API key")


def check_content_type(request: web.Request) -> None:
    if request.method == "POST" and request.content_type != "application/json":
        raise ApiError(415, "the body must be JSON: send 'Content-Type: application/json'",
                       code="unsupported_media_type", close=True)


def allowed_origin(cfg: GatewayConfig, origin: str | None) -> str | None:
    if origin is None or not cfg.cors_allowed:
        return None
    if "*" in cfg.cors_allowed:
        return "*"
    return origin if origin in cfg.cors_allowed else None


def preflight(origin: str) -> web.Response:
    return web.Response(status=204, headers={
        "Access-Control-Allow-Origin": origin, "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
        "Access-Control-Allow-Headers": ALLOWED_HEADERS, "Access-Control-Max-Age": str(PREFLIGHT_MAX_AGE_S),
        "Vary": "Origin"})


@web.middleware
async def guard_middleware(request: web.Request, handler):
    """Runs inside the error middleware: its ``ApiError``s come out OpenAI-shaped and counted."""
    cfg: GatewayConfig = request.app[CFG]
    origin = allowed_origin(cfg, request.headers.get("Origin"))
    if request.method == "OPTIONS" and origin is not None and "Access-Control-Request-Method" in request.headers:
        return preflight(origin)
    if needs_key(cfg, request.path):
        check_key(cfg, request)
    check_content_type(request)
    return await handler(request)


async def add_cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: every response, streams and errors included, before its headers go out."""
    origin = allowed_origin(request.app[CFG], request.headers.get("Origin"))
    if origin is not None:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Vary"] = "Origin"
