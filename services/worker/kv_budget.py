"""``--kv-cache-memory``: how many tokens of KV cache the running requests may hold together.

Each request's cache grows to at most its prompt + ``max_tokens`` (``kv_cache.GrowingLayer``'s bound). The scheduler
lets a waiting request run only while the running requests' bounds, added up, stay within this budget
(``scheduler.Limits.kv_tokens``), and refuses outright one that could never fit alone, naming the knob. Without it
nothing but ``--max-running`` bounded the caches: long requests batched together grew them past the memory there is
(a GPU's out-of-memory error failed every request of the step; on a CPU the kernel's OOM killer ended the worker and
every request with it).

The bytes a token costs come from the model's config (keys and values of every attention layer, in the model's
dtype; DeepSeek's latent attention caches its expanded keys and values): an estimate that errs high for sliding-window
and recurrent layers (whose state does not grow with the context), so the budget is kept, not exceeded. ``auto``
takes 80% of the memory available where the cache lives once the model is loaded: the GPU's free memory, or on a
CPU MemAvailable, within the cgroup's limit when there is one (a container's).
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from common.sizes import format_bytes, parse_size

log = logging.getLogger("moeinf.worker")
AUTO_SHARE = 0.8  # of the available memory, for ``auto``
CGROUP_FILES = (("memory.max", "memory.current"),  # cgroup v2, then v1
                ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes"))


def token_bytes(config, dtype: torch.dtype) -> int:
    """KV cache bytes per token of ``config``'s model (every layer's keys and values)."""
    text = config.get_text_config()
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    width = 2 * kv_heads * head_dim
    if getattr(text, "kv_lora_rank", None):  # latent attention: keys of nope + rope dims, values of v_head_dim
        width = heads * (text.qk_nope_head_dim + text.qk_rope_head_dim + text.v_head_dim)
    layers = text.num_hidden_layers + getattr(text, "num_decoder_layers", 0)  # (an encoder-decoder's decoder too)
    return max(1, layers * width * torch.empty((), dtype=dtype).element_size())


def available_bytes(device: torch.device) -> int:
    """Memory free for the cache where it lives: a GPU's free memory, or the host's MemAvailable (within the
    cgroup's limit)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    free = _meminfo_available()
    for limit_file, usage_file in CGROUP_FILES:
        limit, usage = _read_int(Path("/sys/fs/cgroup") / limit_file), _read_int(Path("/sys/fs/cgroup") / usage_file)
        if limit is not None and usage is not None and limit < 1 << 60:  # ("max" / an unset v1 limit: none)
            free = min(free, max(0, limit - usage))
            break
    return free


def kv_tokens(setting: str, config, dtype: torch.dtype, device: torch.device) -> tuple[int, str]:
    """The budget in tokens, and how it was reached (for the log)."""
    per_token = token_bytes(config, dtype)
    if setting == "auto":
        free = available_bytes(device)
        budget = int(free * AUTO_SHARE)
        how = f"auto: {AUTO_SHARE:.0%} of the {format_bytes(free)} available"
    else:
        spec = parse_size(setting, what="--kv-cache-memory")
        free = available_bytes(device) if spec.fraction is not None else 0
        budget = spec.resolve(free)
        how = f"{setting}" + (f" of the {format_bytes(free)} available" if spec.fraction is not None else "")
    tokens = budget // per_token
    if tokens < 1:
        raise ValueError(f"--kv-cache-memory {setting} leaves {format_bytes(budget)} for the KV cache, less than one"
                         f" token of this model ({format_bytes(per_token)}): give more, or free memory")
    return tokens, f"{format_bytes(budget)} ({how}): {tokens} tokens of {format_bytes(per_token)}"


def _meminfo_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62  # (not Linux: no bound from here)


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None
