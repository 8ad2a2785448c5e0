"""A request's keys and values written in place, not concatenated anew at every layer of every step.

transformers' ``DynamicLayer`` appends by ``torch.cat([keys, new])``: each decode token copies the layer's whole
cache into a freshly allocated tensor (at 4k tokens of the bench preset, 8 MiB of keys and values per layer and
token, 128 MiB a token over 16 layers, plus the allocator's page faults). ``GrowingLayer`` keeps each layer's keys
and values in buffers with room to spare and writes new tokens into them; only when a buffer is full is it copied
once into a larger one (a quarter more, at least ``SPARE`` tokens, never beyond the request's own bound: its prompt
and ``max_tokens``), so an append costs its own tokens, amortised.

What attention sees is unchanged but for its strides: ``keys`` / ``values`` are views of the buffers' first tokens,
the same values as the concatenation's. sdpa (torch's CPU flash kernel, with and without grouped heads, causal or
masked) and the eager path's matmuls give the same bits on such views as on contiguous tensors
(``tests/worker/test_kv_cache.py`` compares the worker's tokens and logits with transformers'). CPU only: on a GPU
the layers stay transformers' own (not verified there).
"""
from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

SPARE = 128  # tokens of room added at least when a buffer grows


class GrowingLayer(DynamicLayer):
    """``DynamicLayer`` whose keys and values are views of buffers that grow by a quarter when full. Anything that
    replaces ``keys`` with a tensor of its own (``batch_select_indices``, ``reorder_cache``, offloading) is taken
    into a new buffer at the next update; ``crop`` keeps a view, so the next tokens overwrite the cropped ones (in
    tensors returned before the crop too, which alias the buffer). A token appended in another dtype is cast to the
    buffer's (``torch.cat`` would promote; the worker appends one dtype)."""

    _layer_type = None  # (never registered in transformers' layer-type mapping: the oracle keeps its own)

    def __init__(self, limit: int = 0):
        super().__init__()
        self.limit = limit  # tokens the request can ever hold (0: unbounded): no buffer grows beyond it
        self.key_buffer = self.value_buffer = None

    def reset(self) -> None:
        super().reset()
        self.key_buffer = self.value_buffer = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.key_buffer = self.value_buffer = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if key_states.device.type != "cpu":
            return super().update(key_states, value_states, *args, **kwargs)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        held = self.get_seq_length()
        total = held + key_states.shape[-2]
        if not self._in_buffers(key_states, value_states) or total > self.key_buffer.shape[-2]:
            room = total + max(SPARE, total // 4)
            self._grow(key_states, value_states, held, max(total, min(room, self.limit)) if self.limit else room)
        self.key_buffer[..., held:total, :].copy_(key_states)
        self.value_buffer[..., held:total, :].copy_(value_states)
        self.keys = self.key_buffer[..., :total, :]
        self.values = self.value_buffer[..., :total, :]
        return self.keys, self.values

    def _in_buffers(self, key_states: torch.Tensor, value_states: torch.Tensor) -> bool:
        """Whether ``keys`` / ``values`` are still the leading views of the buffers, of the new tokens' shape."""
        k, v, kb, vb = self.keys, self.values, self.key_buffer, self.value_buffer
        if kb is None or k.numel() == 0:
            return False
        return (k.data_ptr() == kb.data_ptr() and v.data_ptr() == vb.data_ptr()
                and k.shape[:-2] == kb.shape[:-2] == key_states.shape[:-2]
                and v.shape[:-2] == vb.shape[:-2] == value_states.shape[:-2]
                and k.stride() == kb.stride() and v.stride() == vb.stride())

    def _grow(self, key_states: torch.Tensor, value_states: torch.Tensor, held: int, capacity: int) -> None:
        """New buffers of ``capacity`` tokens holding the ``held`` tokens cached so far."""
        old_keys, old_values = self.keys, self.values
        self.key_buffer = key_states.new_empty(*key_states.shape[:-2], capacity, key_states.shape[-1])
        self.value_buffer = value_states.new_empty(*value_states.shape[:-2], capacity, value_states.shape[-1])
        if held:
            self.key_buffer[..., :held, :].copy_(old_keys)
            self.value_buffer[..., :held, :].copy_(old_values)


def growing_cache(config, limit: int = 0) -> DynamicCache:
    """A DynamicCache for ``config`` whose full-attention layers (exactly transformers' ``DynamicLayer``; sliding,
    indexed and recurrent layers stay as they are) append in place, each at most ``limit`` tokens (0: unbounded)."""
    cache = DynamicCache(config=config)
    cache.layers = [GrowingLayer(limit) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache
