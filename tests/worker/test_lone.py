"""Attention modules that read the mask themselves (services/worker/lone.py): run per request, exact when batched.

In-process, with the model's own experts (the family matrix checks the same families through memd at 25%).
"""
import pytest
import torch
from helpers import write_family
from transformers import AutoModelForCausalLM, DynamicCache

from services.worker.lone import PerRequest, _joined, _rows, attention_modules
from services.worker.flat_step import RequestTokens, FlatStep

PROMPTS = [[1, 5, 9, 22, 7], [(5 * j) % 300 + 3 for j in range(21)]]
NEW_TOKENS = 8
INDEX_TOPK = 8  # helpers' SHRINK: below the long prompt's length, so the indexer's top-k narrows the mask


def greedy(flat: FlatStep, model, prompts) -> list[list[int]]:
    """Greedy tokens of ``prompts`` decoded together, one flat step per token."""
    caches = [DynamicCache(config=model.config) for _ in prompts]
    seqs, past = [list(p) for p in prompts], [0] * len(prompts)
    for _ in range(NEW_TOKENS):
        parts = [RequestTokens(cache, done, seq[done:]) for cache, done, seq in zip(caches, past, seqs)]
        keep = [sum(len(p.tokens) for p in parts[:i + 1]) - 1 for i in range(len(parts))]
        logits = flat.forward(parts, keep)
        for i, part in enumerate(parts):
            past[i] += len(part.tokens)
            seqs[i].append(int(logits[i].argmax()))
    return [seq[len(p):] for seq, p in zip(seqs, prompts)]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["deepseek_v32", "hy_v4"])  # hy_v4: layers that reuse an earlier top-k
def test_indexed_attention_batched_equals_generate(family, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(write_family(family, tmp_path / family))
    assert model.config.index_topk == INDEX_TOPK < len(PROMPTS[1])
    model.generation_config.eos_token_id = None
    expected = [model.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
                [0, len(p):].tolist() for p in PROMPTS]
    flat = FlatStep(model)
    assert not flat.recurrent, "indexed layers batch: their attention runs per request"
    assert greedy(flat, model, PROMPTS) == expected
    assert [greedy(flat, model, [p])[0] for p in PROMPTS] == expected


def test_only_the_attention_of_self_masking_layers_runs_alone(tmp_path):
    from helpers import family_config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(family_config("deepseek_v32"))
    kinds = model.config.layer_types
    layers = DynamicCache(config=model.config).layers
    found = attention_modules(model, kinds, layers)
    assert [type(m).__name__ for m in found] == ["DeepseekV32Attention"] * model.config.num_hidden_layers
    assert attention_modules(model, ["full_attention"] * len(kinds), [object()] * 0) == []


def test_per_token_arguments_are_split_by_request():
    hidden = torch.arange(2 * 5 * 3.0).view(1, 10, 3)[:, :5]
    assert torch.equal(_rows(hidden, 1, 2, 5, 5), hidden[:, 2:5])
    cos_sin = (torch.zeros(1, 5, 4), torch.ones(1, 5, 4))
    assert [t.shape[1] for t in _rows(cos_sin, 0, 0, 2, 5)] == [2, 2]
    assert _rows(torch.zeros(4, 5), 0, 0, 2, 5).shape == (4, 5)  # not [1, tokens, ...]: whole
    assert _rows(PerRequest(["a", "b"]), 1, 2, 5, 5) == "b"
    named = _rows({"main": cos_sin, "compress": cos_sin[0]}, 1, 2, 5, 5)  # (DeepSeek-V4's position embeddings)
    assert [t.shape[1] for t in named["main"]] == [3, 3] and named["compress"].shape[1] == 3


def test_outputs_join_rows_and_keep_per_request_extras():
    outs = [(torch.zeros(1, 2, 3), None, torch.zeros(1, 2, 8)), (torch.ones(1, 3, 3), None, torch.ones(1, 3, 5))]
    joined, weights, topk = _joined(outs)
    assert joined.shape == (1, 5, 3) and weights is None
    assert isinstance(topk, PerRequest) and [t.shape[-1] for t in topk] == [8, 5]
