"""Parsing OpenAI request bodies into one typed ``Job``; anything unsupported or malformed is a 400 naming the
parameter (never silently ignored)."""
from __future__ import annotations

from dataclasses import dataclass, field

from services.gateway.errors import ApiError, bad_request

MAX_STOP = 4
MAX_STOP_CHARS = 1024  # a stop string's length: matching holds back output up to it, and scans it per token
MAX_TOP_K = 2**31 - 1  # values up to it are clamped to the vocabulary; above it they are refused
MAX_USER = 256
COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "n", "stream", "stream_options",
          "user"}
COMPLETION_ONLY = {"prompt", "target_language"}
CHAT_ONLY = {"messages", "max_completion_tokens"}
# Known OpenAI parameters moeinf does not implement: accepted only at a value that asks for nothing (or null), each
# compared with its type (``logprobs: 0`` asks for the chosen token's logprob: it is not ``false``).
NEUTRAL = {"presence_penalty": (0,), "frequency_penalty": (0,), "logit_bias": ({},), "logprobs": (False,),
           "top_logprobs": (0,), "echo": (False,), "best_of": (1,), "suffix": ("",), "tools": ([],),
           "tool_choice": ("none",), "response_format": ({"type": "text"},), "parallel_tool_calls": (True, False),
           "functions": ([],), "function_call": ("none",), "min_tokens": (0,), "repetition_penalty": (1,),
           "store": (False,), "metadata": ({},), "service_tier": ("auto", "default"), "modalities": (["text"],)}
# A message's fields beyond role and content: ``name`` goes to the chat template; the rest are what an assistant
# message echoed back by OpenAI's client carries, accepted only empty (moeinf calls no tools)
MESSAGE_NEUTRAL = {"tool_calls": ([],), "function_call": (), "refusal": (), "audio": (), "annotations": ([],)}
ROLES = {"system", "user", "assistant", "developer"}


@dataclass
class Job:
    """One generation as the gateway runs it."""

    chat: bool
    model: str
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    messages: list[dict] = field(default_factory=list)
    user: str | None = None  # the client's end-user id: routes a conversation back to its worker
    forced_tokens: list[int] = field(default_factory=list)  # the output's first tokens (a translation's language)
    text_to_text: bool = False  # an encoder-decoder model: the output is not a continuation of the prompt


def _typed(body: dict, name: str, types, what: str, default=None):
    value = body.get(name, default)
    if value is None:
        return default
    if types is int and isinstance(value, float) and value.is_integer():
        value = int(value)  # JSON Schema counts 1.0 as an integer
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise bad_request(f"'{name}' must be {what}", name)
    if not isinstance(value, types):
        raise bad_request(f"'{name}' must be {what}, got {type(value).__name__}", name)
    return value


def _number(body: dict, name: str, default: float = 1.0) -> float:
    value = _typed(body, name, (int, float), "a number", default)
    try:
        return float(value)
    except OverflowError:  # an integer beyond float range
        raise bad_request(f"'{name}' is out of range", name) from None


def is_neutral(value, accepted: tuple) -> bool:
    """``value`` is null or one of ``accepted``, compared with its type (a number with a number, never a bool)."""
    return value is None or any(_same(value, a) for a in accepted)


def _same(value, accepted) -> bool:
    if isinstance(value, bool) or isinstance(accepted, bool):
        return value is accepted
    if isinstance(accepted, (int, float)):
        return isinstance(value, (int, float)) and value == accepted
    return type(value) is type(accepted) and value == accepted


def check_known(body: dict, allowed: set[str]) -> None:
    for key, value in body.items():
        if key in allowed:
            continue
        if key in NEUTRAL:
            if is_neutral(value, NEUTRAL[key]):
                continue
            raise bad_request(f"'{key}' is not supported by moeinf", key, "unsupported_parameter")
        raise bad_request(f"unrecognized parameter '{key}'", key, "unsupported_parameter")


def parse_sampling(body: dict, job: Job, *, chat: bool, limit: int, vocab_size: int) -> None:
    """Every sampling parameter; ``job.max_tokens`` stays 0 when the body has none (``default_max_tokens``)."""
    for param in ("max_tokens", "max_completion_tokens") if chat else ("max_tokens",):  # (both checked; the
        max_tokens = _typed(body, param, int, "an integer")                           # newer name wins)
        if max_tokens is not None:
            if max_tokens <= 0:
                raise bad_request(f"'{param}' must be at least 1", param)
            if max_tokens > limit:
                raise bad_request(f"'{param}' is {max_tokens}, above the limit of {limit}", param)
            job.max_tokens = max_tokens
    job.temperature = _number(body, "temperature")
    if not 0 <= job.temperature <= 2:  # (below 1e-5 the worker samples greedily, as vLLM does)
        raise bad_request("'temperature' must be between 0 (greedy) and 2", "temperature")
    job.top_p = _number(body, "top_p")
    if not 0 < job.top_p <= 1:
        raise bad_request("'top_p' must be in (0, 1]", "top_p")
    job.top_k = _typed(body, "top_k", int, "an integer", 0)
    if not -1 <= job.top_k <= MAX_TOP_K:
        raise bad_request(f"'top_k' must be -1 (off), 0 (off) or 1..{MAX_TOP_K}", "top_k")
    job.top_k = 0 if job.top_k >= vocab_size else max(job.top_k, 0)  # all of the vocabulary: off
    user = _typed(body, "user", str, "a string")
    if user is not None and len(user) > MAX_USER:
        raise bad_request(f"'user' may be at most {MAX_USER} characters", "user")
    job.user = user
    seed = _typed(body, "seed", int, "an integer")
    if seed is not None and not -2**63 <= seed < 2**64:
        raise bad_request("'seed' must be a 64-bit integer", "seed")
    job.seed = seed  # (torch's generator takes any of them: a negative one as its two's complement)
    n = _typed(body, "n", int, "an integer", 1)
    if n != 1:
        raise bad_request("only 'n' = 1 is supported", "n")
    job.stop = parse_stop(body.get("stop"))
    job.stream = _typed(body, "stream", bool, "a boolean", False)
    options = _typed(body, "stream_options", dict, "an object")
    if options is not None:
        if not job.stream:
            raise bad_request("'stream_options' is only allowed with 'stream': true", "stream_options")
        unknown = set(options) - {"include_usage"}
        if unknown:
            raise bad_request(f"unrecognized stream_options {sorted(unknown)}", "stream_options")
        job.include_usage = _typed(options, "include_usage", bool, "a boolean", False)


def default_max_tokens(job: Job, *, limit: int, max_model_len: int) -> None:
    """Without max_tokens: 16 for completions (OpenAI's default), the room left in the context for chat."""
    if not job.max_tokens:
        job.max_tokens = max(1, min(limit, max_model_len - len(job.prompt_ids))) if job.chat else 16


def parse_stop(stop) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise bad_request("'stop' must be a string or a list of strings", "stop")
    if len(stop) > MAX_STOP:
        raise bad_request(f"'stop' may hold at most {MAX_STOP} strings", "stop")
    if any(s == "" for s in stop):
        raise bad_request("'stop' strings must not be empty", "stop")
    if any(len(s) > MAX_STOP_CHARS for s in stop):
        raise bad_request(f"'stop' strings may be at most {MAX_STOP_CHARS} characters long", "stop")
    return stop


def check_model(body: dict, served: str) -> str:
    model = body.get("model")
    if model is None:  # (absent or null: the served model, as vLLM and llama.cpp's server take it)
        return served
    if not isinstance(model, str):
        raise bad_request("'model' must be a string", "model")
    if model != served:
        raise ApiError(404, f"the model '{model}' does not exist; this server serves '{served}'", param="model",
                       code="model_not_found")
    return model


def parse_messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if messages is None:
        raise bad_request("'messages' is required", "messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty list", "messages")
    out = []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise bad_request(f"{where} must be an object", where)
        role = msg.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise bad_request(f"{where}.role must be one of {sorted(ROLES)}, got {str(role)[:64]!r}", f"{where}.role")
        parsed = {"role": "system" if role == "developer" else role, "content": _content(msg.get("content"), where)}
        for key, value in msg.items():
            if key == "name" and value is not None:
                if not isinstance(value, str) or not value or len(value) > MAX_USER:
                    raise bad_request(f"{where}.name must be a non-empty string of at most {MAX_USER} characters",
                                      f"{where}.name")
                parsed["name"] = value  # (the chat template decides what it does with it)
            elif key not in ("role", "content", "name") and not (key in MESSAGE_NEUTRAL
                                                                and is_neutral(value, MESSAGE_NEUTRAL[key])):
                what = "is not supported by moeinf" if key in MESSAGE_NEUTRAL else "is not a message field"
                raise bad_request(f"{where}.{str(key)[:64]} {what}", f"{where}.{str(key)[:64]}",
                                  "unsupported_parameter")
        out.append(parsed)
    return out


def _content(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad_request(f"{where}.content: only text parts are supported", f"{where}.content")
            parts.append(part["text"])
        return "\n".join(parts)  # (as vLLM joins them)
    raise bad_request(f"{where}.content must be a string or a list of text parts", f"{where}.content")


def parse_prompt(body: dict, vocab_size: int, max_len: int) -> tuple[str | None, list[int] | None]:
    """Return ``(text, None)`` or ``(None, token ids)``; token ids beyond the context (``max_len``) are refused
    before each is checked."""
    prompt = body.get("prompt")
    if prompt is None:
        raise bad_request("'prompt' is required", "prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, list) and len(prompt) > max_len and isinstance(prompt[0], int):
        raise bad_request(f"the prompt is {len(prompt)} tokens: more than the model's context of {max_len} tokens",
                          "prompt", "context_length_exceeded")
    if isinstance(prompt, str):
        if not prompt:
            raise bad_request("'prompt' must not be empty", "prompt")
        return prompt, None
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if any(not 0 <= t < vocab_size for t in prompt):
            raise bad_request(f"'prompt' token ids must be in 0..{vocab_size - 1}", "prompt")
        return None, prompt
    if isinstance(prompt, list) and len(prompt) > 1:
        raise bad_request("batched prompts are not supported: send one prompt per request", "prompt")
    raise bad_request("'prompt' must be a non-empty string or list of token ids", "prompt")


def parse_target_language(body: dict, model_type: str, required: bool, language_id) -> list[int]:
    """A translation model's output language (NLLB-MoE: required, a language code of its tokenizer such as
    ``fra_Latn``) as the token the output starts with; refused for any other model. ``language_id(code)`` is the
    code's token id, or None when the tokenizer has no such token."""
    code = _typed(body, "target_language", str, "a string")
    if not required:
        if code is not None:
            raise bad_request(f"'target_language' is for translation models; {model_type} takes none",
                              "target_language")
        return []
    if code is None:
        raise bad_request(f"'target_language' is required: {model_type} translates into the language it names (a"
                          " language code of its tokenizer, e.g. 'fra_Latn')", "target_language")
    token = language_id(code)
    if token is None:
        raise bad_request(f"'target_language' {code[:64]!r} is not a language code of this model's tokenizer",
                          "target_language")
    return [token]
