"""The routers in one kernel call each (``router_kernel.py``): bit for bit every softmax-then-top-k family's own
router forward (Mixtral's float32 scores divided by their sum, OLMoE's and Qwen's bfloat16 ones, with and without
the division), one to ``MAX_ROWS`` rows, several magnitudes, 8 to 128 experts; the variant found per module (a
per-module attribute changes what a class computes); ties, non-finite logits, prompts' rows and other dtypes left
to the module's own forward; routers that compute something else (sigmoid scores, top-k before the softmax, score
biases) never taken. The end-to-end oracle (a worker's greedy tokens against transformers', the kernel in use) is
tests/worker/test_exactness.py's wide Mixtral."""
import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from helpers import FAMILIES, family_config
from services.worker import dequant_kernel as dk
from services.worker import matvec_checks, router_kernel
from services.worker.matvec import Matvec

pytestmark = pytest.mark.skipif(dk.compiler() is None, reason="no C compiler")
HIDDEN = 1024  # (oneDNN sums a 64-wide product in an order the exact kernel does not reproduce: no router taken)
SOFTMAX_FIRST = {"mixtral", "olmoe", "qwen2_moe", "qwen3_moe"}


@pytest.fixture(scope="module")
def kernel(kernel_cache):
    torch.set_num_threads(1)  # (the worker's --threads 1 in the tests; oneDNN splits a narrow product's sum otherwise)
    try:
        kernels = dk.load("c", kernel_cache, 1, check=matvec_checks.check_exact)
    except dk.KernelError as exc:
        pytest.skip(f"no exact matrix-vector kernel here: {exc}")
    found = router_kernel.RouterKernel(Matvec(kernels, exact=True))
    if not found.exp:
        pytest.skip("torch's library has no Sleef exp by the names its softmax calls: the routers keep their own")
    (module, *_) = routers_of("mixtral")  # the product's order is the CPU's (oneDNN's or ATen's): where the exact
    x = torch.randn(1, HIDDEN).bfloat16()  # kernel does not give F.linear's bits for a router, none is taken here
    got = found.run(module.weight, module.top_k, x, next(iter(found.exp)), True, False)
    with torch.inference_mode():
        if got is None or not torch.equal(got[0], nn.functional.linear(x, module.weight)):
            pytest.skip("the exact kernel does not give F.linear's bits for a router's product on this CPU")
    return found


def routers_of(family: str, **overrides) -> list[nn.Module]:
    torch.manual_seed(0)
    config = family_config(family, hidden_size=HIDDEN, **overrides)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    return [m for m in model.modules() if "Router" in type(m).__name__ or "Gate" in type(m).__name__]


def compare(kernel, module, verdict, rows_scales, seed: int = 0) -> tuple[int, int]:
    """(calls the kernel took, calls it declined); every taken call equal to the module's own, bit for bit."""
    gen = torch.Generator().manual_seed(seed)
    taken = declined = 0
    with torch.inference_mode():
        for rows, scale in rows_scales:
            x = (torch.randn(rows, HIDDEN, generator=gen) * scale).bfloat16()
            got = kernel.run(module.weight, module.top_k, x, *verdict)
            if got is None:
                declined += 1
                continue
            want = module.forward(x)
            assert router_kernel._same(got, want), (type(module).__name__, rows, scale, got, want)
            taken += 1
    return taken, declined


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_softmax_first_router_equals_its_own_forward(family, kernel):
    routers = routers_of(family)
    assert routers, f"{family}: no router found"
    taken_any = False
    for module in routers:
        verdict = kernel.verdict(module) if router_kernel.candidate(module) else None
        if family not in SOFTMAX_FIRST:
            assert verdict is None, f"{family}: {type(module).__name__} computes something else, yet was taken"
            continue
        assert verdict is not None, f"{family}: {type(module).__name__} not taken"
        taken, _ = compare(kernel, module, verdict, [(r, s) for r in (1, 2, 4, 16) for s in (0.5, 1.0, 4.0)])
        taken_any = taken_any or taken > 0
    assert taken_any or family not in SOFTMAX_FIRST


@pytest.mark.parametrize("overrides, expect", [
    (dict(num_experts=64, num_experts_per_tok=4, norm_topk_prob=True), (True, True)),
    (dict(num_experts=128, num_experts_per_tok=8, norm_topk_prob=False), (False, True)),
    (dict(num_experts=60, num_experts_per_tok=4, norm_topk_prob=True), (True, True)),
    (dict(num_experts=64, num_experts_per_tok=6, norm_topk_prob=True), None),  # ATen sums 6 in another order
    (dict(num_experts=64, num_experts_per_tok=8, norm_topk_prob=True), None),
])
def test_the_variant_is_found_per_module_and_many_experts_match(overrides, expect, kernel):
    module = routers_of("qwen3_moe", **overrides)[0]
    verdict = kernel.verdict(module)
    if expect is None:  # (a bfloat16 output hides the sum's order on most rows: the float32 check must not)
        assert verdict is None, verdict
        return
    assert verdict is not None and verdict[1:] == expect, verdict
    taken, declined = compare(kernel, module, verdict, [(1, s) for s in (1.0, 2.0, 4.0, 8.0)] * 15, seed=3)
    assert taken >= 30, (taken, declined)  # (ties among bfloat16 logits decline the rest)


def test_the_softmax_at_another_vector_width_is_refused(kernel):
    """Only the width torch's own kernels run at is offered; were another (8 lanes on an AVX-512 CPU) tried, the
    float32 check refuses it even where bfloat16 scores would hide the difference."""
    lanes = next(iter(kernel.exp))
    other = 8 if lanes == 16 else 16
    fn = router_kernel.torch_exp().get(other)
    if fn is None or not kernel.mv.kernels.lib.moeinf_route_lanes() & other:
        pytest.skip(f"this build cannot call the {other}-lane exp")
    module = routers_of("olmoe", num_experts=64, num_experts_per_tok=8)[0]
    assert kernel.verdict(module) is not None
    wrong = router_kernel.RouterKernel(kernel.mv)
    wrong.exp = {other: fn}
    assert wrong.verdict(module) is None


def test_mixtrals_scores_stay_float32_and_are_divided_by_their_sum(kernel):
    (module, *_) = routers_of("mixtral")
    assert kernel.verdict(module)[1:] == (True, False)
    taken, _ = compare(kernel, module, kernel.verdict(module), [(1, 1.0)] * 50 + [(3, 2.0)] * 10, seed=5)
    assert taken >= 55


def test_a_tie_is_declined_and_the_wrapped_router_gives_its_own_outputs(kernel):
    (module, *_) = routers_of("mixtral")
    verdict = kernel.verdict(module)
    with torch.no_grad():
        module.weight[1] = module.weight[0]  # experts 0 and 1: equal logits whatever the input
        module.weight[2:] *= 0.01  # ... and the largest two
    own = module.forward
    x = torch.randn(1, HIDDEN).bfloat16()
    assert kernel.run(module.weight, module.top_k, x, *verdict) is None
    with torch.inference_mode():  # (router_kernel._forward: what wrap_routers installs)
        got = router_kernel._forward(module, own, kernel, *verdict, x)
        want = own(x)
    assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_non_finite_logits_prompts_and_other_dtypes_take_the_own_forward(kernel):
    (module, *_) = routers_of("mixtral")
    verdict = kernel.verdict(module)
    x = torch.randn(1, HIDDEN).bfloat16()
    x[0, 3] = float("inf")
    assert kernel.run(module.weight, module.top_k, x, *verdict) is None  # declined, not NaN scores
    calls = []
    spy = lambda *a, **k: calls.append(a) or ("own",)  # noqa: E731
    with torch.inference_mode():
        prompt = torch.randn(router_kernel.MAX_ROWS + 1, HIDDEN).bfloat16()
        router_kernel._forward(module, spy, kernel, *verdict, prompt)
        router_kernel._forward(module, spy, kernel, *verdict, torch.randn(1, HIDDEN))  # float32
        router_kernel._forward(module, spy, kernel, *verdict, torch.randn(1, 1, HIDDEN).bfloat16())  # not 2-D
        out = router_kernel._forward(module, spy, kernel, *verdict, torch.randn(2, HIDDEN).bfloat16())
    assert len(calls) == 3 and out[0].shape == (2, module.weight.shape[0])


def test_a_router_that_computes_something_else_keeps_its_own_forward(kernel):
    (module, *_) = routers_of("mixtral")

    class SigmoidTopKRouter(type(module)):
        def forward(self, hidden_states):
            logits = nn.functional.linear(hidden_states, self.weight)
            scores, index = torch.topk(logits.float().sigmoid(), self.top_k, dim=-1)
            return logits, scores, index

    module.__class__ = SigmoidTopKRouter
    assert router_kernel.candidate(module)
    assert kernel.verdict(module) is None


def test_only_the_exact_kernel_wraps_routers(kernel):
    model = AutoModelForCausalLM.from_config(family_config("mixtral", hidden_size=HIDDEN, num_hidden_layers=2))
    model = model.to(torch.bfloat16)
    fast = Matvec(kernel.mv.kernels, exact=False)
    assert router_kernel.wrap_routers(model, fast) == 0
    assert router_kernel.wrap_routers(model, kernel.mv) == 2
    routers = [m for m in model.modules() if "Router" in type(m).__name__]
    assert all("forward" in m.__dict__ for m in routers)
