"""Server-Sent Events: a completion as ``data:`` chunks, ending in ``data: [DONE]`` or, on a failure after the
headers went out, in a final ``data: {"error": {...}}`` event (OpenAI's error object). Either way the response
is closed; a client never waits on a stream that will not go on. A client that stops reading (its connection's
buffers full) for ``--stream-write-timeout-s`` is dropped as gone: its admission slot is freed and its generation
cancelled, as on a disconnect.
"""
from __future__ import annotations

import asyncio
import json
import logging

from aiohttp import web

from services.gateway.errors import ApiError, internal
from services.gateway.output import Output

log = logging.getLogger("moeinf.gateway")


class Stream:
    def __init__(self, request: web.Request, out: Output, write_timeout_s: float):
        self.request, self.out, self.write_timeout_s = request, out, write_timeout_s
        self.response: web.StreamResponse | None = None

    async def relay(self, deltas) -> web.StreamResponse:
        """Send each text delta of ``deltas`` (an async iterator that raises ``ApiError`` on failure)."""
        try:
            await self._relay(deltas)
        except ApiError as exc:
            if self.response is None:
                raise  # nothing sent yet: an ordinary error response
            log.info("stream %s failed after its headers: %s", self.out.id, exc.message)
            await self.send(exc.body())
        except (ConnectionResetError, OSError):
            raise  # the client went away: nothing to tell it
        except Exception:
            if self.response is None:
                raise
            log.exception("stream %s failed after its headers", self.out.id)
            await self.send(internal().body())
        await self.write(None)
        return self.response

    async def _relay(self, deltas) -> None:
        first = True
        async for delta in deltas:
            await self.start()
            if delta or first:
                await self.send(self.out.chunk(delta, first=first))
                first = False
        await self.start()
        await self.send(self.out.chunk("", final=True))
        if self.out.job.include_usage:
            await self.send(self.out.usage_chunk())
        await self.write(b"data: [DONE]\n\n")

    async def start(self) -> None:
        if self.response is None:
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
            await response.prepare(self.request)
            self.response = response

    async def send(self, obj: dict) -> None:
        await self.write(b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n")

    async def write(self, data: bytes | None) -> None:
        """``data`` out (None: the end of the response), or ``ConnectionResetError`` when the client has left it
        unread for ``write_timeout_s`` (the connection is closed: the handler's cleanup runs as on a disconnect)."""
        try:
            await asyncio.wait_for(self.response.write(data) if data is not None else self.response.write_eof(),
                                   self.write_timeout_s)
        except asyncio.TimeoutError:
            if self.request.transport is not None:
                self.request.transport.abort()
            raise ConnectionResetError(f"stream {self.out.id}: the client read nothing for {self.write_timeout_s:g}s"
                                       " (--stream-write-timeout-s)") from None
