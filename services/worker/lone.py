"""Attention modules that read the mask themselves run once per request, as in a lone run.

DeepSeek sparse attention and its kin (transformers' ``indexed_attention`` layers) score keys with an indexer
inside the attention module: the indexer adds the causal mask to its scores, keeps its own keys in the cache
(``update_indexer``) and narrows the mask to its top-k before calling the attention function. DeepSeek-V4 appends
compressed keys from its own cache layers, with their own mask columns. None of that goes through the
AttentionInterface, so the per-request attention of a flattened step cannot give it each request's mask.
Such an attention module runs once per request of the step instead: that request's rows of every per-token
argument, its own cache, the mask the model builds when it runs alone, and the model's own attention
implementation. The token-wise layers around it (norms, router, experts) still run once on the whole step.
"""
from __future__ import annotations

import copy
import inspect
from functools import partial

import torch
from transformers.masking_utils import LAYER_PATTERN_TO_MASK_FUNCTION_MAPPING

CACHE_ARGS = ("cache", "past_key_values")
TRANSFORMERS_CACHE = "transformers.cache_utils"


def self_masking(mask_function) -> bool:
    """Transformers builds these layers' masks without the is-causal shortcut: their attention reads the mask."""
    return isinstance(mask_function, partial) and mask_function.keywords.get("allow_is_causal_skip") is False


SELF_MASKING = {kind: fn for kind, fn in LAYER_PATTERN_TO_MASK_FUNCTION_MAPPING.items() if self_masking(fn)}


class PerRequest(tuple):
    """A module output that cannot be concatenated over requests (e.g. each request's top-k key indices, which
    differ in width); the next per-request module takes request ``i``'s element."""


def attention_modules(model, layer_kinds: list[str], cache_layers: list) -> list[torch.nn.Module]:
    """The attention modules (the ones that call transformers' attention function) of the layers whose attention
    reads the mask itself: a self-masking kind, or a cache layer of the model's own (DeepSeek-V4's compressed
    keys, appended after the cache update with their own mask columns)."""
    alone = {i for i, kind in enumerate(layer_kinds) if kind in SELF_MASKING}
    alone |= {i for i, layer in enumerate(cache_layers) if type(layer).__module__ != TRANSFORMERS_CACHE}
    return [module for module in model.modules()
            if getattr(module, "layer_idx", None) in alone and _calls_attention(type(module))]


def _calls_attention(cls) -> bool:
    try:
        return "ALL_ATTENTION_FUNCTIONS" in inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False


def run_alone(modules: list[torch.nn.Module], original: str, active) -> None:
    """Make each module run per request while a step is active (``active()`` returns its ``StepLayout``), with the
    model's own attention implementation ``original`` (its config copied, so the rest of the model keeps the
    per-request attention)."""
    for module in modules:
        config = copy.copy(module.config)
        config._attn_implementation_internal = original
        module.config = config
        module.forward = partial(_per_request, module, module.forward, inspect.signature(module.forward), active)


def _per_request(module, forward, signature, active, *args, **kwargs):
    run = active()
    if run is None:
        return forward(*args, **kwargs)
    bound = signature.bind_partial(*args, **kwargs).arguments
    extra = next((bound.pop(p.name, {}) for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), {})
    arguments = {**bound, **extra}
    cache_arg = next((name for name in CACHE_ARGS if name in arguments), None)
    total = run.rows[-1][1]
    outputs = []
    for i, ((lo, hi), part, masks) in enumerate(zip(run.rows, run.cache.parts, run.masks)):
        mine = {name: _rows(value, i, lo, hi, total) for name, value in arguments.items()}
        mine["attention_mask"] = masks[run.flat_step.layer_kinds[module.layer_idx]]
        if cache_arg:
            mine[cache_arg] = part.cache
        outputs.append(forward(**mine))
    return _joined(outputs)


def _rows(value, i: int, lo: int, hi: int, total: int):
    """Request ``i``'s share of an argument: its rows of a per-token tensor ``[1, tokens, ...]``."""
    if isinstance(value, PerRequest):
        return value[i]
    if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[0] == 1 and value.shape[1] == total:
        return value[:, lo:hi]
    if isinstance(value, tuple | list):
        return type(value)(_rows(v, i, lo, hi, total) for v in value)
    if isinstance(value, dict):  # (DeepSeek-V4's position embeddings: {"main": (cos, sin), "compress": ...})
        return {k: _rows(v, i, lo, hi, total) for k, v in value.items()}
    return value


def _joined(outputs: list):
    if isinstance(outputs[0], torch.Tensor):
        return torch.cat(outputs, dim=1)
    first = torch.cat([out[0] for out in outputs], dim=1)
    rest = [None if all(out[k] is None for out in outputs) else PerRequest(out[k] for out in outputs)
            for k in range(1, len(outputs[0]))]
    return (first, *rest)
