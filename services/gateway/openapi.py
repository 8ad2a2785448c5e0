"""``GET /openapi.json``: the API this gateway serves, as OpenAPI 3.1 (its limits are this gateway's knobs)."""
from __future__ import annotations

from common.config import GatewayConfig
from services.gateway.requests import (MAX_STOP, MAX_STOP_CHARS, MAX_TOP_K, MAX_USER, MESSAGE_NEUTRAL,
                                      NEUTRAL)


def _sampling(cfg: GatewayConfig) -> dict:
    return {
        "model": {"type": "string", "enum": [cfg.served_model_name], "description": "the served model (404 otherwise)"},
        "max_tokens": {"type": "integer", "minimum": 1, "maximum": cfg.max_tokens_limit},
        "temperature": {"type": "number", "minimum": 0, "maximum": 2, "default": 1,
                        "description": "0: greedy (and below 1e-5, as vLLM takes it)"},
        "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1, "default": 1},
        "top_k": {"type": "integer", "minimum": -1, "maximum": MAX_TOP_K, "default": 0,
                  "description": "0 or -1: off; values above the vocabulary size are off too"},
        "seed": {"type": "integer", "minimum": -2**63, "maximum": 2**64 - 1,
                 "description": "any 64-bit integer: the same seed gives the same sampling"},
        "stop": {"oneOf": [{"type": "string", "minLength": 1, "maxLength": MAX_STOP_CHARS},
                           {"type": "array", "items": {"type": "string", "minLength": 1, "maxLength": MAX_STOP_CHARS},
                            "maxItems": MAX_STOP}]},
        "n": {"type": "integer", "enum": [1]},
        "stream": {"type": "boolean", "default": False},
        "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
        "user": {"type": "string", "maxLength": MAX_USER,
                 "description": "the client's end-user id: a conversation's turns go back to the worker that served"
                                " its last turn (--affinity-entries)"},
        **_neutral(NEUTRAL),
    }


def _neutral(fields: dict) -> dict:
    """OpenAI's parameters moeinf does not implement: accepted only at a value that asks for nothing (400 else)."""
    return {name: {"enum": [None, *values], "description": "not implemented: accepted only as listed (null included)"}
            for name, values in fields.items()}



_ERROR = {"type": "object", "properties": {"error": {"type": "object", "properties": {
    "message": {"type": "string"}, "type": {"type": "string"}, "param": {"type": ["string", "null"]},
    "code": {"type": ["string", "null"]}}}}}
_EVENT = {"type": "object", "required": ["data"], "description": "one Server-Sent Event", "properties": {
    "data": {"type": "string", "description": "a JSON chunk; the last is `[DONE]`, or a JSON error object when the"
                                              " stream fails after it started"}}}
_USAGE = {"type": "object", "properties": {k: {"type": "integer"} for k in
                                           ("prompt_tokens", "completion_tokens", "total_tokens")}}


def _post(summary: str, request: dict, response: dict) -> dict:
    errors = {str(code): {"description": text, "content": {"application/json": {"schema": _ERROR}}}
              for code, text in ((400, "invalid request"), (401, "missing or wrong API key (with --api-key)"),
                                 (404, "unknown model"), (408, "body not sent within --body-timeout-s"),
                                 (405, "another method than POST"), (413, "body too large"),
                                 (415, "body not application/json"), (429, "queue full (see Retry-After)"),
                                 (431, "request headers too large"),
                                 (500, "the generation failed (the worker's log has the details)"),
                                 (503, "worker or memd not ready, or gone (see Retry-After)"))}
    return {"post": {"summary": summary, "requestBody": {"required": True, "content": {
        "application/json": {"schema": request}}}, "responses": {
        "200": {"description": "the completion, or Server-Sent Events ending with `data: [DONE]` when streaming",
                "content": {"application/json": {"schema": response}, "text/event-stream": {"schema": _EVENT}}},
        **errors}}}


def openapi_spec(cfg: GatewayConfig) -> dict:
    model, sampling = cfg.served_model_name, _sampling(cfg)
    ids = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
    completion = {"type": "object", "required": ["prompt"], "additionalProperties": False, "properties": {
        **sampling, "prompt": {"oneOf": [
            {"type": "string", "minLength": 1}, ids,
            {"type": "array", "items": {"oneOf": [{"type": "string", "minLength": 1}, ids]}, "minItems": 1,
             "maxItems": 1, "description": "a batch of one prompt"}]},
        "target_language": {"type": "string", "description": "translation models (NLLB-MoE) only, and required"
                            " there: the language to write, a language code of the model's tokenizer (fra_Latn)"}}}
    text_part = {"type": "object", "required": ["type", "text"], "additionalProperties": False,
                 "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}
    message = {"type": "object", "required": ["role", "content"], "additionalProperties": False, "properties": {
        "role": {"enum": ["system", "developer", "user", "assistant"]},
        "content": {"oneOf": [{"type": "string"}, {"type": "array", "items": text_part}],
                    "description": "text parts are joined with newlines"},
        "name": {"type": "string", "minLength": 1, "maxLength": MAX_USER,
                 "description": "given to the chat template (400 for a tokenizer without one)"},
        **_neutral(MESSAGE_NEUTRAL)}}
    chat = {"type": "object", "required": ["messages"], "additionalProperties": False, "properties": {
        **sampling, "messages": {"type": "array", "items": message, "minItems": 1},
        "max_completion_tokens": {"type": "integer", "minimum": 1, "maximum": cfg.max_tokens_limit}}}
    completion_out = {"type": "object", "properties": {"id": {"type": "string"}, "object": {"const": "text_completion"},
                                                      "choices": {"type": "array"}, "usage": _USAGE}}
    chat_out = {"type": "object", "properties": {"id": {"type": "string"}, "object": {"const": "chat.completion"},
                                                "choices": {"type": "array"}, "usage": _USAGE}}
    card = {"type": "object", "properties": {"id": {"const": model}, "object": {"const": "model"},
                                             "created": {"type": "integer"}, "owned_by": {"type": "string"},
                                             "max_model_len": {"type": ["integer", "null"]}}}
    spec = {
        "openapi": "3.1.0",
        "info": {"title": "moeinf", "version": "1", "description": f"OpenAI-compatible API serving {model}"},
        "paths": {
            "/v1/completions": _post("text completion", completion, completion_out),
            "/v1/chat/completions": _post("chat completion", chat, chat_out),
            "/v1/models": {"get": {"summary": "the served model", "responses": {"200": {
                "description": "model list", "content": {"application/json": {"schema": {
                    "type": "object", "properties": {"object": {"const": "list"},
                                                     "data": {"type": "array", "items": card}}}}}}}}},
            "/v1/models/{model}": {"get": {"summary": "the served model's card", "parameters": [
                {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}], "responses": {
                "200": {"description": "the model", "content": {"application/json": {"schema": card}}},
                "404": {"description": "another model", "content": {"application/json": {"schema": _ERROR}}}}}},
            "/health": {"get": {"summary": "200 when worker and memd are ready, else 503 with the reason",
                                "responses": {"200": {"description": "ready"}, "503": {"description": "not ready"}}}},
            "/metrics": {"get": {"summary": "Prometheus metrics of the gateway (memd serves its own: docs/deploy.md)",
                                 "responses": {"200": {"description": "Prometheus text exposition",
                                                       "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
        },
    }
    if cfg.api_key:
        spec["components"] = {"securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer"}}}
        for path, item in spec["paths"].items():
            if path.startswith("/v1/") or (path == "/metrics" and cfg.metrics_auth):
                for operation in item.values():
                    operation["security"] = [{"apiKey": []}]
                    operation["responses"].setdefault("401", {"description": "missing or wrong API key"})
    return spec
