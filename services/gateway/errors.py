"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}`` with the matching HTTP status.

aiohttp answers a request it cannot parse (a header over 8190 bytes, a malformed request line) before any
middleware runs, with a text/plain body that quotes the offending bytes and an ERROR traceback in the log.
``GatewayRunner`` swaps in a protocol handler that answers those in the same JSON shape, without the quote, and
logs one INFO line.
"""
from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler

from services.gateway.app_keys import CFG

log = logging.getLogger("moeinf.gateway")
LINGER_S = 1.0
RETRY_AFTER_S = 2  # a crashed worker is back within seconds (the supervisor restarts it)


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None, close: bool = False):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}
        self.close = close  # the connection cannot be reused (e.g. a body that was not read to its end)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> web.Response:
        response = web.json_response(self.body(), status=self.status, headers=self.headers)
        if self.close:
            response.force_close()
        return response


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def unavailable(message: str) -> ApiError:
    return ApiError(503, message, type="service_unavailable_error", code="service_unavailable",
                    headers={"Retry-After": str(RETRY_AFTER_S)})


def too_many(message: str, retry_after_s: int) -> ApiError:
    return ApiError(429, message, type="rate_limit_error", code="queue_full",
                    headers={"Retry-After": str(retry_after_s)})


def internal(message: str = "internal error in the gateway (see its log)") -> ApiError:
    return ApiError(500, message, type="server_error", code="internal")


class _Handler(RequestHandler):
    def handle_error(self, request, status: int = 500, exc: BaseException | None = None, message: str | None = None):
        if not isinstance(exc, HttpProcessingError) or request.writer.output_size > 0:
            return super().handle_error(request, status, exc, message)
        if isinstance(exc, LineTooLong):
            error = ApiError(431, f"a request line or header is longer than {self.max_field_size} bytes",
                             code="header_too_large", close=True)
        else:
            error = ApiError(exc.code if 400 <= exc.code < 500 else 400, "the request is not valid HTTP/1.1",
                             code="bad_http_request", close=True)
        log.info("refused an unparsable request from %s: %s", request.remote, type(exc).__name__)
        return error.response()


class _Server(web.Server):
    def __call__(self) -> RequestHandler:
        return _Handler(self, loop=self._loop, **self._kwargs)


class GatewayRunner(web.AppRunner):
    """``web.AppRunner`` whose connections answer unparsable requests with OpenAI-shaped errors, drain an unread
    body for at most ``LINGER_S`` after answering (aiohttp's default, 10 s, holds a stalled client), and close a
    connection whose request headers are not complete ``--header-timeout-s`` after it opened or after its previous
    response (a client sending its headers byte by byte).

    aiohttp has no header timeout of its own, but its keep-alive timer does this: it starts when the connection opens
    and again after each response, partial header bytes do not restart it, and when it fires on a connection still
    waiting for a complete request it closes it (aiohttp's default is 3630 s)."""

    def __init__(self, app: web.Application, **kwargs):
        kwargs.setdefault("lingering_time", LINGER_S)
        kwargs.setdefault("keepalive_timeout", app[CFG].header_timeout_s)
        super().__init__(app, **kwargs)

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _Server
        return server
