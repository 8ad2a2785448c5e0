"""Framing and typed decoding.

A frame is ``[op: 1 byte][request id: u64 little-endian][msgpack array of the message's fields]``.
Decoding checks the op against the link's allowed set, then ``msgspec`` decodes and validates the body in one pass
against the message's ``Struct`` (types, bounds, field count; one cached decoder per type). Anything else raises
``ProtocolError`` naming the message and the field (``AcquireRequest.tokens[1][0]: Expected `int`, got `str```):
peers reply with an error, never crash.
"""
from __future__ import annotations

import re
import struct
import types
import typing
from functools import lru_cache

import msgspec

from common import messages
from common.protocol import PROTOCOL, PROTOCOL_VERSION, Op

_HEADER = struct.Struct("<BQ")
HEADER_BYTES = _HEADER.size
_ENCODER = msgspec.msgpack.Encoder()  # stateless between calls: one for every type
_PATH = re.compile(r" - at `\$((?:\[\d+\])*)`$")


class ProtocolError(ValueError):
    """A frame that cannot be decoded into a known message (or a message that cannot be encoded)."""


class VersionMismatch(ProtocolError):
    """A handshake from a peer of another protocol version (answered with the ``protocol`` error code)."""


def encode(op: Op, request_id: int, msg) -> bytes:
    if not isinstance(msg, messages.Message):
        raise TypeError(f"cannot encode {type(msg).__name__}: add it to common/messages.py (or admin_messages.py)"
                        " as a Message")
    try:
        return _HEADER.pack(int(op), request_id) + _ENCODER.encode(msg)
    except (OverflowError, msgspec.EncodeError) as exc:  # an int beyond msgpack's 64 bits, an unknown object
        raise ProtocolError(f"{type(msg).__name__}: cannot encode ({exc})") from None


def peek(frame: bytes) -> tuple[int, int]:
    """Return ``(op byte, request id)`` without decoding the body."""
    if len(frame) < HEADER_BYTES:
        raise ProtocolError(f"frame of {len(frame)} bytes is shorter than the {HEADER_BYTES}-byte header")
    return _HEADER.unpack_from(frame)


def request_id_of(frame: bytes) -> int:
    """The request id of ``frame`` to answer a frame that failed to decode with (0 when it has no header)."""
    try:
        return peek(frame)[1]
    except ProtocolError:
        return 0


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
        msg = _decoder(cls).decode(memoryview(frame)[HEADER_BYTES:])
    except msgspec.ValidationError as exc:
        if other := _other_version(cls, frame):
            raise VersionMismatch(other) from None
        raise ProtocolError(_explain(cls, str(exc))) from None
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"{op.name}: body is not msgpack ({exc})") from None
    return op, request_id, msg


def _other_version(cls, frame: bytes) -> str | None:
    """A handshake (its first field: ``protocol``) from another version of moeinf, whose fields need not decode
    here: that, said plainly, rather than the field that did not match."""
    if cls.__struct_fields__[:1] != ("protocol",):
        return None
    try:
        version = msgspec.msgpack.decode(memoryview(frame)[HEADER_BYTES:])[0]
    except (msgspec.DecodeError, TypeError, IndexError, KeyError):
        return None
    if isinstance(version, int) and version != PROTOCOL_VERSION:
        return (f"{cls.__name__}: the peer speaks protocol {version}, this side {PROTOCOL_VERSION}: run one version"
                " of moeinf for memd and its workers")
    return None


def build(cls, value):
    """Turn a decoded msgpack value (an array of fields) into ``cls``, validating every field."""
    try:
        return msgspec.convert(value, cls, strict=True)
    except msgspec.ValidationError as exc:
        raise ProtocolError(_explain(cls, str(exc))) from None


@lru_cache(maxsize=None)
def _decoder(cls) -> msgspec.msgpack.Decoder:
    if not (isinstance(cls, type) and issubclass(cls, messages.Message)):
        raise TypeError(f"{cls!r} is not a common.messages.Message: convert it to a Message struct")
    return msgspec.msgpack.Decoder(cls)


def _explain(cls, text: str) -> str:
    """``Expected `int`, got `str` - at `$[1][0]``` -> ``AcquireRequest.experts[0]: Expected `int`, got `str```."""
    found = _PATH.search(text)
    if found is None:
        return f"{cls.__name__}: {text}"
    indices = [int(i) for i in re.findall(r"\d+", found.group(1))]
    return f"{cls.__name__}{_field_path(cls, indices)}: {text[:found.start()]}"


def _field_path(tp, indices: list[int]) -> str:
    """Name the element that ``indices`` (array positions from the top) reach inside type ``tp``."""
    out = []
    for i in indices:
        tp = _strip(tp)
        if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
            info = msgspec.structs.fields(tp)
            if i >= len(info):
                out.append(f"[{i}]")
                break
            out.append(f".{info[i].name}")
            tp = info[i].type
        elif typing.get_origin(tp) is list:
            out.append(f"[{i}]")
            (tp,) = typing.get_args(tp)
        else:
            out.append(f"[{i}]")
            break
    return "".join(out)


def _strip(tp):
    """``Annotated[X, ...]`` -> X; ``X | None`` -> X."""
    while True:
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (typing.Union, types.UnionType):
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        else:
            return tp
