"""``--device``: the knob's parsing, a GPU asked for on a host without one, and moving a loaded model's dense
weights (ties kept, experts left on meta). The GPU itself runs in ``test_cuda_worker.py`` (marker ``cuda``)."""
import pytest
import torch

from common.config import WorkerConfig
from services.worker import device


def test_knob_accepts_cpu_and_cuda_and_refuses_the_rest(tmp_path):
    for ok in ("cpu", "cuda", "cuda:1"):
        assert WorkerConfig(model=tmp_path, device=ok).device == ok
    with pytest.raises(ValueError, match="--device must be cpu, cuda or cuda:N"):
        WorkerConfig(model=tmp_path, device="gpu0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the host without a GPU")
def test_cuda_without_a_gpu_says_what_to_do():
    with pytest.raises(RuntimeError, match="torch sees no CUDA device.*--device cpu"):
        device.resolve("cuda")
    assert device.resolve("cpu") == torch.device("cpu") and device.hello_name(torch.device("cpu")) == "cpu"


def test_place_moves_dense_weights_keeps_ties_and_leaves_experts(mixtral):
    from common.checkpoint import Checkpoint
    from services.worker import experts
    from services.worker.loader import load_model

    experts.register()
    model, layers = load_model(Checkpoint(mixtral), experts.IMPLEMENTATION)
    model.lm_head.weight = model.model.embed_tokens.weight  # tied, as in checkpoints that tie them
    dense = {n: p.clone() for n, p in model.named_parameters() if not p.is_meta}
    assert device.place(model, torch.device("cpu")) == 0  # nothing to do on the host
    moved = device.place(model, torch.device("meta"))  # a device other than the host's, which every build has
    assert moved == sum(p.numel() * p.element_size() for p in dense.values())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert all(p.is_meta for p in model.parameters())
    assert all(b.is_meta for b in model.buffers())
    expert_params = [p for layer in layers for p in model.get_submodule(layer.module).parameters(recurse=False)]
    assert expert_params and all(p.is_meta for p in expert_params)


def test_encoder_decoder_families_stay_on_the_cpu(tmp_path):
    from types import SimpleNamespace

    model = SimpleNamespace(config=SimpleNamespace(model_type="switch_transformers", is_encoder_decoder=True))
    device.check_family(model, [], torch.device("cpu"))
    with pytest.raises(RuntimeError, match="switch_transformers.*--device cpu"):
        device.check_family(model, [], torch.device("cuda"))
