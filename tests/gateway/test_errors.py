"""Bad requests: each gets its status and OpenAI-shaped error; a good request still works after them."""
import json
import urllib.error
import urllib.request

import pytest

M = "demo"  # the fixture's model directory is named "demo"
CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
USER = [{"role": "user", "content": "hi"}]

CASES = [
    ("malformed json", COMP, b"{not json", 400, "invalid_request_error", None),
    ("body not an object", COMP, [1, 2], 400, "invalid_request_error", None),
    ("unknown model", COMP, {"model": "gpt-9", "prompt": "x"}, 404, "invalid_request_error", "model"),
    ("model not a string", COMP, {"model": 3, "prompt": "x"}, 400, "invalid_request_error", "model"),
    ("missing prompt", COMP, {"model": M}, 400, "invalid_request_error", "prompt"),
    ("empty prompt", COMP, {"model": M, "prompt": ""}, 400, "invalid_request_error", "prompt"),
    ("prompt of wrong type", COMP, {"model": M, "prompt": 42}, 400, "invalid_request_error", "prompt"),
    ("token id out of vocab", COMP, {"model": M, "prompt": [1, 10**9]}, 400, "invalid_request_error", "prompt"),
    ("batched prompts", COMP, {"model": M, "prompt": ["a", "b"]}, 400, "invalid_request_error", "prompt"),
    ("max_tokens zero", COMP, {"model": M, "prompt": "x", "max_tokens": 0}, 400, "invalid_request_error", "max_tokens"),
    ("max_tokens negative", CHAT, {"model": M, "messages": USER, "max_tokens": -5}, 400, "invalid_request_error",
     "max_tokens"),
    ("max_tokens above limit", COMP, {"model": M, "prompt": "x", "max_tokens": 10**7}, 400, "invalid_request_error",
     "max_tokens"),
    ("max_tokens a string", COMP, {"model": M, "prompt": "x", "max_tokens": "5"}, 400, "invalid_request_error",
     "max_tokens"),
    ("beyond context", COMP, {"model": M, "prompt": [5] * 4000, "max_tokens": 200}, 400, "invalid_request_error",
     "prompt"),
    ("temperature too high", COMP, {"model": M, "prompt": "x", "temperature": 3}, 400, "invalid_request_error",
     "temperature"),
    ("top_p zero", COMP, {"model": M, "prompt": "x", "top_p": 0}, 400, "invalid_request_error", "top_p"),
    ("top_k below -1", COMP, {"model": M, "prompt": "x", "top_k": -2}, 400, "invalid_request_error", "top_k"),
    ("target_language on a model that does not translate", COMP, {"model": M, "prompt": "x",
     "target_language": "fra_Latn"}, 400, "invalid_request_error", "target_language"),
    ("n above 1", COMP, {"model": M, "prompt": "x", "n": 2}, 400, "invalid_request_error", "n"),
    ("stop of wrong type", COMP, {"model": M, "prompt": "x", "stop": 5}, 400, "invalid_request_error", "stop"),
    ("too many stops", COMP, {"model": M, "prompt": "x", "stop": list("abcde")}, 400, "invalid_request_error", "stop"),
    ("stream not a bool", COMP, {"model": M, "prompt": "x", "stream": "yes"}, 400, "invalid_request_error", "stream"),
    ("stream_options without stream", COMP, {"model": M, "prompt": "x", "stream_options": {"include_usage": True}},
     400, "invalid_request_error", "stream_options"),
    ("unsupported logprobs", COMP, {"model": M, "prompt": "x", "logprobs": 3}, 400, "invalid_request_error",
     "logprobs"),
    ("unsupported penalty", CHAT, {"model": M, "messages": USER, "presence_penalty": 1.0}, 400,
     "invalid_request_error", "presence_penalty"),
    ("unknown parameter", COMP, {"model": M, "prompt": "x", "temprature": 0.5}, 400, "invalid_request_error",
     "temprature"),
    ("missing messages", CHAT, {"model": M}, 400, "invalid_request_error", "messages"),
    ("empty messages", CHAT, {"model": M, "messages": []}, 400, "invalid_request_error", "messages"),
    ("bad role", CHAT, {"model": M, "messages": [{"role": "wizard", "content": "x"}]}, 400, "invalid_request_error",
     "messages[0].role"),
    ("message not an object", CHAT, {"model": M, "messages": ["hi"]}, 400, "invalid_request_error", "messages[0]"),
    ("image content part", CHAT, {"model": M, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     400, "invalid_request_error", "messages[0].content"),
    ("role not a string", CHAT, {"model": M, "messages": [{"role": ["user"], "content": "x"}]}, 400,
     "invalid_request_error", "messages[0].role"),
    ("unknown message field", CHAT, {"model": M, "messages": [{"role": "user", "content": "x", "nmae": "bob"}]}, 400,
     "invalid_request_error", "messages[0].nmae"),
    ("message tool calls", CHAT, {"model": M, "messages": [{"role": "assistant", "content": "x", "tool_calls": [1]}]},
     400, "invalid_request_error", "messages[0].tool_calls"),
    ("name without a chat template", CHAT, {"model": M, "messages": [{"role": "user", "content": "x", "name": "b"}]},
     400, "invalid_request_error", "messages"),
    ("logprobs zero asks for logprobs", COMP, {"model": M, "prompt": "x", "logprobs": 0}, 400,
     "invalid_request_error", "logprobs"),
    ("max_tokens a string beside max_completion_tokens", CHAT, {"model": M, "messages": USER, "max_tokens": "abc",
     "max_completion_tokens": 5}, 400, "invalid_request_error", "max_tokens"),
    ("seed beyond 64 bits", COMP, {"model": M, "prompt": "x", "seed": 2**64}, 400, "invalid_request_error", "seed"),
    ("response_format json", CHAT, {"model": M, "messages": USER, "response_format": {"type": "json_object"}}, 400,
     "invalid_request_error", "response_format"),
    ("another model's card", "/v1/models/gpt-9", None, 404, "invalid_request_error", "model"),
    ("body too large", COMP, {"model": M, "prompt": "x" * (2 << 20)}, 413, "invalid_request_error", None),
    ("unknown route", "/v1/engines", {}, 404, "invalid_request_error", None),
]


def post(url: str, body) -> tuple[int, dict]:
    """POST ``body`` (GET where it is None)."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.parametrize("name,path,body,status,etype,param", CASES, ids=[c[0] for c in CASES])
def test_bad_request(served, name, path, body, status, etype, param):
    got, payload = post(served.url + path, body)
    assert got == status, payload
    error = payload["error"]
    assert error["type"] == etype and error["message"]
    assert set(error) == {"message", "type", "param", "code"}
    if param is not None:
        assert error["param"] == param


def test_good_request_after_bad_ones(served):
    for _, path, body, *_ in CASES[:5]:
        post(served.url + path, body)
    status, payload = post(served.url + COMP, {"model": M, "prompt": "Hello", "max_tokens": 4, "temperature": 0})
    assert status == 200 and payload["usage"]["completion_tokens"] >= 1


def test_get_on_post_route_is_405(served):
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(served.url + COMP, timeout=10)
    assert caught.value.code == 405 and json.loads(caught.value.read())["error"]["type"] == "invalid_request_error"


def test_openapi_describes_the_api(served):
    with urllib.request.urlopen(served.url + "/openapi.json", timeout=10) as resp:
        spec = json.loads(resp.read())
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health"} <= set(spec["paths"])


NEUTRAL_BODIES = [  # what OpenAI's clients send at values that ask for nothing: served as without them
    {"response_format": {"type": "text"}, "tool_choice": "none", "store": False, "metadata": None,
     "service_tier": "auto", "parallel_tool_calls": True, "logprobs": False, "top_logprobs": 0, "seed": -1,
     "presence_penalty": 0.0, "max_tokens": 99, "max_completion_tokens": 3},
    {"messages": [{"role": "system", "content": "Be brief."},
                  {"role": "assistant", "content": "ok", "refusal": None, "tool_calls": [], "annotations": []},
                  {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
     "max_tokens": 3},
]


@pytest.mark.parametrize("extra", NEUTRAL_BODIES, ids=["neutral parameters", "assistant echo"])
def test_neutral_values_are_served(served, extra):
    status, payload = post(served.url + CHAT, {"model": M, "messages": USER, "temperature": 0, **extra})
    assert status == 200, payload
    assert payload["usage"]["completion_tokens"] == 3  # (max_completion_tokens wins over max_tokens)


@pytest.mark.parametrize("model", [None, "absent"])
def test_a_request_without_a_model_gets_the_served_one(served, model):
    body = {"messages": USER, "max_tokens": 2, **({} if model == "absent" else {"model": model})}
    status, payload = post(served.url + CHAT, body)
    assert status == 200 and payload["model"] == M, payload


def test_model_card(served):
    with urllib.request.urlopen(served.url + f"/v1/models/{M}", timeout=10) as resp:
        card = json.loads(resp.read())
    assert card["id"] == M and card["object"] == "model"
