"""Turning a worker's token stream into OpenAI response bodies and SSE chunks."""
from __future__ import annotations

import time
import uuid

from services.gateway.requests import Job
from services.gateway.text import IncrementalDetokenizer, StopMatcher, TextCodec


class Output:
    """Text of one generation as tokens arrive: detokenized, stop strings applied, usage counted."""

    def __init__(self, codec: TextCodec, job: Job):
        self.job = job
        # a continuation decodes after the prompt's last tokens; a text-to-text output is a text of its own
        self.detok = IncrementalDetokenizer(codec, [] if job.text_to_text else job.prompt_ids)
        self.stop = StopMatcher(job.stop)
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.text = ""
        self.id = ("chatcmpl-" if job.chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def add(self, tokens: list[int], finish_reason: str | None) -> str:
        """Feed a step's tokens; returns the text that may be shown now."""
        self.completion_tokens += len(tokens)
        delta = self.stop.feed(self.detok.add(tokens))
        if self.stop.stopped:
            self.finish_reason = "stop"
        elif finish_reason is not None:
            delta += self.stop.feed(self.detok.flush())
            if not self.stop.stopped:
                delta += self.stop.flush()
            self.finish_reason = "stop" if self.stop.stopped else finish_reason
        self.text += delta
        return delta

    @property
    def usage(self) -> dict:
        prompt = len(self.job.prompt_ids)
        return {"prompt_tokens": prompt, "completion_tokens": self.completion_tokens,
                "total_tokens": prompt + self.completion_tokens}

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.job.model}

    def body(self) -> dict:
        if self.job.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": self.text}, "logprobs": None,
                      "finish_reason": self.finish_reason}
            return {**self._head("chat.completion"), "choices": [choice], "usage": self.usage}
        choice = {"index": 0, "text": self.text, "logprobs": None, "finish_reason": self.finish_reason}
        return {**self._head("text_completion"), "choices": [choice], "usage": self.usage}

    def chunk(self, delta: str, *, first: bool = False, final: bool = False) -> dict:
        reason = self.finish_reason if final else None
        if self.job.chat:
            piece = ({"role": "assistant", "content": delta} if first else {"content": delta}) if not final else {}
            choice = {"index": 0, "delta": piece, "logprobs": None, "finish_reason": reason}
            chunk = {**self._head("chat.completion.chunk"), "choices": [choice]}
        else:
            choice = {"index": 0, "text": delta, "logprobs": None, "finish_reason": reason}
            chunk = {**self._head("text_completion"), "choices": [choice]}
        if self.job.include_usage:
            chunk["usage"] = None
        return chunk

    def usage_chunk(self) -> dict:
        obj = "chat.completion.chunk" if self.job.chat else "text_completion"
        return {**self._head(obj), "choices": [], "usage": self.usage}
