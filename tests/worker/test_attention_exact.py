"""``--attention-kernel exact`` (attention_exact.c, through services/worker/decode_attention.py): torch's sdpa bits,
bit for bit, on every shape a decode step can bring (grouped or not, head sizes that are not multiples of 4, one
token to more than one 512-token block, a cache's views, scores that overflow the exponential's range, several
threads); the steps it leaves to the model's own attention; and a model's decode steps through the worker's
flattened step giving transformers' logits exactly, the kernel having taken every layer of every decode step.
Where this machine's torch sums in another order (another CPU, MKL or torch) the check refuses the kernel and the
tests that need it skip: ``auto`` then keeps torch's attention (tested too)."""
import pytest
import torch
import torch.nn.functional as F
from decoding import flat_against_transformers, generate_greedy, run_scheduled
from hypothesis import given, settings, strategies as st
from transformers import AutoModelForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from common.config import WorkerConfig
from services.worker import decode_attention as da
from services.worker import dequant_kernel as dk
from services.worker.engine import Engine
from services.worker.flat_step import FlatStep
from services.worker.scheduler import Limits

pytestmark = pytest.mark.skipif(dk.compiler() is None, reason="no C compiler")
PLAIN = {"dropout": 0.0, "scaling": 0.125}


@pytest.fixture(scope="module")
def exact(kernel_cache):
    try:
        return da.load("exact", kernel_cache, threads=1)
    except dk.KernelError as exc:  # (this machine's torch sums in another order: auto keeps torch's attention)
        pytest.skip(f"attention_exact.c does not give this torch's bits here: {exc}")


class Grouped:
    num_key_value_groups = 4


def sdpa_and_kernel(kernels, heads, kv_heads, d, tokens, seed, scale=None, amplitude=1.0):
    gen = torch.Generator().manual_seed(seed)
    query = (amplitude * torch.randn(1, heads, 1, d, generator=gen)).bfloat16()
    room = (amplitude * torch.randn(2, 1, kv_heads, tokens + 40, d, generator=gen)).bfloat16()  # a cache's views
    key, value = room[0, :, :, :tokens], room[1, :, :, :tokens]
    scale = d ** -0.5 if scale is None else scale
    want = F.scaled_dot_product_attention(query, key, value, scale=scale, enable_gqa=heads != kv_heads)[0, :, 0]
    out = torch.empty(heads, d, dtype=torch.bfloat16)
    da.attend_exact(kernels, query[0, :, 0], key[0], value[0], scale, out)
    return out, want


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.contiguous().view(torch.int16), b.contiguous().view(torch.int16))


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("heads,kv_heads,d,tokens", [
    (16, 4, 128, 32), (16, 4, 128, 2048), (8, 8, 64, 1), (12, 4, 64, 129), (6, 3, 80, 33), (32, 4, 128, 515),
    (4, 2, 200, 70), (6, 6, 72, 1030), (8, 2, 66, 47), (4, 1, 256, 16), (3, 3, 130, 31)])
def test_sdpas_bits(kernel_cache, exact, heads, kv_heads, d, tokens, threads):
    kernels = da.load("exact", kernel_cache, threads=threads).kernels
    for seed, amplitude in ((tokens, 1.0), (tokens + 1, 6.0)):  # (6: scores far below the maximum underflow to 0)
        out, want = sdpa_and_kernel(kernels, heads, kv_heads, d, tokens, seed, amplitude=amplitude)
        assert same_bits(out, want), (heads, kv_heads, d, tokens, amplitude)


@settings(max_examples=40, deadline=None)
@given(kv_heads=st.integers(1, 4), rep=st.sampled_from([1, 2, 3, 4, 8]),
       d=st.integers(1, 72).map(lambda x: 4 * x - x % 3), tokens=st.integers(1, 1100), scale=st.floats(0.01, 2.0),
       seed=st.integers(0, 2**16))
def test_sdpas_bits_anywhere(exact, kv_heads, rep, d, tokens, scale, seed):
    out, want = sdpa_and_kernel(exact.kernels, kv_heads * rep, kv_heads, d, tokens, seed, scale=scale)
    assert same_bits(out, want)


def test_takes_only_steps_whose_bits_are_sdpas(exact):
    q, k = torch.zeros(1, 16, 1, 8, dtype=torch.bfloat16), torch.zeros(1, 4, 5, 8, dtype=torch.bfloat16)
    assert exact.gives_sdpas_bits(Grouped(), q, k, None, sdpa_attention_forward)
    assert exact.gives_sdpas_bits(object(), q[:, :4], k, None, sdpa_attention_forward)  # plain heads
    eager = lambda *args, **kwargs: None  # noqa: E731  (a model whose own attention is eager, or any other)
    wide = torch.zeros(1, 4, 5, 320, dtype=torch.bfloat16)
    declined = [
        (Grouped(), q, k, None, eager),
        (Grouped(), q, k, None, None),
        (Grouped(), q, k, torch.ones(1, 1, 1, 5, dtype=torch.bool), sdpa_attention_forward),  # heads packed by one
        (Grouped(), q, k, torch.zeros(1, 1, 1, 5), sdpa_attention_forward),
        (Grouped(), torch.zeros(1, 16, 1, 320, dtype=torch.bfloat16), wide, None, sdpa_attention_forward),  # > 256
        (object(), q, k, None, sdpa_attention_forward),  # grouped heads, but sdpa would not be told so
    ]
    assert not any(exact.gives_sdpas_bits(*case) for case in declined)
    key = torch.randn(1, 4, 5, 8).bfloat16()
    assert exact(Grouped(), q, key, key, None, PLAIN, eager) is None
    assert exact(Grouped(), q, key, key, None, PLAIN, sdpa_attention_forward) is not None
    assert exact(Grouped(), q, key, key, None, {**PLAIN, "softcap": 30.0}, sdpa_attention_forward) is None


def decode(model_dir, attention, implementation: str, steps: int = 20):
    """``steps`` decode steps of a flattened model with ``attention`` against transformers' own, both taking
    transformers' token: the largest logit difference, and how many attentions the kernel computed."""
    load = dict(dtype=torch.bfloat16, attn_implementation=implementation)
    reference = AutoModelForCausalLM.from_pretrained(model_dir, **load).eval()
    model = AutoModelForCausalLM.from_pretrained(model_dir, **load).eval()
    flat = FlatStep(model, attention)
    tokens = torch.randint(3, model.config.vocab_size, (12,), generator=torch.Generator().manual_seed(0)).tolist()
    used = attention.used
    worst = flat_against_transformers(flat, reference, tokens, steps)
    return worst, attention.used - used, model.config.num_hidden_layers


def test_a_models_decode_steps_are_transformers_bit_for_bit(mixtral, exact):
    worst, used, layers = decode(mixtral, exact, "sdpa")
    assert used == 19 * layers  # every layer of every decode step
    assert worst == 0.0


def test_a_model_that_attends_eagerly_keeps_its_own(mixtral, exact):
    worst, used, _ = decode(mixtral, exact, "eager", steps=4)
    assert used == 0 and worst == 0.0


def test_the_knob(kernel_cache, exact):
    assert WorkerConfig(model="m").attention_kernel == "auto"
    assert da.load("torch", kernel_cache, threads=1) is None
    assert da.load("auto", kernel_cache, threads=1).exact
    assert not da.load("fast", kernel_cache, threads=1).exact
    with pytest.raises(ValueError, match="--attention-kernel must be one of auto, torch, exact, fast"):
        WorkerConfig(model="m", attention_kernel="quick")


def test_the_engines_steps_take_it_after_batching_is_enabled_again(mixtral, exact):
    """What ``bench profile`` does: the worker's engine, batching switched on with the kernel, then again (the
    flattened step keeps the model's own attention it found first; before, the second found the flattened one and
    recursed); greedy tokens are transformers' own."""
    model = AutoModelForCausalLM.from_pretrained(mixtral, dtype=torch.bfloat16).eval()
    prompt = torch.randint(3, model.config.vocab_size, (9,), generator=torch.Generator().manual_seed(2)).tolist()
    expected = generate_greedy(model, prompt, 8)
    engine = Engine(model, 256)
    engine.enable_batching(exact)
    engine.enable_batching(exact)
    used = exact.used
    limits = Limits(max_running=2, max_step_tokens=16, max_prefill_chunk=16, max_waiting=4)
    assert run_scheduled(engine, prompt, 8, limits) == expected
    assert exact.used - used == 7 * model.config.num_hidden_layers
