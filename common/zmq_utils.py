"""The one place sockets are made. Each link picks its own high-water mark (RPC unbounded, traces small).

An ``ipc://`` socket file is born 0600 (0660 with ``access=Access(group)``) whatever the umask: libzmq creates it
with the process umask, so the bind runs under a strict one and the mode is set again afterwards.
"""
from __future__ import annotations

import os

import zmq

from common.access import OWNER_ONLY, Access

_IPC_PATH_MAX = 107  # sun_path is 108 bytes on Linux, including the NUL


def ipc_path(addr: str) -> str | None:
    return addr[len("ipc://"):] if addr.startswith("ipc://") else None


def make_socket(ctx: zmq.Context, kind: int, addr: str, *, bind: bool, hwm: int = 0, linger_ms: int = 0,
                identity: bytes | None = None, immediate: bool = False, max_msg_bytes: int = -1,
                access: Access = OWNER_ONLY) -> zmq.Socket:
    path = ipc_path(addr)
    if path is not None and len(path) > _IPC_PATH_MAX:
        raise ValueError(f"socket path {path!r} is {len(path)} characters, above the {_IPC_PATH_MAX} Unix sockets"
                         " allow: use a shorter --state-dir (env MOEINF_STATE_DIR)")
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, linger_ms)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.RCVHWM, hwm)
    if identity is not None:
        sock.setsockopt(zmq.IDENTITY, identity)
    if immediate:
        sock.setsockopt(zmq.IMMEDIATE, 1)  # no queueing towards a peer that is not connected: sends fail at once
    if max_msg_bytes > 0:
        sock.setsockopt(zmq.MAXMSGSIZE, max_msg_bytes)  # a larger message disconnects its peer (listeners on TCP)
    if kind == zmq.ROUTER:
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a reply to a vanished peer raises instead of vanishing
    if bind and path is not None:
        access.makedirs(os.path.dirname(path) or ".")
        if os.path.lexists(path):
            os.unlink(path)  # a stale socket file from a crashed run; the pool lock guards against a live one
        try:
            with access.umask():
                sock.bind(addr)
            access.apply(path)
        except BaseException:
            sock.close()
            raise
    elif bind:
        sock.bind(addr)
    else:
        sock.connect(addr)
    return sock


def remove_ipc_file(addr: str) -> None:
    path = ipc_path(addr)
    if path is not None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
