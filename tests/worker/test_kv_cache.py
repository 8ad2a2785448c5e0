"""The worker's in-place KV cache (services/worker/kv_cache.py) against transformers' concatenating one: the same
keys and values after every kind of update, and, in a model, the same logits bit for bit past several growths."""
import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache
from transformers.cache_utils import DynamicLayer

from services.worker.kv_cache import SPARE, GrowingLayer, growing_cache


def _states(gen, tokens, batch=1, heads=2, dim=8):
    return (torch.randn(batch, heads, tokens, dim, generator=gen).bfloat16(),
            torch.randn(batch, heads, tokens, dim, generator=gen).bfloat16())


def test_appends_crops_and_selections_match_the_concatenating_layer():
    gen = torch.Generator().manual_seed(0)
    plain, growing = DynamicLayer(), GrowingLayer()
    buffers = set()

    def both(*call):
        for layer in (plain, growing):
            getattr(layer, call[0])(*call[1:])

    def append(tokens, batch=2):
        k, v = _states(gen, tokens, batch)
        want, got = plain.update(k, v), growing.update(k, v)
        assert all(torch.equal(a, b) for a, b in zip(want, got))
        buffers.add(growing.key_buffer.data_ptr())

    append(5)
    for _ in range(SPARE * 2):
        append(1)
    append(37)
    assert growing.keys.data_ptr() == growing.key_buffer.data_ptr()  # views of the buffer, not copies
    assert len(buffers) <= 4, "the buffer was reallocated for more than a few of 300 appends"
    both("crop", -3)  # the next tokens overwrite the cropped ones
    append(2)
    both("batch_select_indices", torch.tensor([1]))  # replaced by a tensor of its own: taken into a new buffer
    append(1, batch=1)
    assert torch.equal(plain.keys, growing.keys) and plain.get_seq_length() == growing.get_seq_length()
    both("batch_repeat_interleave", 2)
    append(1)
    both("reorder_cache", torch.tensor([1, 0]))
    append(2)
    both("reset")
    assert growing.key_buffer is None  # (its memory goes with the reset)
    append(3, batch=1)
    assert growing.get_seq_length() == 3


def test_a_buffer_never_grows_beyond_the_requests_bound():
    gen = torch.Generator().manual_seed(1)
    layer = GrowingLayer(limit=300)
    layer.update(*_states(gen, 250))
    assert layer.key_buffer.shape[-2] == 300  # (not 250 + a quarter)
    for _ in range(50):
        layer.update(*_states(gen, 1))
    assert layer.key_buffer.shape[-2] == 300 and layer.get_seq_length() == 300
    layer.update(*_states(gen, 1))  # past the bound (a caller's mistake): it still holds every token
    assert layer.get_seq_length() == 301


def test_only_full_attention_layers_grow_in_place():
    from helpers import family_config

    config = family_config("gpt_oss")  # sliding and full attention layers alternate
    cache = growing_cache(config)
    kinds = {type(layer).__name__ for layer in DynamicCache(config=config).layers}
    assert "DynamicSlidingWindowLayer" in kinds
    for mine, theirs in zip(cache.layers, DynamicCache(config=config).layers):
        assert type(mine) is (GrowingLayer if type(theirs) is DynamicLayer else type(theirs))


@pytest.mark.parametrize("attention", ["sdpa", pytest.param("eager", marks=pytest.mark.slow)])  # CI: the default
def test_a_model_decodes_the_same_bits_past_several_growths(mixtral, attention):
    model = AutoModelForCausalLM.from_pretrained(mixtral, dtype=torch.bfloat16, attn_implementation=attention).eval()
    prompt = torch.randint(3, model.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(1))
    caches = [DynamicCache(config=model.config), growing_cache(model.config)]
    tokens = [prompt, prompt]
    with torch.no_grad():
        for step in range(SPARE * 3):
            logits = [model(input_ids=t, cache=c, use_cache=True).logits[:, -1] for t, c in zip(tokens, caches)]
            assert torch.equal(logits[0], logits[1]), step
            tokens = [lg.argmax(-1, keepdim=True) for lg in logits]
    layer = caches[1].layers[0]
    assert isinstance(layer, GrowingLayer) and layer.key_buffer.shape[-2] > layer.get_seq_length() > SPARE * 2
