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
    with Stack(model, tmp_path / "state", expert_memory="100%", extra_memd=["--preload", "off"]) as stack:
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


SPREAD = """
import gc, json, os, sys, torch
from common.checkpoint import Checkpoint
from services.worker import matvec
from services.worker.loader import load_model

def anon():
    with open(f"/proc/{os.getpid()}/status") as f:
        return int(dict(l.split(":", 1) for l in f)["RssAnon"].split()[0]) * 1024

model, layers = load_model(Checkpoint(sys.argv[1]), "grouped_mm")
gc.collect()
before = anon()
stand_in = type("Matvec", (), {"exact": True})()  # wrap_dense only keeps it for the forward
count = matvec.wrap_dense(model, stand_in, {1, layers[0].num_experts})
gc.collect()
spread = [p for p in model.parameters() if p.dim() == 2 and p.stride(0) != p.shape[1]]
print(json.dumps([anon() - before, len(spread), sum(p.numel() * p.element_size() for p in spread)]))
"""


def test_spreading_dense_rows_keeps_the_weights_once(tmp_path):
    """``wrap_dense`` replaces the weights whose rows it spreads (``layouts.spread_rows``): the worker's anonymous
    memory does not keep the replaced weights (freed, and the heap's free pages handed back)."""
    model = write_family("mixtral", tmp_path / "wide", dtype="bfloat16", hidden_size=1024, intermediate_size=64,
                         num_attention_heads=8, num_key_value_heads=8, num_hidden_layers=8, vocab_size=8192)
    out = subprocess.run([sys.executable, "-c", SPREAD, str(model)], capture_output=True, text=True, check=True)
    grown, spread, nbytes = json.loads(out.stdout.splitlines()[-1])
    assert spread == 8 * 4 + 1 and nbytes >= 72 * 2**20, (spread, nbytes)  # q, k, v, o of each layer; the LM head
    # measured: 18.6 MiB with the freed heap handed back, 56.1 without (glibc keeps the replaced weights' chunks)
    assert grown <= nbytes / 3, f"anonymous memory grew {grown / 2**20:.1f} MiB for {nbytes / 2**20:.0f} MiB spread"


AT_LOAD = """
import gc, json, os, sys
from common.checkpoint import Checkpoint
from services.worker.loader import load_model

model, _ = load_model(Checkpoint(sys.argv[1]), "grouped_mm", spread=sys.argv[2] == "1")
gc.collect()
spread = [p for p in model.parameters() if p.dim() == 2 and p.stride(0) != p.shape[1]]
with open(f"/proc/{os.getpid()}/status") as f:
    status = dict(l.split(":", 1) for l in f)
print(json.dumps([int(status[k].split()[0]) * 1024 for k in ("RssAnon", "VmHWM")] + [len(spread)]))
"""


def test_rows_spread_at_load_cost_their_padding_only(tmp_path):
    """The worker's loader copies a linear's weight from the checkpoint straight into spread rows (one copy, as
    any other weight gets): anonymous memory and the peak grow by the padding, not by a second copy."""
    model = write_family("mixtral", tmp_path / "wide", dtype="bfloat16", hidden_size=1024, intermediate_size=64,
                         num_attention_heads=8, num_key_value_heads=8, num_hidden_layers=8, vocab_size=8192)
    runs = {flag: json.loads(subprocess.run([sys.executable, "-c", AT_LOAD, str(model), flag], capture_output=True,
                                            text=True, check=True).stdout.splitlines()[-1]) for flag in ("0", "1")}
    (anon, peak, none), (spread_anon, spread_peak, spread) = runs["0"], runs["1"]
    assert none == 0 and spread == 8 * 4 + 1  # q, k, v, o of each layer; the LM head (the router stays packed)
    padding = (8 * 4 * 1024 + 8192) * 64
    assert spread_anon - anon <= padding + 4 * 2**20 and spread_peak - peak <= padding + 4 * 2**20, runs
