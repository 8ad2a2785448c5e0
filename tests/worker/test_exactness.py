"""The oracle: greedy generation through real memd + worker processes, with the expert pool at 25% of all
expert bytes (so experts are evicted and re-read on every token), equals plain transformers' generate."""
import pytest
import torch
from helpers import FAMILIES, Stack

from common.worker_client import WorkerClient

PROMPTS = [[1, 5, 9, 22, 7], [3] * 11, list(range(2, 60, 2))]
NEW_TOKENS = 24


def reference(model_dir, prompts):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.generation_config.eos_token_id = None  # compare fixed-length outputs; stop ids are tested elsewhere
    outs = []
    for prompt in prompts:
        out = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
        outs.append(out[0, len(prompt):].tolist())
    return outs


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_equals_transformers_at_25_percent(family, checkpoints, state_dir):
    expected = reference(checkpoints[family], PROMPTS)
    with Stack(checkpoints[family], state_dir, expert_memory="25%") as stack:
        client = WorkerClient(stack.worker_addr)
        try:
            got = [client.generate(p, NEW_TOKENS)[0] for p in PROMPTS]
        finally:
            client.close()
        stats = stack.memd_stats()
    for prompt, exp, out in zip(PROMPTS, expected, got):
        assert out == exp, f"{family}: prompt {prompt[:6]}... diverged"
    assert len(set(map(tuple, expected))) > 1, "degenerate oracle: all prompts gave the same output"
    assert stats.evictions > 0 and stats.misses > stats.num_slots, "25% memory must evict and reload experts"
    assert stats.bytes_read >= stats.misses * 1  # every miss was read from the checkpoint
