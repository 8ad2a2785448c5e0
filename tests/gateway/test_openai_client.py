"""The official openai client against a running ``moeinf serve``."""
import openai
import pytest
import torch


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model_id(client):
    return client.models.list().data[0].id


def test_models_list(client, demo_model):
    models = client.models.list().data
    assert [m.id for m in models] == [demo_model.name]


def test_chat_completion_and_usage(client, model_id):
    r = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "Hello!"}], max_tokens=8,
                                       temperature=0)
    choice = r.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 8 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_stream_equals_non_stream_for_a_seed(client, model_id):
    kwargs = dict(model=model_id, messages=[{"role": "user", "content": "Tell me a story"}], max_tokens=16,
                  temperature=0.9, top_p=0.95, seed=7)
    full = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_completion_stream_equals_non_stream(client, model_id):
    kwargs = dict(model=model_id, prompt="The capital of France is", max_tokens=12, temperature=0.7, seed=3)
    full = client.completions.create(**kwargs)
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kwargs) if c.choices)
    assert streamed == full.choices[0].text
    assert full.usage.completion_tokens >= 1


def test_greedy_completion_equals_transformers(client, model_id, demo_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_model)
    model = AutoModelForCausalLM.from_pretrained(demo_model)
    prompt = "Once upon a time"
    ids = tok(prompt).input_ids
    out = model.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False, pad_token_id=0)[0, len(ids):].tolist()
    if tok.eos_token_id in out:
        out = out[:out.index(tok.eos_token_id)]
    r = client.completions.create(model=model_id, prompt=prompt, max_tokens=20, temperature=0)
    whole, context = (tok.decode(t, skip_special_tokens=True) for t in (ids + out, ids))  # (in context: a leading
    assert r.choices[0].text == whole[len(context):]                                    # space is the text's)
    assert r.usage.completion_tokens == min(20, len(out) + (1 if len(out) < 20 else 0))


def test_stop_string_is_not_emitted(client, model_id):
    base = client.completions.create(model=model_id, prompt="Hello", max_tokens=16, temperature=0).choices[0].text
    if len(base) < 6:
        pytest.skip("the random model produced too little text to pick a stop string")
    stop = base[3:6]
    for stream in (False, True):
        if stream:
            chunks = list(client.completions.create(model=model_id, prompt="Hello", max_tokens=16, temperature=0,
                                                    stop=[stop], stream=True))
            text = "".join(c.choices[0].text for c in chunks if c.choices)
            reason = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        else:
            r = client.completions.create(model=model_id, prompt="Hello", max_tokens=16, temperature=0, stop=stop)
            text, reason = r.choices[0].text, r.choices[0].finish_reason
        assert text == base[:base.index(stop)] and reason == "stop"
