"""An EAMC that travels: a replica starting cold takes in a peer's collection, so a fleet warms up once.

``moeinf memd --eamc-from SOURCE`` at start, after memd's own ``eamc.bin`` is loaded:

* ``tcp://HOST:PORT``: a peer memd's ``--admin-tcp`` socket, asked with ``ADMIN_EAMC_EXPORT`` and this memd's
  ``--admin-token`` (a fleet shares one). The reply's msgpack frame says how many bytes follow; the collection
  itself rides in one raw frame, in the file format (bulk data never rides in msgpack);
* a file path: an ``eamc.bin`` a peer saved (``moeinf admin eamc save``), copied here by hand or by an init step.
  It is the operator's flag, read once at start; the admin socket's ``eamc load`` stays confined to
  ``--eamc-dir``.

The peer's members are merged into ours, bounded by ``--eamc-capacity`` (``Eamc.merge``: ours stay, near-duplicates
are averaged, the peer's most matched fill the free capacity; at most ``--eamc-capacity`` of the peer's most matched
members are considered). A peer that cannot be reached or sends a bad
collection is logged and memd starts with what it has: a replica must not fail to start for want of a warm cache.
"""
from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import zmq

from common import admin_messages as a
from common import messages as m
from common.codec import ProtocolError, decode, encode
from common.protocol import Op
from common.zmq_utils import make_socket
from services.memd.eamc import Eamc, EamcFileError

log = logging.getLogger("moeinf.memd.eamc")
PULL_TIMEOUT_S = 30.0  # a peer's answer, collection included
MAX_PULL_BYTES = 1 << 30  # a larger reply disconnects the peer (ZMQ_MAXMSGSIZE)


async def export_eamc(eamc: Eamc) -> tuple[a.EamcExportReply, bytes]:
    """The admin's ``ADMIN_EAMC_EXPORT``: a snapshot, serialised off the event loop."""
    snapshot = eamc.copy()
    raw = await asyncio.get_running_loop().run_in_executor(None, snapshot.to_bytes)
    return a.EamcExportReply(snapshot.size, snapshot.capacity, len(raw)), raw


def fetch(addr: str, token: str, timeout_s: float = PULL_TIMEOUT_S) -> bytes:
    """A peer's EAMC bytes from its TCP admin socket; RuntimeError says why not."""
    ctx = zmq.Context()
    sock = make_socket(ctx, zmq.DEALER, addr, bind=False, max_msg_bytes=MAX_PULL_BYTES)
    try:
        sock.send(encode(Op.ADMIN_EAMC_EXPORT, 1, a.EamcExportRequest(token)))
        if not sock.poll(int(timeout_s * 1000)):
            raise RuntimeError(f"no answer within {timeout_s:g}s (is its --admin-tcp there?)")
        parts = sock.recv_multipart()
    finally:
        sock.close()
        ctx.term()
    try:
        _, _, reply = decode(parts[0], reply=True)
    except ProtocolError as exc:
        raise RuntimeError(f"a malformed reply: {exc}") from None
    if isinstance(reply, m.ErrorReply):
        raise RuntimeError(f"refused: {reply.message}")
    if not isinstance(reply, a.EamcExportReply):  # (another op's reply: not a moeinf memd's admin socket?)
        raise RuntimeError(f"answered with a {type(reply).__name__}, not an EAMC export")
    if len(parts) != 2 or len(parts[1]) != reply.nbytes:
        raise RuntimeError(f"expected {reply.nbytes} bytes of EAMC after the reply, got {len(parts) - 1} frames")
    return parts[1]


def pull(eamc: Eamc, source: str, token: str) -> tuple[int, int] | None:
    """Merge the EAMC at ``source`` (``tcp://HOST:PORT`` or a file) into ``eamc``; (merged, added), or None when
    it could not be had (logged)."""
    peer = Eamc(eamc.num_layers, eamc.num_experts, eamc.capacity, eamc.model)
    try:
        raw = fetch(source, token) if source.startswith("tcp://") else Path(source).read_bytes()
        peer.from_bytes(raw, source)
    except (RuntimeError, OSError, EamcFileError) as exc:
        log.warning("--eamc-from %s: not used, starting with the %d patterns memd has: %s", source, len(eamc),
                    getattr(exc, "strerror", None) or exc)
        return None
    merged, added = eamc.merge(peer)
    log.info("EAMC: %d patterns from %s: %d added, %d merged into near-duplicates, %d left out (--eamc-capacity"
             " %d); %d in all", len(peer), source, added, merged, len(peer) - added - merged, eamc.capacity, len(eamc))
    return merged, added
