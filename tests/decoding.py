"""Decoding helpers for the worker's tests, with transformers as the oracle: its own greedy continuation, one request
scheduled through the engine, and a flattened step decoding side by side with transformers."""
import torch

from common import messages as m
from services.worker.flat_step import RequestTokens
from services.worker.scheduler import Scheduler


def generate_greedy(model, prompt: list[int], tokens: int) -> list[int]:
    """transformers' own greedy continuation of ``prompt`` (the oracle the engine's tokens must equal)."""
    out = model.generate(torch.tensor([prompt]), max_new_tokens=tokens, do_sample=False, pad_token_id=0,
                         eos_token_id=None)
    return out[0, len(prompt):].tolist()


def run_scheduled(engine, prompt: list[int], tokens: int, limits) -> list[int]:
    """One request through ``engine.run`` as the worker's loop schedules it (``limits``: its ``Limits``): the
    tokens it generated."""
    scheduler = Scheduler(limits)
    seq = engine.start(m.GenerateRequest("a", prompt, tokens))
    scheduler.add(seq)
    with torch.inference_mode():
        while seq.finish_reason is None:
            engine.run(scheduler.schedule())
    return seq.generated


def flat_against_transformers(flat, reference, prompt: list[int], steps: int, cache=None) -> float:
    """``steps`` steps of ``flat`` (a ``FlatStep``: ``prompt`` first, then one token a step, into ``cache`` or a new
    one) beside ``reference`` (plain transformers, chaining its own cache, whatever class it wants), both taking
    transformers' greedy token: the largest difference between their last logits."""
    mine = flat.new_cache() if cache is None else cache
    theirs, past, worst, tokens = None, 0, 0.0, list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            got = flat.forward([RequestTokens(mine, past, tokens)], [len(tokens) - 1])[0]
            out = reference(input_ids=torch.tensor([tokens]), past_key_values=theirs, use_cache=True)
            theirs, want = out.past_key_values, out.logits[0, -1].float()
            worst = max(worst, (got - want).abs().max().item())
            past += len(tokens)
            tokens = [int(want.argmax())]
    return worst
