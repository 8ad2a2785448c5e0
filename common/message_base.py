"""The base of every message (``common/messages.py`` gathers the vocabulary): the bounded field types, ``Message``
(frozen, an array of its fields on the wire) and ``ErrorReply``."""
from __future__ import annotations

from typing import Annotated

from msgspec import Meta, Struct, field

# Bounds of the integers and floats on the wire (a forged counter of 4.6e18 or a NaN weight is refused on decode).
INDEX_MAX = 2**31 - 1  # layers, experts, slots, token ids, tokens per step, pids: far above any real value
COUNT_MAX = 2**53  # cumulative counters, byte sizes, step numbers: exact in a float, never reached in practice
Index = Annotated[int, Meta(ge=0, le=INDEX_MAX)]
Count = Annotated[int, Meta(ge=0, le=COUNT_MAX)]
NonNeg = Annotated[float, Meta(ge=0.0, le=1e18)]  # seconds, bytes/s, token weights: finite, >= 0 (NaN refused)
Ratio = Annotated[float, Meta(ge=0.0, le=1.0)]  # probabilities, precision, recall, top_p
Text = Annotated[str, Meta(max_length=4096)]  # names, paths, request ids, tokens
READ_EVENTS_MAX = 1024  # "done reading" events one worker may share (HelloRequest.read_events)


class Message(Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """Base of every message: frozen, an array of its fields on the wire, no extra trailing fields."""


def field_names(obj) -> tuple[str, ...]:
    """The fields of a message (or a message type), in wire order."""
    return obj.__struct_fields__


def to_dict(value):
    """A message as plain dicts and lists, recursively (``--json`` output; the wire uses arrays)."""
    if isinstance(value, Message):
        return {name: to_dict(getattr(value, name)) for name in value.__struct_fields__}
    if isinstance(value, list):
        return [to_dict(v) for v in value]
    return value


class ErrorReply(Message):
    code: str  # machine-readable: "bad_request", "capacity", "unavailable", "internal", ... (docs/protocol.md)
    message: str  # says what to fix
