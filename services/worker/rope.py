"""Rotary embeddings whose frequencies follow the sequence's length, computed request by request in a step.

transformers' dynamic-NTK and LongRoPE embeddings (``rope_type`` "dynamic", "longrope", or a layer type's) pick
their frequencies from the largest position they are given, and dynamic NTK keeps them in the module between calls
(``dynamic_rope_update``). A flattened step gives the model every request's positions at once, so one request
beside a long one would rotate its keys with the long one's frequencies, and a request would inherit them from the
requests before it. Wrapped here, such a module computes each request's rows from that request's positions alone,
starting each time from the frequencies it was built with: what a fresh model computes for the request alone. A
prompt prefilled in chunks gets, in every chunk, the frequencies of the whole prompt's length, as ``generate``
computes them for the prompt in one forward (the chunk's own last position would rotate its keys with other
frequencies, and the tokens after it would differ). Embeddings of any other type depend on each position alone and
are left as they are.
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
    """Wrap every length-dependent rotary embedding of ``model``; ``rows()``: the running step's ``((lo, hi),
    length)`` for each request, its row span and, for a prompt's chunk, the whole prompt's length (else 0); None
    outside a step. Returns how many were wrapped."""
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
        spans = rows() or [((0, n), 0)]
        if spans[-1][0][1] != n:  # positions other than the step's rows (a module's own call): as one request's
            spans = [((0, n), 0)]
        outputs = []
        for (lo, hi), length in spans:
            positions = position_ids[..., lo:hi]
            last = positions.new_full((*positions.shape[:-1], 1), length - 1)  # (the frequencies of that length)
            extend = length - 1 > int(positions.max())  # (a chunk before the prompt's last)
            with lock:
                _fresh(module)
                out = forward(x, torch.cat([positions, last], dim=-1) if extend else positions, *args, **kwargs)
            outputs.append(tuple(o[..., :-1, :] for o in out) if extend else out)
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
