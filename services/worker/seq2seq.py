"""Encoder-decoder generation (Switch Transformers, NLLB-MoE): what ``model.generate`` runs, one request at a time.

A request's first step runs the encoder once on the whole prompt (its own forward, so the routing trace of the
encoder's MoE layers is the prompt's), then the decoder on the decoder start token; every later step runs the
decoder on the last token, with the request's ``EncoderDecoderCache`` (self-attention keys grow, the
cross-attention keys are computed once) and its encoder output. Tokens forced at the start of the output (NLLB's
target language, ``GenerateRequest.forced_tokens``) are taken in place of the first samples, as generate's
``forced_bos_token_id`` does. The decode steps of several requests share a scheduler step but not a forward:
each request's cross-attention reads its own encoder output, so they run one after another (documented in
docs/families.md).
"""
from __future__ import annotations

import torch
from transformers import DynamicCache, EncoderDecoderCache

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

    def new_cache(self) -> EncoderDecoderCache:
        config = self.model.config
        return EncoderDecoderCache(DynamicCache(config=config), DynamicCache(config=config))

    @torch.inference_mode()
    def forward(self, seq) -> torch.Tensor:
        """The float32 logits of the next token of ``seq`` (an ``engine.Sequence``): the encoder first when it has
        not run, then one decoder token."""
        prompt = seq.req.prompt
        if seq.encoded is None:
            self._begin(seq, len(prompt), 0, "prefill")
            seq.encoded = self.model.get_encoder()(input_ids=torch.tensor([prompt]),
                                                   attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
        last = seq.generated[-1] if seq.generated else self.decoder_start
        self._begin(seq, 1, len(prompt) + len(seq.generated), "decode")
        out = self.model(encoder_outputs=seq.encoded, attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         decoder_input_ids=torch.tensor([[last]]), past_key_values=seq.cache, use_cache=True)
        return out.logits[0, -1].float()

    def _begin(self, seq, tokens: int, position: int, phase: str) -> None:
        if self.steps is not None:
            self.steps.begin([seq.request_id], [0] * tokens, positions=list(range(position, position + tokens)),
                             phases=[phase])
