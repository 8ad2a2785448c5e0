"""Reading a request body: within a deadline, as JSON, bounded in depth, valid Unicode; each failure is a 4xx.

``json.loads`` accepts what a tokenizer or msgpack cannot: lone surrogates (``"\\ud800"``), ``NaN`` and
``Infinity``, and nesting up to the interpreter's recursion limit (beyond it, ``RecursionError``). All of them
are refused here with a 400 that names where they are, before any handler looks at the body.
"""
from __future__ import annotations

import asyncio
import json

from aiohttp import web

from services.gateway.errors import ApiError, bad_request

MAX_DEPTH = 32  # an OpenAI request nests 5 deep (messages[i].content[j].text); 32 leaves room for extensions


async def read_json(request: web.Request, timeout_s: float) -> dict:
    try:
        raw = await asyncio.wait_for(request.read(), timeout_s)
    except asyncio.TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {timeout_s:g}s (the server's"
                            " --body-timeout-s)", code="request_timeout", close=True) from None
    return parse_json(raw)


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw, parse_constant=_no_constant)
    except RecursionError:
        raise bad_request(f"the body nests deeper than {MAX_DEPTH} levels", None, "too_deep") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request(f"the body is not valid JSON ({exc})") from None
    if not isinstance(body, dict):
        raise bad_request("the body must be a JSON object")
    check_structure(body)
    return body


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON value")


_NESTED = frozenset((str, dict, list))  # the types check_structure looks into


def check_structure(body: dict) -> None:
    """Depth at most ``MAX_DEPTH``; every string and key encodable as UTF-8 (no lone surrogates). Iterative."""
    stack: list[tuple[object, int, tuple]] = [(body, 1, ())]
    while stack:
        value, depth, path = stack.pop()
        if isinstance(value, str):
            _check_text(value, path)
            continue
        if depth > MAX_DEPTH:
            raise bad_request(f"the body nests deeper than {MAX_DEPTH} levels", _param(path), "too_deep")
        if isinstance(value, dict):
            for key, item in value.items():
                _check_text(key, path + (key,))
                if isinstance(item, (str, dict, list)):
                    stack.append((item, depth + 1, path + (key,)))
        elif not _NESTED.isdisjoint(map(type, value)):  # (json.loads makes exact types: a list of numbers, such
            for index, item in enumerate(value):  # as token ids, is passed over at C speed, ~5x faster)
                if isinstance(item, (str, dict, list)):
                    stack.append((item, depth + 1, path + (index,)))


def _check_text(text: str, path: tuple) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        where = _param(path)
        raise bad_request(f"'{where}' holds a lone UTF-16 surrogate (\\ud800-\\udfff): not valid Unicode text",
                          where, "invalid_unicode") from None


def _param(path: tuple) -> str | None:
    """``("messages", 0, "content")`` -> ``messages[0].content``."""
    out = ""
    for key in path:
        out += f"[{key}]" if isinstance(key, int) else (f".{key}" if out else str(key))
    return out or None
