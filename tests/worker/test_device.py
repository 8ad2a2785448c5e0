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


def test_a_refused_strided_window_falls_back_to_copies_once_for_every_layer(monkeypatch, caplog):
    """``ExpertBinding.grouped``: on a GPU whose grouped matmul refuses strided views, the window is copied and the
    flag (shared through the pool views) keeps every layer copying, with one warning; a CPU tensor's error and an
    out-of-memory error go through unchanged."""
    from types import SimpleNamespace

    from services.worker import experts

    strided = torch.arange(48.0).view(4, 12)[:, ::2]  # a slot view: not contiguous

    def grouped_mm(window, hidden, index, weights, mv):
        if not window.w.is_contiguous():
            raise RuntimeError("grouped_mm: strides not supported")
        return "computed"

    monkeypatch.setattr(experts.matvec, "forward", grouped_mm)
    views = SimpleNamespace(contiguous=False)  # what PoolViews / CudaPoolViews carry

    def binding():
        b = SimpleNamespace(fallback=views, matvec=None)
        b.grouped = lambda *args: experts.ExpertBinding.grouped(b, *args)
        return b

    window = experts.SlotExperts(SimpleNamespace(), {"w": strided}, 4)
    gpu = SimpleNamespace(is_cuda=True, device="cuda:0")
    with caplog.at_level("WARNING"):
        assert binding().grouped(window, gpu, None, None) == "computed"
        assert views.contiguous
        assert binding().grouped(window, gpu, None, None) == "computed"  # another layer: copies, no new warning
    assert sum("refused the pool's strided slot views" in r.message for r in caplog.records) == 1
    with pytest.raises(RuntimeError, match="strides"):  # on the CPU nothing is retried
        cpu_views = SimpleNamespace(contiguous=False)
        b = SimpleNamespace(fallback=cpu_views, matvec=None)
        experts.ExpertBinding.grouped(b, window, torch.zeros(1), None, None)

    def out_of_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(experts.matvec, "forward", out_of_memory)
    fresh = SimpleNamespace(fallback=SimpleNamespace(contiguous=False), matvec=None)
    with pytest.raises(torch.OutOfMemoryError):
        experts.ExpertBinding.grouped(fresh, window, gpu, None, None)
    assert not fresh.fallback.contiguous
