"""Several forwards of one step, one per request, meeting at every MoE layer.

Some requests cannot share a forward: an encoder-decoder request's cross-attention reads its own encoder output,
and a recurrent layer's state (Jamba, Qwen3-Next, ...) belongs to one request. Each such request runs its own
forward, in a thread of a small pool, and at every MoE layer the forwards meet: one of them runs the layer for all
(``forward_together``: their tokens concatenated, one acquire of the union of their experts, one pass of each
routed expert) and each goes on with its own rows. Everything else in the model runs per request, with the shapes
of a lone run. A forward that fails breaks the barrier, so the others fail at their next layer instead of waiting
forever; the step's requests then fail together (their recurrent or encoder state cannot be rewound, so the
step is not run again request by request as a flattened step is: ``Engine.rewind``).
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch


class Lockstep:
    """``n`` forwards, one per thread, meeting at each MoE layer: released together once one of them has run the
    layer on everyone's tokens."""

    def __init__(self, n: int):
        self.barrier = threading.Barrier(n)
        self.inputs: list = [None] * n
        self.outputs: list = []
        self.error: BaseException | None = None
        self.local = threading.local()  # .index: this thread's forward

    def meet(self, binding, hidden_states, args, kwargs):
        """At an MoE layer: wait for the other forwards; forward 0 (the compute thread, the only one that talks to
        memd) runs ``binding.forward_together`` for all. Its error is raised as it is there (a dead memd stays a
        ``MemdDeadError``), and as ``PeerFailed`` in the others."""
        i = self.local.index
        self.inputs[i] = (hidden_states, args, kwargs)
        self.barrier.wait()
        if i == 0:
            try:
                self.outputs, self.error = binding.forward_together(self.inputs), None
            except BaseException as exc:  # every forward fails with it, none waits forever
                self.outputs, self.error = [], exc
        self.barrier.wait()
        if self.error is not None:
            if i == 0:
                raise self.error
            raise PeerFailed(f"the batched MoE layer failed: {self.error}") from self.error
        return self.outputs[i]


class PeerFailed(RuntimeError):
    """Another forward of the step failed (its error is the step's)."""


class Together:
    """Runs the forwards of a step in lockstep (a thread pool that grows to the largest step seen)."""

    def __init__(self, steps):
        self.steps = steps  # the StepState every MoE binding reads ``lockstep`` from
        self.pool: ThreadPoolExecutor | None = None

    def run(self, forwards: list[Callable[[], torch.Tensor]]) -> list[torch.Tensor]:
        """Each of ``forwards`` in its own thread (the first in this one), meeting at every MoE layer; their
        results in order, or the first real error of any of them."""
        lockstep = Lockstep(len(forwards))
        if self.pool is None or self.pool._max_workers < len(forwards) - 1:
            if self.pool is not None:
                self.pool.shutdown(wait=False)
            self.pool = ThreadPoolExecutor(max_workers=max(1, len(forwards) - 1), thread_name_prefix="moeinf-forward")

        def run(i: int) -> torch.Tensor:
            lockstep.local.index = i
            try:
                return forwards[i]()
            except BaseException:
                if lockstep.error is None:  # failed on its own: the others stop waiting for it at their next layer
                    lockstep.barrier.abort()  # (a failed layer fails every forward already: no abort races them)
                raise

        self.steps.lockstep = lockstep
        try:
            others = [self.pool.submit(run, i) for i in range(1, len(forwards))]
            results = [_result(lambda: run(0)), *(_result(f.result) for f in others)]
        finally:
            self.steps.lockstep = None
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:  # the first real error (the others saw a broken barrier or the layer's error second-hand)
            raise next((e for e in failed if not isinstance(e, threading.BrokenBarrierError | PeerFailed)), failed[0])
        return results


def joined(values: list, rows: list[int]):
    """One argument of several forwards: per-token tensors (first dimension = that forward's tokens) concatenated;
    anything else must be the same object or an equal non-tensor value for all."""
    if all(isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n for v, n in zip(values, rows)):
        return torch.cat(values)
    first = values[0]
    if all(v is first or (not isinstance(v, torch.Tensor) and not isinstance(first, torch.Tensor) and v == first)
           for v in values):
        return first
    raise RuntimeError("the forwards of a batched step reached an MoE layer with arguments that cannot be joined")


def together(compute, inputs: list) -> list[torch.Tensor]:
    """``compute(hidden_states, args, kwargs)`` once on the inputs of several forwards (their tokens concatenated),
    each forward's rows back."""
    flat = [h.reshape(-1, h.shape[-1]) for h, _, _ in inputs]  # [tokens, hidden] each
    rows = [h.shape[0] for h in flat]
    args = tuple(joined([a[k] for _, a, _ in inputs], rows) for k in range(len(inputs[0][1])))
    kwargs = {k: joined([kw[k] for _, _, kw in inputs], rows) for k in inputs[0][2]}
    out = compute(torch.cat(flat), args, kwargs)
    return [part.reshape(h.shape) for part, (h, _, _) in zip(out.reshape(-1, out.shape[-1]).split(rows), inputs)]


def _result(get):
    try:
        return get()
    except BaseException as exc:
        return exc
