"""Generation: sequences, sampling, stop conditions, and the forward of a step.

``run`` is the worker's path: one forward for a whole scheduled step (see ``scheduler.py`` and ``flat_step.py``), or
for a model whose per-request state a flattened step cannot split (recurrent layers; encoder-decoder models) one
forward per request, meeting at every MoE layer (``lockstep.py``).
``step`` is the plain path for one sequence, the prompt first and then one token per call, exactly what
``model.generate`` runs (``logits_to_keep=1``, argmax of the last logits in float32); ``moeinf bench overhead``
drives plain transformers and moeinf through it. Both give a lone greedy request transformers' own tokens.

Sampling is per request: a request whose distribution is degenerate (non-finite logits) fails alone with a
``SamplingError``, its batch-mates go on. A temperature below ``GREEDY_TEMPERATURE`` is greedy, as vLLM takes it
(its distribution is the argmax's to float32's precision; ``logits / temperature`` stays finite far below that,
and softmax subtracts the largest first), and top-p always keeps the most likely token, however small top_p is.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from common import messages as m
from services.worker.device import current
from services.worker.scheduler import Chunk
from services.worker.tracing import StepState
from services.worker.flat_step import RequestTokens, FlatStep
from services.worker.kv_cache import GrowingLayer, growing_cache
from services.worker.lockstep import Together
from services.worker.seq2seq import Seq2Seq


GREEDY_TEMPERATURE = 1e-5  # below it, a temperature samples the argmax (vLLM's _SAMPLING_EPS)


class RequestError(ValueError):
    """A request that cannot be served as asked; the message says why."""


class SamplingError(RequestError):
    """This request's sampling distribution is degenerate; only this request fails (a 400: its parameters)."""

    code = "bad_request"


class ModelOutputError(SamplingError):
    """The model's logits for this request hold NaN (a numerical fault, not the request's parameters: a 500); only
    this request fails, since its cache holds the fault too."""

    code = "internal"


@dataclass(eq=False)
class Sequence:
    req: m.GenerateRequest
    cache: DynamicCache
    generator: torch.Generator | None
    generated: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    cached: int = 0  # tokens whose keys and values are in the cache
    error: str | None = None  # why sampling failed for this request (its step's other requests go on) ...
    error_code: str = SamplingError.code  # ... and the error code it goes back with
    encoded: object = None  # an encoder-decoder model's encoder output for the prompt (seq2seq.py)
    kv_bytes: int = 0  # its cache's bytes at its last weighing (kv_budget.KvMeter) ...
    kv_at: int = 0  # ... when it held this many tokens (0: not weighed yet)

    @property
    def request_id(self) -> str:
        return self.req.request

    @property
    def num_tokens(self) -> int:
        return len(self.req.prompt) + len(self.generated)

    @property
    def kv_tokens(self) -> int:
        """The most tokens its KV cache can hold (its bound: what the KV cache budget reserves)."""
        return len(self.req.prompt) + self.req.max_tokens

    @property
    def prompt_left(self) -> int:
        return max(len(self.req.prompt) - self.cached, 0)

    def next_tokens(self, limit: int) -> list[int]:
        """The next ``limit`` prompt tokens, or the last generated one once the prompt is in the cache."""
        if self.prompt_left:
            return self.req.prompt[self.cached:self.cached + limit]
        return self.generated[-1:]


class Engine:
    def __init__(self, model, max_model_len: int, steps: StepState | None = None):
        """``steps``: the step state the model's experts are bound to (``experts.bind``); None for a model whose
        experts are its own (plain transformers)."""
        self.model = model
        self.device = model.get_input_embeddings().weight.device  # where the model computes (--device)
        self.steps = steps
        self.max_model_len = max_model_len
        self.vocab_size = model.config.get_text_config().vocab_size
        self.flat_step: FlatStep | None = None
        self.seq2seq = Seq2Seq(model, steps) if getattr(model.config, "is_encoder_decoder", False) else None
        self.together = Together(steps)  # forwards per request, batched at the MoE layers (recurrent models)

    @property
    def whole_prompts(self) -> bool:
        """Whether a prompt must be prefilled in one forward: indexed-attention (DSA) layers pick each query's top-k
        keys among a prompt's keys so that a prompt split in chunks selects others (transformers' own split
        prefill differs from its whole one too; an audit: logits 0.4-4.9 apart)."""
        return self.flat_step is not None and self.flat_step.indexed

    @property
    def one_at_a_time(self) -> bool:
        """Whether each request needs a forward of its own (recurrent state the flattened step cannot split)."""
        return self.flat_step is not None and self.flat_step.recurrent

    def enable_batching(self, decode=None) -> None:
        """Switch the model to flattened steps with per-request attention, which ``run`` needs (``step`` then no
        longer works). An encoder-decoder model keeps its own attention: ``run`` runs its requests one by one.
        ``decode``: ``--attention-kernel``'s ``DecodeAttention`` (None: the model's own attention). Again: the
        step keeps the model's own attention it found first (the model now names the flattened one) and takes
        ``decode``."""
        if self.flat_step is not None:
            self.flat_step.decode = decode
        elif self.seq2seq is None:
            self.flat_step = FlatStep(self.model, decode)

    def start(self, req: m.GenerateRequest) -> Sequence:
        self.validate(req)
        generator = None
        if req.temperature > 0:
            generator = torch.Generator()  # (its own: seeding never touches the process's generators)
            if req.seed is not None:
                generator.manual_seed(req.seed)
            else:
                generator.seed()
        if self.seq2seq is not None:
            cache = self.seq2seq.new_cache(req.max_tokens + 1)  # (the decoder's start token, then its output)
        else:
            limit = len(req.prompt) + req.max_tokens  # the most tokens this request's cache can hold
            cache = self.flat_step.new_cache(limit) if self.flat_step else growing_cache(self.model.config, limit)
        return Sequence(req, cache, generator)

    def validate(self, req: m.GenerateRequest) -> None:
        if not req.prompt:
            raise RequestError("the prompt is empty")
        if any(not 0 <= t < self.vocab_size for t in req.prompt):
            raise RequestError(f"prompt token ids must be in 0..{self.vocab_size - 1}")
        if any(not 0 <= t < self.vocab_size for t in req.forced_tokens):
            raise RequestError(f"forced token ids must be in 0..{self.vocab_size - 1}")
        if req.max_tokens < 1:
            raise RequestError("max_tokens must be >= 1")
        if len(req.prompt) + req.max_tokens > self.max_model_len:
            raise RequestError(f"prompt ({len(req.prompt)} tokens) + max_tokens ({req.max_tokens}) exceeds the"
                               f" context of {self.max_model_len} tokens")
        if not req.temperature >= 0 or not 0 < req.top_p <= 1 or req.top_k < 0:  # (NaN fails every comparison)
            raise RequestError("temperature must be >= 0, top_p in (0, 1], top_k >= 0")

    def run(self, step: list[Chunk]) -> list[int | None]:
        """One forward for the whole step. Returns each chunk's new token, or None for a prompt chunk that is not
        the prompt's last (nothing to sample yet)."""
        if self.seq2seq is not None:
            return self.run_seq2seq([chunk.seq for chunk in step])
        if self.flat_step is None:
            raise RuntimeError("Engine.run needs enable_batching() first")
        owner, positions, rows = _layout(step)
        if self.steps is not None:
            self.steps.begin([chunk.seq.request_id for chunk in step], owner, positions=positions,
                             phases=["prefill" if chunk.seq.prompt_left else "decode" for chunk in step])
        parts = [RequestTokens(c.seq.cache, c.seq.cached, c.tokens, len(c.seq.req.prompt) if c.seq.prompt_left else 0)
                 for c in step]
        if self.one_at_a_time and len(step) > 1 and self.steps is not None:
            logits = iter(self.forward_apart(step, parts))
        else:
            logits = iter(self.flat_step.forward(parts, rows))
        tokens = []
        for chunk in step:
            chunk.seq.cached += len(chunk.tokens)
            samples = chunk.seq.cached == chunk.seq.num_tokens
            tokens.append(self.accept_or_fail(chunk.seq, next(logits)) if samples else None)
        return tokens

    def rewind(self, step: list[Chunk]) -> bool:
        """Undo what a failed ``run`` of ``step`` appended to its requests' caches (each back to ``seq.cached``
        tokens), so that each request can run again on its own; False where a cache cannot be rewound exactly
        (an encoder-decoder's, sliding-window or recurrent layers: they drop or fold in what they hold)."""
        if self.seq2seq is not None or self.one_at_a_time or (self.flat_step and self.flat_step.own_cache):
            return False  # (a model's own cache class may hold state beside its layers: MiniMax's linear cache)
        caches = [(chunk.seq.cache, chunk.seq.cached) for chunk in step]
        if not all(_rewindable(cache) for cache, _ in caches):
            return False
        for cache, cached in caches:
            for layer in cache.layers:
                if layer.is_initialized and (extra := layer.get_seq_length() - cached) > 0:
                    layer.crop(-extra)
        return True

    def forward_apart(self, step: list[Chunk], parts: list[RequestTokens]) -> list[torch.Tensor]:
        """A model whose per-request state the flattened step cannot split (recurrent layers): one forward per
        request, meeting at every MoE layer (``lockstep.py``); the logits of the chunks that sample, in order."""
        outs = self.together.run([lambda p=p: self.flat_step.forward([p], [len(p.tokens) - 1])[0] for p in parts])
        return [out for out, c in zip(outs, step) if c.seq.cached + len(c.tokens) == c.seq.num_tokens]

    def run_seq2seq(self, seqs: list[Sequence]) -> list[int | None]:
        """An encoder-decoder step: a request's whole prompt is encoded on its first (``seq2seq.py``)."""
        tokens = []
        for seq, logits in zip(seqs, self.seq2seq.forward(seqs)):
            seq.cached = seq.num_tokens
            tokens.append(self.accept_or_fail(seq, logits))
        return tokens

    def accept_or_fail(self, seq: Sequence, logits: torch.Tensor) -> int | None:
        """The next token, or None with ``seq.error`` set when this request cannot be sampled."""
        try:
            return self.accept(seq, logits)
        except SamplingError as exc:
            seq.error, seq.error_code = str(exc), exc.code
            return None

    @torch.inference_mode()
    def step(self, seq: Sequence) -> int:
        """Run one forward (the whole prompt first, then one token) and return the next token."""
        if self.seq2seq is not None:
            logits = self.seq2seq.forward([seq])[0]
            seq.cached = seq.num_tokens
            return self.accept(seq, logits)
        ids = seq.req.prompt if not seq.generated else seq.generated[-1:]
        device = self.device
        input_ids = torch.tensor([ids], dtype=torch.long, device=device)
        if self.steps is not None:
            self.steps.begin([seq.req.request], [0] * len(ids))
        with current(device):
            out = self.model(input_ids=input_ids, past_key_values=seq.cache, use_cache=True, logits_to_keep=1,
                             attention_mask=torch.ones(1, seq.num_tokens, dtype=torch.long, device=device))
        seq.cached = seq.num_tokens
        return self.accept(seq, out.logits[0, -1].float().cpu())

    def accept(self, seq: Sequence, logits: torch.Tensor) -> int:
        forced = seq.req.forced_tokens
        token = forced[len(seq.generated)] if len(seq.generated) < len(forced) else sample(logits, seq.req,
                                                                                            seq.generator)
        seq.generated.append(token)
        seq.finish_reason = self.finish_reason(seq, token)
        return token

    def finish_reason(self, seq: Sequence, token: int) -> str | None:
        if token in seq.req.stop_token_ids:
            return "stop"
        if len(seq.generated) >= seq.req.max_tokens:
            return "length"
        return None


def _rewindable(cache) -> bool:
    """A plain ``DynamicCache`` of full-attention layers only: what it appended can be cropped off exactly."""
    return type(cache) is DynamicCache and getattr(cache, "is_croppable", True) \
        and all(type(layer) in (GrowingLayer, DynamicLayer) for layer in cache.layers)


def _layout(step: list[Chunk]) -> tuple[list[int], list[int], list[int]]:
    """Per flattened token: its chunk's index and its position; and the rows whose logits sample a token (the
    last row of each chunk that completes its sequence's known tokens)."""
    owner, positions, rows = [], [], []
    for i, chunk in enumerate(step):
        seq, n = chunk.seq, len(chunk.tokens)
        owner.extend([i] * n)
        positions.extend(range(seq.cached, seq.cached + n))
        if seq.cached + n == seq.num_tokens:
            rows.append(len(owner) - 1)
    return owner, positions, rows


def sample(logits: torch.Tensor, req: m.GenerateRequest, generator: torch.Generator | None) -> int:
    if bool(torch.isnan(logits).any()):  # (argmax would pick a NaN's index, or 0, and go on emitting garbage)
        raise ModelOutputError("the model's logits for this request hold NaN (a numerical fault in the model or its"
                               " weights): the request cannot go on")
    if req.temperature < GREEDY_TEMPERATURE:
        return int(torch.argmax(logits))
    logits = logits.float() / req.temperature
    if 0 < req.top_k < logits.numel():
        kth = torch.topk(logits, req.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if req.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= req.top_p  # keep the token that crosses top_p
        drop[0] = False  # and always the most likely one (a top_p below float32's resolution rounds to 0)
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if not bool(torch.isfinite(probs).all()):
        raise SamplingError(f"cannot sample: the distribution at temperature {req.temperature:g}, top_p"
                            f" {req.top_p:g}, top_k {req.top_k} is not finite (the logits hold inf or nan)")
    return int(torch.multinomial(probs, 1, generator=generator))
