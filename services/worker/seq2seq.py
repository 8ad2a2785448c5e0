"""Encoder-decoder generation (Switch Transformers, NLLB-MoE): what ``model.generate`` runs, request by request,
with the MoE layers of a step's decoder tokens batched.

A request's first step runs the encoder once on the whole prompt (its own forward, so the routing trace of the
encoder's MoE layers is the prompt's), then the decoder on the decoder start token; every later step runs the
decoder on the last token, with the request's ``EncoderDecoderCache`` (self-attention keys grow, the
cross-attention keys were computed once) and its encoder output. Tokens forced at the start of the output (NLLB's
target language, ``GenerateRequest.forced_tokens``) are taken in place of the first samples, as generate's
``forced_bos_token_id`` does. The encoder is bidirectional, so ``--max-prefill-chunk`` does not split it: the
first step encodes the whole prompt whatever chunk the scheduler gave it.

**A step's decoder tokens, batched where it pays** (``Lockstep``). Each request's cross-attention reads its own
encoder output and its self-attention its own cache, so every request runs its own decoder forward, each in a thread
of a small pool; at every MoE layer the forwards meet, and one of them runs the layer for all: one acquire of the
union of their experts and one pass of each routed expert over all their tokens (``KeyedBinding.forward`` on the
tokens concatenated), and each forward goes on with its own rows. Attention and the dense layers stay per request,
with the shapes of a lone run.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import torch
from transformers import DynamicCache, EncoderDecoderCache

from services.worker.tracing import StepState


class Lockstep:
    """``n`` decoder forwards, one per thread, meeting at each MoE layer: the last to arrive is released with the
    others once one of them has run the layer on everyone's tokens."""

    def __init__(self, n: int):
        self.barrier = threading.Barrier(n)
        self.inputs: list = [None] * n
        self.outputs: list = []
        self.error: BaseException | None = None
        self.local = threading.local()  # .index: this thread's forward

    def meet(self, binding, hidden_states, args, kwargs):
        i = self.local.index
        self.inputs[i] = (hidden_states, args, kwargs)
        if self.barrier.wait() == 0:  # exactly one thread runs the layer for all
            try:
                self.outputs, self.error = binding.forward_together(self.inputs), None
            except BaseException as exc:  # every forward fails with it, none waits forever
                self.outputs, self.error = [], exc
        self.barrier.wait()
        if self.error is not None:
            raise RuntimeError(f"the batched MoE layer failed: {self.error}") from self.error
        return self.outputs[i]


class Seq2Seq:
    def __init__(self, model, steps: StepState | None):
        self.model = model
        self.steps = steps
        generation = model.generation_config
        start = generation.decoder_start_token_id
        if start is None:
            start = model.config.decoder_start_token_id
        if start is None:
            raise RuntimeError(f"{type(model).__name__}: neither generation_config.json nor config.json sets"
                               " decoder_start_token_id, which an encoder-decoder model needs to start decoding")
        self.decoder_start = int(start)
        self.pool: ThreadPoolExecutor | None = None

    def new_cache(self) -> EncoderDecoderCache:
        config = self.model.config
        return EncoderDecoderCache(DynamicCache(config=config), DynamicCache(config=config))

    def forward(self, seqs: list) -> list[torch.Tensor]:
        """The float32 logits of the next token of each of ``seqs`` (``engine.Sequence``): the encoder first for
        those whose prompt is not encoded yet (one forward each), then one decoder token each (batched at the MoE
        layers when there are several)."""
        for seq in seqs:
            if seq.encoded is None:
                self.encode(seq)
        if len(seqs) == 1 or self.steps is None:
            return [self.decode(seq) for seq in seqs]
        return self.decode_together(seqs)

    @torch.inference_mode()
    def encode(self, seq) -> None:
        prompt = seq.req.prompt
        self._begin([seq], [len(prompt)], [0], "prefill")
        seq.encoded = self.model.get_encoder()(input_ids=torch.tensor([prompt]),
                                               attention_mask=torch.ones(1, len(prompt), dtype=torch.long))

    @torch.inference_mode()
    def decode(self, seq, declared: bool = False) -> torch.Tensor:
        if not declared:
            self._begin([seq], [1], [self._position(seq)], "decode")
        last = seq.generated[-1] if seq.generated else self.decoder_start
        out = self.model(encoder_outputs=seq.encoded, attention_mask=torch.ones(1, len(seq.req.prompt),
                                                                                dtype=torch.long),
                         decoder_input_ids=torch.tensor([[last]]), past_key_values=seq.cache, use_cache=True)
        return out.logits[0, -1].float()

    def decode_together(self, seqs: list) -> list[torch.Tensor]:
        self._begin(seqs, [1] * len(seqs), [self._position(s) for s in seqs], "decode")
        lockstep = Lockstep(len(seqs))
        if self.pool is None or self.pool._max_workers < len(seqs) - 1:
            self.pool = ThreadPoolExecutor(max_workers=len(seqs) - 1, thread_name_prefix="moeinf-decoder")

        def run(i: int) -> torch.Tensor:
            lockstep.local.index = i
            try:
                return self.decode(seqs[i], declared=True)
            except BaseException:
                lockstep.barrier.abort()  # the others stop waiting for this forward at their next layer
                raise

        self.steps.lockstep = lockstep
        try:
            others = [self.pool.submit(run, i) for i in range(1, len(seqs))]
            first = _result(lambda: run(0))
            rest = [_result(f.result) for f in others]
        finally:
            self.steps.lockstep = None
        results = [first, *rest]
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:  # the first real error (the others saw a broken barrier)
            raise next((e for e in failed if not isinstance(e, threading.BrokenBarrierError)), failed[0])
        return results

    def _position(self, seq) -> int:
        return len(seq.req.prompt) + len(seq.generated)

    def _begin(self, seqs: list, tokens: list[int], starts: list[int], phase: str) -> None:
        if self.steps is None:
            return
        owner = [i for i, n in enumerate(tokens) for _ in range(n)]
        positions = [start + j for start, n in zip(starts, tokens) for j in range(n)]
        self.steps.begin([seq.request_id for seq in seqs], owner, positions=positions, phases=[phase] * len(seqs))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False)


def _result(get):
    try:
        return get()
    except BaseException as exc:
        return exc
