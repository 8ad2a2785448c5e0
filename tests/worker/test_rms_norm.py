"""The RMSNorms in one kernel call each (``rms_norm.py``): bit for bit every tested family's own norm forward (the
decoders', Qwen3's per-head q/k norms, Gemma's ``1 + weight`` and GPT-OSS's float32 styles), one to many rows,
strided rows, tiny and large magnitudes, one and two threads (rows enough for torch to share them); the lane count
found from torch's own mean (a wrong one gives other means, which the check sees); the style found on a random weight
(a weight of ones hides it); each module checked on its own (a per-module attribute changes what a class computes);
gated norms, norms that compute something else, rows too wide, prompts' rows and a weight no longer bfloat16 left to
the module's own forward. The end-to-end oracle (a worker's greedy tokens against transformers' with the kernels
on) is tests/worker/test_exactness.py."""
import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from common.families import UNSUPPORTED, experts_families
from helpers import FAMILIES, family_config
from services.worker import dequant_kernel as dk
from services.worker import matvec_checks, rms_norm

pytestmark = pytest.mark.skipif(dk.compiler() is None, reason="no C compiler")


@pytest.fixture(scope="module")
def library(kernel_cache):
    kernels = dk.load("c", kernel_cache, 1, check=matvec_checks.check)
    if rms_norm.NormKernel(kernels).sum_lanes(64) is None:  # (a torch whose float sum is neither 8 nor 16 lanes)
        pytest.skip("torch's float sum runs in an order rms_norm.c does not reproduce here: the norms keep torch's")
    return kernels


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
        model = AutoModelForCausalLM.from_config(family_config("mixtral", hidden_size=1024)).to(torch.bfloat16)
        module = norms_of(model)[0]
        with torch.no_grad():
            module.weight.normal_(1.0, 0.3)
        x = random_rows(rms_norm.MAX_ROWS, 1024, 5.0)  # 65536 values, past ATen's grain: torch's threads share rows
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


def test_the_style_is_found_where_a_weight_of_ones_hides_it(kernel):
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRMSNorm

    module = GptOssRMSNorm(128, eps=1e-5).to(torch.bfloat16)  # (weight: ones, where Llama's style gives its bits)
    assert kernel.verdict(module, module.weight, 1e-5)[1] == 2
    with torch.no_grad():
        module.weight.normal_(1.0, 0.3)
    lanes, style = kernel.verdict(module, module.weight, 1e-5)
    x = random_rows(3, 128, 4.0)
    assert torch.equal(kernel.run(x, module.weight, 1e-5, lanes, style).view(torch.int16), module(x).view(torch.int16))


class GroupRMSNorm(nn.Module):
    """One class, two behaviours: normalised over the whole row, or over groups of ``group_size`` (per module)."""

    def __init__(self, width: int, group_size: int | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(width).bfloat16())
        self.variance_epsilon = 1e-6
        self.group_size = group_size

    def forward(self, hidden_states):
        h = hidden_states.float()
        if self.group_size:
            h = h.unflatten(-1, (-1, self.group_size))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.flatten(-2).to(hidden_states.dtype) if self.group_size else \
            self.weight * h.to(hidden_states.dtype)


def test_each_module_is_checked_on_its_own(library):
    plain, grouped = GroupRMSNorm(256), GroupRMSNorm(256, group_size=64)
    model = nn.Sequential(plain, grouped)
    assert rms_norm.wrap_norms(model, library) == 1
    assert "forward" in vars(plain) and "forward" not in vars(grouped)
    x = random_rows(2, 256, 3.0)
    assert torch.equal(grouped(x).view(torch.int16), GroupRMSNorm.forward(grouped, x).view(torch.int16))


class GatedRMSNorm(nn.Module):
    """A Mamba-style gated norm: ``forward(hidden_states, gate=None)``; without a gate, a plain RMSNorm."""

    def __init__(self, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width).bfloat16())
        self.variance_epsilon = 1e-6

    def forward(self, hidden_states, gate=None):
        h = hidden_states.float()
        if gate is not None:
            h = h * torch.nn.functional.silu(gate.float())
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(hidden_states.dtype)


def test_a_gated_norm_keeps_its_forward(library):
    module = GatedRMSNorm(128)
    assert rms_norm.candidate(module) is None
    assert rms_norm.wrap_norms(nn.Sequential(module), library) == 0
    x, gate = random_rows(2, 128, 1.0), random_rows(2, 128, 1.0, seed=5)
    assert torch.equal(module(x, gate), GatedRMSNorm.forward(module, x, gate))


def test_strided_rows_too_wide_rows_and_a_changed_weight(kernel, library):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(family_config("mixtral")).to(torch.bfloat16)
    module = norms_of(model)[0]
    with torch.no_grad():
        module.weight.normal_(1.0, 0.3)
    width = module.weight.shape[0]
    want_of = type(module).forward
    assert rms_norm.wrap_norms(model, library) > 0
    wide = random_rows(4, width + 24, 2.0)
    x = wide[..., :width]  # (rows width + 24 apart: a split's view)
    assert torch.equal(module(x).view(torch.int16), want_of(module, x).view(torch.int16))
    assert kernel.verdict(module, torch.ones(rms_norm.MAX_WIDTH, dtype=torch.bfloat16), 1e-5) is None
    module.weight.data = module.weight.data.float()  # no longer what the kernel reads: the module's own forward
    x = random_rows(2, width, 2.0)
    assert torch.equal(module(x), want_of(module, x))


@pytest.mark.slow
@pytest.mark.parametrize("family", [f for f in experts_families() if f not in UNSUPPORTED])
def test_every_served_familys_logits_are_unchanged(family, library):
    """Every family memd and the worker serve (docs/families.md), tiny, its norms' weights random: the model's
    logits with its norms wrapped equal its own, in every bit (gated and other norms the kernel does not compute
    keep their forwards)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(family_config(family)).to(torch.bfloat16).eval()
    with torch.no_grad():
        for module in model.modules():
            if "RMSNorm" in type(module).__name__ and isinstance(getattr(module, "weight", None), torch.Tensor) \
                    and module.weight.dim() == 1:
                module.weight.normal_(0.5, 0.3)
        ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
        want = model(ids).logits
        rms_norm.wrap_norms(model, library)
        assert torch.equal(model(ids).logits, want)
