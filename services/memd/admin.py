"""memd's admin socket: live inspection and control for ``moeinf admin`` (docs/admin.md).

A ROUTER on ``<state-dir>/admin.sock``, created with mode 0600 (only memd's user may connect), and with
``--admin-tcp HOST:PORT`` a second ROUTER on TCP whose requests must carry ``--admin-token``. One reader task per
socket; handlers are a table keyed by op (``common/protocol.MEMD_ADMIN_OPS``). They act on the same objects the
worker link does (slot table, loads, decision core), on the event loop; file and memory work (EAMC files,
allocating and releasing pool memory) runs in threads.

Resizing never moves a slot or changes the region's size: shrinking retires the slots at and above the new
capacity (``SlotTable.shrink``), and each retired slot's memory goes back to the OS as soon as it is free;
growing allocates that memory again first (``pool_memory.PoolMemory``).
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import os
import time
from pathlib import Path

import numpy as np
import zmq

from common import admin_messages as a
from common import messages as m
from common.access import Access
from common.codec import ProtocolError, decode, request_id_of
from common.config import POLICIES
from common.protocol import MEMD_ADMIN_OPS, PROTOCOL, Handler, Op
from common.sizes import format_bytes, parse_size
from common.zmq_utils import make_socket, remove_ipc_file
from services.memd.eamc import Eamc, EamcFileError
from services.memd.eamc_share import export_eamc
from services.memd.loads import LoadError
from services.memd.leases import others_hold
from services.memd.policy import Key
from services.memd.replies import CodedError, Refusals, answer, send_error
from services.memd.slots import PoolExhausted

log = logging.getLogger("moeinf.memd.admin")
MAX_MSG_BYTES = 1 << 20
TCP_HWM = 64  # messages queued each way per TCP admin peer
RECLAIM_INTERVAL_S, RECLAIM_TRIES = 0.5, 20  # asking workers again for experts that must leave


class AdminError(CodedError):
    """An admin request memd refuses; its code goes into the ErrorReply."""


class AdminServer:
    def __init__(self, server, ctx):
        self.server, self.cfg = server, server.cfg
        self.core, self.table, self.loads, self.store = server.core, server.table, server.loads, server.store
        self.slot_bytes = self.store.slot_bytes
        self.pool = server.pool
        self.pins: set[Key] = set()  # the admin's own pins (at most capacity minus one layer)
        self.pin_loads: dict[Key, asyncio.Future] = {}  # reads a pin started, by expert (a second pin waits for them)
        self.refusals = Refusals(log)  # wrong tokens over TCP
        self.started = time.monotonic()
        self.memory = server.memory  # the retired slots' memory (the slot table tells it when one is free)
        self.resizing = asyncio.Lock()
        self.tasks: set[asyncio.Task] = set()
        self.handlers = {
            Op.ADMIN_STATS: self.on_stats, Op.ADMIN_EXPERTS: self.on_experts, Op.ADMIN_RESIZE: self.on_resize,
            Op.ADMIN_POLICY: self.on_policy, Op.ADMIN_PREFETCH: self.on_prefetch,
            Op.ADMIN_EAMC_SAVE: self.on_eamc_save, Op.ADMIN_EAMC_LOAD: self.on_eamc_load,
            Op.ADMIN_EAMC_CLEAR: self.on_eamc_clear, Op.ADMIN_EAMC_MATCH: self.on_eamc_match,
            Op.ADMIN_PIN: self.on_pin, Op.ADMIN_UNPIN: self.on_unpin, Op.ADMIN_DROP: self.on_drop,
            Op.ADMIN_HEALTH: self.on_health, Op.ADMIN_EAMC_EXPORT: lambda req: export_eamc(self.core.eamc),
        }
        assert set(self.handlers) == MEMD_ADMIN_OPS
        self.sockets = [(self._bind_unix(ctx), False)]
        if self.cfg.admin_tcp:
            self.sockets.append((self._bind_tcp(ctx), True))

    def _bind_unix(self, ctx) -> zmq.Socket:
        # owner-only whatever --group says: the admin socket resizes the pool and writes files
        return make_socket(ctx, zmq.ROUTER, self.cfg.admin_addr, bind=True, max_msg_bytes=MAX_MSG_BYTES)

    def _bind_tcp(self, ctx) -> zmq.Socket:
        try:
            sock = make_socket(ctx, zmq.ROUTER, f"tcp://{self.cfg.admin_tcp}", bind=True, max_msg_bytes=MAX_MSG_BYTES,
                               hwm=TCP_HWM)  # (a peer that sends without reading is held back, not queued for)
        except zmq.ZMQError as exc:
            raise RuntimeError(f"--admin-tcp {self.cfg.admin_tcp}: cannot listen there: {exc}") from None
        log.info("admin socket also on tcp://%s (token required)", self.cfg.admin_tcp)
        return sock

    # ------------------------------------------------------------------ loop
    async def serve(self) -> None:
        try:
            await asyncio.gather(*(self._read(sock, tcp) for sock, tcp in self.sockets))
        finally:
            for sock, _ in self.sockets:
                sock.close()
            remove_ipc_file(self.cfg.admin_addr)
            self.memory.close()

    async def _read(self, sock: zmq.Socket, tcp: bool) -> None:
        while True:
            parts = await sock.recv_multipart()
            if len(parts) != 2:
                continue
            identity, frame = parts
            try:
                op, rid, req = decode(frame, MEMD_ADMIN_OPS)
            except ProtocolError as exc:
                await send_error(sock, identity, request_id_of(frame), "bad_request", str(exc))
                continue
            if tcp and not hmac.compare_digest(req.token.encode(), self.cfg.admin_token.encode()):
                if self.refusals.refuse(identity, op.name):  # (a flood is answered a few times, logged now and then)
                    await send_error(sock, identity, rid, "unauthorized", "wrong admin token (memd --admin-token,"
                                      " env MOEINF_ADMIN_TOKEN)")
                continue
            if PROTOCOL[op].handler is Handler.ASYNC:
                task = asyncio.create_task(self._handle(sock, identity, op, rid, req))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
            else:
                await self._handle(sock, identity, op, rid, req)

    async def _handle(self, sock, identity: bytes, op: Op, rid: int, req) -> None:
        await answer(sock, identity, op, rid, lambda: self.handlers[op](req))

    # ------------------------------------------------------------------ inspection
    def on_stats(self, req: a.AdminStatsRequest) -> a.AdminStatsReply:
        t = self.table
        stats = self.server.on_stats(None, m.StatsRequest())
        leaving = sum(1 for k in t.slot_of if t.must_leave(k))
        return a.AdminStatsReply(stats, t.capacity, t.num_slots, self.slot_bytes, self.pool.resident_bytes(),
                                 len(t.loading), len(self.pins), leaving)

    def on_experts(self, req: a.AdminExpertsRequest) -> a.AdminExpertsReply:
        t = self.table
        rows = [a.LayerExperts(layer, [], [], [], [], []) for layer in range(self.store.num_layers)]
        for key in sorted(t.slot_of):
            row, expert = rows[key[0]], key[1]
            (row.loading if key in t.loading else row.resident).append(expert)
            for wanted, column in ((t.pins.get(key), row.pinned), (key in self.pins, row.admin_pinned),
                                   (t.must_leave(key), row.leaving)):
                if wanted:
                    column.append(expert)
        return a.AdminExpertsReply(t.capacity, t.num_slots, rows)

    def on_health(self, req: a.AdminHealthRequest) -> a.AdminHealthReply:
        workers = [c.pid for c in self.server.clients.values() if c.ready]
        return a.AdminHealthReply(os.getpid(), time.monotonic() - self.started, str(self.cfg.model),
                                  self.server.pool_name, workers)

    # ------------------------------------------------------------------ size
    async def on_resize(self, req: a.ResizeRequest) -> a.ResizeReply:
        self._slots_for(req.size)  # (a bad size is refused at once, without waiting for another resize)
        async with self.resizing:
            slots = self._slots_for(req.size)  # again under the lock: the floor counts the pins made meanwhile
            old = self.table.capacity
            evicted, pending = 0, []
            if slots > old:
                await self._grow(slots)
            elif slots < old:
                self._check_pins_stay(slots)
                evicted, pending = self.table.shrink(slots)
                self._cancel_prefetches(pending)
                if pending:
                    self._reclaim()
            await self.memory.settled()  # queued releases are done
        log.info("pool resized from %d to %d slots (%s): %d evicted, %d leave when released", old, slots,
                 format_bytes(slots * self.slot_bytes), evicted, len(pending))
        return a.ResizeReply(old, self.table.capacity, self.table.num_slots, self.slot_bytes, evicted, len(pending),
                             self.pool.resident_bytes())

    def _slots_for(self, size: str) -> int:
        s, L, E = self.slot_bytes, self.store.num_layers, self.store.num_experts
        try:
            budget = parse_size(size, what="size").resolve(s * L * E)
        except ValueError as exc:
            raise AdminError("bad_request", str(exc)) from None
        slots, created = budget // s, self.table.num_slots
        if slots > created:
            raise AdminError("bad_request", f"size {size} ({format_bytes(budget)}) is more than the {created} slots"
                                            f" ({format_bytes(created * s)}) memd created its pool with: it cannot"
                                            " grow past that; restart memd with a larger --expert-memory")
        minimum = E + len(self.pins)
        if slots < minimum:
            pinned = f" plus the {len(self.pins)} the admin pinned" if self.pins else ""
            raise AdminError("bad_request", f"size {size} ({format_bytes(budget)}, {slots} slots) is below the"
                                            f" minimum of {minimum} slots ({format_bytes(minimum * s)}): one layer's"
                                            f" {E} experts{pinned}")
        return slots

    def _check_pins_stay(self, slots: int) -> None:
        """A shrink to ``slots`` retires the slots from there on: an admin pin in one would stay in it for good."""
        if stuck := sorted(k for k in self.pins if self.table.slot_of.get(k, -1) >= slots):
            raise AdminError("bad_request", f"the admin's pins {_names(stuck)} sit in slots a pool of {slots} slots"
                                            " retires: unpin them, resize, then pin them again (they load into the"
                                            " smaller pool)")

    async def _grow(self, slots: int) -> None:
        try:
            await self.memory.grow(self.table.capacity, slots)
        except RuntimeError as exc:
            raise AdminError("capacity", str(exc)) from None
        self.table.grow(slots)

    def _cancel_prefetches(self, keys) -> None:
        """Loading prefetches nobody pins among ``keys`` (retired or dropped) are stopped: their slot is leaving."""
        for key in keys:
            if key in self.table.loading and not self.table.pins.get(key):
                self.loads.cancel(key)

    def _reclaim(self) -> None:
        """Ask the workers for the experts they hold (leases) until every expert that must leave has left."""
        self.server.reclaim_leases()
        if not any(not t.done() and t.get_name() == "admin-reclaim" for t in self.tasks):
            task = asyncio.create_task(self._reclaim_until_gone(), name="admin-reclaim")
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _reclaim_until_gone(self) -> None:
        for _ in range(RECLAIM_TRIES):
            await asyncio.sleep(RECLAIM_INTERVAL_S)
            if not any(self.table.must_leave(k) for k in self.table.slot_of if k not in self.pins):
                return
            self.server.reclaim_leases()

    def on_drop(self, req: a.DropRequest) -> a.DropReply:
        evicted, pending = self.table.drop(keep=self.pins)
        self._cancel_prefetches(pending)
        if pending:
            self._reclaim()
        log.info("drop: %d experts evicted, %d leave when released", evicted, len(pending))
        return a.DropReply(evicted, len(pending), len(self.table.slot_of))

    # ------------------------------------------------------------------ decisions
    def on_policy(self, req: a.PolicyRequest) -> a.PolicyReply:
        if req.name not in POLICIES:
            raise AdminError("bad_request", f"unknown policy {req.name!r}: choose one of {', '.join(POLICIES)}")
        old = self.core.policy_name
        self.core.set_policy(req.name)
        log.info("eviction policy switched from %s to %s", old, req.name)
        return a.PolicyReply(old, req.name)

    def on_prefetch(self, req: a.PrefetchRequest) -> a.PrefetchReply:
        was, cancelled = self.core.prefetching, 0
        self.core.prefetching = req.on
        if not req.on:
            for key in list(self.core.planner.inflight):
                if key in self.loads.jobs and not self.table.pins.get(key):
                    self.loads.cancel(key)
                    cancelled += 1
        log.info("prefetch %s (%d in flight cancelled)", "on" if req.on else "off", cancelled)
        return a.PrefetchReply(was, req.on, cancelled)

    # ------------------------------------------------------------------ EAMC
    async def on_eamc_save(self, req: a.EamcSaveRequest) -> a.EamcReply:
        path, snapshot = self._eamc_path(req.path), self.core.eamc.copy()
        try:
            await asyncio.get_running_loop().run_in_executor(None, snapshot.save, path, Access(self.cfg.group))
        except OSError as exc:
            raise AdminError("io", f"cannot save the EAMC to {path}: {exc.strerror or exc}") from None
        log.info("EAMC: %d activation patterns saved to %s (admin)", snapshot.size, path)
        return a.EamcReply(snapshot.size, snapshot.capacity, str(path))

    async def on_eamc_load(self, req: a.EamcLoadRequest) -> a.EamcReply:
        path, eamc = self._eamc_path(req.path), self.core.eamc
        fresh = Eamc(eamc.num_layers, eamc.num_experts, eamc.capacity, eamc.model)
        try:
            await asyncio.get_running_loop().run_in_executor(None, fresh.load, path)
        except EamcFileError as exc:
            raise AdminError("bad_request", str(exc)) from None
        eamc.assign(fresh)
        log.info("EAMC: %d activation patterns loaded from %s (admin)", len(eamc), path)
        return a.EamcReply(len(eamc), eamc.capacity, str(path))

    def on_eamc_clear(self, req: a.EamcClearRequest) -> a.EamcReply:
        self.core.eamc.clear()
        log.info("EAMC cleared (admin)")
        return a.EamcReply(0, self.core.eamc.capacity, "")

    def on_eamc_match(self, req: a.EamcMatchRequest) -> a.EamcMatchReply:
        query = np.zeros((1, self.store.num_layers, self.store.num_experts), np.float32)
        for layer, expert in self._keys(req.experts):
            query[0, layer, expert] = 1.0
        predicted, similarity = self.core.eamc.predict(query, self.core.knobs.eamc_top, count=False)
        return a.EamcMatchReply(float(similarity[0]), predicted[0].tolist())

    # ------------------------------------------------------------------ pins
    async def on_pin(self, req: a.PinRequest) -> a.PinReply:
        keys = self._keys(req.experts)
        new = [k for k in keys if k not in self.pins]
        if leaving := [k for k in new if self.table.slot_of.get(k, -1) >= self.table.capacity]:
            raise AdminError("capacity", f"{_names(leaving)} still sit in slots a shrink retired (a worker reads them):"
                                     " pin them once they have left (`moeinf admin experts` shows them leaving)")
        limit = self.table.capacity - self.store.num_experts
        if len(self.pins) + len(new) > limit:
            raise AdminError("capacity", f"the admin may pin at most {limit} experts (the pool's {self.table.capacity}"
                                         f" slots minus one layer's {self.store.num_experts} for the workers);"
                                         f" {len(self.pins)} are pinned already")
        for key in new:
            self.pins.add(key)
            self.table.pin(key)
        wait = lambda: others_hold(self.server.clients.values(), None, self.server.reclaim_leases)  # noqa: E731
        loads = {k: asyncio.ensure_future(self.loads.load_without_free_slot(k, False, wait)) for k in new
                 if not self.table.is_resident(k)}
        for key, load in loads.items():  # a pin of the same expert meanwhile waits for this read (not a slot yet)
            self.pin_loads[key] = load
            load.add_done_callback(lambda _, key=key: self.pin_loads.pop(key, None))
        try:
            await asyncio.gather(*(self.pin_loads[k] for k in keys if k in self.pin_loads))  # (keys: distinct)
        except (PoolExhausted, LoadError) as exc:  # (an earlier pin's read failed too: that pin undoes its own)
            for key in new:
                self._unpin(key)
            raise AdminError("capacity" if isinstance(exc, PoolExhausted) else "io", str(exc)) from None
        log.info("admin pinned %s", _names(new))
        return a.PinReply([self.table.slot_of[k] for k in keys], len(loads), len(self.pins))

    def on_unpin(self, req: a.UnpinRequest) -> a.UnpinReply:
        keys = self._keys(req.experts)
        missing = [k for k in keys if k not in self.pins]
        if missing:
            raise AdminError("bad_request", f"not pinned by the admin: {_names(missing)} (`moeinf admin experts` lists"
                                            " the admin's pins; a worker's pins are its own)")
        for key in keys:
            self._unpin(key)
        return a.UnpinReply(len(keys), len(self.pins))

    def _unpin(self, key: Key) -> None:
        if key in self.pins:
            self.pins.discard(key)
            self.table.unpin(key)

    def _eamc_path(self, path: str) -> Path:
        return eamc_path(path, self.cfg.eamc_dir or self.cfg.state_dir)

    def _keys(self, experts: list[a.ExpertKey]) -> list[Key]:
        L, E = self.store.num_layers, self.store.num_experts
        bad = [(k.layer, k.expert) for k in experts if not (0 <= k.layer < L and 0 <= k.expert < E)]
        if bad:
            raise AdminError("bad_request", f"{_names(bad)} out of range: MoE layers 0..{L - 1}, experts 0..{E - 1}")
        return list(dict.fromkeys((k.layer, k.expert) for k in experts))


STATE_FILES = {"memd.lock", "expert-index.msgpack"}  # memd's own files beside the EAMC (and *.sock, *.lock, ...)


def eamc_path(path: str, allowed: Path) -> Path:
    """``path`` resolved (links and ``..`` followed), if it lies in the directory ``allowed``; AdminError if not:
    the admin socket (and ``--admin-tcp``) must not read or write anywhere memd can."""
    if not os.path.isabs(path):
        raise AdminError("bad_request", f"{path!r}: give an absolute path (moeinf admin resolves relative ones)")
    root = Path(os.path.realpath(allowed))
    real = Path(os.path.realpath(path))
    if real == root or root not in real.parents:
        raise AdminError("forbidden", f"{path}: EAMC files are saved and loaded only inside {root} (memd's"
                                      " --eamc-dir, by default its --state-dir)")
    if real.parent != root or real.name in STATE_FILES or real.suffix in (".sock", ".lock", ".msgpack") \
            or (real.exists() and not real.is_file()):
        raise AdminError("forbidden", f"{path}: an EAMC file is a regular file directly in {root}: not memd's own"
                                      f" ({', '.join(sorted(STATE_FILES))}, sockets, locks), nor in a subdirectory"
                                      " (slot images, kernels)")
    return real


def _names(keys) -> str:
    return " ".join(f"{layer}:{expert}" for layer, expert in keys)

