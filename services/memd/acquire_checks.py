"""A HELLO and an ACQUIRE checked against the model and the pool before memd acts on them: versions, the
checkpoint, ranges, shapes, what fits."""
from __future__ import annotations

import os
from pathlib import Path

from common import messages as m
from common.expert_index import file_stats
from common.protocol import PROTOCOL_VERSION
from services.memd.replies import CodedError


def checkpoint_stamp(model: Path) -> list[tuple[str, int, int]]:
    """The checkpoint's files as memd found them (name, size, mtime): config, index, safetensors."""
    model = Path(model)
    return file_stats(sorted([model / "config.json", model / "model.safetensors.index.json",
                              *model.glob("*.safetensors")]))


def check_hello(req: m.HelloRequest, model: Path, stamp: list) -> None:
    """A worker of this protocol version, on memd's checkpoint, unchanged since memd indexed it (a checkpoint
    updated in place would pair the worker's new dense weights with memd's old experts)."""
    if req.protocol != PROTOCOL_VERSION:
        raise CodedError("protocol", f"worker speaks protocol {req.protocol}, memd {PROTOCOL_VERSION}: run one"
                                     " version")
    if os.path.realpath(req.model) != os.path.realpath(model):
        raise CodedError("model", f"memd serves {model}, the worker loaded {req.model}: give both one --model")
    if checkpoint_stamp(model) != stamp:
        raise CodedError("model", f"the checkpoint at {model} changed since memd started (its files' sizes or"
                                  " times): restart memd, then its workers")


def check_acquire(req: m.AcquireRequest, num_layers: int, num_experts: int, capacity: int) -> list[tuple[int, int]]:
    """The request's (layer, expert) keys; a ``CodedError`` ("bad_request", "capacity") saying what is wrong."""
    if not 0 <= req.layer < num_layers:
        raise CodedError("bad_request", f"layer {req.layer} out of range 0..{num_layers - 1}")
    if len(set(req.experts)) != len(req.experts) or any(not 0 <= e < num_experts for e in req.experts):
        raise CodedError("bad_request", f"experts {req.experts} must be distinct, in 0..{num_experts - 1}")
    if len(req.experts) > capacity:
        raise CodedError("capacity", f"{len(req.experts)} experts asked at once but the pool has {capacity} slots;"
                                     " raise --expert-memory")
    if req.tokens and (len(req.tokens) != len(req.requests) or any(len(r) != len(req.experts) for r in req.tokens)):
        raise CodedError("bad_request", f"tokens must be {len(req.requests)} rows of {len(req.experts)} counts")
    if req.counts and len(req.counts) != len(req.experts):
        raise CodedError("bad_request", f"counts must be {len(req.experts)} numbers, one per expert")
    if any(not 0 <= e < num_experts for e in req.speculated):
        raise CodedError("bad_request", f"speculated experts {req.speculated} out of range")
    if any(len(t) != 2 or not 0 <= t[0] < num_layers or not 0 <= t[1] < num_experts for t in req.leased_uses):
        raise CodedError("bad_request", "leased_uses must be [layer, expert] pairs in range")
    return [(req.layer, e) for e in req.experts]


def merge_slots(count: int, device: list[int], host: dict[int, int]) -> list[int]:
    """One slot per requested expert: ``host[j]`` (a host-tier slot) at the positions the CPU computes, the device
    slots in order at the others."""
    rest = iter(device)
    return [host[j] if j in host else next(rest) for j in range(count)]
