"""The OpenAI-compatible HTTP API. Handlers parse into a ``Job``, admit it, and relay the worker's tokens."""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid

from aiohttp import web

from common import messages as m
from common.config import GatewayConfig
from services.gateway import requests as rq
from services.gateway.errors import ApiError, bad_request, too_many, unavailable
from services.gateway.metrics import GatewayMetrics, RequestClock, metrics_middleware
from services.gateway.openapi import openapi_spec
from services.gateway.output import Output
from services.gateway.text import TextCodec
from services.gateway.worker_link import WorkerLink, WorkerRejected, WorkerUnavailable

log = logging.getLogger("moeinf.gateway")
HEALTH_POLL_S = 1.0


class Gateway:
    def __init__(self, cfg: GatewayConfig, codec: TextCodec):
        self.cfg, self.codec = cfg, codec
        self.active = 0
        self.info: m.WorkerInfoReply | None = None
        self.health_reason = "the worker has not answered yet"
        self.metrics = GatewayMetrics(self, cfg.memd_addr)

    # ------------------------------------------------------------------ lifecycle
    async def start(self, app: web.Application) -> None:
        self.link = WorkerLink(self.cfg.worker_addr, max_pending=self.cfg.max_queued + 64)
        self._poller = asyncio.create_task(self._poll_health())

    async def stop(self, app: web.Application) -> None:
        self._poller.cancel()
        await asyncio.gather(self._poller, return_exceptions=True)
        await self.link.close()
        self.metrics.close()

    async def _poll_health(self) -> None:
        while True:
            try:
                info = await self.link.info(timeout_s=HEALTH_POLL_S * 2)
                self.info = info
                self.health_reason = "" if info.ready else "the worker is up but memd is not"
            except (WorkerUnavailable, WorkerRejected) as exc:
                self.health_reason = f"the worker is not answering ({exc})"
            await asyncio.sleep(HEALTH_POLL_S)

    # ------------------------------------------------------------------ routes
    async def health(self, request: web.Request) -> web.Response:
        try:
            self.info = await self.link.info(timeout_s=HEALTH_POLL_S)
            self.health_reason = "" if self.info.ready else "the worker is up but memd is not"
        except (WorkerUnavailable, WorkerRejected) as exc:
            self.health_reason = f"the worker is not answering ({exc})"
        if self.health_reason:
            return web.json_response({"status": "unavailable", "reason": self.health_reason}, status=503)
        return web.json_response({"status": "ok", "model": self.cfg.served_model_name})

    async def models(self, request: web.Request) -> web.Response:
        card = {"id": self.cfg.served_model_name, "object": "model", "created": 0, "owned_by": "moeinf",
                "max_model_len": self.info.max_model_len if self.info else None}
        return web.json_response({"object": "list", "data": [card]})

    async def openapi(self, request: web.Request) -> web.Response:
        return web.json_response(openapi_spec(self.cfg.served_model_name))

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await read_json(request)
        rq.check_known(body, rq.COMMON | rq.COMPLETION_ONLY)
        info = self.require_worker()
        job = rq.Job(chat=False, model=rq.check_model(body, self.cfg.served_model_name), prompt_ids=[], max_tokens=0)
        text, ids = rq.parse_prompt(body, info.vocab_size)
        job.prompt_ids = ids if ids is not None else self.codec.encode(text)
        return await self.run(request, job, body, info)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await read_json(request)
        rq.check_known(body, rq.COMMON | rq.CHAT_ONLY)
        info = self.require_worker()
        job = rq.Job(chat=True, model=rq.check_model(body, self.cfg.served_model_name), prompt_ids=[], max_tokens=0)
        job.messages = rq.parse_messages(body)
        job.prompt_ids = self.codec.encode_chat(job.messages)
        return await self.run(request, job, body, info)

    # ------------------------------------------------------------------ generation
    def require_worker(self) -> m.WorkerInfoReply:
        if self.health_reason or self.info is None:
            raise unavailable(f"not ready: {self.health_reason or 'starting'}")
        return self.info

    async def run(self, request: web.Request, job: rq.Job, body: dict, info: m.WorkerInfoReply):
        room = info.max_model_len - len(job.prompt_ids)
        default = max(1, min(self.cfg.max_tokens_limit, room)) if job.chat else 16
        rq.parse_sampling(body, job, chat=job.chat, limit=self.cfg.max_tokens_limit, default=default)
        if len(job.prompt_ids) + job.max_tokens > info.max_model_len:
            param = "messages" if job.chat else "prompt"
            raise bad_request(f"the prompt is {len(job.prompt_ids)} tokens and max_tokens {job.max_tokens}: together"
                              f" above the model's context of {info.max_model_len} tokens", param,
                              "context_length_exceeded")
        if self.active >= self.cfg.max_queued:
            raise too_many(f"{self.active} requests are in progress (limit {self.cfg.max_queued}); retry shortly", 1)
        self.active += 1
        self.metrics.prompt_tokens.inc(len(job.prompt_ids))
        clock = self.metrics.clock(request.get("received", time.perf_counter()))
        try:
            if job.stream:
                return await self.stream(request, job, info, clock)
            return await self.complete(job, info, clock)
        finally:
            self.active -= 1

    def worker_request(self, job: rq.Job, info: m.WorkerInfoReply) -> m.GenerateRequest:
        return m.GenerateRequest(request=uuid.uuid4().hex, prompt=job.prompt_ids, max_tokens=job.max_tokens,
                                 stop_token_ids=list(info.eos_token_ids), temperature=job.temperature,
                                 top_p=job.top_p, top_k=job.top_k, seed=job.seed)

    async def tokens(self, job: rq.Job, info: m.WorkerInfoReply, out: Output, clock: RequestClock):
        """Yield text deltas; cancels the worker's generation on a stop string, an error or a disconnect."""
        req = self.worker_request(job, info)
        finished = False
        try:
            async for reply in self.link.generate(req, self.cfg.step_timeout_s):
                clock.add(len(reply.tokens))
                delta = out.add(reply.tokens, reply.finish_reason)
                finished = out.finish_reason is not None
                yield delta
                if finished:
                    return
        except WorkerUnavailable as exc:
            raise unavailable(str(exc)) from None
        except WorkerRejected as exc:
            status = 429 if exc.code == "capacity" else 400 if exc.code == "bad_request" else 500
            raise ApiError(status, str(exc), type="invalid_request_error" if status == 400 else "server_error",
                           code=exc.code) from None
        finally:
            clock.done()
            if not finished or out.stop.stopped:
                asyncio.ensure_future(self.link.cancel(req.request))

    async def complete(self, job: rq.Job, info: m.WorkerInfoReply, clock: RequestClock) -> web.Response:
        out = Output(self.codec, job)
        async for _ in self.tokens(job, info, out, clock):
            pass
        return web.json_response(out.body())

    async def stream(self, request: web.Request, job: rq.Job, info: m.WorkerInfoReply,
                     clock: RequestClock) -> web.StreamResponse:
        with self.metrics.streams.track_inprogress():
            return await self._stream(request, job, info, clock)

    async def _stream(self, request: web.Request, job: rq.Job, info: m.WorkerInfoReply,
                      clock: RequestClock) -> web.StreamResponse:
        out = Output(self.codec, job)
        response = None
        first = True
        async for delta in self.tokens(job, info, out, clock):
            if response is None:
                response = await start_sse(request)
            if delta or first:
                await send_event(response, out.chunk(delta, first=first))
                first = False
        if response is None:
            response = await start_sse(request)
        await send_event(response, out.chunk("", final=True))
        if job.include_usage:
            await send_event(response, out.usage_chunk())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


async def read_json(request: web.Request) -> dict:
    raw = await request.read()
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request(f"the body is not valid JSON ({exc})") from None
    if not isinstance(body, dict):
        raise bad_request("the body must be a JSON object")
    return body


async def start_sse(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    return response


async def send_event(response: web.StreamResponse, obj: dict) -> None:
    await response.write(b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n")


@web.middleware
async def errors_middleware(request: web.Request, handler):
    started = time.perf_counter()
    try:
        return await handler(request)
    except ApiError as exc:
        return exc.response()
    except web.HTTPException as exc:  # 404, 405, 413 from aiohttp itself, in OpenAI's shape
        kind = "invalid_request_error" if exc.status < 500 else "server_error"
        return ApiError(exc.status, exc.reason if exc.status != 413 else
                        f"the request body is larger than {request.app['cfg'].max_body_bytes} bytes",
                        type=kind, code=str(exc.status)).response()
    except (asyncio.CancelledError, ConnectionResetError):
        log.info("client went away after %.2fs: %s %s", time.perf_counter() - started, request.method, request.path)
        raise
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return ApiError(500, "internal error in the gateway (see its log)", type="server_error",
                        code="internal").response()


def build_app(cfg: GatewayConfig, codec: TextCodec) -> web.Application:
    app = web.Application(client_max_size=cfg.max_body_bytes, middlewares=[metrics_middleware, errors_middleware])
    gateway = Gateway(cfg, codec)
    app["cfg"], app["gateway"], app["metrics"] = cfg, gateway, gateway.metrics
    app.on_startup.append(gateway.start)
    app.on_cleanup.append(gateway.stop)
    app.router.add_get("/health", gateway.health)
    app.router.add_get("/v1/models", gateway.models)
    app.router.add_get("/openapi.json", gateway.openapi)
    app.router.add_get("/metrics", gateway.metrics.handle)
    app.router.add_post("/v1/completions", gateway.completions)
    app.router.add_post("/v1/chat/completions", gateway.chat)
    return app
