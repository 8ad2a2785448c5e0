"""--matmul-cache: oneDNN's per-shape kernels are bounded, so new matmul shapes stop growing the worker's memory."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from services.worker import kernel_caches

ROOT = Path(__file__).resolve().parents[2]  # the checkout under test, whatever the cwd

GROWTH = """
import sys
import torch
from services.worker import kernel_caches
kernel_caches.bound(int(sys.argv[1]))  # after torch's import, before its first bfloat16 matmul: as in the worker

def rss_mib():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("RssAnon")) / 1024

w1, w2 = torch.randn(512, 256, dtype=torch.bfloat16), torch.randn(256, 512, dtype=torch.bfloat16)
torch.nn.functional.linear(torch.randn(1, 256, dtype=torch.bfloat16), w1)
start = rss_mib()
for rows in range(1, 151):  # 300 shapes: row counts as continuous batching meets them
    torch.nn.functional.linear(torch.nn.functional.linear(torch.randn(rows, 256, dtype=torch.bfloat16), w1), w2)
print(rss_mib() - start)
"""


def growth_mib(shapes: int) -> float:
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}  # none of the capacity variables
    out = subprocess.run([sys.executable, "-c", GROWTH, str(shapes)], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=120, check=True)
    return float(out.stdout)


def test_bound_sets_both_caches_and_a_users_variable_wins():
    env = {"LRU_CACHE_CAPACITY": "9"}
    assert kernel_caches.bound(128, env) == {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "128", "LRU_CACHE_CAPACITY": "9"}
    assert kernel_caches.bound(64, {"DNNL_PRIMITIVE_CACHE_CAPACITY": "5"}) == {  # oneDNN's older name, still read
        "LRU_CACHE_CAPACITY": "64", "DNNL_PRIMITIVE_CACHE_CAPACITY": "5"}
    assert kernel_caches.bound(0, {}) == {}


def test_bound_sets_the_process_environment(monkeypatch):
    for name in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "DNNL_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
        monkeypatch.setenv(name, "-")  # recorded, so that monkeypatch puts back what was there (or nothing)
        monkeypatch.delenv(name)
    assert kernel_caches.bound(32) == {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "32", "LRU_CACHE_CAPACITY": "32"}
    assert os.environ["LRU_CACHE_CAPACITY"] == "32"  # (monkeypatch puts the environment back)


def test_a_bounded_cache_stops_new_shapes_from_growing_memory():
    unbounded = growth_mib(0)
    if unbounded < 40:
        pytest.skip(f"this CPU's bfloat16 matmul keeps no per-shape kernels (+{unbounded:.1f} MiB for 300 shapes)")
    bounded = growth_mib(8)
    assert bounded < unbounded / 3, (bounded, unbounded)
