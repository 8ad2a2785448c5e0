"""A lone decode token's experts in one kernel call (``moe_token.py``): bit for bit the experts forward it replaces
(``matvec.forward``, itself checked against transformers in test_matvec and test_matvec_exact) for every family
whose experts take it, with float32 and bfloat16 routing weights, 2 to 4 experts, strided slot rows and several
threads; declined where the experts are not ones it computes; turned off, with a log line, when a layer's first token
computed both ways differs; and a worker decoding through it gives transformers' greedy tokens."""
import contextlib
import itertools
import logging

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.integrations.moe import _default_apply_gate

from helpers import FAMILIES, family_config, write_family
from services.worker import dequant_kernel as dk
from services.worker import matvec, matvec_checks, moe_token

pytestmark = pytest.mark.skipif(dk.compiler() is None, reason="no C compiler")


def wide_experts_module(family: str):
    """A family's experts module with experts 512 wide and 256 deep (widths the call takes; oneDNN's order is
    found for them), random weights."""
    torch.manual_seed(0)
    config = family_config(family, hidden_size=512, intermediate_size=256, moe_intermediate_size=256,
                           num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    module = next(mod for mod in model.modules() if isinstance(getattr(mod, "down_proj", None), torch.nn.Parameter))
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.5)
    return module


@pytest.fixture(scope="module")
def state(kernel_cache):
    return kernel_cache  # (the library compiled once for the session)


def matvecs(tmp_path, threads: int) -> list[matvec.Matvec]:
    """The fast kernel and, where its check holds here, the exact one (ATen's or oneDNN's order)."""
    out = []
    fast = dk.load("c", tmp_path, threads, check=matvec_checks.check)
    if fast.matvec_fast:
        out.append(matvec.Matvec(fast))
    try:
        out.append(matvec.Matvec(dk.load("c", tmp_path, threads, check=matvec_checks.check_exact), exact=True))
    except dk.KernelError:
        pass
    if not out:
        pytest.skip("no matrix-vector kernel on this CPU")
    return out


def slot_params(module, pad: int = 0) -> dict[str, torch.Tensor]:
    """The module's experts as a pool's ``[slots, ...]`` views (``pad`` elements between rows, as spread slots)."""
    params = {}
    for name in ("gate_up_proj", "down_proj"):
        p = getattr(module, name).detach()
        storage = torch.zeros(*p.shape[:-1], p.shape[-1] + pad, dtype=p.dtype)
        storage[..., :p.shape[-1]] = p
        params[name] = storage[..., :p.shape[-1]]
    return params


def token(module, mv, pad: int = 0):
    params = slot_params(module, pad)
    return moe_token.TokenExperts.of(moe_token.TokenPath(mv), 0, module, params), params


def in_parts(tok, hidden, slots: list[int], weights, gen) -> torch.Tensor:
    """The token's layer output through ``Staged``: its experts in two groups, the later top-k positions first
    (the resident experts computed while memd loads the others can be any of them)."""
    tok.checked = True  # (the layer's first token would have been compared by forward)
    staged = tok.staged(hidden, len(slots), weights)
    assert staged is not None
    order = torch.randperm(len(slots), generator=gen).tolist()
    cut = 1 + int(torch.randint(len(slots) - 1, (1,), generator=gen))
    for group in (sorted(order[:cut], reverse=True), order[cut:]):
        with pytest.raises(RuntimeError, match="before every expert"):
            staged.out()
        with torch.inference_mode():
            assert staged.experts(group, [slots[i] for i in group])
    return staged.out()


def takes(module) -> bool:
    return getattr(type(module), "_apply_gate", None) is _default_apply_gate and not module.has_bias \
        and not module.is_transposed and not module.has_post_expert_norm


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_one_call_gives_the_experts_forwards_bits(family, state, threads):
    """Where the family's experts are ones it computes; the others (a gate of their own, biases, [in, out]
    weights) are declined."""
    module = wide_experts_module(family)
    gen = torch.Generator().manual_seed(threads)
    torch.set_num_threads(threads)  # (oneDNN's blocks are found per thread count)
    try:
        for mv in matvecs(state, threads):
            tok, params = token(module, mv, pad=32)
            if not takes(module) or (threads > 1 and not mv.kernels.openmp):
                assert tok is None, family  # (without OpenMP on torch's runtime, Python's threads split each call)
                continue
            assert tok is not None, (family, mv.exact)
            # (a fused multiply-add in the weighting changes ~1 output in 2000: many tokens to catch one)
            for k, dtype in [(2, torch.float32)] * 24 + [(4, torch.bfloat16)] * 4 + [(3, torch.float32)] * 4:
                hidden = torch.randn(1, params["down_proj"].shape[1], generator=gen).to(torch.bfloat16)
                index = torch.randperm(module.num_experts, generator=gen)[:k].unsqueeze(0)
                weights = torch.rand(1, k, generator=gen).softmax(-1).to(dtype)
                with torch.inference_mode():
                    want = matvec.forward(module, hidden, index, weights, mv)
                    got = tok._call(hidden, index[0].tolist(), weights)
                assert got is not None and got.dtype == want.dtype and got.shape == want.shape
                assert torch.equal(got.view(torch.int16), want.view(torch.int16)), (family, k, dtype, mv.exact)
                staged = in_parts(tok, hidden, index[0].tolist(), weights, gen)
                assert torch.equal(staged.view(torch.int16), want.view(torch.int16)), (family, k, dtype, mv.exact)
            for dtype, bad in itertools.product((torch.float32, torch.bfloat16), ("inf", "nan")):  # the same bits too
                hidden = torch.randn(1, params["down_proj"].shape[1], generator=gen).to(torch.bfloat16)
                hidden[0, 1] = float(bad)
                weights = torch.tensor([[0.25, 0.75]], dtype=dtype)
                with torch.inference_mode():
                    want = matvec.forward(module, hidden, torch.tensor([[2, 5]]), weights, mv)
                    got = tok._call(hidden, [2, 5], weights)
                assert torch.equal(got.view(torch.int16), want.view(torch.int16)), (family, dtype, mv.exact)
                staged = in_parts(tok, hidden, [2, 5], weights, gen)
                assert torch.equal(staged.view(torch.int16), want.view(torch.int16)), (family, dtype, mv.exact)
    finally:
        torch.set_num_threads(1)


def test_other_widths_and_activations_are_declined(state, monkeypatch):
    mv = matvecs(state, 1)[0]
    path = moe_token.TokenPath(mv)
    module = wide_experts_module("mixtral")
    params = slot_params(module)
    narrow = {n: p[..., :p.shape[-1] - 8] if n == "gate_up_proj" else p[:, :-8] for n, p in params.items()}
    assert moe_token.TokenExperts.of(path, 0, module, narrow) is None  # a width torch's vectors leave a tail of
    assert moe_token.TokenExperts.of(path, 0, module, {n: p.float() for n, p in params.items()}) is None
    assert path.table(lambda x: x.softmax(-1)) is None  # not one value at a time
    assert path.table(lambda x: x.flip(0)) is None
    assert path.table(lambda x: x.reshape(-1, 1)) is None  # not the input's shape
    assert path.table(lambda x: x.float()) is None  # nor its dtype
    assert path.table(lambda x: x.view(4, -1) * torch.ones(5, 1)) is None  # one that raises
    monkeypatch.setattr(moe_token, "MAX_INTER", 128)  # wider than ATen's grain: cut among threads off the vectors
    assert moe_token.TokenExperts.of(path, 0, module, params) is None
    monkeypatch.undo()
    other = wide_experts_module("mixtral")
    module._apply_gate = other._apply_gate  # the default gate, but another module's (or any override of its own)
    assert moe_token.TokenExperts.of(path, 0, module, params) is None
    assert path.table(torch.nn.SiLU()) is path.table(torch.nn.SiLU())  # one table per distinct function


def test_a_token_that_differs_turns_the_path_off(state, caplog):
    mv = matvecs(state, 1)[0]
    module = wide_experts_module("mixtral")
    tok, params = token(module, mv)
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(1, params["down_proj"].shape[1], generator=gen).to(torch.bfloat16)
    index, weights = torch.tensor([[1, 6]]), torch.tensor([[0.7, 0.3]])
    reference = lambda: matvec.forward(module, hidden, index, weights, mv)  # noqa: E731
    with torch.inference_mode():
        want = reference()
        tok.table = tok.table.clone()
        tok.table.add_(1)  # every activation one bit off
        with caplog.at_level(logging.WARNING, logger="moeinf.worker"):
            got = tok.forward(hidden, [1, 6], weights, reference)
    assert torch.equal(got, want)  # the first token is the reference's
    assert tok.path.off and "differed" in caplog.text
    assert tok.forward(hidden, [1, 6], weights, reference) is None  # off for every layer: the caller computes


def test_tokens_it_does_not_take_are_left_to_the_forward(state):
    """More experts than torch sums in order, or expert parallelism switched on after the layer was bound."""
    module = wide_experts_module("mixtral")
    tok, params = token(module, matvecs(state, 1)[0])
    hidden = torch.zeros(1, params["down_proj"].shape[1], dtype=torch.bfloat16)
    never = lambda: pytest.fail("the reference runs only on a token the call computed")  # noqa: E731
    slots = list(range(moe_token.MAX_EXPERTS + 1))
    assert tok.forward(hidden, slots, torch.full((1, len(slots)), 1 / len(slots)), never) is None
    module._is_expert_parallel = True  # (set after the layer was bound: checked at each call)
    assert tok.forward(hidden, [0, 1], torch.full((1, 2), 0.5), never) is None


def test_a_worker_decodes_transformers_tokens_through_it(tmp_path):
    from services.bench.overhead import MoeinfSystem, make_prompt
    from services.bench.profile import Decoder, experts_of

    model_dir = write_family("mixtral", tmp_path / "wide", dtype="bfloat16", hidden_size=512, intermediate_size=256,
                             num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=128)
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    prompt = make_prompt(reference.config.vocab_size, 7)
    want = reference.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, pad_token_id=0)[0, 7:]
    with contextlib.ExitStack() as stack:
        system = MoeinfSystem(model_dir, "25%", 1, stack)
        modules = experts_of(system.engine.model)
        if modules[0]._moeinf.matvec is None:
            pytest.skip("no matrix-vector kernel here (the worker multiplies with torch)")
        tokens = [m._moeinf.token for m in modules]
        assert all(t is not None for t in tokens)  # every layer takes the call
        decoder = Decoder(system, modules, batched=True).start(prompt, 11, "r")
        while not decoder.done:
            decoder.step()
        assert decoder.seq.generated == want.tolist()
        # some layers computed their resident experts while memd still loaded others (--early-experts)
        assert system.client.partial_layers > 0
    assert all(t.checked for t in tokens) and not tokens[0].path.off  # every layer checked once, then trusted
