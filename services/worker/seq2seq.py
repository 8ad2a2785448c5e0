"""Encoder-decoder generation (Switch Transformers, NLLB-MoE): what ``model.generate`` runs, request by request,
with the MoE layers of a step's decoder tokens batched.

A request's first step runs the encoder once on the whole prompt (its own forward, so the routing trace of the
encoder's MoE layers is the prompt's), then the decoder on the decoder start token; every later step runs the
decoder on the last token, with the request's ``EncoderDecoderCache`` (self-attention keys grow, the
cross-attention keys were computed once) and its encoder output. Tokens forced at the start of the output (NLLB's
target language, ``GenerateRequest.forced_tokens``) are taken in place of the first samples, as generate's
``forced_bos_token_id`` does. The encoder is bidirectional, so ``--max-prefill-chunk`` does not split it: the
first step encodes the whole prompt whatever chunk the scheduler gave it.

**A step's decoder tokens, batched at the MoE layers** (``lockstep.py``). Each request's cross-attention reads its
own encoder output and its self-attention its own cache, so every request runs its own decoder forward, each in a
thread; at every MoE layer the forwards meet, and one of them runs the layer for all: one acquire of the union of
their experts and one pass of each routed expert over all their tokens, and each forward goes on with its own rows.
Attention and the dense layers stay per request, with the shapes of a lone run.
"""
from __future__ import annotations

import torch
from transformers import DynamicCache, EncoderDecoderCache

from services.worker.kv_cache import growing_cache
from services.worker.lockstep import Together
from services.worker.tracing import StepState


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
        self.together = Together(steps)

    def new_cache(self, limit: int = 0) -> EncoderDecoderCache:
        """A request's cache: the decoder's self-attention grows in place, up to ``limit`` tokens (0: unbounded)."""
        config = self.model.config
        return EncoderDecoderCache(growing_cache(config, limit), DynamicCache(config=config))

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
        return self.together.run([lambda seq=seq: self.decode(seq, declared=True) for seq in seqs])

    def _position(self, seq) -> int:
        return len(seq.req.prompt) + len(seq.generated)

    def _begin(self, seqs: list, tokens: list[int], starts: list[int], phase: str) -> None:
        if self.steps is None:
            return
        owner = [i for i, n in enumerate(tokens) for _ in range(n)]
        positions = [start + j for start, n in zip(starts, tokens) for j in range(n)]
        self.steps.begin([seq.request_id for seq in seqs], owner, positions=positions, phases=[phase] * len(seqs))
