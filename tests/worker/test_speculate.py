"""Hidden-state speculation on tiny random-weight models: the routers of layers l+1..l+k applied to layer l's
hidden state (one matmul) against the routing plain transformers then computes. At every distance it must beat
the history baseline (the previous token's experts at the target layer), and in every family the one-layer guess
must equal the next-gate guess (the next router's top-k on this input)."""
import pytest
import torch
from helpers import FAMILIES
from transformers import AutoModelForCausalLM

from services.worker.next_gate import find_router
from common.checkpoint import find_moe_layers
from services.worker.moe_norms import moe_input_gains, rms_gain
from services.worker.speculate import Speculator


def routed_run(checkpoint, tokens: int = 48, seed: int = 0, gains_seed: int | None = None, dtype=None,
               router_dtype=None):
    """(speculator, inputs of every MoE layer's experts [T, H], their routing [T, k]) for one random sequence;
    ``gains_seed``: the MoE blocks' input norms get random per-channel gains first, as real checkpoints have
    (random-weight models' are all 1), and the speculator is built as the worker builds it, with their gains."""
    model = AutoModelForCausalLM.from_pretrained(checkpoint, **({} if dtype is None else {"dtype": dtype})).eval()
    layers = find_moe_layers(model)
    gains = written = None
    if gains_seed is not None:
        gen = torch.Generator().manual_seed(gains_seed)
        blocks = [layer.module.rpartition(".")[0] for layer in layers]
        written = [torch.randn(model.config.hidden_size, generator=gen).mul(0.7).exp() for _ in blocks]
        with torch.no_grad():
            for block, gain in zip(blocks, written):
                model.get_submodule(block.rpartition(".")[0]).post_attention_layernorm.weight.copy_(gain)
        gains = moe_input_gains(model, blocks)
        assert gains is not None and all(torch.allclose(g.float(), w, rtol=1e-2) for g, w in zip(gains, written))
    top_k = model.config.get_text_config().num_experts_per_tok
    routers = [find_router(model.get_submodule(layer.module.rpartition(".")[0]), layer.num_experts, top_k,
                           router_dtype or dtype) for layer in layers]
    seen = {}

    def hook(index):
        def grab(module, args):
            seen[index] = (args[0].detach().clone(), args[1].detach().clone())
        return grab

    handles = [model.get_submodule(layer.module).register_forward_pre_hook(hook(i)) for i, layer in enumerate(layers)]
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        model(ids)
    for handle in handles:
        handle.remove()
    spec = Speculator(routers, layers[0].num_experts, len(layers) - 1, gains=gains)
    spec.written_gains = written  # (for the tests: the gains the norms were given)
    return spec, routers, [seen[i] for i in range(len(layers))]


def scores(spec, runs, distance):
    """(speculation hits, history hits, routed) per-token at ``distance`` layers ahead."""
    hit = base = routed = 0
    for layer in range(len(runs) - distance):
        hidden, _ = runs[layer]
        actual = runs[layer + distance][1]
        for t in range(1, hidden.shape[0]):
            targets, experts, _ = spec.guess(layer, hidden[t:t + 1], distance)
            guess = {e for g, e in zip(targets, experts) if g == layer + distance}
            want = set(actual[t].tolist())
            hit += len(guess & want)
            base += len(set(actual[t - 1].tolist()) & want)
            routed += len(want)
    return hit, base, routed


@pytest.mark.parametrize("seed", [0, 1])
def test_speculation_beats_history_at_every_distance(mixtral, seed):
    spec, _, runs = routed_run(mixtral, seed=seed)
    for distance in range(1, len(runs)):
        hit, base, routed = scores(spec, runs, distance)
        assert hit > base, (distance, hit, base, routed)  # precision = recall here: k guesses for k routed


@pytest.mark.parametrize("family", list(FAMILIES))
def test_one_layer_ahead_equals_the_next_gate_guess(family, checkpoints):
    spec, routers, runs = routed_run(checkpoints[family], tokens=12)
    for layer in range(len(runs) - 1):
        hidden = runs[layer][0]
        targets, experts, conf = spec.guess(layer, hidden, 3)
        assert targets and all(layer < g <= layer + 3 for g in targets) and all(0 < c <= 1 for c in conf)
        one = sorted(e for g, e in zip(targets, experts) if g == layer + 1)
        assert one == routers[layer + 1].guess(hidden, spec.E)[0]
        kept = spec.guess(layer, hidden, 3, threshold=0.99)  # a high threshold keeps only confident guesses
        assert len(kept[1]) < len(experts) and all(c >= 0.99 for c in kept[2])


def test_guesses_stop_at_the_knob_and_the_last_layer(mixtral):
    spec, _, runs = routed_run(mixtral, tokens=4)
    assert spec.ahead(0, 10) == len(runs) - 1 and spec.ahead(len(runs) - 1, 3) == 0
    assert Speculator([None] * 4, 8, 3).guess(0, runs[0][0], 3) == ([], [], [])


def test_group_limited_routing_is_guessed_as_the_router_routes(checkpoints):
    """DeepSeek-V3 (8 experts in 2 groups, one kept per token): the guess of layer l+1 made from layer l+1's own
    input is that layer's routing, token for token; without the group limit it is not."""
    spec, routers, runs = routed_run(checkpoints["deepseek_v3"], tokens=24)
    assert all(r is not None and r.groups == (2, 1, "top2") for r in routers)
    differs = 0
    for layer in range(len(runs) - 1):
        hidden, actual = runs[layer + 1]
        for t in range(hidden.shape[0]):
            targets, experts, _ = spec.guess(layer, hidden[t:t + 1], 1)
            assert sorted(experts) == sorted(actual[t].tolist()), (layer, t)
        spec.groups[layer + 1] = None  # the plain top-k of the corrected scores: some tokens pick across groups
        for t in range(hidden.shape[0]):
            differs += sorted(spec.guess(layer, hidden[t:t + 1], 1)[1]) != sorted(actual[t].tolist())
    assert differs > 0, "the model's routing never crossed groups: the test proves nothing"


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "qwen3_moe"])
def test_one_token_guesses_equal_the_batched_path(family, checkpoints):
    """A lone token takes a shorter path (no scatter over tokens); a batch of that token twice takes the general
    one: the same guesses in the same order and their confidences, at every threshold (DeepSeek: sigmoid scores,
    groups)."""
    spec, _, runs = routed_run(checkpoints[family], tokens=6)
    compared = 0
    for layer in range(len(runs) - 1):
        hidden = runs[layer][0]
        for t in range(hidden.shape[0]):
            one = hidden[t:t + 1]
            for threshold in (0.0, 0.2, 0.45):
                alone = spec.guess(layer, one, 3, threshold)
                batched = spec.guess(layer, torch.cat([one, one]), 3, threshold)
                assert alone[:2] == batched[:2], (layer, t, threshold)
                # (the router matmul of two rows may round its last bit otherwise than of one)
                assert alone[2] == pytest.approx(batched[2], rel=1e-5), (layer, t, threshold)
                compared += len(alone[0])
    assert compared > 0


@pytest.fixture(scope="module")
def kernels(kernel_cache):
    from services.worker import dequant_kernel, matvec_checks
    if dequant_kernel.compiler() is None:
        pytest.skip("no C compiler: guesses keep torch's ops")
    return dequant_kernel.load("c", kernel_cache, 1, check=matvec_checks.check)


@pytest.mark.parametrize("router_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gains_seed", [None, 3])
def test_one_call_guesses_equal_torchs(kernels, mixtral, gains_seed, router_dtype):
    """guess.c (one token, one call) against the torch ops it replaces, on a bfloat16 model with and without the
    norm-gain correction, its routers copied to float32 (as the worker does on the CPU) or kept bfloat16: the same
    experts wherever the scores are not a rounding apart, the probabilities within a bfloat16 rounding, every
    threshold honoured; a batch keeps torch's ops."""
    spec, _, runs = routed_run(mixtral, tokens=24, gains_seed=gains_seed, dtype=torch.bfloat16,
                               router_dtype=router_dtype)
    assert spec.use_kernels(kernels)
    assert spec.launch(0, runs[0][0][:1], 3)[2] is None  # one token: guess.c's path (no logits from torch)
    kernel, compared, close = spec.kernel, 0, 0
    for layer in range(len(runs) - 1):
        hidden = runs[layer][0]
        for t in range(hidden.shape[0]):
            one = hidden[t:t + 1]
            for threshold in (0.0, 0.3):
                spec.kernel = kernel
                fast = spec.guess(layer, one, 3, threshold)
                assert spec.kernel is kernel  # (guess.c took it: no fallback)
                spec.kernel = None
                slow = spec.guess(layer, one, 3, threshold)
                assert all(c >= threshold for c in fast[2])
                if fast[:2] != slow[:2]:  # only where the two orders' last bits decide between near-equal scores
                    close += 1
                    assert _near_tie(spec, layer, one, fast, slow, threshold), (layer, t, threshold, fast, slow)
                    continue
                assert fast[2] == pytest.approx(slow[2], rel=2e-2, abs=1e-3), (layer, t, threshold)
                compared += len(fast[0])
    spec.kernel = kernel
    assert compared > 0 and close <= compared // 50, (compared, close)
    assert spec.launch(0, runs[0][0][:2], 2)[2] is not None  # two tokens: torch's ops


def _near_tie(spec, layer, one, fast, slow, threshold) -> bool:
    """Do the two guesses differ only in experts whose probabilities sit within a rounding of the top-k's edge or
    of the threshold (torch's probabilities, every expert, threshold 0)?"""
    spec.kernel = None
    launched = spec.launch(layer, one, 3)
    probs = launched[2].view(-1, spec.E).softmax(-1)  # [k, E]
    for target, expert in set(zip(*fast[:2])) ^ set(zip(*slow[:2])):
        row = probs[target - layer - 1]
        edge = row.topk(spec.top_k).values[-1].item()
        p = row[expert].item()
        if abs(p - edge) > 2e-2 * edge and abs(p - threshold) > 2e-2 * max(threshold, 1e-3):
            return False
    return True


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_call_guesses_with_biases_gaps_and_odd_shapes(kernels, dtype):
    """Routers with biases, layers without one, 40 experts and a hidden size of 100 (neither a multiple of the
    kernel's 16 lanes), every distance and threshold: guess.c's guesses are torch's (float32: equal; bfloat16: up to
    experts whose logits tie exactly, which guess.c gives the lower index)."""
    from types import SimpleNamespace
    gen = torch.Generator().manual_seed(5)
    L, E, H = 8, 40, 100
    routers = [None if i in (2, 5) else SimpleNamespace(
        weight=torch.randn(E, H, generator=gen).to(dtype), bias=torch.randn(E, generator=gen).to(dtype), top_k=3,
        groups=None, correction=None) for i in range(L)]
    spec = Speculator(routers, E, 4)
    assert spec.use_kernels(kernels)
    kernel, compared, tied = spec.kernel, 0, 0
    for layer in range(L - 1):
        for seed in range(6):
            one = (torch.randn(1, H, generator=gen) * (1 + seed)).bfloat16()
            for threshold in (0.0, 0.05, 0.2):
                spec.kernel = kernel
                fast = spec.guess(layer, one, 4, threshold)
                assert spec.kernel is kernel
                spec.kernel = None
                slow = spec.guess(layer, one, 4, threshold)
                assert all(t not in (2, 5) for t in fast[0]) and all(c >= threshold for c in fast[2])
                if dtype == torch.bfloat16 and fast[:2] != slow[:2]:
                    tied += 1
                    assert _exact_tie(spec, layer, one, fast, slow), (layer, seed, threshold, fast, slow)
                    continue
                assert fast[:2] == slow[:2], (layer, seed, threshold)
                assert fast[2] == pytest.approx(slow[2], rel=1e-4 if dtype == torch.float32 else 2e-2, abs=1e-9)
                compared += len(fast[0])
    assert compared > 500 and tied <= compared // 10, (compared, tied)
    spec.kernel = kernel
    one = torch.randn(1, H, generator=gen).bfloat16()
    every = spec.guess(0, one, 1, 0.0)
    assert spec.guess(0, one, 1, every[2][-1])[1][-1] == every[1][-1]  # a probability equal to the threshold reaches it
    spec.kernel = None  # a call it does not take (more guesses than its buffers hold) falls back to torch's ops
    want = spec.guess(0, one, 4, 0.0)
    spec.kernel = kernel
    assert spec.pick((0, 5, None, (one, kernel)), 0.0) == want and spec.kernel is None  # (for good)


def test_one_call_guesses_break_exact_ties_to_the_lower_expert(kernels):
    from types import SimpleNamespace
    same = SimpleNamespace(weight=torch.ones(6, 16), bias=None, top_k=2, groups=None, correction=None)
    spec = Speculator([same, same], 6, 1)
    assert spec.use_kernels(kernels)
    assert spec.guess(0, torch.randn(1, 16).bfloat16(), 1) == ([1, 1], [0, 1], [pytest.approx(1 / 6)] * 2)


def _exact_tie(spec, layer, one, fast, slow) -> bool:
    """Do the guesses differ only in experts whose torch probability equals that of the top-k's last one?"""
    spec.kernel = None
    probs = spec.launch(layer, one, 4)[2].view(-1, spec.E).softmax(-1)
    for target, expert in set(zip(*fast[:2])) ^ set(zip(*slow[:2])):
        row = probs[target - layer - 1]
        if row[expert].item() != row.topk(spec.top_k).values[-1].item():
            return False
    return True


def test_one_call_guesses_stay_off_where_torchs_ops_differ(kernels, checkpoints):
    spec, _, _ = routed_run(checkpoints["deepseek_v3"], tokens=4, dtype=torch.bfloat16)
    assert not spec.use_kernels(kernels) and spec.kernel is None  # sigmoid scores, group-limited routing
    spec, _, _ = routed_run(checkpoints["mixtral"], tokens=4, router_dtype=torch.float16)
    assert not spec.use_kernels(kernels)  # (a type guess.c does not read)


def test_within_keeps_what_memd_asked_for():
    from services.worker.speculate import within

    made = ([3, 3, 4, 6], [1, 5, 2, 0], [0.9, 0.2, 0.6, 0.8])  # guesses made at layer 2
    assert within(made, 2, 2, 0.5) == ([3, 4], [1, 2], [0.9, 0.6])
    assert within(made, 2, 4, 0.0) == made
    assert within(made, 2, 4, 0.0, wanted=False) == ([], [], [])  # memd said it has no use for guesses


def test_guesses_use_each_target_layers_own_norm_gain(mixtral):
    """With per-channel gains that differ by layer (as in real checkpoints), a guess of layer l+d made from layer
    l's input sees the residual stream under layer l+d's gain: exact when the stream did not change (layer l+1's
    own input carried back to layer l's gain, with the gains the norms were given), and more often right than the
    guess under layer l's gain, by a margin that neither half of the correction alone reaches."""
    spec, routers, runs = routed_run(mixtral, gains_seed=0)
    written = spec.written_gains
    assert all(torch.allclose(spec.unscale[i], 1.0 / w) for i, w in enumerate(written))
    plain = Speculator(routers, spec.E, spec.max_ahead)
    for layer in range(len(runs) - 1):
        hidden, actual = runs[layer + 1]
        same_stream = hidden.float() / written[layer + 1] * written[layer]  # x_{l+1} / g_{l+1} * g_l
        for t in range(hidden.shape[0]):
            experts = spec.guess(layer, same_stream[t:t + 1], 1)[1]
            assert sorted(experts) == sorted(actual[t].tolist()), (layer, t)
    assert spec.unscale is not None  # the inputs held the premise: the correction stays
    for distance, least in ((1, 0.5), (2, 0.45)):  # (0.557 and 0.484 here; plain 0.404 / 0.335, the rows'
        corrected, _, routed = scores(spec, runs, distance)  # gain alone 0.436 / 0.351, the gains twice 0.465 /
        uncorrected, _, _ = scores(plain, runs, distance)  # 0.404)
        assert corrected / routed >= least and corrected > uncorrected, (distance, corrected, uncorrected, routed)


def test_the_correction_is_dropped_where_inputs_are_not_the_norms_output(mixtral):
    """A block fed something else than its named norm's output (a post-norm layer: the raw stream) fails the rms
    check on its first input; from then on every layer guesses as without gains."""
    spec, routers, runs = routed_run(mixtral, gains_seed=0)
    plain = Speculator(routers, spec.E, spec.max_ahead)
    raw = runs[0][0] * 3.0  # not a normalised stream over layer 0's gain
    assert spec.guess(0, raw, 2) == plain.guess(0, raw, 2) and spec.unscale is None
    assert all(spec.guess(1, h[None], 2) == plain.guess(1, h[None], 2) for h in runs[1][0][:4])


def test_norm_gains_are_found_by_behaviour_or_not_at_all():
    from torch import nn
    from transformers.models.mixtral.modeling_mixtral import MixtralRMSNorm

    rms = MixtralRMSNorm(16)
    with torch.no_grad():
        rms.weight.copy_(torch.linspace(0.1, 3.0, 16))
    assert torch.allclose(rms_gain(rms, 16), rms.weight)

    class OnePlus(MixtralRMSNorm):  # Gemma's norms scale by 1 + weight
        def forward(self, x):
            return super().forward(x) * (1.0 + self.weight) / self.weight

    gemma = OnePlus(16)
    with torch.no_grad():
        gemma.weight.copy_(torch.linspace(0.1, 3.0, 16))
    assert torch.allclose(rms_gain(gemma, 16), 1.0 + gemma.weight)
    with torch.no_grad():
        gemma.weight[3] = 150.0  # one large gain: the others still tell 1 + w from w
    assert torch.allclose(rms_gain(gemma, 16), 1.0 + gemma.weight)
    assert rms_gain(nn.LayerNorm(16), 16) is None  # subtracts the mean: not a gain on the normalised stream
    assert rms_gain(nn.LayerNorm(16, bias=False), 16) is None
    assert rms_gain(rms, 32) is None
