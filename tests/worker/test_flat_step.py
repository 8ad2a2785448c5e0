"""services/worker/flat_step.py: the cache a request gets, and which models run one request per step."""
import torch
from decoding import generate_greedy, run_scheduled
from helpers import family_config
from transformers import AutoModelForCausalLM, DynamicCache

from services.worker.flat_step import StepCache, FlatStep, own_cache_class


def meta_model(family: str):
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(family_config(family))


def test_a_model_with_a_cache_class_of_its_own_gets_it_per_request_and_in_the_step():
    model = meta_model("minimax")
    own = own_cache_class(model)
    assert own is not None and own.__name__ == "MiniMaxCache"
    flat = FlatStep(model)
    assert type(flat.new_cache()) is own
    assert issubclass(flat.step_cache, own) and issubclass(flat.step_cache, StepCache)  # passes its isinstance
    assert flat.recurrent, "its state is reachable per request only: one request per step"


def test_other_models_get_a_dynamic_cache_and_batch():
    model = meta_model("mixtral")
    assert own_cache_class(model) is None
    flat = FlatStep(model)
    assert type(flat.new_cache()) is DynamicCache and flat.step_cache is StepCache
    assert not flat.recurrent


def batched_vs_alone(family: str) -> tuple[FlatStep, list, list]:
    """Two requests' prompts, then two decode steps batched, against each request's own flattened steps."""
    from services.worker.flat_step import RequestTokens

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(family_config(family)).eval()
    flat = FlatStep(model)
    prompts, nexts = [[5, 9, 2, 7], [3, 8, 1, 4, 6, 2, 11]], [[12, 13], [14, 15]]
    alone = []
    for prompt, following in zip(prompts, nexts):
        part = RequestTokens(flat.new_cache(), 0, prompt)
        rows = [flat.forward([part], [len(prompt) - 1])]
        for past, token in enumerate(following, start=len(prompt)):
            rows.append(flat.forward([RequestTokens(part.cache, past, [token])], [0]))
        alone.append(rows)
    parts = [RequestTokens(flat.new_cache(), 0, p) for p in prompts]
    batched = [flat.forward(parts, [len(prompts[0]) - 1, len(prompts[0]) + len(prompts[1]) - 1])]
    for step in range(2):
        batched.append(flat.forward([RequestTokens(p.cache, len(prompts[i]) + step, [nexts[i][step]])
                                     for i, p in enumerate(parts)], [0, 1]))
    return flat, alone, batched


def test_a_batched_step_reads_each_requests_cache_in_place_and_equals_the_lone_steps():
    """After the first batched step, the layers that pass the cache's keys to attention as they are get no copy of
    their requests' caches (they were concatenated in every layer of every step); the logits are those alone (the
    placeholders those layers get instead are never read: uninitialised memory would show)."""
    flat, alone, batched = batched_vs_alone("mixtral")
    assert flat.direct == set(range(flat.model.config.num_hidden_layers))
    for i in range(2):
        for step in range(3):
            assert torch.allclose(batched[step][i], alone[i][step][0], atol=1e-4)  # (float32 products of more rows)


def test_latent_attention_that_expands_the_cache_after_the_update_still_sees_the_concatenation():
    flat, alone, batched = batched_vs_alone("deepseek_v3")
    assert flat.direct == set()
    for i in range(2):
        for step in range(3):
            assert torch.allclose(batched[step][i], alone[i][step][0], atol=1e-4)  # (float32 products of more rows)


def test_a_long_batch_mate_does_not_change_a_requests_dynamic_rope_frequencies():
    """Dynamic-NTK rotary frequencies follow the longest position given: a short request beside one past the
    original context got the long one's (and kept them in later steps, the module remembering them)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    from services.worker.flat_step import RequestTokens

    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, head_dim=16,
                           max_position_embeddings=32, rope_parameters={"rope_type": "dynamic",
                                                                        "rope_theta": 10000.0, "factor": 4.0})
    flat = FlatStep(MixtralForCausalLM(config).eval())
    short, long = [3, 1, 4, 1, 5, 9, 2, 6], [7] * 120

    def decode(batch_mate: bool) -> list[torch.Tensor]:
        parts = [RequestTokens(flat.new_cache(), 0, short)] + ([RequestTokens(flat.new_cache(), 0, long)]
                                                             if batch_mate else [])
        keep = [len(short) - 1] + ([len(short) + len(long) - 1] if batch_mate else [])
        rows = [flat.forward(parts, keep)[0]]
        for step in range(3):
            steps = [RequestTokens(p.cache, len(p.tokens) + step, [11 + step]) for p in parts]
            rows.append(flat.forward(steps, list(range(len(steps))))[0])
        return rows

    alone, beside = decode(False), decode(True)
    assert max((a - b).abs().max().item() for a, b in zip(alone, beside)) < 1e-5


def test_a_prompt_prefilled_in_chunks_gets_the_whole_prompts_dynamic_rope_frequencies():
    """``generate`` rotates a prompt with the frequencies of its whole length; a chunk before the last must get
    those too (with its own last position's, the keys of a prompt past the original context were rotated otherwise
    and the next tokens differed: logits 8.5 apart on this model, an audit)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    from services.worker.engine import Engine
    from services.worker.scheduler import Limits

    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, head_dim=16,
                           max_position_embeddings=16, initializer_range=0.2,
                           rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0})
    model = MixtralForCausalLM(config).eval()
    prompt = torch.randint(2, 128, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    expected = generate_greedy(model, prompt, 6)  # (before batching switches the model's attention)
    engine = Engine(model, 256)
    engine.enable_batching()
    limits = Limits(max_running=4, max_step_tokens=12, max_prefill_chunk=8, max_waiting=8)
    assert run_scheduled(engine, prompt, 6, limits) == expected


def test_indexed_attention_models_prefill_whole_prompts():
    """DSA's indexer picks other keys when a prompt is split (transformers' own split prefill differs too): the
    engine prefills such prompts whole; every other family keeps chunking."""
    assert FlatStep(meta_model("deepseek_v32")).indexed and not FlatStep(meta_model("mixtral")).indexed
