"""The reflective msgpack codec that ``common/codec.py`` replaced, kept ONLY as the baseline of ``moeinf bench
wire``. Same framing (op byte, u64 id, msgpack array of fields), and the same layout but for the step trace, whose
layers were nested lists before ``9be5c84`` made them flat arrays (kept nested here, as it was sent); fields are
checked by walking ``typing.get_type_hints`` of frozen dataclasses in Python. The dataclasses mirror the hot
messages of ``common/messages.py`` field for field (no bounds: the old codec had none)."""
from __future__ import annotations

import dataclasses
import struct
import types
import typing
from dataclasses import dataclass, field

import msgpack

_HEADER = struct.Struct("<BQ")


@dataclass(frozen=True, slots=True)
class AcquireRequest:
    layer: int
    experts: list[int]
    requests: list[str] = field(default_factory=list)
    tokens: list[list[int]] = field(default_factory=list)
    step: int = 0
    prefill: list[bool] = field(default_factory=list)
    speculated: list[int] = field(default_factory=list)
    speculated_tokens: list[int] = field(default_factory=list)
    lease: bool = False
    leased_uses: list[list[int]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class AcquireReply:
    slots: list[int]
    hits: int
    revoked: list[list[int]] = field(default_factory=list)
    epoch: int = 0
    speculate_layers: int = 0
    speculate_threshold: float = 0.0


@dataclass(frozen=True, slots=True)
class LayerTrace:
    layer: int
    experts: list[int]
    tokens: list[list[int]]
    weights: list[list[float]]
    speculated: list[int] = field(default_factory=list)
    leased: bool = False


@dataclass(frozen=True, slots=True)
class StepTraceEvent:
    worker: int
    step: int
    requests: list[str]
    tokens: list[int]
    prefill: list[bool]
    layers: list[LayerTrace]


def encode(op: int, request_id: int, msg) -> bytes:
    body = msgpack.packb([getattr(msg, f.name) for f in dataclasses.fields(msg)], default=_to_wire)
    return _HEADER.pack(op, request_id) + body


def _to_wire(obj):
    if dataclasses.is_dataclass(obj):
        return [getattr(obj, f.name) for f in dataclasses.fields(obj)]
    raise TypeError(f"cannot encode {type(obj).__name__}")


def decode(frame: bytes, cls):
    op, request_id = _HEADER.unpack_from(frame)
    return op, request_id, build(cls, msgpack.unpackb(frame[_HEADER.size:], raw=False, strict_map_key=True))


def build(cls, value):
    fields = dataclasses.fields(cls)
    if not isinstance(value, list):
        raise ValueError(f"{cls.__name__}: expected an array")
    required = sum(1 for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
    if not required <= len(value) <= len(fields):
        raise ValueError(f"{cls.__name__}: expected {required}..{len(fields)} fields, got {len(value)}")
    hints = _hints(cls)
    return cls(**{f.name: _check(hints[f.name], v, f"{cls.__name__}.{f.name}") for f, v in zip(fields, value)})


_HINTS: dict[type, dict] = {}


def _hints(cls) -> dict:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
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
            raise ValueError(f"{where}: expected a list")
        (item,) = typing.get_args(tp)
        return [_check(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return build(tp, value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, bool) or not isinstance(value, tp):
        raise ValueError(f"{where}: expected {tp.__name__}")
    return value
