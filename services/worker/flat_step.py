"""One forward pass for the tokens of several requests: the step's tokens flattened into one sequence.

Everything that acts token by token (embeddings, projections, norms, the router, the experts, the LM head) runs
once on the whole step, so each MoE layer acquires the union of the step's experts once. Attention is the one
place requests must not see each other. The model runs with the ``moeinf_per_request`` attention implementation:
for each request it calls the model's own attention function (sdpa or eager) on that request's queries and on
its own cache's keys and values, with the mask the model builds when the request runs alone. Per request, the
attention inputs, shapes and masks are those of a lone run; only the token-wise matmuls see more rows.
"""
from __future__ import annotations

import copy
import sys
import threading
from dataclasses import dataclass

import torch
from transformers import AttentionInterface, Cache, DynamicCache
from transformers.masking_utils import LAYER_PATTERN_TO_MASK_FUNCTION_MAPPING, create_recurrent_attention_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from services.worker import rope, rotary
from services.worker.device import current
from services.worker.kv_cache import growing_cache
from services.worker.lone import attention_modules, run_alone

IMPLEMENTATION = "moeinf_per_request"
FULL, SLIDING = "full_attention", "sliding_attention"
BATCHED_CACHE_LAYERS = ("DynamicLayer", "DynamicSlidingWindowLayer", "DynamicIndexedLayer")
# each attention kind's mask as transformers builds it (recurrent kinds' padding masks aside: their layers never
# reach the attention function; a kind it does not know takes the causal mask, see FlatStep.masks)
MASK_FUNCTIONS = {kind: fn for kind, fn in LAYER_PATTERN_TO_MASK_FUNCTION_MAPPING.items()
                  if callable(fn) and fn is not create_recurrent_attention_mask}


@dataclass
class RequestTokens:
    """One request's share of a step: ``tokens`` appended to ``cache``, which holds ``past`` tokens so far."""

    cache: DynamicCache
    past: int
    tokens: list[int]
    length: int = 0  # a prompt's chunk: the whole prompt's length (length-dependent rotary frequencies, rope.py)


class StepCache:
    """The cache the model sees during a step. Each layer's new keys and values are split by request and appended to
    that request's own cache. What ``update`` returns depends on the layer: code that expands the keys after the
    update (DeepSeek's latent attention) gets every request's full keys and values concatenated, and ``spans``
    remembers where each request's part lies; a layer that passes them to attention as they are (every other
    family) gets placeholders of that shape, and its attention reads each request's cache directly, so a step never
    copies its requests' caches. Which kind a layer is, the first batched step finds out (``direct``: the layers
    that passed the concatenation through unchanged; the model's ``FlatStep`` keeps it)."""

    def __init__(self, parts: list[RequestTokens], rows: list[tuple[int, int]], recurrent: bool = False,
                 direct: set[int] | None = None):
        self.parts, self.rows, self.recurrent = parts, rows, recurrent
        self.direct = set() if direct is None else direct
        self.spans: dict[int, list[tuple[int, int]]] = {}
        self.pieces: dict[int, tuple[list, list]] = {}  # layer -> each request's keys, values (its cache's tensors)
        self.returned: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> what update returned

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        if len(self.parts) == 1:  # one request (a lone decode): its cache takes the step's keys as they are
            k, v = self.parts[0].cache.update(key, value, layer_idx, *args, **kwargs)
            self.spans[layer_idx] = [(0, k.shape[-2])]
            return k, v
        keys, values, spans, start = [], [], [], 0
        for part, (lo, hi) in zip(self.parts, self.rows):
            k, v = part.cache.update(key[:, :, lo:hi], value[:, :, lo:hi], layer_idx, *args, **kwargs)
            keys.append(k)
            values.append(v)
            spans.append((start, start + k.shape[-2]))
            start += k.shape[-2]
        self.spans[layer_idx], self.pieces[layer_idx] = spans, (keys, values)
        if layer_idx in self.direct:  # (never read: attention takes ``pieces``; one element of storage each)
            k = keys[0].new_empty(()).expand(*keys[0].shape[:-2], start, keys[0].shape[-1])
            v = values[0].new_empty(()).expand(*values[0].shape[:-2], start, values[0].shape[-1])
        else:
            k, v = torch.cat(keys, dim=-2), torch.cat(values, dim=-2)
        self.returned[layer_idx] = k, v
        return k, v

    def per_request(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor) -> list[tuple]:
        """Each request's keys and values for layer ``layer_idx``'s attention, which got ``key`` and ``value``: its
        cache's own tensors when they are what ``update`` returned, else their slices of ``key`` and ``value``."""
        returned, pieces = self.returned.pop(layer_idx, None), self.pieces.pop(layer_idx, None)  # (held no longer)
        if returned is not None and key is returned[0] and value is returned[1]:
            self.direct.add(layer_idx)
            return list(zip(*pieces))
        if layer_idx in self.direct:  # (the step fails and its requests run again one by one: Engine.rewind)
            raise RuntimeError(f"layer {layer_idx}'s attention got keys other than its cache returned, which it had"
                               " passed through unchanged before")
        return [(key[:, :, lo:hi], value[:, :, lo:hi]) for lo, hi in self.spans[layer_idx]]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        if self.recurrent and len(self.parts) == 1:  # the forward's one request (query offsets: Inkling2's)
            return self.parts[0].cache.get_seq_length(layer_idx)
        return 0  # positions are always passed explicitly

    def __getattr__(self, name: str):
        """Recurrent and linear-attention state (conv, ssm) is per request: reachable when the step has one."""
        parts = self.__dict__.get("parts") or ()
        if self.__dict__.get("recurrent") and len(parts) == 1:
            return getattr(parts[0].cache, name)
        raise AttributeError(f"StepCache.{name}: recurrent layers run one request per forward (see FlatStep.recurrent)")


class StepLayout:
    """The state of one forward: where each request's rows are, its cache, its masks."""

    def __init__(self, flat: FlatStep, parts: list[RequestTokens]):
        self.flat_step = flat
        self.rows, start = [], 0
        for part in parts:
            self.rows.append((start, start + len(part.tokens)))
            start += len(part.tokens)
        self.lengths = [part.length for part in parts]  # (rope.py: a prompt chunk's frequencies are the prompt's)
        self.masks = [flat.masks(part) for part in parts]  # before the caches grow, as the model does alone
        self.cache = flat.step_cache(parts, self.rows, flat.recurrent, flat.direct)

    def attend(self, module, query, key, value, kwargs):
        kind = self.flat_step.layer_kinds[module.layer_idx]
        if len(self.masks) == 1:  # one request: its queries, keys and values are the whole tensors
            return self._one(module, query, key, value, self.masks[0][kind], kwargs), None
        outputs = []
        for (lo, hi), (k, v), masks in zip(self.rows, self.cache.per_request(module.layer_idx, key, value),
                                           self.masks):
            outputs.append(self._one(module, query[:, :, lo:hi], k, v, masks[kind], kwargs))
        return (outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)), None

    def _one(self, module, query, key, value, mask, kwargs):
        """One request's attention output: the decode kernel's where it takes it, else the model's own."""
        decode, own = self.flat_step.decode, self.flat_step.attention_for(module)
        out = None if decode is None else decode(module, query, key, value, mask, kwargs, own)
        return own(module, query, key, value, mask, **kwargs)[0] if out is None else out


def per_request_attention(module, query, key, value, attention_mask, **kwargs):
    """The registered attention: the step that ``module``'s model runs now (``FlatStep.__init__`` gave every
    attention layer its ``FlatStep``) attends request by request."""
    flat = getattr(module, "_moeinf_flat_step", None)
    run = None if flat is None else flat.run
    if run is None:
        raise RuntimeError("the moeinf_per_request attention runs only inside FlatStep.forward")
    if not hasattr(module, "layer_idx"):  # attention over its own inputs, no cache (Inkling2's block residuals)
        if len(run.rows) > 1:  # (it could mix the requests' rows: the step fails, its requests run one by one)
            raise RuntimeError(f"{type(module).__name__} attends without a layer index over the rows of several"
                               " requests, which it could mix")
        return flat.attention_for(module)(module, query, key, value, attention_mask, **kwargs)
    return run.attend(module, query, key, value, kwargs)


class FlatStep:
    """A model switched to flattened steps: remembers its own attention, to call per request."""

    def __init__(self, model, decode=None):
        AttentionInterface.register(IMPLEMENTATION, per_request_attention)
        self.decode = decode  # --attention-kernel: a request's one-token decode step (decode_attention.py)
        config = model.config
        self.model = model
        self.device = model.get_input_embeddings().weight.device  # the step's tensors go where the model computes
        self.original = config._attn_implementation or "eager"
        self.mask_config = copy.copy(config)  # builds each request's masks as the model does with its own attention
        self.mask_config._attn_implementation_internal = self.original
        self.layer_kinds = _layer_kinds(config)
        self.kinds = sorted(set(self.layer_kinds))
        # recurrent / linear-attention layers keep state that the flattened step cannot split by request (an indexed
        # layer's indexer keys are split: its attention runs per request, see lone.py)
        cache_layers = DynamicCache(config=config).layers
        self.recurrent = any(type(layer).__name__ not in BATCHED_CACHE_LAYERS
                             for layer in cache_layers)
        self.indexed = any(type(layer).__name__ == "DynamicIndexedLayer" for layer in cache_layers)  # (engine.py)
        # a model that insists on a cache class of its own (MiniMax) gets one per request, and a step cache of that
        # class whose state is the forward's one request's (so one request per forward); so does a recurrent one,
        # a DynamicCache (code that asks ``isinstance(cache, Cache)`` reads the request's layers: Inkling2's)
        self.own_cache = own_cache_class(model)
        base = self.own_cache or (DynamicCache if self.recurrent else None)
        self.step_cache = StepCache if base is None else type(f"Step{base.__name__}", (StepCache, base), {})
        self.recurrent = self.recurrent or self.own_cache is not None
        self._attention: dict[type, object] = {}
        self.direct: set[int] = set()  # layers whose attention takes the cache's keys as they are (StepCache)
        self._local = threading.local()  # .run: the step in progress in this thread (FlatStep.forward)
        for module in model.modules():  # attention layers (they carry their layer index) find their step here, and
            module._moeinf_flat_step = self  # other modules that call the attention interface
        model.set_attn_implementation(IMPLEMENTATION)
        if model.config._attn_implementation != IMPLEMENTATION:
            raise RuntimeError(f"{type(model).__name__} cannot switch its attention implementation: it does not use"
                               " transformers' AttentionInterface, so the worker cannot batch it")
        # rotary embeddings whose frequencies follow the longest position: each request's own (rope.py)
        rope.per_request(model, lambda: list(zip(self.run.rows, self.run.lengths)) if self.run is not None else None)
        # attention that reads the mask itself runs per request (lone.py)
        run_alone(attention_modules(model, self.layer_kinds, cache_layers), self.original, lambda: self.run)

    @property
    def run(self) -> StepLayout | None:
        """The step in progress in the calling thread (several run at once in lockstep, one per request)."""
        return getattr(self._local, "run", None)

    @run.setter
    def run(self, layout: StepLayout | None) -> None:
        self._local.run = layout

    def new_cache(self, limit: int = 0) -> Cache:
        """A request's own cache: the model's own class where it has one, else a DynamicCache for its config whose
        full-attention layers append in place (``kv_cache.py``), up to ``limit`` tokens (0: unbounded)."""
        return self.own_cache() if self.own_cache is not None else growing_cache(self.model.config, limit)

    def attention_for(self, module):
        fn = self._attention.get(type(module))
        if fn is None:  # "eager" is each modeling file's own eager_attention_forward (GPT-OSS adds its sinks there)
            eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
            fn = self._attention[type(module)] = ALL_ATTENTION_FUNCTIONS.get_interface(self.original, eager)
        return fn

    def masks(self, part: RequestTokens) -> dict:
        n = len(part.tokens)
        dev = self.device
        args = dict(config=self.mask_config, inputs_embeds=torch.empty(1, n, 1, dtype=self.model.dtype, device=dev),
                    attention_mask=torch.ones(1, part.past + n, dtype=torch.long, device=dev), cache=part.cache,
                    position_ids=torch.arange(part.past, part.past + n, device=dev).unsqueeze(0))
        # other kinds (indexed, linear, recurrent, ...) take the causal mask, as their modeling files build it
        return {kind: MASK_FUNCTIONS.get(kind, MASK_FUNCTIONS[SLIDING if 'sliding' in kind else FULL])(**args)
                for kind in self.kinds}

    @torch.inference_mode()
    def forward(self, parts: list[RequestTokens], keep: list[int]) -> torch.Tensor:
        """Run the step; return the float32 logits of the flattened rows ``keep``, one row each, on the host (where
        sampling runs)."""
        dev = self.device
        input_ids = torch.tensor([[t for part in parts for t in part.tokens]], dtype=torch.long, device=dev)
        positions = torch.cat([torch.arange(p.past, p.past + len(p.tokens)) for p in parts]).unsqueeze(0).to(dev)
        self.run = run = StepLayout(self, parts)
        try:
            with current(dev), rotary.active():
                out = self.model(input_ids=input_ids, position_ids=positions, cache=run.cache, use_cache=True,
                                 logits_to_keep=torch.tensor(keep, dtype=torch.long, device=dev))
        finally:
            self.run = None
        return out.logits[0].float().cpu()


def _layer_kinds(config) -> list[str]:
    """Which mask each layer uses, as the modeling files decide it: ``layer_types`` where the config has them, else
    one kind for all layers, sliding when the config sets ``sliding_window``."""
    text = config.get_text_config()
    kinds = getattr(text, "layer_types", None)
    if kinds:
        return list(kinds)
    kind = SLIDING if getattr(text, "sliding_window", None) else FULL
    return [kind] * text.num_hidden_layers


def own_cache_class(model) -> type | None:
    """The cache class a model's modeling file defines for itself (MiniMax rejects any other), or None."""
    module = sys.modules[type(model).__module__]
    return next((c for c in vars(module).values() if isinstance(c, type) and issubclass(c, Cache)
                 and c.__module__ == module.__name__), None)
