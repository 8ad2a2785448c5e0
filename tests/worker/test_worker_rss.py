"""The worker never materialises expert weights: its private memory grows by the dense weights only.

The pool pages it maps are memd's shared memory (RssShmem), so the check uses RssAnon + RssFile (what the
worker itself holds), compared with a process that imports the same modules and loads nothing.
"""
import json
import subprocess
import sys

from helpers import Stack, write_family

from common.worker_client import WorkerClient


def private_rss(pid: int) -> int:
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return sum(int(fields[k].split()[0]) * 1024 for k in ("RssAnon", "RssFile"))


BASELINE = """
import json, os, torch, transformers, services.worker.main, services.worker.experts
from transformers import AutoModelForCausalLM
with open(f"/proc/{os.getpid()}/status") as f:
    s = dict(l.split(":", 1) for l in f)
print(json.dumps(sum(int(s[k].split()[0]) * 1024 for k in ("RssAnon", "RssFile"))))
"""


def test_worker_rss_excludes_experts(tmp_path):
    model = write_family("mixtral", tmp_path / "big", hidden_size=512, intermediate_size=1024, num_local_experts=16,
                         vocab_size=320)
    from common.checkpoint import Checkpoint
    from services.memd.store import ExpertStore

    store = ExpertStore(Checkpoint(model))
    total = sum(e.nbytes for e in store.checkpoint.tensors.values())
    assert store.total_expert_bytes >= 0.8 * total, "the test needs a checkpoint that is mostly experts"
    baseline = json.loads(subprocess.run([sys.executable, "-c", BASELINE], capture_output=True, text=True,
                                         check=True).stdout)
    with Stack(model, tmp_path / "state", expert_memory="100%") as stack:
        client = WorkerClient(stack.worker_addr)
        try:
            client.generate(list(range(1, 40)), 8)  # touch experts through the pool
        finally:
            client.close()
        grown = private_rss(stack.worker.pid) - baseline
        assert stack.memd_stats().misses > 0
    dense = total - store.total_expert_bytes
    print(f"worker private growth {grown / 2**20:.0f} MiB; dense {dense / 2**20:.0f} MiB;"
          f" experts {store.total_expert_bytes / 2**20:.0f} MiB")
    assert grown < dense + 0.25 * store.total_expert_bytes, (
        f"worker private memory grew {grown / 2**20:.0f} MiB over the baseline; dense weights are"
        f" {dense / 2**20:.0f} MiB, experts {store.total_expert_bytes / 2**20:.0f} MiB")
