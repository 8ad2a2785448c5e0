"""The RMSNorms in one kernel call each (``rms_norm.py``): bit for bit every family's own norm forward (the
decoders', Qwen3's per-head q/k norms, Gemma's ``1 + weight`` style), one to many rows, tiny and large magnitudes,
one and two threads; the lane count found from torch's own mean (a wrong one gives other means, which the check
sees); a module that only calls itself an RMSNorm left as it is; prompts' rows left to torch. The end-to-end oracle
(a worker's greedy tokens against transformers' with the kernels on) is tests/worker/test_exactness.py."""
import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from helpers import FAMILIES, family_config
from services.worker import dequant_kernel as dk
from services.worker import matvec_checks, rms_norm

pytestmark = pytest.mark.skipif(dk.compiler() is None, reason="no C compiler")


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    return dk.load("c", tmp_path_factory.mktemp("state"), 1, check=matvec_checks.check)


@pytest.fixture
def kernel(library):
    return rms_norm.NormKernel(library)


def norms_of(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if rms_norm.candidate(m) is not None]


def random_rows(rows: int, width: int, scale: float, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(1, rows, width, generator=gen) * scale).bfloat16()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_familys_norms_equal_their_own_forward(family, kernel):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(family_config(family)).to(torch.bfloat16)
    norms = norms_of(model)
    assert norms, f"{family}: no RMSNorm found"
    for module in norms:
        with torch.no_grad():
            module.weight.normal_(1.0, 0.3)
        weight, eps = rms_norm.candidate(module)
        verdict = kernel.verdict(module, weight, eps)
        assert verdict is not None, f"{family}: {type(module).__name__} not taken"
        for rows, scale in ((1, 1.0), (5, 40.0), (2, 1e-3), (64, 3.0)):
            x = random_rows(rows, weight.shape[0], scale, seed=rows)
            got = kernel.run(x, weight, eps, *verdict)
            want = module.forward(x)
            assert torch.equal(got.view(torch.int16), want.view(torch.int16)), (family, type(module).__name__, rows)


def test_gemma_style_is_found(kernel):
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    module = Gemma3RMSNorm(256, eps=1e-6).to(torch.bfloat16)
    with torch.no_grad():
        module.weight.normal_(0.0, 0.3)
    lanes, style = kernel.verdict(module, module.weight, 1e-6)
    assert style == 1
    x = random_rows(3, 256, 2.0)
    assert torch.equal(kernel.run(x, module.weight, 1e-6, lanes, style).view(torch.int16),
                       module(x).view(torch.int16))


@pytest.mark.parametrize("width", [16, 24, 128, 1000, 2048, 2880])
def test_the_lane_count_gives_torchs_means_and_the_other_does_not(kernel, width):
    lanes = kernel.sum_lanes(width)
    assert lanes in rms_norm.LANES
    rows = (torch.randn(32, width, generator=torch.Generator().manual_seed(width))
            * torch.logspace(-3, 3, 32)[:, None]).bfloat16()
    want = rows.float().pow(2).mean(-1).tolist()
    means = {n: [kernel.mean(row.data_ptr(), width, n) for row in rows] for n in rms_norm.LANES}
    assert all(rms_norm._same_float(a, b) for a, b in zip(means[lanes], want))
    other = next(n for n in rms_norm.LANES if n != lanes)
    assert not all(rms_norm._same_float(a, b) for a, b in zip(means[other], want)), "the check could not tell"


class NotQuiteRMSNorm(nn.Module):
    """Calls itself an RMSNorm, but subtracts the mean first (a LayerNorm without bias)."""

    def __init__(self, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width, dtype=torch.bfloat16))
        self.variance_epsilon = 1e-5

    def forward(self, x):
        h = x.float() - x.float().mean(-1, keepdim=True)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(x.dtype)


def test_a_norm_that_computes_something_else_keeps_its_forward(kernel, library):
    module = NotQuiteRMSNorm(64)
    assert kernel.verdict(module, module.weight, 1e-5) is None
    assert rms_norm.wrap_norms(nn.Sequential(module), library) == 0
    assert "forward" not in vars(module)


@pytest.mark.parametrize("threads", [1, 2])
def test_wrapped_model_norms_equal_and_prompts_use_torch(library, threads, monkeypatch):
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(family_config("mixtral")).to(torch.bfloat16)
        module = norms_of(model)[0]
        with torch.no_grad():
            module.weight.normal_(1.0, 0.3)
        x = random_rows(3, module.weight.shape[0], 5.0)
        want = module(x)
        assert rms_norm.wrap_norms(model, library) == len(norms_of(model))
        calls = []
        run = rms_norm.NormKernel.run
        monkeypatch.setattr(rms_norm.NormKernel, "run", lambda self, *a: calls.append(a) or run(self, *a))
        assert torch.equal(module(x).view(torch.int16), want.view(torch.int16))
        assert len(calls) == 1  # (through the kernel)
        prompt = random_rows(rms_norm.MAX_ROWS + 1, module.weight.shape[0], 1.0)
        module(prompt)
        assert len(calls) == 1  # a prompt's rows: the module's own forward
        monkeypatch.setattr(rms_norm.NormKernel, "run", lambda self, *a: None)  # a call the kernel declines
        assert torch.equal(module(x).view(torch.int16), want.view(torch.int16))
    finally:
        torch.set_num_threads(1)
