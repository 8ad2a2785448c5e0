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
