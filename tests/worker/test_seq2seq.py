"""Encoder-decoder MoE families (Switch Transformers, NLLB-MoE): experts kept one module per expert in an
``nn.ModuleDict``, served through real memd + worker processes at 25% expert memory. The oracle is transformers'
own ``generate`` on the same checkpoint: each prompt alone, then several requests in flight together, and NLLB's
target language forced as generate's ``forced_bos_token_id`` forces it."""
import uuid

import pytest
import torch
from helpers import SEQ2SEQ, Stack, write_seq2seq
from test_batching import Mux, max_streaming
from test_family_matrix import record

from common.checkpoint import Checkpoint, build_meta_model, find_moe_layers
from common.families import keyed_families
from common.checkpoint import in_experts
from common.worker_client import WorkerClient

PROMPTS = [[5, 9, 22, 7, 33], [(5 * j) % 300 + 3 for j in range(21)], [44, 3, 17]]
NEW_TOKENS = 10


def reference(model_dir, prompts, **generate):
    from transformers import AutoModelForSeq2SeqLM

    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir).eval()
    return [model.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                           **generate)[0, 1:].tolist() for p in prompts]


def together(addr: str, prompts, **params) -> list[list[int]]:
    mux = Mux(addr)
    try:
        requests = [mux.submit(uuid.uuid4().hex, p, NEW_TOKENS, **params) for p in prompts]
        mux.run(set(requests))
        assert max_streaming(mux) == len(prompts), "the requests did not run together"
        return [mux.tokens(r)[0] for r in requests]
    finally:
        mux.close()


@pytest.mark.parametrize("family", sorted(SEQ2SEQ))
def test_keyed_experts_are_found_in_encoder_and_decoder(family, tmp_path):
    model_dir = write_seq2seq(family, tmp_path / family)
    layers = find_moe_layers(build_meta_model(Checkpoint(model_dir).load_config()))
    assert [l.keyed for l in layers] == [True] * 4
    assert [l.module.split(".")[0 if family == "switch_transformers" else 1] for l in layers] == \
        ["encoder", "encoder", "decoder", "decoder"]


def test_the_keyed_families_are_the_ones_tested():
    assert set(keyed_families()) == set(SEQ2SEQ)


@pytest.mark.parametrize("family", sorted(SEQ2SEQ))
def test_seq2seq_greedy_equals_transformers(family, tmp_path):
    try:
        check_seq2seq(family, tmp_path)
    except BaseException as exc:
        record(family, "fail", f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc) else ''}")
        raise
    record(family, "pass")


def check_seq2seq(family: str, tmp_path) -> None:
    model_dir = write_seq2seq(family, tmp_path / family)
    forced = {"forced_bos_token_id": 250} if family == "nllb-moe" else {}
    expected = reference(model_dir, PROMPTS, **forced)
    assert len(set(map(tuple, expected))) == len(PROMPTS), "degenerate oracle: prompts gave the same output"
    params = {"forced_tokens": [250]} if forced else {}
    with Stack(model_dir, tmp_path / "state", expert_memory="25%") as stack:
        client = WorkerClient(stack.worker_addr)
        try:
            alone = [client.generate(p, NEW_TOKENS, **params)[0] for p in PROMPTS]
        finally:
            client.close()
        both = together(stack.worker_addr, PROMPTS, **params)
        stats = stack.memd_stats()
    assert alone == expected, f"{family}: alone diverged from transformers"
    assert both == expected, f"{family}: requests in flight together diverged from transformers"
    assert stats.evictions > 0, "25% expert memory must evict experts"


def test_expert_parameters_are_told_apart_from_their_neighbours():
    stacked, keyed = "model.layers.1.mlp.experts", "encoder.block.1.layer.1.mlp.experts"
    modules = {stacked, keyed}
    assert in_experts(f"{stacked}.gate_up_proj", modules, {keyed})
    assert not in_experts(f"{stacked}.post_norm.weight", modules, {keyed}), "a stacked module's child is dense"
    assert in_experts(f"{keyed}.expert_3.wi.weight", modules, {keyed})
    assert not in_experts("encoder.block.1.layer.1.mlp.router.classifier.weight", modules, {keyed})
