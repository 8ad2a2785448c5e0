"""The OpenAI-compatible HTTP API. Handlers parse into a ``Job``, admit it, and relay the worker's tokens.

A request holds an admission slot (``--max-queued``) from tokenization to its last token. Tokenization runs in
a small thread pool (the tokenizer releases the GIL), after a cheap length bound that refuses a text that cannot
fit the context without tokenizing it. Once a stream has sent its headers, every failure ends it with a final
``data: {"error": {...}}`` event and a closed response (``sse.py``); before that, it is an ordinary error response.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from common import messages as m
from common.config import GatewayConfig
from services.gateway import requests as rq
from services.gateway.app_keys import CFG, GATEWAY, METRICS, RECEIVED
from services.gateway.body import read_json
from services.gateway.errors import ApiError, bad_request, internal, too_many, unavailable
from services.gateway.guard import add_cors_headers, guard_middleware
from services.gateway.metrics import GatewayMetrics, RequestClock, metrics_middleware
from services.gateway.openapi import openapi_spec
from services.gateway.output import Output
from services.gateway.sse import Stream
from services.gateway.text import TemplateRefused, TextCodec
from services.gateway.routing import WorkerSet
from services.gateway.worker_link import GatewayStopping, WorkerRejected, WorkerSilent, WorkerUnavailable

log = logging.getLogger("moeinf.gateway")
HEALTH_POLL_S = 1.0
TOKENIZER_THREADS = 2
WORKER_ERRORS = {"capacity": (429, "rate_limit_error"), "bad_request": (400, "invalid_request_error"),
                 "memd": (503, "service_unavailable_error")}  # anything else: 500


class Gateway:
    def __init__(self, cfg: GatewayConfig, codec: TextCodec):
        self.cfg, self.codec = cfg, codec
        self.active = 0
        self.info: m.WorkerInfoReply | None = None
        self.health_reason = "the worker has not answered yet"
        self.metrics = GatewayMetrics(self)
        self.pool = ThreadPoolExecutor(TOKENIZER_THREADS, thread_name_prefix="tokenize")
        self.cancels: set[asyncio.Task] = set()  # CANCELs on their way to the worker (the loop keeps weak references)
        self._refreshing: asyncio.Future | None = None  # the health refresh in flight, shared by every caller

    # ------------------------------------------------------------------ lifecycle
    async def start(self, app: web.Application) -> None:
        # worker.sock and every worker-*.sock; routing (routing.py); a vanished worker's metric series go with it
        self.workers = WorkerSet(self.cfg, on_gone=self.metrics.worker_gone)
        self._poller = asyncio.create_task(self._poll_health())

    async def stop(self, app: web.Application) -> None:
        self._poller.cancel()
        await asyncio.gather(self._poller, return_exceptions=True)
        await self.workers.close()
        self.pool.shutdown(wait=False, cancel_futures=True)

    def abort_requests(self, reason: str) -> None:
        """Shutting down: every request in flight ends now (streams with an error event) instead of running on."""
        self.workers.abort(reason)

    async def _poll_health(self) -> None:
        while True:
            await self.refresh_health(HEALTH_POLL_S * 2)
            await asyncio.sleep(HEALTH_POLL_S)

    async def refresh_health(self, timeout_s: float) -> None:
        """Ready while at least one worker is. One refresh at a time, however many ``/health`` calls come: each
        joins the one in flight, so a flood of them sends each worker one WORKER_INFO, not one per call (which
        would take the link's room from generation calls and mark a busy worker not ready for everyone)."""
        if self._refreshing is None:
            self._refreshing = asyncio.ensure_future(self._refresh(timeout_s))
            self._refreshing.add_done_callback(self._refreshed)
        await asyncio.shield(self._refreshing)  # a caller that goes away does not cancel the others' refresh

    async def _refresh(self, timeout_s: float) -> None:
        await self.workers.refresh(timeout_s)
        self.info = self.workers.info() or self.info
        self.health_reason = self.workers.health_reason()

    def _refreshed(self, done: asyncio.Future) -> None:
        self._refreshing = None
        if not done.cancelled():
            done.exception()  # (retrieved: each caller that waited got it raised)

    # ------------------------------------------------------------------ routes
    async def health(self, request: web.Request) -> web.Response:
        await self.refresh_health(HEALTH_POLL_S)
        if self.health_reason:
            return web.json_response({"status": "unavailable", "reason": self.health_reason}, status=503)
        return web.json_response({"status": "ok", "model": self.cfg.served_model_name})

    def model_card(self) -> dict:
        return {"id": self.cfg.served_model_name, "object": "model", "created": 0, "owned_by": "moeinf",
                "max_model_len": self.info.max_model_len if self.info else None}

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [self.model_card()]})

    async def model(self, request: web.Request) -> web.Response:
        """``GET /v1/models/{model}`` (the client libraries' ``models.retrieve``)."""
        rq.check_model({"model": request.match_info["model"]}, self.cfg.served_model_name)
        return web.json_response(self.model_card())

    async def openapi(self, request: web.Request) -> web.Response:
        return web.json_response(openapi_spec(self.cfg))

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await read_json(request, self.cfg.body_timeout_s)
        rq.check_known(body, rq.COMMON | rq.COMPLETION_ONLY)
        info = self.require_worker()
        job = rq.Job(chat=False, model=rq.check_model(body, self.cfg.served_model_name), prompt_ids=[], max_tokens=0)
        text, ids = rq.parse_prompt(body, info.vocab_size, info.max_model_len)
        rq.parse_sampling(body, job, chat=False, limit=self.cfg.max_tokens_limit, vocab_size=info.vocab_size)
        job.forced_tokens = rq.parse_target_language(body, info.model_type, info.target_language,
                                                     self.codec.language_id)
        if job.forced_tokens and 0 < job.max_tokens <= len(job.forced_tokens):
            raise bad_request(f"'max_tokens' must leave room for text after the target language token (it counts"
                              f" as one): at least {len(job.forced_tokens) + 1}", "max_tokens")
        job.text_to_text = info.text_to_text
        with self.admission():
            if ids is None:
                ids = await self.tokenize(self.codec.encode, text, len(text), "prompt", info)
            job.prompt_ids = ids
            return await self.run(request, job, info)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await read_json(request, self.cfg.body_timeout_s)
        rq.check_known(body, rq.COMMON | rq.CHAT_ONLY)
        info = self.require_worker()
        if info.text_to_text:
            raise bad_request(f"{info.model_type} is a text-to-text (encoder-decoder) model without a chat format:"
                              " send the text to /v1/completions", "messages")
        job = rq.Job(chat=True, model=rq.check_model(body, self.cfg.served_model_name), prompt_ids=[], max_tokens=0)
        job.messages = rq.parse_messages(body)
        rq.parse_sampling(body, job, chat=True, limit=self.cfg.max_tokens_limit, vocab_size=info.vocab_size)
        chars = sum(len(msg["content"]) for msg in job.messages)
        with self.admission():
            try:
                job.prompt_ids = await self.tokenize(self.codec.encode_chat, job.messages, chars, "messages", info)
            except TemplateRefused as exc:
                raise bad_request(str(exc), "messages") from None
            return await self.run(request, job, info)

    # ------------------------------------------------------------------ admission and tokenization
    def require_worker(self) -> m.WorkerInfoReply:
        self.health_reason = self.workers.health_reason()  # a worker's death is known before the next poll
        if self.health_reason or self.info is None:
            raise unavailable(f"not ready: {self.health_reason or 'starting'}")
        return self.info

    @contextlib.contextmanager
    def admission(self):
        """One of ``--max-queued`` slots, held until the response is over (however it ends)."""
        if self.active >= self.cfg.max_queued:
            raise too_many(f"{self.active} requests are in progress (--max-queued {self.cfg.max_queued}); retry"
                           " shortly", 1)
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1

    async def tokenize(self, encode, text, chars: int, param: str, info: m.WorkerInfoReply) -> list[int]:
        if self.codec.too_long(chars, info.max_model_len):
            raise bad_request(f"the {param} is {chars} characters: more than the model's context of"
                              f" {info.max_model_len} tokens can hold", param, "context_length_exceeded")
        return await asyncio.get_running_loop().run_in_executor(self.pool, encode, text)

    # ------------------------------------------------------------------ generation
    async def run(self, request: web.Request, job: rq.Job, info: m.WorkerInfoReply):
        rq.default_max_tokens(job, limit=self.cfg.max_tokens_limit, max_model_len=info.max_model_len)
        if len(job.prompt_ids) + job.max_tokens > info.max_model_len:
            param = "messages" if job.chat else "prompt"
            raise bad_request(f"the prompt is {len(job.prompt_ids)} tokens and max_tokens {job.max_tokens}: together"
                              f" above the model's context of {info.max_model_len} tokens", param,
                              "context_length_exceeded")
        self.metrics.prompt_tokens.inc(len(job.prompt_ids))
        clock = self.metrics.clock(request.get(RECEIVED, time.perf_counter()))
        out = Output(self.codec, job)
        # closed when the request ends however it ends, so that its cleanup (the worker's CANCEL, the slot) runs
        # then, not when the garbage collector frees a generator left suspended by a disconnect
        async with contextlib.aclosing(self.tokens(job, info, out, clock)) as tokens:
            if job.stream:
                with self.metrics.streams.track_inprogress():
                    return await Stream(request, out, self.cfg.stream_write_timeout_s).relay(tokens)
            async for _ in tokens:
                pass
        return web.json_response(out.body())

    def worker_request(self, job: rq.Job, info: m.WorkerInfoReply) -> m.GenerateRequest:
        return m.GenerateRequest(request=uuid.uuid4().hex, prompt=job.prompt_ids, max_tokens=job.max_tokens,
                                 stop_token_ids=self.stop_token_ids(info), temperature=job.temperature,
                                 top_p=job.top_p, top_k=job.top_k, seed=job.seed, forced_tokens=job.forced_tokens)

    def stop_token_ids(self, info: m.WorkerInfoReply) -> list[int]:
        """The model's end-of-sequence tokens (its generation config's, as transformers stops) and the tokenizer's
        own, where a checkpoint's configs lack or differ from it (as vLLM stops)."""
        eos = self.codec.eos_token_id
        return list(info.eos_token_ids) + ([eos] if eos is not None and eos not in info.eos_token_ids else [])

    async def tokens(self, job: rq.Job, info: m.WorkerInfoReply, out: Output, clock: RequestClock):
        """Yield text deltas; cancels the worker's generation on a stop string, an error or a disconnect.

        Worker failures come out as ``ApiError``s: a dead worker's as 503 with ``Retry-After``."""
        req = self.worker_request(job, info)
        finished = gone = False  # gone: the worker no longer has the request (it failed it, or it died)
        try:
            dispatch = self.workers.route(job.user, job.prompt_ids, job.max_tokens)
        except WorkerUnavailable as exc:
            raise unavailable(str(exc)) from None
        link = dispatch.worker.link
        self.metrics.worker_requests.labels(dispatch.worker.name).inc()
        try:
            async for reply in link.generate(req, self.cfg.step_timeout_s):
                if not reply.tokens and reply.finish_reason is None:
                    continue  # a prompt's chunk done: the request is under way (the headers wait for a token)
                dispatch.progress(len(reply.tokens))
                clock.add(len(reply.tokens))
                delta = out.add(reply.tokens, reply.finish_reason)
                finished = out.finish_reason is not None
                yield delta
                if finished:
                    return
        except WorkerUnavailable as exc:
            # a stopping gateway, or one that heard nothing for --step-timeout-s, still cancels the worker's generation
            gone = not isinstance(exc, (GatewayStopping, WorkerSilent))
            raise unavailable(str(exc)) from None
        except WorkerRejected as exc:
            gone = True
            status, kind = WORKER_ERRORS.get(exc.code, (500, "server_error"))
            raise ApiError(status, str(exc), type=kind, code=exc.code,
                           headers={"Retry-After": "1"} if status in (429, 503) else None) from None
        finally:
            dispatch.end()
            clock.done()
            if not gone and (not finished or out.stop.stopped):
                task = asyncio.ensure_future(link.cancel(req.request))
                self.cancels.add(task)
                task.add_done_callback(self.cancels.discard)


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
                        f"the request body is larger than {request.app[CFG].max_body_bytes} bytes",
                        type=kind, code=str(exc.status), close=exc.status == 413).response()
    except (asyncio.CancelledError, ConnectionResetError):
        log.info("client went away after %.2fs: %s %s", time.perf_counter() - started, request.method, request.path)
        raise
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return internal().response()


def build_app(cfg: GatewayConfig, codec: TextCodec) -> web.Application:
    app = web.Application(client_max_size=cfg.max_body_bytes,
                          middlewares=[metrics_middleware, errors_middleware, guard_middleware])
    gateway = Gateway(cfg, codec)
    app[CFG], app[GATEWAY], app[METRICS] = cfg, gateway, gateway.metrics
    app.on_startup.append(gateway.start)
    app.on_cleanup.append(gateway.stop)
    app.on_response_prepare.append(add_cors_headers)
    app.router.add_get("/health", gateway.health)
    app.router.add_get("/v1/models", gateway.models)
    app.router.add_get("/v1/models/{model:.+}", gateway.model)
    app.router.add_get("/openapi.json", gateway.openapi)
    app.router.add_get("/metrics", gateway.metrics.handle)
    app.router.add_post("/v1/completions", gateway.completions)
    app.router.add_post("/v1/chat/completions", gateway.chat)
    return app

