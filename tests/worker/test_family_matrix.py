"""The family matrix: every model type of the installed transformers whose experts use the ExpertsInterface.

Each family gets a tiny random checkpoint from its config class (tests/helpers.py ``family_config``), written in
several shards, and greedy tokens through real memd + worker processes at 25% expert memory must equal
transformers' ``generate``: each prompt alone, then two requests batched together. A family listed in
``common.families.UNSUPPORTED`` must instead be refused at start-up with its reason.

CI runs a few special families here (recurrent layers, MoE every k-th layer, expert biases) and the refused ones;
the known families are in tests/worker/test_exactness.py (same oracle, same 25%: Mixtral, Qwen2-MoE, DeepSeek-V3
and GPT-OSS in CI; OLMoE and Qwen3-MoE, which route as Mixtral does, under ``-m slow``), and run here too under
``-m slow`` with the rest. With ``MOEINF_FAMILY_RESULTS=<file>`` each outcome is recorded there, and
``moeinf families --markdown --results <file>`` turns the full run into docs/families.md.
"""
import json
import os
import uuid

import pytest
import torch
from helpers import FAMILIES, Stack, write_family
from test_batching import Mux, max_streaming

from common.checkpoint import Checkpoint, CheckpointError
from common.families import UNSUPPORTED, experts_families
from common.worker_client import WorkerClient

PROMPTS = [[1, 5, 9, 22, 7], [(5 * j) % 300 + 3 for j in range(21)]]
NEW_TOKENS = 12
# hybrid recurrent, every k-th layer, expert bias, indexed sparse attention, experts stored in interleaved pairs
CI_EXTRA = {"jamba", "qwen3_next", "granitemoe", "lfm2_moe", "deepseek_v32", "inkling2_text"}


def _param(family: str):
    fast = family in CI_EXTRA or family in UNSUPPORTED  # the known families: tests/worker/test_exactness.py
    return pytest.param(family, marks=() if fast else pytest.mark.slow, id=family)


def record(family: str, status: str, reason: str = "") -> None:
    path = os.environ.get("MOEINF_FAMILY_RESULTS")
    if not path:
        return
    results = json.loads(open(path).read()) if os.path.exists(path) else {}
    results[family] = {"status": status, "reason": reason}
    with open(path, "w") as f:
        json.dump(dict(sorted(results.items())), f, indent=1)


def reference(model_dir, prompts):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.generation_config.eos_token_id = None
    return [model.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
            [0, len(p):].tolist() for p in prompts]


def batched(addr: str, prompts) -> list[list[int]]:
    mux = Mux(addr)
    try:
        requests = [mux.submit(uuid.uuid4().hex, p, NEW_TOKENS) for p in prompts]
        mux.run(set(requests))
        assert max_streaming(mux) == len(prompts), "the requests did not run together"
        return [mux.tokens(r)[0] for r in requests]
    finally:
        mux.close()


def test_enumeration_finds_the_known_families():
    found = experts_families()
    assert set(FAMILIES) <= set(found), set(FAMILIES) - set(found)
    assert all(cls.endswith("ForCausalLM") for cls in found.values()), found  # the decoder-only LM heads


@pytest.mark.parametrize("family", [_param(f) for f in experts_families()])
def test_family_greedy_equals_transformers(family, tmp_path):
    try:
        status = check_family(family, tmp_path)
    except BaseException as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [""]
        reason = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"
        record(family, "fail", f"{type(exc).__name__}: {reason[:300]}")
        raise
    record(family, status, UNSUPPORTED.get(family, ""))


def check_family(family: str, tmp_path) -> str:
    model_dir = write_family(family, tmp_path / family, shard=True)
    if family in UNSUPPORTED:
        with pytest.raises(CheckpointError, match="not supported by moeinf yet"):
            Checkpoint(model_dir).load_config()
        return "refused"
    assert len(list(model_dir.glob("*.safetensors"))) > 1, "the matrix checkpoints are sharded"
    expected = reference(model_dir, PROMPTS)
    assert len(set(map(tuple, expected))) > 1, "degenerate oracle: both prompts gave the same output"
    with Stack(model_dir, tmp_path / "state", expert_memory="25%") as stack:
        client = WorkerClient(stack.worker_addr)
        try:
            alone = [client.generate(p, NEW_TOKENS)[0] for p in PROMPTS]
        finally:
            client.close()
        together = batched(stack.worker_addr, PROMPTS)
        stats = stack.memd_stats()
    assert alone == expected, f"{family}: alone diverged from transformers"
    assert together == expected, f"{family}: batched diverged from transformers"
    assert stats.evictions > 0, "25% expert memory must evict experts"
    return "pass"
