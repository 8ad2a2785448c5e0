"""The worker on a GPU (marker ``cuda``; skipped without a CUDA device and cupy): memd with ``--pool-backend cuda``
and a worker with ``--device cuda`` as real processes, the experts shared by CUDA IPC. The oracle is plain
transformers on the same checkpoint on the same GPU: greedy tokens equal at 25% expert memory (experts evicted
and re-copied on every token), for two families; several requests at once do not break each other."""
import threading

import pytest

from services.selftest import cuda_missing

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(bool(cuda_missing()), reason=cuda_missing() or "CUDA")]
PROMPTS = [[1, 5, 9, 22, 7], [3] * 11, list(range(2, 60, 2))]
NEW_TOKENS = 24
GPU = dict(extra_memd=["--pool-backend", "cuda", "--host-memory", "50%"], extra_worker=["--device", "cuda"])


@pytest.fixture(scope="module")
def bf16(tmp_path_factory):
    from helpers import write_family

    root = tmp_path_factory.mktemp("cuda-worker")
    return {name: write_family(name, root / name, dtype="bfloat16") for name in ("mixtral", "qwen3_moe")}


def reference(model_dir, prompts):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to("cuda").eval()
    model.generation_config.eos_token_id = None
    outs = []
    for prompt in prompts:
        out = model.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=NEW_TOKENS, do_sample=False,
                             pad_token_id=0)
        outs.append(out[0, len(prompt):].tolist())
    del model
    torch.cuda.empty_cache()
    return outs


@pytest.mark.parametrize("family, leases", [("mixtral", "on"), ("qwen3_moe", "on"), ("mixtral", "off")])
def test_greedy_on_the_gpu_equals_transformers_at_25_percent(bf16, family, leases, state_dir):
    """Leases off: every layer releases its experts naming a "done reading" event, and memd's rewrite of those
    slots waits for it on the GPU (no host sync in the worker)."""
    from helpers import Stack

    expected = reference(bf16[family], PROMPTS)
    gpu = dict(GPU, extra_worker=[*GPU["extra_worker"], "--leases", leases])
    with Stack(bf16[family], state_dir, expert_memory="25%", **gpu) as stack:
        got = stack.generate_all(PROMPTS, NEW_TOKENS)
        stats = stack.memd_stats()
    assert got == expected, f"{family} on the GPU diverged from transformers"
    assert len(set(map(tuple, expected))) > 1
    assert stats.evictions > 0 and stats.misses > stats.num_slots, "25% memory must evict and re-copy experts"
    assert (stats.read_events > 0) == (leases == "off"), "releases name the worker's read events (leases off only)"


def test_concurrent_requests_on_the_gpu(bf16, state_dir):
    """Several requests batched in one step on the GPU: each finishes with the tokens it gets alone."""
    from common.worker_client import WorkerClient
    from helpers import Stack

    with Stack(bf16["mixtral"], state_dir, expert_memory="25%", **GPU) as stack:
        alone = stack.generate_all(PROMPTS, NEW_TOKENS)
        results = [None] * len(PROMPTS)

        def one(i):
            client = WorkerClient(stack.worker_addr)
            try:
                results[i] = client.generate(PROMPTS[i], NEW_TOKENS)[0]
            finally:
                client.close()

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
    assert all(r is not None and len(r) == NEW_TOKENS for r in results), results
    assert results == alone, "a request batched with others on the GPU gave other tokens than alone"


def test_cpu_experts_compute_host_tier_experts_on_the_cpu(bf16, state_dir):
    """memd --cpu-experts always, every expert in the host tier: each routed expert the device pool lacks and the
    host tier holds is computed on the worker's CPU (counted in memd's stats; ``auto`` would weigh it against the
    copy, which on a tiny model and a fast link the copy wins). Every request completes. The CPU rounds differently,
    and a random tiny model's greedy choice flips on tiny differences, so the tokens are not compared past the
    first (the prompt runs before the host tier holds anything: all on the GPU); the layer's numbers are checked
    against transformers by ``moeinf selftest --device cuda``."""
    from helpers import Stack

    expected = reference(bf16["mixtral"], PROMPTS)
    gpu = dict(extra_memd=["--pool-backend", "cuda", "--host-memory", "100%", "--cpu-experts", "always"],
               extra_worker=["--device", "cuda"])
    with Stack(bf16["mixtral"], state_dir, expert_memory="25%", **gpu) as stack:
        got = stack.generate_all(PROMPTS, NEW_TOKENS)
        stats = stack.memd_stats()
    assert stats.cpu_experts > 0, "every expert the device pool lacked should have gone to the CPU"
    assert [len(g) for g in got] == [NEW_TOKENS] * len(PROMPTS) and got[0][0] == expected[0][0]
