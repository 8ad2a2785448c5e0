"""The worker's gateway link and its compute loop.

The event loop owns the ROUTER socket (one reader task, one writer task); the compute thread owns the model,
the memd client and the scheduler. They meet in two queues: requests in, replies out. Admission is bounded: beyond
``--max-queued`` waiting plus ``--max-running`` running requests a request is refused with ``capacity``. The
compute loop reads like the step it is: take new requests -> drop cancelled ones -> schedule -> one forward for
the whole step -> publish each request's token -> retire the finished ones. Requests join and leave only between
steps; a failed step runs again request by request where the caches can be rewound (else it fails only the
requests in it), and a request that cannot be sampled fails alone. Every
request ends with its last token or an error reply: when the worker stops, those still here get ``unavailable``.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
from dataclasses import dataclass, replace

import msgspec
import zmq
import zmq.asyncio

from common import messages as m
from common.access import OWNER_ONLY, Access
from common.codec import ProtocolError, decode, encode, request_id_of
from common.protocol import WORKER_OPS, Op
from common.zmq_utils import make_socket, remove_ipc_file
from services.worker import device
from services.worker.engine import Engine, RequestError, Sequence
from services.worker.kv_budget import KvMeter
from services.worker.memd_client import MemdClient, MemdDeadError, MemdError
from services.worker.scheduler import CapacityError, Chunk, Limits, Scheduler

log = logging.getLogger("moeinf.worker")
MEMD_WATCH_S = 0.2  # how often the worker checks memd's pid (a dead memd: the worker stops, streams end)
LINGER_MS = 500  # at exit, the last replies (errors of the requests still here) get this long to go out
STOP_JOIN_S = 30.0  # a stop waits this long for the step in progress to end


@dataclass(eq=False, slots=True)
class Job:
    """A request the compute thread serves, and where its replies go."""

    identity: bytes
    rid: int
    seq: Sequence


class WorkerServer:
    def __init__(self, addr: str, engine: Engine, client: MemdClient, info: m.WorkerInfoReply, limits: Limits,
                 access: Access = OWNER_ONLY):
        self.addr, self.engine, self.client, self.info = addr, engine, client, info
        self.access = access  # of worker.sock: whoever may open it may generate
        self.max_live = limits.max_waiting + limits.max_running
        self.inbox: queue.Queue = queue.Queue(maxsize=2 * self.max_live)
        self.cancelled: set[str] = set()  # live requests cancelled, until the compute loop drops them (a step's end)
        self.live: dict[str, tuple[bytes, int]] = {}  # request id -> (gateway, call id) (event loop side):
        #                                               <= max_live not cancelled, <= 2 * max_live in all
        self.meter = KvMeter()  # what a request's KV cache costs, weighed after each step (--kv-cache-memory)
        self.scheduler = Scheduler(limits, self.meter.reserve)
        self.jobs: dict[str, Job] = {}  # request id -> job (compute side), at most 2 x max_live (see full)
        self.stopping = threading.Event()
        self.compute_stuck = False  # the compute thread outlived the stop (it may still use the memd client)
        self.exit_code = 0
        self.generated_tokens = 0

    # ------------------------------------------------------------------ event loop side
    async def serve(self) -> int:
        self.loop = asyncio.get_running_loop()
        ctx = zmq.asyncio.Context()
        self.sock = make_socket(ctx, zmq.ROUTER, self.addr, bind=True, access=self.access)
        self.outbox: asyncio.Queue = asyncio.Queue()
        compute = threading.Thread(target=self.compute_loop, name="worker-compute", daemon=True)
        compute.start()
        tasks = [asyncio.create_task(self._read()), asyncio.create_task(self._write()),
                 asyncio.create_task(self._watch_memd())]
        log.info("worker ready on %s", self.addr)
        try:
            await self.loop.run_in_executor(None, self.stopping.wait)
        finally:
            self.stopping.set()
            await self.loop.run_in_executor(None, compute.join, STOP_JOIN_S)
            self.answer_leftovers(compute.is_alive())
            await self._flush(timeout_s=1.0)  # the last replies (errors of requests still here) go out
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.sock.close(linger=LINGER_MS)
            ctx.term()
            remove_ipc_file(self.addr)
        return self.exit_code

    def stop(self) -> None:
        self.stopping.set()

    def answer_leftovers(self, computing: bool) -> None:
        """After the compute thread's join: requests admitted after its last look at the inbox, and, if it still
        runs a step (``computing``: memd slow to answer), every request still here, get ``unavailable`` now."""
        stopped = m.ErrorReply("unavailable", "the worker is stopping; retry shortly")
        while not self.inbox.empty():
            identity, rid, req = self.inbox.get_nowait()
            self.live.pop(req.request, None)
            self._reply(identity, Op.ERROR, rid, stopped)
        if computing:
            self.compute_stuck = True
            log.warning("the compute thread did not end within %gs of stopping: %d requests answered unavailable",
                        STOP_JOIN_S, len(self.live))
            for identity, rid in self.live.values():
                self._reply(identity, Op.ERROR, rid, stopped)

    async def _flush(self, timeout_s: float) -> None:
        """Send every reply still queued (a reply taken off the outbox but not yet sent counts too: join, not
        empty); the socket then closes with ``LINGER_MS`` of linger, so its I/O thread writes them out."""
        await asyncio.sleep(0)  # let the compute thread's last call_soon_threadsafe replies land in the outbox
        try:
            await asyncio.wait_for(self.outbox.join(), timeout_s)
        except asyncio.TimeoutError:
            log.warning("%d replies not sent within %gs of stopping", self.outbox.qsize(), timeout_s)

    async def _watch_memd(self) -> None:
        """A worker without memd cannot compute: exit (status 3) so the supervisor restarts both."""
        while not self.stopping.is_set():
            await asyncio.sleep(MEMD_WATCH_S)
            if not self.client.memd_alive():
                log.error("memd (pid %s) is gone; the worker stops", self.client.memd_pid)
                self.exit_code = 3
                self.stopping.set()

    async def _read(self) -> None:
        while True:
            parts = await self.sock.recv_multipart()
            if len(parts) != 2:
                continue
            identity, frame = parts
            try:
                op, rid, req = decode(frame, WORKER_OPS)
            except ProtocolError as exc:
                self._reply(identity, Op.ERROR, request_id_of(frame), m.ErrorReply("bad_request", str(exc)))
                continue
            self.on_request(identity, op, rid, req)

    def on_request(self, identity: bytes, op: Op, rid: int, req) -> None:
        if op is Op.WORKER_INFO:
            ready = self.client.memd_alive() and not self.stopping.is_set()  # (a draining worker takes no more)
            info = msgspec.structs.replace(self.info, ready=ready, active=len(self.live),
                                       generated_tokens=self.generated_tokens)
            self._reply(identity, op, rid, info)
        elif op is Op.CANCEL:
            found = req.request in self.live
            if found:
                self.cancelled.add(req.request)
            self._reply(identity, op, rid, m.CancelReply(found))
        elif op is Op.GENERATE:
            self.admit_request(identity, rid, req)

    def admit_request(self, identity: bytes, rid: int, req: m.GenerateRequest) -> None:
        if self.stopping.is_set():  # the compute loop may have drained its inbox already: nobody would answer
            self._reply(identity, Op.ERROR, rid, m.ErrorReply("unavailable", "the worker is stopping; retry shortly"))
            return
        if req.request in self.live:
            self._reply(identity, Op.ERROR, rid, m.ErrorReply("bad_request", f"request id {req.request!r} is in use"))
            return
        if self.full():
            self._reply(identity, Op.ERROR, rid, m.ErrorReply("capacity", f"{len(self.live)} requests queued or"
                                                                          " running; raise --max-queued or"
                                                                          " --max-running"))
            return
        self.live[req.request] = identity, rid
        self.inbox.put_nowait((identity, rid, req))

    def full(self) -> bool:
        """No room for one more request: ``max_live`` that were not cancelled (a cancelled one stays in ``live``
        until the running step ends, and would otherwise refuse the requests of clients who gave up and retried), or
        twice that in all (a bound on what many cancels during one long step can leave)."""
        return len(self.live) - len(self.cancelled) >= self.max_live or len(self.live) >= 2 * self.max_live

    async def _write(self) -> None:
        while True:
            identity, frame = await self.outbox.get()
            try:
                await self.sock.send_multipart([identity, frame])
            except zmq.ZMQError as exc:
                self.forsake(identity, exc)
            finally:
                self.outbox.task_done()

    def forsake(self, identity: bytes, exc: zmq.ZMQError) -> None:
        """A reply to a gateway that is gone (killed: its client cannot be told anything): cancel every request of
        that gateway, so that none of them keeps computing for nobody."""
        orphans = [r for r, (owner, _) in self.live.items() if owner == identity and r not in self.cancelled]
        self.cancelled.update(orphans)
        if orphans:
            log.info("a reply to a vanished gateway was dropped (%s): its %d requests are cancelled", exc, len(orphans))

    def _reply(self, identity: bytes, op: Op, rid: int, msg) -> None:
        self.outbox.put_nowait((identity, encode(op, rid, msg)))

    def _to_loop(self, fn, *args) -> None:
        """From the compute thread: ``fn(*args)`` on the event loop; nothing once the stop answered its requests
        for it (``answer_leftovers``) or the loop closed (a step that outlived the stop)."""
        if self.compute_stuck or self.loop.is_closed():
            return
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # closed meanwhile
            pass

    def _reply_threadsafe(self, identity: bytes, op: Op, rid: int, msg) -> None:
        self._to_loop(self._reply, identity, op, rid, msg)

    # ------------------------------------------------------------------ compute thread
    def compute_loop(self) -> None:
        try:
            while not self.stopping.is_set():
                self.take_new(wait=not self.scheduler)
                self.drop_cancelled()
                step = self.scheduler.schedule()
                if step:
                    self.run_step(step)
                elif not self.jobs:
                    self.client.return_leases()  # idle: hold nothing in memd's pool
        except Exception:  # outside a step's own guard: a worker that cannot compute stops (its supervisor restarts
            log.exception("the compute loop failed; the worker stops")  # it) rather than answer ready and hang
            self.exit_code = self.exit_code or 1
            self.stopping.set()
        reasons = {3: "the worker lost memd", 4: "the worker's GPU failed", 0: "the worker is shutting down"}
        reason = reasons.get(self.exit_code, "the worker failed (see its log)")
        self.fail(list(self.jobs.values()), "unavailable", f"{reason}; retry shortly")
        while True:  # and those that arrived but never started
            try:
                identity, rid, req = self.inbox.get_nowait()
            except queue.Empty:
                break
            self._reply_threadsafe(identity, Op.ERROR, rid, m.ErrorReply("unavailable", f"{reason}; retry shortly"))

    def take_new(self, wait: bool) -> None:
        """Start every request that arrived; when idle, wait a little for one."""
        try:
            item = self.inbox.get(timeout=0.2) if wait else self.inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self.start(*item)
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                return

    def start(self, identity: bytes, rid: int, req: m.GenerateRequest) -> None:
        try:
            seq = self.engine.start(req)
            if req.request not in self.cancelled:  # (cancelled before it started: answered below, never queued,
                self.drop_cancelled()               # so it takes no room; nor do those cancelled while they waited)
                self.scheduler.add(seq)
        except Exception as exc:  # (anything: this request fails alone, answered)
            code = "bad_request" if isinstance(exc, RequestError) else \
                "capacity" if isinstance(exc, CapacityError) else "internal"
            if code == "internal":
                log.exception("starting request %s failed", req.request)
            message = str(exc) if code != "internal" else f"the worker could not start it ({type(exc).__name__})"
            self._reply_threadsafe(identity, Op.ERROR, rid, m.ErrorReply(code, message))
            self._to_loop(self._forget, req.request)
            return
        self.jobs[req.request] = Job(identity, rid, seq)
        self.engine.steps.request_started(req.request, len(req.prompt))
        if req.request in self.cancelled:
            self.finish(self.jobs[req.request], "cancelled")

    def weigh(self, step: list[Chunk]) -> None:
        """The step's caches weighed for the KV cache budget (none without one). A cache it cannot weigh turns the
        budget off, said once, rather than failing the requests."""
        if not self.scheduler.limits.kv_bytes:
            return
        try:
            for chunk in step:
                self.meter.observe(chunk.seq)
        except Exception:
            log.exception("--kv-cache-memory: a request's KV cache could not be weighed; the budget is off")
            self.scheduler.limits = replace(self.scheduler.limits, kv_bytes=0)

    def drop_cancelled(self) -> None:
        for request in self.cancelled & self.jobs.keys():  # a set operation in C: safe against the loop thread
            self.finish(self.jobs[request], "cancelled")

    def run_step(self, step: list[Chunk]) -> None:
        cached = [chunk.seq.cached for chunk in step]  # (a step that failed before any request moved on can rerun)
        try:
            tokens = self.engine.run(step)
        except MemdDeadError as exc:
            log.error("%s", exc)
            self.fail([self.jobs[c.seq.request_id] for c in step], "unavailable", str(exc))
            self.exit_code = 3
            self.stopping.set()
            return
        except MemdError as exc:
            self.fail([self.jobs[c.seq.request_id] for c in step], "memd", str(exc))
            return
        except Exception as exc:
            log.exception("a step of %d requests failed", len(step))
            broken = device.broken(self.engine.device)  # every later step would fail too: exit, to be restarted
            rerun = not broken and len(step) > 1 and [c.seq.cached for c in step] == cached \
                and self.engine.rewind(step)
            if not rerun:
                self.fail([self.jobs[c.seq.request_id] for c in step], "internal",
                          f"generation failed in the worker ({type(exc).__name__}; its log has the details)")
            if broken:
                log.error("the worker's %s no longer computes (%s); the worker stops", self.engine.device, broken)
                self.exit_code = 4
                self.stopping.set()
            if not rerun:
                return
        else:
            self.publish_step(step, tokens)
            return
        self.rerun_alone(step)  # (out of the handler: the failed forward's frames and tensors are freed first)

    def rerun_alone(self, step: list[Chunk]) -> None:
        """A failed step (rewound) again, one request at a time: only a request that fails alone fails. The failed
        step's trace is dropped (the reruns record their own); a stop meanwhile leaves the rest to its answers."""
        log.warning("running the step's %d requests one by one: only a request that fails alone fails", len(step))
        self.engine.steps.abort()
        for chunk in step:
            if self.stopping.is_set():
                return
            self.run_step([chunk])

    def publish_step(self, step: list[Chunk], tokens: list[int | None]) -> None:
        self.weigh(step)
        frames, done = [], []
        for chunk, token in zip(step, tokens):
            job = self.jobs[chunk.seq.request_id]
            if chunk.seq.error is not None:
                self.fail([job], chunk.seq.error_code, chunk.seq.error)
            elif token is not None:
                self.generated_tokens += 1
                frames.append(self._tokens_frame(job, [token]))
                if job.seq.finish_reason is not None:
                    done.append(job)
            else:  # a prompt's chunk before its last: a reply without tokens says the request is under way
                frames.append(self._tokens_frame(job, []))
        if frames:  # the step's tokens reach the event loop in one wake-up, encoded here
            self._to_loop(self._put_frames, frames)
        for job in done:
            self.retire(job)

    def publish(self, job: Job, tokens: list[int]) -> None:
        self._to_loop(self._put_frames, [self._tokens_frame(job, tokens)])
        if job.seq.finish_reason is not None:
            self.retire(job)

    def _tokens_frame(self, job: Job, tokens: list[int]) -> tuple[bytes, bytes]:
        seq = job.seq
        reply = m.TokensReply(seq.request_id, tokens, seq.finish_reason, len(seq.req.prompt), len(seq.generated))
        return job.identity, encode(Op.GENERATE, job.rid, reply)

    def _put_frames(self, frames: list[tuple[bytes, bytes]]) -> None:
        for item in frames:
            self.outbox.put_nowait(item)

    def finish(self, job: Job, reason: str) -> None:
        job.seq.finish_reason = reason
        self.publish(job, [])

    def retire(self, job: Job) -> None:
        self.scheduler.remove(job.seq)
        self.jobs.pop(job.seq.request_id, None)
        self.engine.steps.request_ended(job.seq.request_id, len(job.seq.generated))
        self._to_loop(self._forget, job.seq.request_id)

    def _forget(self, request: str) -> None:
        self.live.pop(request, None)
        self.cancelled.discard(request)

    def fail(self, jobs: list[Job], code: str, message: str) -> None:
        """A failed forward leaves its requests' caches half-updated: each of them ends with the error."""
        for job in jobs:
            self._reply_threadsafe(job.identity, Op.ERROR, job.rid, m.ErrorReply(code, message))
            self.retire(job)
