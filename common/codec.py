"""Framing and typed decoding.

A frame is ``[op: 1 byte][request id: u64 little-endian][msgpack array of the message's fields]``.
Decoding checks the op against the link's allowed set and every field against the dataclass's annotations,
and raises ``ProtocolError`` (with what was wrong) for anything else: peers reply with an error, never crash.
"""
from __future__ import annotations

import dataclasses
import struct
import types
import typing

import msgpack

from common import messages
from common.protocol import PROTOCOL, Op

_HEADER = struct.Struct("<BQ")
HEADER_BYTES = _HEADER.size


class ProtocolError(ValueError):
    """A frame that cannot be decoded into a known message."""


def encode(op: Op, request_id: int, msg) -> bytes:
    body = msgpack.packb([getattr(msg, f.name) for f in dataclasses.fields(msg)], default=_to_wire)
    return _HEADER.pack(int(op), request_id) + body


def _to_wire(obj):
    if dataclasses.is_dataclass(obj):
        return [getattr(obj, f.name) for f in dataclasses.fields(obj)]
    raise TypeError(f"cannot encode {type(obj).__name__}: add it to common/messages.py (or admin_messages.py)")


def peek(frame: bytes) -> tuple[int, int]:
    """Return ``(op byte, request id)`` without decoding the body."""
    if len(frame) < HEADER_BYTES:
        raise ProtocolError(f"frame of {len(frame)} bytes is shorter than the {HEADER_BYTES}-byte header")
    return _HEADER.unpack_from(frame)


def decode(frame: bytes, allowed: frozenset[Op] | None = None, *, reply: bool = False):
    """Decode a frame into ``(op, request_id, message)``.

    ``reply=True`` decodes the op's reply type (or ``ErrorReply`` for ``Op.ERROR``) instead of its request type.
    """
    op_byte, request_id = peek(frame)
    try:
        op = Op(op_byte)
    except ValueError:
        raise ProtocolError(f"unknown op {op_byte}") from None
    if op is Op.ERROR and reply:
        cls = messages.ErrorReply
    else:
        if allowed is not None and op not in allowed:
            raise ProtocolError(f"op {op.name} is not served on this socket")
        rpc = PROTOCOL.get(op)
        if rpc is None:  # ERROR only ever answers; a server has no handler for it
            raise ProtocolError(f"op {op.name} is a reply, not a request")
        cls = rpc.reply if reply else rpc.request
        if cls is None:
            raise ProtocolError(f"op {op.name} has no reply")
    try:
        body = msgpack.unpackb(frame[HEADER_BYTES:], raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several types for garbage
        raise ProtocolError(f"{op.name}: body is not msgpack ({exc})") from None
    return op, request_id, build(cls, body)


def build(cls, value):
    """Turn a decoded msgpack array into ``cls``, validating every field."""
    fields = dataclasses.fields(cls)
    if not isinstance(value, list):
        raise ProtocolError(f"{cls.__name__}: expected an array of {len(fields)} fields, got {type(value).__name__}")
    required = sum(1 for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
    if not required <= len(value) <= len(fields):
        raise ProtocolError(f"{cls.__name__}: expected {required}..{len(fields)} fields, got {len(value)}")
    hints = _hints(cls)
    kwargs = {f.name: _check(hints[f.name], v, f"{cls.__name__}.{f.name}") for f, v in zip(fields, value)}
    return cls(**kwargs)


_HINTS: dict[type, dict] = {}


def _hints(cls) -> dict:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)  # each class's own module: messages.py or admin_messages.py
    return _HINTS[cls]


def _check(tp, value, where: str):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        return _check(next(a for a in args if a is not type(None)), value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ProtocolError(f"{where}: expected a list, got {type(value).__name__}")
        (item,) = typing.get_args(tp)
        return [_check(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return build(tp, value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, bool) or not isinstance(value, tp):
        raise ProtocolError(f"{where}: expected {tp.__name__}, got {type(value).__name__}")
    return value
