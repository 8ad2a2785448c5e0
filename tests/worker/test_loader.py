"""The worker's dense loader (services/worker/loader.py): every dense tensor equals ``from_pretrained``'s, including
tensors transformers converts at load, and experts stay on meta."""
import pytest
import torch
from helpers import write_family
from transformers import AutoModelForCausalLM

from common.checkpoint import Checkpoint, find_moe_layers
from services.worker.loader import build_skeleton, check_materialised, load_dense


# bailing_hybrid: q/k/v conv kernels concatenated into one; lara_mini: a fused in_proj split in four;
# deepseek_v4: a rename (".norm." -> ".kv_norm.") too broad for model.norm, which keeps its own name
@pytest.mark.parametrize("family", ["bailing_hybrid", "lara_mini", "deepseek_v4"])
def test_dense_tensors_equal_from_pretrained(family, tmp_path):
    model_dir = write_family(family, tmp_path / family, shard=True)
    expected = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    checkpoint = Checkpoint(model_dir)
    model = build_skeleton(checkpoint.load_config(), "eager")
    experts = {layer.module for layer in find_moe_layers(model)}
    assert load_dense(model, checkpoint, experts) > 0
    check_materialised(model, experts)
    dense = {n: p for n, p in model.state_dict().items() if p.device.type != "meta"}
    assert set(expected) - set(dense) == {n for n in expected if n.rpartition(".")[0] in experts}
    assert [n for n, p in dense.items() if not torch.equal(p, expected[n])] == []


def test_fp8_dense_weights_are_dequantized_in_the_configs_blocks():
    """As transformers' ``Fp8Dequantize`` where the scale grid divides the weight (the same bits), and right where
    a ragged last block makes the grid round up (DeepSeek's 576-row projection in 128-row blocks): transformers
    derives the block from the grid there and refuses, or (192 rows, a 2-row grid) takes 96-row blocks."""
    from types import SimpleNamespace

    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    from common.checkpoint import CheckpointError
    from services.worker.loader import _dequantize_fp8

    model = SimpleNamespace(get_submodule=lambda name: SimpleNamespace(weight=torch.empty(0, dtype=torch.bfloat16)))
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(256, 384, generator=gen).to(torch.float8_e4m3fn)
    scales = torch.rand(2, 3, generator=gen) + 0.5
    ours = _dequantize_fp8(model, "x.weight", weight, scales, (128, 128), "x.weight")
    assert torch.equal(ours, Fp8Dequantize(None)._dequantize_one(weight, scales, output_dtype=torch.bfloat16))
    ragged = torch.ones(192, 128).to(torch.float8_e4m3fn)
    out = _dequantize_fp8(model, "x.weight", ragged, torch.tensor([[1.0], [2.0]]), (128, 128), "x.weight")
    assert out[100, 0] == 1.0 and out[150, 0] == 2.0  # rows 0-127 in the first block, 128-191 in the second
    with pytest.raises(CheckpointError, match="scales of shape \\[2, 1\\] expected"):
        _dequantize_fp8(model, "x.weight", ragged, torch.ones(3, 1), (128, 128), "x.weight")


def test_an_fp8_dense_weight_without_its_scales_is_refused(tmp_path):
    """Its values alone are not the weight: loading them cast as they are would be silently wrong."""
    from quant_helpers import write_quantized
    from safetensors.torch import load_file, save_file

    from common.checkpoint import CheckpointError

    path = write_quantized("qwen3_moe-fp8", tmp_path / "q")
    dropped = None
    for file in sorted(path.glob("*.safetensors")):
        tensors = load_file(file)
        keys = [k for k in tensors if k.endswith("self_attn.q_proj.weight_scale_inv")]
        if keys and dropped is None:
            dropped = keys[0]
            del tensors[dropped]
            save_file(tensors, file, metadata={"format": "pt"})
    index = path / "model.safetensors.index.json"
    if index.exists():
        import json

        doc = json.loads(index.read_text())
        doc["weight_map"].pop(dropped, None)
        index.write_text(json.dumps(doc))
    checkpoint = Checkpoint(path)
    model = build_skeleton(checkpoint.load_config(), "eager")
    experts = {layer.module for layer in find_moe_layers(model)}
    with pytest.raises(CheckpointError, match=f"{dropped[:-len('_scale_inv')]}: an fp8 tensor without its"):
        load_dense(model, checkpoint, experts)
