"""Generation: prefill, decode, sampling, stop conditions. One forward per ``step``.

Greedy decoding follows ``model.generate`` exactly (same inputs, ``logits_to_keep=1``, argmax of the last
logits in float32), so the output is token-for-token that of plain transformers.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from common import messages as m
from services.worker.experts import set_step


class RequestError(ValueError):
    """A request that cannot be served as asked; the message says why."""


@dataclass
class Sequence:
    req: m.GenerateRequest
    cache: DynamicCache
    generator: torch.Generator | None
    generated: list[int] = field(default_factory=list)
    finish_reason: str | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.req.prompt) + len(self.generated)


class Engine:
    def __init__(self, model, max_model_len: int):
        self.model = model
        self.max_model_len = max_model_len
        self.vocab_size = model.config.get_text_config().vocab_size

    def start(self, req: m.GenerateRequest) -> Sequence:
        self.validate(req)
        generator = None
        if req.temperature > 0:
            generator = torch.Generator().manual_seed(req.seed if req.seed is not None else torch.seed())
        return Sequence(req, DynamicCache(config=self.model.config), generator)

    def validate(self, req: m.GenerateRequest) -> None:
        if not req.prompt:
            raise RequestError("the prompt is empty")
        if any(not 0 <= t < self.vocab_size for t in req.prompt):
            raise RequestError(f"prompt token ids must be in 0..{self.vocab_size - 1}")
        if req.max_tokens < 1:
            raise RequestError("max_tokens must be >= 1")
        if len(req.prompt) + req.max_tokens > self.max_model_len:
            raise RequestError(f"prompt ({len(req.prompt)} tokens) + max_tokens ({req.max_tokens}) exceeds the"
                               f" context of {self.max_model_len} tokens")
        if req.temperature < 0 or not 0 < req.top_p <= 1 or req.top_k < 0:
            raise RequestError("temperature must be >= 0, top_p in (0, 1], top_k >= 0")

    @torch.inference_mode()
    def step(self, seq: Sequence) -> int:
        """Run one forward (the whole prompt first, then one token) and return the next token."""
        ids = seq.req.prompt if not seq.generated else seq.generated[-1:]
        input_ids = torch.tensor([ids], dtype=torch.long)
        set_step([seq.req.request], torch.zeros(len(ids), dtype=torch.long))
        out = self.model(input_ids=input_ids, attention_mask=torch.ones(1, seq.num_tokens, dtype=torch.long),
                         past_key_values=seq.cache, use_cache=True, logits_to_keep=1)
        token = sample(out.logits[0, -1].float(), seq.req, seq.generator)
        seq.generated.append(token)
        seq.finish_reason = self.finish_reason(seq, token)
        return token

    def finish_reason(self, seq: Sequence, token: int) -> str | None:
        if token in seq.req.stop_token_ids:
            return "stop"
        if len(seq.generated) >= seq.req.max_tokens:
            return "length"
        return None


def sample(logits: torch.Tensor, req: m.GenerateRequest, generator: torch.Generator | None) -> int:
    if req.temperature == 0:
        return int(torch.argmax(logits))
    logits = logits / req.temperature
    if req.top_k > 0:
        kth = torch.topk(logits, min(req.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if req.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop = cumulative - torch.softmax(sorted_logits, dim=-1) >= req.top_p  # keep the token that crosses top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
