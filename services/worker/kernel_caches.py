"""oneDNN's per-shape kernel caches, bounded (``--matmul-cache``).

On CPUs with AVX-512 BF16 or AMX, a bfloat16 linear runs oneDNN's brgemm matmul, which compiles a kernel for every
new shape, and a shape is a weight and a row count: the step's token count for the dense layers, the tokens routed
to each expert for the experts. Continuous batching meets new row counts as long as it runs, and each compiled
kernel (with its entry in ideep's cache of computations in front of oneDNN's) costs ~0.6 MiB, so with oneDNN's own
bounds (1024 of each) the worker's memory grows by hundreds of MiB over hours (docs/soak.md). Both caches read their
capacity from the environment when first used, so this runs before the process's first bfloat16 matmul; a shape
evicted and met again is compiled again (~0.4 ms), which changes no result.
"""
from __future__ import annotations

import os
from typing import MutableMapping

CAPACITY_VARIABLES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")  # oneDNN's, ideep's
LEGACY = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": ("DNNL_PRIMITIVE_CACHE_CAPACITY",)}  # oneDNN's older name, still read


def bound(shapes: int, environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """Keep at most ``shapes`` compiled kernels in each cache (0: the libraries' defaults). A variable the user set
    (or its older name) wins. Returns the variables each cache will read (absent: its default)."""
    for name in CAPACITY_VARIABLES:
        if shapes and not any(n in environ for n in (name, *LEGACY.get(name, ()))):
            environ[name] = str(shapes)
    names = (*CAPACITY_VARIABLES, *(n for older in LEGACY.values() for n in older))
    return {name: environ[name] for name in names if name in environ}
