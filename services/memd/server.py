"""memd's RPC and trace sockets: receive -> decide -> act -> reply.

One reader task per socket. Inline handlers run on the event loop; an acquire is a task of its own, awaiting only
its reads (reader threads). Decisions (load, prefetch, evict, cancel; what the traces teach) are ``core.py``'s;
this module moves messages, starts reads (``loads.py``) and saves the EAMC now and then.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from pathlib import Path

import zmq
import zmq.asyncio

from common import messages as m
from common.access import Access
from common.codec import ProtocolError, VersionMismatch, decode, encode, request_id_of
from common.config import PROTOCOL_VERSION, MemdConfig
from common.expert_index import ExpertIndex
from common.procs import pid_alive
from common.protocol import MEMD_RPC_OPS, MEMD_TRACE_OPS, PROTOCOL, Handler, Op
from common.zmq_utils import make_socket, remove_ipc_file
from services.memd.acquire_checks import check_acquire, check_hello, checkpoint_stamp, merge_slots
from services.memd.core import ExpertCache
from services.memd.eamc import FILE_NAME as EAMC_FILE
from services.memd.host_compute import HostCompute, NoHostCompute
from services.memd.leases import ConnectedWorker, ControlPage, ahead_limit, others_hold, room, room_error, shortfall
from services.memd.loads import LoadError, Loads
from services.memd.policy import Key
from services.memd.pool_memory import PoolMemory
from services.memd.pools import refusal
from services.memd.prefetching import Prefetcher
from services.memd.preload import preload
from services.memd.prometheus import start_metrics
from services.memd.reader import ExpertReader
from services.memd.replies import CodedError, answer, send, send_error
from services.memd.slots import PoolExhausted
from services.memd.staged import Pending, StagedAcquires
from services.memd.traces import Traces
from services.memd.stats import stats_fields
from services.memd.slot_images import image_fields
from services.memd.tiers import tier_fields

log = logging.getLogger("moeinf.memd")
TRACE_HWM, EAMC_SAVE_INTERVAL_S = 1024, 30.0
NOTE_TURNS = 4  # event-loop turns an acquire yields for its own layer note to be read first


class RpcError(CodedError):
    """A worker's request memd refuses; its code goes into the ErrorReply."""


class MemdServer:
    def __init__(self, cfg: MemdConfig, store: ExpertIndex, core: ExpertCache, reader: ExpertReader,
                 memory: PoolMemory, control: ControlPage | None = None, host: HostCompute | None = None):
        self.cfg, self.store, self.core, self.reader = cfg, store, core, reader
        self.stamp = checkpoint_stamp(cfg.model)  # (a worker's HELLO finds the checkpoint as memd found it)
        self.host = host or NoHostCompute()  # --cpu-experts: host-tier experts the workers compute on their CPU
        self.control = control  # the revoke epoch workers read; None: no leases (every acquire is a message)
        self.table, self.loads = core.table, Loads(core, reader)
        self.prefetcher = Prefetcher(core, self.loads, lambda: self.reader.expert_rate, self._rpc_waiting)
        self.rpc, self._rpc_recv = None, None  # the RPC socket, and its reader's receive in progress
        self.memory, self.pool = memory, memory.pool  # the pool, and its retired slots' memory (admin resize)
        self.pool_name = self.pool.export().name or self.pool.backend
        self.eamc_path = Path(cfg.state_dir) / EAMC_FILE
        self.clients: dict[bytes, ConnectedWorker] = {}
        self.staged = StagedAcquires(self)  # acquires answered in two parts (AcquireRequest.partial)
        self.traces = Traces(self)  # the trace socket: request starts and ends, step traces, layer notes
        self.handlers = {
            Op.HELLO: self.on_hello, Op.READY: self.on_ready, Op.ACQUIRE: self.on_acquire,
            Op.RELEASE: self.on_release, Op.STATS: self.on_stats, Op.RETURN_LEASES: self.on_return_leases,
            Op.AWAIT: self.staged.on_await, **self.traces.handlers,
        }
        assert set(self.handlers) == MEMD_RPC_OPS | MEMD_TRACE_OPS
        self._stop = asyncio.Event()

    # ------------------------------------------------------------------ loop
    async def serve(self) -> None:
        from services.memd.admin import AdminServer

        metrics = start_metrics(self.cfg, lambda: self.on_stats(b"", m.StatsRequest()))  # --metrics-port, or None
        ctx = zmq.asyncio.Context()
        self.admin = AdminServer(self, ctx)  # <state-dir>/admin.sock (0600), and --admin-tcp: `moeinf admin`
        access = Access(self.cfg.group)  # 0600, or 0660 and --group: who may attach a worker or send traces
        self.rpc = make_socket(ctx, zmq.ROUTER, self.cfg.rpc_addr, bind=True, access=access)
        self.trace = make_socket(ctx, zmq.PULL, self.cfg.trace_addr, bind=True, hwm=TRACE_HWM, access=access)
        tasks = [asyncio.create_task(self._read_rpc()), asyncio.create_task(self.traces.read(self.trace)),
                 asyncio.create_task(self._watch_clients()), asyncio.create_task(self._save_eamc_now_and_then()),
                 asyncio.create_task(self.admin.serve()), asyncio.create_task(preload(self.core, self.loads, self.cfg))]
        log.info("memd ready: %d slots of %d bytes for %d MoE layers x %d experts on %s; policy %s, prefetch %s",
                 self.table.num_slots, self.store.slot_bytes, self.store.num_layers, self.store.num_experts,
                 self.cfg.rpc_addr, self.core.policy_name, "on" if self.core.prefetching else "off")
        try:
            await self._stop.wait()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if metrics is not None:
                await asyncio.to_thread(metrics.close)  # its scrape in flight needs this loop to finish
            self.rpc.close()
            self.trace.close()
            ctx.term()
            for addr in (self.cfg.rpc_addr, self.cfg.trace_addr):
                remove_ipc_file(addr)
            self.save_eamc()

    def save_eamc(self) -> None:
        """Save the EAMC now if it changed (at the end: the loop has stopped)."""
        if self.core.eamc.dirty:
            self._save(self.core.eamc)

    def _save(self, eamc) -> bool:
        try:
            eamc.save(self.eamc_path, Access(self.cfg.group))
        except OSError as exc:
            log.warning("could not save the EAMC to %s: %s", self.eamc_path, exc)
            return False
        log.info("EAMC: %d activation patterns saved to %s", len(eamc), self.eamc_path)
        return True

    async def _save_eamc_now_and_then(self) -> None:
        """Every ``EAMC_SAVE_INTERVAL_S``, a changed EAMC's snapshot saved on a thread (its bytes, hash and fsyncs
        would hold every acquire on the loop); a save in progress when memd stops is waited for (then the last)."""
        while True:
            await asyncio.sleep(EAMC_SAVE_INTERVAL_S)
            eamc = self.core.eamc
            if not eamc.dirty:
                continue
            snapshot, eamc.dirty = eamc.copy(), False
            saving = asyncio.ensure_future(asyncio.to_thread(self._save, snapshot))
            try:
                await asyncio.shield(saving)
            finally:
                if not await saving:
                    eamc.dirty = True  # (not saved: the next round, or the final save, tries again)

    def stop(self) -> None:
        self._stop.set()

    async def _read_rpc(self) -> None:
        while True:
            identity, frame = await self._recv_pair()
            if identity is None:
                continue
            try:
                op, rid, req = decode(frame, MEMD_RPC_OPS)
            except ProtocolError as exc:
                log.warning("rejected frame: %s", exc)
                code = "protocol" if isinstance(exc, VersionMismatch) else "bad_request"
                await send_error(self.rpc, identity, request_id_of(frame), code, str(exc))
                continue
            try:
                if op is Op.ACQUIRE:
                    await self._acquire(identity, rid, req)
                elif PROTOCOL[op].handler is Handler.ASYNC:
                    asyncio.create_task(self._handle(identity, op, rid, req))
                else:
                    await self._handle(identity, op, rid, req)
            except Exception as exc:  # a failure outside a handler's own guard fails that call, never this reader
                log.exception("%s failed", op.name)  # (without the reader memd would stay up and answer nothing)
                await send_error(self.rpc, identity, rid, "internal", f"{op.name} failed in memd: {exc}")

    async def _recv_pair(self):
        self._rpc_recv = self.rpc.recv_multipart()
        parts = await self._rpc_recv
        self._rpc_recv = None
        if len(parts) != 2:
            log.warning("dropped a message of %d frames (expected identity + 1)", len(parts))
            return None, None
        return parts

    def _rpc_waiting(self) -> bool:
        """An RPC frame is received and its reader has not run yet: the prefetch planner lets it go first. (Not
        ZMQ_EVENTS: reading it consumes the edge the socket's file descriptor signals, and the reader would then
        never wake for a frame already queued.)"""
        return self._rpc_recv is not None and self._rpc_recv.done()

    async def _handle(self, identity: bytes, op: Op, rid: int, req) -> None:
        await answer(self.rpc, identity, op, rid, lambda: self.handlers[op](identity, req))

    async def _watch_clients(self) -> None:
        """Release the pins of workers that died without releasing (their pid is gone)."""
        while True:
            await asyncio.sleep(1.0)
            for identity, client in list(self.clients.items()):
                if not pid_alive(client.pid):
                    log.warning("worker pid %d is gone; releasing the %d experts it held", client.pid, client.held)
                    self._drop_client(identity)

    def _drop_client(self, identity: bytes) -> None:
        client = self.clients.pop(identity, None)
        self.core.ahead_limit = ahead_limit(self.clients.values(), self.store.num_layers)
        if client:
            self.core.forget_worker(client.pid)
            if dropped := self.core.eams.forget_worker(client.pid):
                log.info("worker %d left with %d requests unfinished: their activation matrices are dropped (not"
                         " added to the EAMC)", client.pid, dropped)
            self.prefetcher.forget(client.pid)
            self.host.forget(client.pid)
            client.release_all(self.table)
            self.pool.close_events(client.read_events)
            self.staged.forget_worker(identity)

    def _client(self, identity: bytes) -> ConnectedWorker:
        client = self.clients.get(identity)
        if client is None or not client.ready:
            raise RpcError("handshake", "send HELLO and READY before other requests")
        return client

    # ------------------------------------------------------------------ handlers
    def on_hello(self, identity: bytes, req: m.HelloRequest) -> m.HelloReply:
        check_hello(req, self.cfg.model, self.stamp)
        if identity not in self.clients and len(self.clients) >= self.cfg.max_clients:
            raise RpcError("capacity", f"{len(self.clients)} workers attached; raise --max-clients")
        if refused := refusal(pool := self.pool.export(), req.device):
            raise RpcError(*refused)
        self._drop_client(identity)  # a restarted worker re-using its identity starts clean
        self.clients[identity] = ConnectedWorker(req.pid, read_events=self.pool.open_events(req.read_events))
        return m.HelloReply(PROTOCOL_VERSION, os.getpid(), pool.backend, pool.name, pool.nbytes,
                            self.store.slot_bytes, self.table.num_slots, self.store.num_layers,
                            self.store.num_experts, self.store.tensors,
                            self.control.name if self.control else "", pool.device, pool.chunk_bytes, pool.handles,
                            pool.event_handles, self.host.name, self.host.slots)

    def on_ready(self, identity: bytes, req: m.ReadyRequest) -> m.ReadyReply:
        client = self.clients.get(identity)
        if client is None:
            raise RpcError("handshake", "READY before HELLO")
        client.ready, client.speculate_max = True, req.speculate_max
        self.core.ahead_limit = ahead_limit(self.clients.values(), self.store.num_layers)
        self.host.worker_ready(client.pid, req.cpu_expert_seconds)
        log.info("worker pid %d attached", client.pid)
        if why := room_error([c for i, c in self.clients.items() if i != identity], self.table, self.store):
            log.warning("%s", why)
        return m.ReadyReply()

    async def _acquire(self, identity: bytes, rid: int, req: m.AcquireRequest) -> None:
        """The hot path: an acquire whose experts are all resident is answered inline (no task); one that must
        wait for loads continues in its own task, so other acquires are served meanwhile."""
        await self._after_own_note(identity, req)
        try:
            pending = self.begin_acquire(identity, req)
        except CodedError as exc:
            await send_error(self.rpc, identity, rid, exc.code, str(exc))
            return
        except Exception as exc:
            log.exception("ACQUIRE failed")
            await send_error(self.rpc, identity, rid, "internal", f"ACQUIRE failed in memd: {exc}")
            return
        if pending.loading:  # no prefetch is planned until this one is answered: demand first
            self.prefetcher.hold()
            if req.partial and not pending.host:  # answered once some experts are resident (staged.py)
                task = self.staged.start(identity, rid, pending)
            else:
                task = asyncio.create_task(self._handle(identity, Op.ACQUIRE, rid, pending))
            task.add_done_callback(lambda _: self.prefetcher.let_go())
        else:
            await send(self.rpc, identity, encode(Op.ACQUIRE, rid, self._acquired(pending)))
        client = self.clients.get(identity)
        if pending.fed and client is not None:  # it carried its layer's routing (no note): plan after the reply
            self.prefetcher.wake(client.pid)

    async def _after_own_note(self, identity: bytes, req: m.AcquireRequest) -> None:
        """Let the trace reader first handle a note already here (sent before this acquire, on the other socket), so
        that policy and predictor decide at its layer; not for an acquire carrying its routing, nor without notes."""
        client = self.clients.get(identity)
        if client is None or req.requests or not self.takes_notes:
            return
        for _ in range(NOTE_TURNS):
            if self.core.predictor.duplicate(client.pid, req.step, req.layer):
                return
            await asyncio.sleep(0)

    def begin_acquire(self, identity: bytes, req: m.AcquireRequest):
        """Pin (or lease), plan loads; returns the pending acquire: request, keys, loads to wait for, hits, revoked."""
        client = self._client(identity)
        client.acquiring = req
        try:
            keys = check_acquire(req, self.store.num_layers, self.store.num_experts, self.table.capacity)
        except CodedError:
            self._release_held(client, req, [])
            raise
        if host := self.host.choose(client.pid, req, self.table.slot_of.__contains__):
            keys = [k for j, k in enumerate(keys) if j not in host]  # the rest: from the device pool
        revoked = self._pin_or_lease(client, req, keys)
        with self._released_on_failure(client, req, keys):
            plan = self.core.acquire(client.pid, req, time.perf_counter(), [e for _, e in keys] if host else None)
            loading = {key: self.loads.start(key, slot, demand=True) for key, slot in plan.loads}
            loading.update((key, self.loads.promote(key)) for key in plan.already_loading)
            wait = lambda: self._wait_for_slots(client, req, keys, revoked)  # noqa: E731 (no slot)
            loading.update((key, asyncio.create_task(self.loads.load_without_free_slot(key, plan.transient, wait)))
                           for key in plan.no_slot)
        epoch = self.control.epoch if self.control is not None else 0  # what the revocations above answered
        return Pending(req, keys, loading, plan.hits, revoked, epoch, plan.fed, host)

    def _wait_for_slots(self, client: ConnectedWorker, req, wanted: list[Key], revoked: list[Key]) -> bool:
        """No slot for a load: wait? This worker's other leases go back (into ``revoked``), the others are asked."""
        mine = req.lease and client.acquiring is req  # (a failed acquire's leftover waits: its leases are gone)
        revoked.extend(freed := client.give_back_unwanted(self.table, wanted) if mine else [])
        return others_hold(self.clients.values(), client, lambda: self.reclaim_leases(but=client)) or bool(freed)

    def _pin_or_lease(self, client: ConnectedWorker, req: m.AcquireRequest, keys: list[Key]) -> list[Key]:
        """Pin ``keys``, or lease them, revoking as many of the worker's other leases as this layer lacks slots
        for, in the policy's victim order (asking the other workers for theirs when short). Returns the revoked."""
        if not req.lease:
            client.pin(self.table, keys)
            return []
        reserve, spare = self.core.prefetch_reserve(), self.core.unused
        short = shortfall(self.table, keys, reserve, spare)
        # the layer itself lacks slots (not just the prefetch reserve, which this worker's own leases refill)
        if short > reserve and any(c.leases for c in self.clients.values() if c is not client):
            self.reclaim_leases(but=client)
        return client.lease(self.table, keys, shortfall=short, room=room(self.table, keys, reserve), spare=spare)

    def _release_held(self, client: ConnectedWorker, req: m.AcquireRequest, keys) -> None:
        """A failed acquire: its pins go; a failed lease acquire ends all that worker's leases (it forgets them)."""
        self.host.failed(client.pid, req)  # (and what its CPU was to compute)
        client.acquiring = None
        if req.lease:
            client.return_leases(self.table)
        else:
            client.unpin(self.table, keys)

    @contextlib.contextmanager
    def _released_on_failure(self, client: ConnectedWorker, req: m.AcquireRequest, keys):
        """A failure inside lets go of what the acquire holds; a full pool or a failed read: ``capacity``, ``io``."""
        try:
            yield
        except BaseException as exc:
            self._release_held(client, req, keys)
            if isinstance(exc, PoolExhausted):  # every slot pinned or loading
                raise RpcError("capacity", str(exc)) from None
            if isinstance(exc, LoadError):
                raise RpcError("io", str(exc)) from None
            raise

    async def on_acquire(self, identity: bytes, pending, stall: bool = True) -> m.AcquireReply:
        """Wait for the loads an acquire needs (``pending`` comes from ``begin_acquire``); ``stall``: count the
        wait as the worker's (a partial answer counts its own: staged.py)."""
        req, start = pending.req, time.perf_counter()
        client = self._client(identity)
        with self._released_on_failure(client, req, pending.keys):
            await asyncio.gather(*pending.waits)
            client.acquiring = None
            if stall:
                self.core.stall(client.pid, req.layer, time.perf_counter() - start)
        if self.clients.get(identity) is not client:  # it died meanwhile: what it held went with it
            raise RpcError("handshake", "this worker was detached while its acquire waited")
        return self._acquired(pending)

    def _acquired(self, p: Pending, loading: list[int] = ()) -> m.AcquireReply:
        """The reply to ``p``; ``loading``: positions still loading (a partial answer: their slots are 0 here)."""
        ahead, threshold = self.core.speculation(self.reader.expert_rate)
        slots = [0 if j in loading else self.table.slot_of[k] for j, k in enumerate(p.keys)]
        replied = merge_slots(len(p.req.experts), slots, p.host) if p.host else slots
        ready = [s for j, s in enumerate(slots) if j not in loading]
        return m.AcquireReply(replied, p.hits, [list(k) for k in p.revoked], p.epoch, ahead, threshold,
                              self.core.wants_guesses(), self.reader.pending_events(ready), sorted(p.host),
                              list(loading), self.takes_notes)

    @property
    def takes_notes(self) -> bool:  # (a host tier's slots wait for the worker's next message about a later layer)
        return not self.core.holds_every_expert() or bool(self.host.slots)

    def on_release(self, identity: bytes, req: m.ReleaseRequest) -> None:
        client = self._client(identity)
        self.host.released(client.pid, req.layer)
        client.release(self.table, [(req.layer, e) for e in req.experts], req.read_done,
                       getattr(self.reader, "fences", None))

    def on_return_leases(self, identity: bytes, req: m.ReturnLeasesRequest) -> None:
        client = self._client(identity)
        self.host.forget(client.pid, keep_cost=True)
        client.return_leases(self.table)

    def reclaim_leases(self, but: ConnectedWorker | None = None) -> None:
        """Ask every worker (``but`` the one acquiring: it gives back only its shortfall) to hand back its leases at
        its next acquire, which the bumped epoch on the control page makes it send (an idle worker holds none)."""
        for client in self.clients.values():
            if client is not but:
                client.reclaim = bool(client.leases)
        if self.control is not None:
            self.control.bump()

    def on_stats(self, identity: bytes, req: m.StatsRequest) -> m.StatsReply:
        c, t = self.table.counters, self.table
        live_bytes = t.capacity * self.store.slot_bytes  # after an admin resize: the live size, not the region's
        return m.StatsReply(os.getpid(), live_bytes, t.capacity, t.live_resident(), t.num_pinned,
                            c.hits, c.misses, c.evictions, c.bytes_read, c.read_seconds, c.stall_seconds,
                            self.reader.direct_io, t.resident_per_layer(self.store.num_layers),
                            read_bandwidth=self.reader.bandwidth or 0.0, reader_busy_seconds=self.loads.busy_seconds(),
                            acquires_partial=self.staged.answered_early,
                            **stats_fields(self.core), **tier_fields(self.reader, self.host),
                            **image_fields(self.store, self.reader))
