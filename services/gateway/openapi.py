"""``GET /openapi.json``: the API this gateway serves, as OpenAPI 3.1."""
from __future__ import annotations

_SAMPLING = {
    "model": {"type": "string"},
    "max_tokens": {"type": "integer", "minimum": 1},
    "temperature": {"type": "number", "minimum": 0, "maximum": 2, "default": 1},
    "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1, "default": 1},
    "top_k": {"type": "integer", "minimum": -1, "default": 0, "description": "0 or -1: off"},
    "seed": {"type": "integer", "minimum": 0},
    "stop": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "maxItems": 4}]},
    "n": {"type": "integer", "enum": [1]},
    "stream": {"type": "boolean", "default": False},
    "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
    "user": {"type": "string", "description": "accepted and ignored"},
}
_ERROR = {"type": "object", "properties": {"error": {"type": "object", "properties": {
    "message": {"type": "string"}, "type": {"type": "string"}, "param": {"type": ["string", "null"]},
    "code": {"type": ["string", "null"]}}}}}
_USAGE = {"type": "object", "properties": {k: {"type": "integer"} for k in
                                           ("prompt_tokens", "completion_tokens", "total_tokens")}}


def _post(summary: str, request: dict, response: dict) -> dict:
    errors = {str(code): {"description": text, "content": {"application/json": {"schema": _ERROR}}}
              for code, text in ((400, "invalid request"), (404, "unknown model"), (413, "body too large"),
                                 (429, "queue full (see Retry-After)"), (503, "worker or memd not ready"))}
    return {"post": {"summary": summary, "requestBody": {"required": True, "content": {
        "application/json": {"schema": request}}}, "responses": {
        "200": {"description": "the completion, or Server-Sent Events ending with `data: [DONE]` when streaming",
                "content": {"application/json": {"schema": response}, "text/event-stream": {"schema": {"type": "string"}}}},
        **errors}}}


def openapi_spec(model: str) -> dict:
    completion = {"type": "object", "required": ["model", "prompt"], "properties": {
        **_SAMPLING, "prompt": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "integer"}}]}}}
    message = {"type": "object", "required": ["role", "content"], "properties": {
        "role": {"enum": ["system", "developer", "user", "assistant"]},
        "content": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "object"}}]}}}
    chat = {"type": "object", "required": ["model", "messages"], "properties": {
        **_SAMPLING, "messages": {"type": "array", "items": message, "minItems": 1},
        "max_completion_tokens": {"type": "integer", "minimum": 1}}}
    completion_out = {"type": "object", "properties": {"id": {"type": "string"}, "object": {"const": "text_completion"},
                                                      "choices": {"type": "array"}, "usage": _USAGE}}
    chat_out = {"type": "object", "properties": {"id": {"type": "string"}, "object": {"const": "chat.completion"},
                                                "choices": {"type": "array"}, "usage": _USAGE}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "moeinf", "version": "1", "description": f"OpenAI-compatible API serving {model}"},
        "paths": {
            "/v1/completions": _post("text completion", completion, completion_out),
            "/v1/chat/completions": _post("chat completion", chat, chat_out),
            "/v1/models": {"get": {"summary": "the served model", "responses": {"200": {"description": "model list"}}}},
            "/health": {"get": {"summary": "200 when worker and memd are ready, else 503 with the reason",
                                "responses": {"200": {"description": "ready"}, "503": {"description": "not ready"}}}},
            "/metrics": {"get": {"summary": "Prometheus metrics of the gateway and of memd (docs/deploy.md)",
                                 "responses": {"200": {"description": "Prometheus text exposition",
                                                       "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
        },
    }
