"""The gateway <-> worker messages (re-exported by ``common/messages.py``, the vocabulary of every link)."""
from __future__ import annotations

from msgspec import field

from common.message_base import Count, Index, Message, NonNeg, Ratio, Text


class GenerateRequest(Message):
    request: Text
    prompt: list[Index]
    max_tokens: Index
    stop_token_ids: list[Index] = field(default_factory=list)
    temperature: NonNeg = 0.0  # 0: greedy
    top_p: Ratio = 1.0
    top_k: Index = 0  # 0: off
    seed: int | None = None
    forced_tokens: list[Index] = field(default_factory=list)  # the output's first tokens (NLLB: target language)


class TokensReply(Message):
    """A step's output for one request; several arrive per GenerateRequest, the last with ``finish_reason``."""

    request: Text
    tokens: list[Index]
    finish_reason: Text | None = None  # "stop", "length", "cancelled"
    prompt_tokens: Index = 0
    completion_tokens: Index = 0


class CancelRequest(Message):
    request: Text


class CancelReply(Message):
    found: bool


class WorkerInfoRequest(Message):
    pass


class WorkerInfoReply(Message):
    pid: Index
    model: Text
    model_type: Text
    max_model_len: Index
    vocab_size: Index
    eos_token_ids: list[Index]
    ready: bool  # memd is alive
    active: Index = 0  # requests queued or running
    generated_tokens: Count = 0  # since start
    text_to_text: bool = False  # an encoder-decoder model: completions only, no chat (Switch, NLLB-MoE)
    target_language: bool = False  # each request names the language to write (NLLB-MoE)
