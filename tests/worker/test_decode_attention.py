"""``--attention-kernel fast`` (services/worker/decode_attention.py, attention.c): the kernel against float64
attention and torch's sdpa, the cases it must leave to the model's own attention, and a model's decode steps
through the worker's flattened step with it (the logits within bfloat16 rounding of transformers', the kernel
having taken every layer of every decode step)."""
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, DynamicCache

from services.worker import decode_attention as da
from services.worker import dequant_kernel as dk
from services.worker.flat_step import FlatStep, RequestTokens

pytestmark = pytest.mark.skipif(dk.compiler() is None, reason="no C compiler")


@pytest.fixture(scope="module")
def state(kernel_cache):
    return kernel_cache


@pytest.fixture(scope="module")
def attention(state):
    return da.load("fast", state, threads=1)


class Plain:
    pass


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("heads,kv_heads,d,tokens", [(16, 4, 128, 2048), (8, 8, 64, 1), (12, 4, 64, 129),
                                                     (6, 6, 72, 33), (4, 2, 200, 70)])
def test_matches_sdpa_within_a_rounding(state, heads, kv_heads, d, tokens, threads):
    attention = da.load("fast", state, threads=threads)  # (3 threads: the key-value heads split where >= 6)
    gen = torch.Generator().manual_seed(tokens)
    query = torch.randn(1, heads, 1, d, generator=gen).bfloat16()
    room = torch.randn(2, 1, kv_heads, tokens + 40, d, generator=gen).bfloat16()  # a cache's views
    key, value = room[0, :, :, :tokens], room[1, :, :, :tokens]
    out = attention(Plain(), query, key, value, None, {"dropout": 0.0, "scaling": d ** -0.5})
    want = F.scaled_dot_product_attention(query, key, value, enable_gqa=True).transpose(1, 2)
    assert out.shape == want.shape and out.dtype == torch.bfloat16
    assert (out.float() - want.float()).abs().max() <= 2 ** -7 * want.float().abs().max()
    exact = da.reference(query[0, :, 0], key[0], value[0], d ** -0.5)
    assert (out[0, 0].double() - exact).abs().max() <= da.TOLERANCE * exact.abs().max()


def test_leaves_what_it_does_not_compute_to_the_model(attention):
    q, k = torch.zeros(1, 4, 1, 8, dtype=torch.bfloat16), torch.zeros(1, 2, 5, 8, dtype=torch.bfloat16)
    plain = {"dropout": 0.0, "scaling": 0.3, "sliding_window": None}
    assert da.DecodeAttention.applies(Plain(), q, k, k, None, plain)
    assert da.DecodeAttention.applies(Plain(), q, k, k, torch.ones(1, 1, 1, 5, dtype=torch.bool), plain)
    assert da.DecodeAttention.applies(Plain(), q, k, k, torch.zeros(1, 1, 1, 5), plain)  # additive, hides nothing
    declined = [
        (Plain(), q.repeat(1, 1, 2, 1), k, k, None, plain),  # a prompt chunk: several queries
        (Plain(), q, k, k, torch.tensor([[[[True, True, False, True, True]]]]), plain),  # a mask that hides
        (Plain(), q, k, k, torch.full((1, 1, 1, 5), float("-inf")), plain),
        (Plain(), q.float(), k.float(), k.float(), None, plain),
        (Plain(), q, k, k, None, {**plain, "dropout": 0.1}),
        (Plain(), q, k, k, None, {**plain, "softcap": 30.0}),  # an extra it does not compute
        (Plain(), q, k, k, None, {**plain, "s_aux": torch.zeros(4)}),
        (type("WithSinks", (), {"sinks": torch.zeros(4)})(), q, k, k, None, plain),
        (Plain(), q, k, k[..., :4], None, plain),  # values of another width
        (Plain(), q, k, k, None, {**plain, "scaling": None}),  # sdpa and eager default the scale each their way
        (Plain(), q, k, k, None, {**plain, "head_mask": torch.ones(4)}),
        (Plain(), q, k.transpose(-1, -2).contiguous().transpose(-1, -2), k, None, plain),  # columns not contiguous
    ]
    assert not any(da.DecodeAttention.applies(*case) for case in declined)
    assert attention(*declined[1]) is None


def test_a_models_decode_steps_take_the_kernel(mixtral, attention):
    reference = AutoModelForCausalLM.from_pretrained(mixtral, dtype=torch.bfloat16).eval()
    model = AutoModelForCausalLM.from_pretrained(mixtral, dtype=torch.bfloat16).eval()
    flat = FlatStep(model, attention)
    prompt = torch.randint(3, model.config.vocab_size, (12,), generator=torch.Generator().manual_seed(0)).tolist()
    mine, theirs = flat.new_cache(), DynamicCache(config=reference.config)
    tokens, past, used = prompt, 0, attention.used
    worst = 0.0
    with torch.no_grad():
        for step in range(20):
            got = flat.forward([RequestTokens(mine, past, tokens)], [len(tokens) - 1])[0]
            want = reference(input_ids=torch.tensor([tokens]), cache=theirs, use_cache=True).logits[0, -1].float()
            worst = max(worst, ((got - want).abs().max() / want.abs().max()).item())
            past += len(tokens)
            tokens = [int(want.argmax())]  # both continue with transformers' token
    assert attention.used - used == 19 * model.config.num_hidden_layers  # every layer of every decode step
    # not eager's bits (hence the flag), within bfloat16 roundings of them (0.04 here; a scale 10% off gives 0.78,
    # a token of the cache left out 1.07, the heads' groups swapped 1.66)
    assert 0 < worst < 0.2
