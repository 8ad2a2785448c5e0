"""Rotary embeddings whose frequencies follow the sequence's length, computed request by request in a step.

transformers' dynamic-NTK and LongRoPE embeddings (``rope_type`` "dynamic", "longrope", or a layer type's) pick
their frequencies from the largest position they are given, and dynamic NTK keeps them in the module between calls
(``dynamic_rope_update``). A flattened step gives the model every request's positions at once, so one request
beside a long one would rotate its keys with the long one's frequencies, and a request would inherit them from the
requests before it. Wrapped here, such a module computes each request's rows from that request's positions alone,
starting each time from the frequencies it was built with: what a fresh model computes for the request alone. (A
prompt prefilled in chunks still sees, for each chunk, the length so far, as transformers' own cache does when its
prompt arrives in pieces.) Embeddings of any other type depend on each position alone and are left as they are.
"""
from __future__ import annotations

import threading
from functools import wraps

import torch


def length_dependent(module) -> bool:
    """A rotary embedding whose frequencies depend on the longest position it is given."""
    rope_type = getattr(module, "rope_type", None)
    if not hasattr(module, "original_inv_freq") and not any(n.endswith("original_inv_freq") for n, _ in
                                                            module.named_buffers(recurse=False)):
        return False
    types = rope_type.values() if isinstance(rope_type, dict) else [rope_type]
    return any(isinstance(t, str) and ("dynamic" in t or t == "longrope") for t in types)


def per_request(model, rows) -> int:
    """Wrap every length-dependent rotary embedding of ``model``; ``rows()``: the running step's ``(lo, hi)`` row
    span of each request (None outside a step). Returns how many were wrapped."""
    wrapped = 0
    for module in model.modules():
        if length_dependent(module) and not getattr(module, "_moeinf_per_request", False):
            module.forward = _wrap(module, module.forward, rows)
            module._moeinf_per_request = True
            wrapped += 1
    return wrapped


def _wrap(module, forward, rows):
    lock = threading.Lock()  # (lockstep runs one forward per request, in threads, through the same module)

    @wraps(forward)
    def per_request_forward(x, position_ids, *args, **kwargs):
        n = position_ids.shape[-1]
        spans = rows() or [(0, n)]
        if spans[-1][1] != n:  # positions other than the step's rows (a module's own call): as one request's
            spans = [(0, n)]
        outputs = []
        for lo, hi in spans:
            with lock:
                _fresh(module)
                outputs.append(forward(x, position_ids[..., lo:hi], *args, **kwargs))
        if len(outputs) == 1:
            return outputs[0]
        return tuple(torch.cat(parts, dim=-2) for parts in zip(*outputs))
    return per_request_forward


def _fresh(module) -> None:
    """Back to the frequencies the module was built with (dynamic NTK's growth is recomputed from the positions)."""
    rope_type = module.rope_type
    prefixes = [f"{t}_" for t in rope_type] if isinstance(rope_type, dict) else [""]
    for prefix in prefixes:
        original = getattr(module, f"{prefix}original_inv_freq", None)
        if original is None:
            continue
        module.register_buffer(f"{prefix}inv_freq", original.clone(), persistent=False)
        if hasattr(module, "original_max_seq_len"):
            setattr(module, f"{prefix}max_seq_len_cached", module.original_max_seq_len)
