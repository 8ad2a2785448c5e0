"""services/bench/e2e_floor.py: the weights one decode token reads, counted on the checkpoint's model, equal what
transformers' own model holds (its non-expert parameters but the embedding tables' unread rows, plus top-k experts
of every MoE layer), in families with shared experts, latent attention, per-layer embeddings and tied or untied
heads; tensors the model never loads are not counted; the bandwidth is measured on the threads asked for."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from common.checkpoint import experts_per_token, is_experts_module
from services.bench import e2e_floor

from helpers import write_family, write_seq2seq


def _reference(path) -> int:
    """From transformers' loaded model: every parameter once (tied ones too), less every embedding table but the LM
    head's, plus top-k experts of each MoE layer as its parameters hold them."""
    model = AutoModelForCausalLM.from_pretrained(path)
    experts = [m for m in model.modules() if is_experts_module(m)]
    skip = {id(p) for m in experts for p in m.parameters()}
    head = model.get_output_embeddings().weight
    skip |= {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding) and m.weight is not head}
    dense = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in skip)
    per_expert = sum(p.numel() * p.element_size() for p in experts[0].parameters()) // experts[0].num_experts
    return dense + _routed_per_token(model, experts) * len(experts) * per_expert


def _routed_per_token(model, experts) -> int:
    """How many experts the model's own routers give a token (the width of what they hand the experts)."""
    widths = set()
    hooks = [m.register_forward_pre_hook(lambda _, args, kwargs: widths.add(
        (args[1] if len(args) > 1 else kwargs["top_k_index"]).shape[-1]), with_kwargs=True) for m in experts]
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))
    for hook in hooks:
        hook.remove()
    assert len(widths) == 1, widths
    return widths.pop()


@pytest.mark.parametrize("family,overrides", [("mixtral", {}), ("mixtral", {"tie_word_embeddings": True}),
                                              ("mixtral", {"num_experts_per_tok": 3}),
                                              ("deepseek_v3", {}), ("gpt_oss", {}), ("gemma4_text", {})])
def test_decode_bytes_are_what_the_model_reads_per_token(tmp_path, family, overrides):
    path = write_family(family, tmp_path / "m", dtype="bfloat16", **overrides)
    assert e2e_floor.decode_bytes(path) == _reference(path)


def test_tensors_the_model_never_loads_are_not_counted(tmp_path):
    """A multi-token-prediction layer (DeepSeek-V3's layer 61, Qwen3-Next's ``mtp.*``) ships in the checkpoint but
    is no part of the model a decode step runs."""
    path = write_family("deepseek_v3", tmp_path / "m", dtype="bfloat16")
    before = e2e_floor.decode_bytes(path)
    shard = path / "model.safetensors"
    tensors = load_file(shard)
    tensors["mtp.layers.0.proj.weight"] = torch.zeros(512, 512, dtype=torch.bfloat16)
    save_file(tensors, shard, metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 1}))
    assert e2e_floor.decode_bytes(path) == before


def test_the_floor_is_measured_on_the_threads_asked_for(tmp_path):
    path = write_family("mixtral", tmp_path / "m", dtype="bfloat16")
    before = torch.get_num_threads()
    floor = e2e_floor.measure(path, 1, 8 << 20)
    assert torch.get_num_threads() == before
    assert floor.threads == 1 and floor.gbps > 0 and floor.bytes_per_token == e2e_floor.decode_bytes(path)
    assert floor.ms == pytest.approx(floor.bytes_per_token / floor.gbps / 1e6)
    assert "MiB of weights per decode token" in floor.describe()


def test_no_floor_for_an_encoder_decoder_model(tmp_path):
    assert e2e_floor.decode_bytes(write_seq2seq("switch_transformers", tmp_path / "s")) is None


@pytest.mark.parametrize("name", ["num_experts_per_tok", "num_experts_per_token", "top_k_experts", "moe_topk", "moe_k"])
def test_the_routers_top_k_is_read_under_each_familys_name(name):
    """Gemma 4 says ``top_k_experts``, ERNIE ``moe_k``, Hunyuan ``moe_topk`` (a list per layer there): a top-k read
    as 2 would make memd's predictor and the compute floor count the wrong number of experts per token."""
    from transformers import PretrainedConfig

    assert experts_per_token(PretrainedConfig(**{name: 4})) == 4
    assert experts_per_token(PretrainedConfig(**{name: [4, 6]})) == 6
    assert experts_per_token(PretrainedConfig()) == 2
