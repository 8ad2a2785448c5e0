"""``--kv-cache-memory``: how much KV cache the running requests may hold together, measured, not guessed.

Each request's cache grows to its bound, prompt + ``max_tokens`` tokens (``kv_cache.GrowingLayer`` never holds room
beyond it). Without a budget nothing but ``--max-running`` bounded the caches: long requests batched together grew
them past the memory there is (a GPU's out-of-memory error failed every request of the step; on a CPU the kernel's
OOM killer ended the worker and every request with it).

What a token costs is measured on the caches themselves (``KvMeter``), because the config does not say it the same
way across families (DeepSeek's latent attention caches the compressed latent; sliding-window layers stop growing;
recurrent layers keep a fixed state per request; some configs differ per layer): after every step, each request's
cache is weighed (its tensors' bytes, ``cache_bytes``), and the largest growth per token seen, and the largest fixed
part (what a request holds beyond its tokens' growth), are what a request's bound is reserved at. A running request
reserves what it holds plus its remaining tokens' growth; a waiting one its bound's growth plus the fixed part. The
scheduler lets the oldest waiting request join only while the reservations fit the budget; one above the whole
budget runs alone once nothing else does (not refused: the largest growth seen errs high where sliding-window layers
stop growing at their window, so a refusal could turn away a request that fits). So the budget bounds what runs
together, the failure it was added for. Until a request has been weighed twice there is nothing to go by
(one weighing cannot tell a fixed state from its tokens), and requests join as ``--max-running`` allows.

The budget: a size, or a share of the memory available where the cache lives once the model is loaded (a GPU's
free memory; on a CPU, MemAvailable within the cgroup's limit, page cache that can be reclaimed not counted as
used); ``auto`` is 80% of it. ``moeinf serve --workers N`` gives each worker a share of 80% / N.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from common.config import KV_AUTO_SHARE
from common.sizes import format_bytes, parse_size

log = logging.getLogger("moeinf.worker")
CGROUP = Path("/sys/fs/cgroup")
CGROUP_FILES = (("memory.max", "memory.current", "inactive_file"),  # cgroup v2, then v1
                ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes", "total_inactive_file"))
MAX_DEPTH = 4  # how deep ``cache_bytes`` looks into a cache's objects (an encoder-decoder cache nests two)


def budget_bytes(setting: str, device: torch.device) -> tuple[int, str]:
    """``--kv-cache-memory`` in bytes (at least 1: nothing available means one request at a time, not no bound),
    and how it was reached (for the log)."""
    if setting == "auto":
        free = available_bytes(device)
        return max(1, int(free * KV_AUTO_SHARE)), f"auto: {KV_AUTO_SHARE:.0%} of the {format_bytes(free)} available"
    spec = parse_size(setting, what="--kv-cache-memory")
    if spec.fraction is None:
        return spec.resolve(0), setting
    free = available_bytes(device)
    return max(1, spec.resolve(free)), f"{setting} of the {format_bytes(free)} available"


def available_bytes(device: torch.device) -> int:
    """Memory free for the cache where it lives: a GPU's free memory, or the host's MemAvailable within the
    cgroup's limit (a container's)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    free = _meminfo_available()
    for limit_file, usage_file, inactive in CGROUP_FILES:
        limit, usage = _read_int(CGROUP / limit_file), _read_int(CGROUP / usage_file)
        if limit is not None and usage is not None and limit < 1 << 60:  # ("max" / an unset v1 limit: none)
            reclaimable = _stat(CGROUP / Path(limit_file).with_name("memory.stat"), inactive)
            return min(free, max(0, limit - usage + reclaimable))
    return free


def cache_bytes(cache) -> int:
    """The bytes of the tensors a request's cache holds: every tensor reachable from it (its layers' keys and values,
    a recurrent layer's states, an encoder-decoder's two caches). Tensors over one storage count once, by the
    smallest (a growing layer's keys are a view of its buffer's first tokens: the measure follows the tokens, not
    the spare room, which never exceeds the request's bound)."""
    smallest: dict[int, int] = {}
    for tensor in _tensors(cache, 0):
        if tensor.numel():
            nbytes = tensor.numel() * tensor.element_size()
            ptr = tensor.data_ptr()
            smallest[ptr] = min(smallest.get(ptr, nbytes), nbytes)
    return sum(smallest.values())


def _tensors(obj, depth: int):
    if isinstance(obj, dict):
        items = obj.values()
    elif isinstance(obj, (list, tuple)):
        items = obj
    else:
        items = getattr(obj, "__dict__", {}).values()
    for value in items:
        if isinstance(value, torch.Tensor):
            yield value
        elif depth < MAX_DEPTH and not isinstance(value, (str, bytes, type, torch.nn.Module, torch.Generator)) \
                and (isinstance(value, (dict, list, tuple)) or hasattr(value, "__dict__")):
            yield from _tensors(value, depth + 1)


class KvMeter:
    """What a request's KV cache costs, weighed on the running requests after each step (see the module docstring).
    ``growth``: the most bytes a token added between two weighings of one request (None until a request has been
    weighed twice: a first weighing alone cannot tell a fixed state from its tokens); ``fixed``: the most a request
    held beyond its tokens' growth."""

    def __init__(self):
        self.growth: float | None = None
        self.fixed = 0

    def observe(self, seq) -> None:
        """Weigh ``seq``'s cache after a step (``seq.kv_bytes``, ``seq.kv_at``: its last weighing)."""
        now, tokens = cache_bytes(seq.cache), seq.cached
        if seq.kv_at and tokens > seq.kv_at:
            self.growth = max(self.growth or 0.0, (now - seq.kv_bytes) / (tokens - seq.kv_at))
        if self.growth is not None:
            self.fixed = max(self.fixed, int(now - tokens * self.growth))
        seq.kv_bytes, seq.kv_at = now, tokens

    def reserve(self, seq) -> int | None:
        """Bytes ``seq``'s cache may come to (None: nothing weighed yet)."""
        if self.growth is None:
            return None
        if seq.kv_at:
            return int(seq.kv_bytes + max(0, seq.kv_tokens - seq.kv_at) * self.growth)
        return int(seq.kv_tokens * self.growth) + self.fixed


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


def _stat(path: Path, name: str) -> int:
    try:
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == name:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0
