"""Hidden-state speculation: guess the experts of MoE layers l+1..l+k from layer l's hidden state.

The routers of every MoE layer are stacked once into one ``[layers * experts, hidden]`` matrix; the guess at layer
``l`` is a single matmul of the hidden state with the contiguous rows of layers l+1..l+k (a view, no copy). Each
target layer's top-k per token is picked as its router would (the scores plus DeepSeek's
``e_score_correction_bias`` when there is one; the router's own bias is in the logits); a guessed expert's
confidence is the highest probability a token gave it (softmax over the layer's experts, or the sigmoid score for
sigmoid routers). Guesses below the confidence threshold are not sent. Group-limited routing (DeepSeek's
``n_group`` / ``topk_group``) is applied as the router applies it: the experts of the groups a token does not keep
cannot be guessed (``NextGate.groups``). Where every MoE block's input norm is a known RMSNorm (``moe_norms.py``),
each router's rows are stacked times its own layer's gain and layer l's hidden state is divided by layer l's, so
layer l+d's router sees the residual stream under the gain it was trained with, not layer l's.

None of it touches the computed values: the routers are copies (or the model's own tensors, only read).
"""
from __future__ import annotations

import ctypes
import logging

import numpy as np
import torch
import torch.nn.functional as F

from services.worker.moe_norms import premise_holds

log = logging.getLogger("moeinf.worker")
_P, _I = ctypes.c_void_p, ctypes.c_int64
GUESS_MAX_HIDDEN, GUESS_MAX_EXPERTS, GUESS_MAX_TOP = 16384, 512, 16  # guess.c's limits


class Speculator:
    def __init__(self, routers: list, num_experts: int, max_ahead: int, always: bool = False,
                 gains: list[torch.Tensor] | None = None):
        """``routers[i]``: MoE layer i's ``NextGate`` (None where it has none: that layer is never guessed);
        ``always``: guess even when memd says it has no use for guesses (a trace being recorded keeps them);
        ``gains[i]``: the gain of MoE layer i's input RMSNorm (``moe_norms.moe_input_gains``; None: uncorrected)."""
        self.E, self.L, self.max_ahead = num_experts, len(routers), max(0, max_ahead)
        self.always = always
        self.unscale = None  # float32 [L, hidden]: 1 / layer l's input gain, or None (no correction)
        present = [r for r in routers if r is not None]
        if not present or self.max_ahead == 0:
            self.weight = None
            return
        hidden, dtype, device = present[0].weight.shape[1], present[0].weight.dtype, present[0].weight.device
        self.weight = torch.zeros(self.L * num_experts, hidden, dtype=dtype, device=device)  # on the matmul's device
        self.bias = torch.zeros(self.L * num_experts, dtype=dtype, device=device)
        self.correction = torch.zeros(self.L * num_experts, dtype=torch.float32)
        self.sigmoid = torch.zeros(self.L, dtype=torch.bool)
        self.any_sigmoid = False
        self.known = torch.tensor([r is not None for r in routers])
        self.known_np = self.known.numpy()
        self.known_u8 = self.known_np.astype(np.uint8)
        self.kernel: GuessKernel | None = None  # ``use_kernels``: one token's guesses in one call
        self.top_k = max(r.top_k for r in present)
        self.groups = [None if r is None else r.groups for r in routers]
        self.routers, self.checked = None, set()  # (kept to undo the correction: ``_check_premise``)
        if gains is not None and len(gains) == self.L and not all(torch.equal(g, gains[0]) for g in gains):
            stacked = torch.stack([g.float().cpu() for g in gains])  # (one gain for all layers changes nothing)
            self.unscale = (1.0 / stacked).to(device)
            self.routers = routers
        self._stack(routers, None if self.unscale is None else stacked)
        with torch.no_grad():
            for i, r in enumerate(routers):
                if r is None:
                    continue
                rows = slice(i * num_experts, (i + 1) * num_experts)
                if r.bias is not None:
                    self.bias[rows] = r.bias.to(dtype)
                if r.correction is not None:
                    self.correction[rows] = r.correction.float().cpu()
                    self.sigmoid[i] = True
                    self.any_sigmoid = True

    @torch.no_grad()
    def _stack(self, routers: list, gains: torch.Tensor | None) -> None:
        """Each router's rows into ``weight``, times its own layer's input gain when ``gains`` are given."""
        for i, r in enumerate(routers):
            if r is not None:
                gain = 1.0 if gains is None else gains[i].to(r.weight.device)
                self.weight[i * self.E:(i + 1) * self.E] = (r.weight.float() * gain).to(self.weight.dtype)

    def use_kernels(self, kernels) -> bool:
        """Guess one token at a time with ``guess.c`` from the compiled kernels (``dequant_kernel.load``), where
        it computes what ``pick`` would: float32 or bfloat16 routers on the CPU with softmax scores, no group-limited
        routing, and shapes within the kernel's limits; True if it does."""
        if kernels is None or self.weight is None or self.weight.dtype not in (torch.bfloat16, torch.float32) \
                or self.weight.device.type != "cpu" or self.any_sigmoid or any(g is not None for g in self.groups):
            return False
        too_big = self.weight.shape[1] > GUESS_MAX_HIDDEN or self.E > GUESS_MAX_EXPERTS
        if too_big or self.top_k > min(GUESS_MAX_TOP, self.E):
            return False
        self.kernel = GuessKernel(kernels, self.max_ahead * self.top_k)
        return True

    def _check_premise(self, layer: int, hidden: torch.Tensor) -> None:
        """On a layer's first input: the correction stays only if the input over its gain is the normalised stream
        (``moe_norms.premise_holds``); otherwise the routers are stacked plain again, for every layer."""
        self.checked.add(layer)
        if not premise_holds(hidden, self.unscale[layer]):
            log.info("hidden-state guesses: MoE layer %d's input is not its norm's output over the gain found;"
                     " guessing from the inputs as they are", layer)
            self.unscale = None
            self._stack(self.routers, None)
            self.routers = None

    def ahead(self, layer: int, wanted: int) -> int:
        """How many layers after ``layer`` can be guessed (at most ``wanted`` and the knob)."""
        if self.weight is None:
            return 0
        return max(0, min(wanted, self.max_ahead, self.L - 1 - layer))

    def guess(self, layer: int, hidden_states: torch.Tensor, wanted: int,
              threshold: float = 0.0) -> tuple[list[int], list[int], list[float]]:
        """``(target layers, experts, confidences)``, flat, for MoE layers layer+1..layer+k."""
        return self.pick(self.launch(layer, hidden_states, wanted), threshold)

    @torch.no_grad()
    def launch(self, layer: int, hidden_states: torch.Tensor, wanted: int) -> tuple | None:
        """The guess's one matmul, its logits on their way to the host: on a GPU the copy is queued without waiting,
        and the layer's read of its routed ids (the one host synchronisation per layer) completes it; ``pick`` after
        that. None when nothing is guessed."""
        k = self.ahead(layer, wanted)
        if k == 0:
            return None
        lo, hi = (layer + 1) * self.E, (layer + 1 + k) * self.E
        hidden = hidden_states.reshape(-1, self.weight.shape[1])
        if self.unscale is not None and layer not in self.checked:
            self._check_premise(layer, hidden)
        if self.kernel is not None and hidden.shape[0] == 1 and hidden.dtype == torch.bfloat16 \
                and hidden.device.type == "cpu" and hidden.stride(-1) == 1:
            return layer, k, None, (hidden, self.kernel)  # one token on the CPU: ``pick`` guesses in one call
        if self.unscale is not None:  # the residual stream normalised, without layer l's gain (in float32)
            hidden = hidden.float() * self.unscale[layer]
        hidden = hidden.to(self.weight.dtype)
        logits = F.linear(hidden, self.weight[lo:hi], self.bias[lo:hi]).float()
        return layer, k, logits.to("cpu", non_blocking=True), None

    @torch.no_grad()
    def pick(self, launched: tuple | None, threshold: float = 0.0) -> tuple[list[int], list[int], list[float]]:
        """The guesses of a ``launch`` whose logits are on the host, kept where confident enough."""
        if launched is None:
            return [], [], []
        layer, k, logits, fast = launched
        if logits is None:  # (guess.c's)
            hidden, kernel = fast
            unscale = None if self.unscale is None else self.unscale[layer]
            guessed = kernel.guess(hidden, unscale, self.weight, self.bias, layer + 1, k, self.E, self.top_k,
                                   self.known_u8, threshold)
            if guessed is not None:
                return guessed
            self.kernel = None  # (a shape guess.c does not take: torch's ops from now on)
            return self.pick(self.launch(layer, hidden, k), threshold)
        logits = logits.view(-1, k, self.E)  # [T, k, E]
        probs, select = self._scores(layer, k, logits)
        if logits.shape[0] == 1:  # one token: its picks are the guesses, each with its own probability
            return self._one_token(layer, k, probs[0].numpy(), select[0].numpy(), threshold)
        top = select.topk(min(self.top_k, self.E), dim=-1).indices  # [T, k, top_k]
        conf = torch.zeros(k, self.E)
        picked = probs.gather(-1, top)  # [T, k, top_k]
        flat = (torch.arange(k).view(1, k, 1) * self.E + top).reshape(-1)
        conf = conf.view(-1).scatter_reduce(0, flat, picked.reshape(-1), reduce="amax").view(k, self.E)
        chosen = torch.zeros(k * self.E, dtype=torch.bool)
        chosen[flat] = True
        keep = chosen.view(k, self.E) & (conf >= threshold) & self.known[layer + 1:layer + 1 + k].view(k, 1)
        ahead, expert = keep.nonzero(as_tuple=True)
        return (ahead + layer + 1).tolist(), expert.tolist(), conf[ahead, expert].tolist()

    def _scores(self, layer: int, k: int, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(probs, select)`` [T, k, E]: each target router's probabilities, and the scores its top-k is picked by."""
        if not self.any_sigmoid:
            probs = select = logits.softmax(-1)
        else:
            sigmoid = self.sigmoid[layer + 1:layer + 1 + k].view(1, k, 1)
            probs = torch.where(sigmoid, logits.sigmoid(), logits.softmax(-1))
            correction = self.correction[(layer + 1) * self.E:(layer + 1 + k) * self.E].view(1, k, self.E)
            select = torch.where(sigmoid, probs + correction, probs)
        groups = self.groups[layer + 1:layer + 1 + k]
        if any(g is not None for g in groups):
            select = select.clone() if select is probs else select
            for j, g in enumerate(groups):
                if g is not None:
                    select[:, j] = limit_to_groups(select[:, j], *g)
        return probs, select

    def _one_token(self, layer: int, k: int, probs: np.ndarray, select: np.ndarray,
                   threshold: float) -> tuple[list[int], list[int], list[float]]:
        """``guess`` for a single token (``probs``, ``select``: [k, E]) in numpy, without torch's per-op cost or
        the scatter over tokens: its top-k per target layer, in expert order, kept where the probability reaches
        ``threshold`` and the layer has a router."""
        top = min(self.top_k, self.E)
        experts = np.sort(np.argpartition(-select, top - 1, axis=-1)[:, :top], axis=-1)  # [k, top_k]
        conf = probs[np.arange(k)[:, None], experts]
        ahead, j = ((conf >= threshold) & self.known_np[layer + 1:layer + 1 + k, None]).nonzero()
        return (ahead + layer + 1).tolist(), experts[ahead, j].tolist(), conf[ahead, j].tolist()


class GuessKernel:
    """``guess.c``'s entry in the kernels' library, and the buffers its guesses come back in (one caller at a time:
    the worker's compute thread; a lockstep batch of several forwards takes torch's path)."""

    def __init__(self, kernels, most: int):
        self.fn = kernels.lib.moeinf_guess
        self.fn.argtypes = [_P, _P, _I, _P, _P, ctypes.c_int, _I, _I, _I, _P, ctypes.c_float, _P, _P, _P]
        self.fn.restype = ctypes.c_int
        most = max(1, most)
        self.ahead, self.experts = (ctypes.c_int32 * most)(), (ctypes.c_int32 * most)()
        self.conf = (ctypes.c_float * most)()

    def guess(self, hidden: torch.Tensor, unscale: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor,
              first: int, k: int, experts: int, top: int, known: np.ndarray,
              threshold: float) -> tuple[list[int], list[int], list[float]] | None:
        """``Speculator.pick``'s result for one token's ``hidden`` [1, h] and target layers first..first+k-1, or
        None for a shape the kernel does not take."""
        if k * top > len(self.conf):
            return None
        h, size = hidden.shape[-1], weight.element_size()
        n = self.fn(hidden.data_ptr(), None if unscale is None else unscale.data_ptr(), h,
                    weight.data_ptr() + first * experts * h * size, bias.data_ptr() + first * experts * size,
                    size == 4, k, experts, top, known.ctypes.data + first, threshold, self.ahead, self.experts,
                    self.conf)
        if n < 0:
            return None
        return [first + a for a in self.ahead[:n]], self.experts[:n], self.conf[:n]


def limit_to_groups(select: torch.Tensor, groups: int, kept: int, rule: str) -> torch.Tensor:
    """``select`` [T, E] with the experts of the groups a token does not keep at -inf, as group-limited routers do:
    groups scored by their two best scores summed (``top2``) or their best (``max``), the ``kept`` best kept."""
    by_group = select.view(select.shape[0], groups, -1)
    score = by_group.topk(2, dim=-1).values.sum(-1) if rule == "top2" else by_group.max(dim=-1).values
    keep = torch.zeros_like(score, dtype=torch.bool).scatter_(1, score.topk(kept, dim=-1).indices, True)
    return by_group.masked_fill(~keep.unsqueeze(-1), float("-inf")).view_as(select)


def within(guesses: tuple[list[int], list[int], list[float]], layer: int, ahead: int, threshold: float,
           wanted: bool = True) -> tuple[list[int], list[int], list[float]]:
    """The ``(target layers, experts, confidences)`` of ``guesses`` (made at ``layer``) at most ``ahead`` layers
    ahead with at least ``threshold`` confidence; none unless ``wanted`` (memd's word)."""
    keep = [i for i, (t, c) in enumerate(zip(guesses[0], guesses[2]))
            if wanted and t - layer <= ahead and c >= threshold]
    return [guesses[0][i] for i in keep], [guesses[1][i] for i in keep], [guesses[2][i] for i in keep]
