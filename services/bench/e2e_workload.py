"""The prompts of ``moeinf bench e2e``: a fresh workload for every repeat and client count, the same for every system.

memd learns from what it serves (the EAMC keeps finished requests' activation matrices), so a workload served twice is
easier the second time. By default every timed run therefore gets prompts that its system has never served: workload
``(repeat, concurrency)`` is drawn from its own seed (``--seed`` and the two indices), or, with ``--prompts FILE``, is
its own slice of the file's lines (the file must hold enough). Every system serves the same workloads, each in its own
processes (a fresh memd, its own state directory and EAMC, the page cache dropped), so the comparison is paired: the
same routing for every system, and no system has seen a prompt before it is timed on it. The untimed warm-up request
has its own seed too. ``--warm-eamc`` asks for the other scenario: one workload, served once untimed before the timed
runs and then again in every run; the report labels it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

PROMPT_LENGTHS = (16, 48, 24, 64, 8, 32, 40, 56)
WARMUP_LENGTH = 24
WARMUP_STREAM = 2**31 - 1  # the warm-up's seed index, apart from every workload's


@dataclass(frozen=True)
class Workloads:
    """Prompts by (repeat, concurrency index), the same for every system, drawn on demand."""

    model: Path
    requests: int
    seed: int
    warm: bool
    systems: tuple[str, ...]
    repeats: int
    concurrencies: int  # concurrency values measured per repeat
    lines: tuple[tuple[int, ...], ...] | None = None  # --prompts: tokenized lines
    vocab: int = 0

    @classmethod
    def build(cls, opts) -> Workloads:
        lines = None
        if opts.prompts is not None:
            lines = tuple(tuple(ids) for ids in _tokenized_lines(opts.model, opts.prompts))
            if not lines:
                raise ValueError(f"--prompts {opts.prompts}: no prompts in it")
        w = cls(opts.model, opts.requests, opts.seed, opts.warm_eamc, opts.run_systems, opts.repeats,
                len(opts.concurrency), lines, _vocab(opts.model))
        w.check()
        return w

    @property
    def runs(self) -> int:
        """Timed runs per system: repeats x concurrency values."""
        return self.repeats * self.concurrencies

    @property
    def needed(self) -> int:
        """Distinct prompts the run serves (every system serves the same ones)."""
        return self.requests if self.warm else self.requests * self.runs

    def check(self) -> None:
        if self.lines is not None and len(self.lines) < self.needed:
            raise ValueError(f"--prompts has {len(self.lines)} prompts; fresh prompts for every repeat and client"
                             f" count need {self.needed} ({self.runs} runs x"
                             f" {self.requests} requests): add prompts, or pass --warm-eamc to serve the same ones")

    def prompts(self, system: str, repeat: int = 0, concurrency_index: int = 0) -> list[list[int]]:
        """The workload of one timed run: the same for every ``system`` (with ``warm``: for every run too)."""
        index = 0 if self.warm else repeat * self.concurrencies + concurrency_index
        if self.lines is not None:
            return [list(p) for p in self.lines[index * self.requests:(index + 1) * self.requests]]
        rng = np.random.default_rng([self.seed, index])
        return [_random_ids(rng, PROMPT_LENGTHS[i % len(PROMPT_LENGTHS)], self.vocab) for i in range(self.requests)]

    def warmup(self) -> list[int]:
        """The untimed warm-up request's prompt: outside every workload."""
        return _random_ids(np.random.default_rng([self.seed, WARMUP_STREAM]), WARMUP_LENGTH, self.vocab)

    def longest(self) -> list[int]:
        """A prompt as long as the workload's longest, outside every workload (the runtime measurement's)."""
        if self.lines is not None:
            return list(max(self.lines, key=len))
        return _random_ids(np.random.default_rng([self.seed, WARMUP_STREAM - 1]), max(PROMPT_LENGTHS), self.vocab)

    def label(self) -> str:
        if self.warm:
            return ("WARM EAMC (--warm-eamc): one workload, served once untimed before the timed runs, then in every"
                    " run: memd has seen every prompt")
        return ("fresh prompts: every repeat and client count serves its own workload (its own seed), the same for"
                " every system (paired); each system runs in fresh processes, so memd's EAMC has not seen it")


def _tokenized_lines(model: Path, path: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return [tokenizer(line)["input_ids"] for line in lines]


def _vocab(model: Path) -> int:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model).get_text_config().vocab_size


def _random_ids(rng, n: int, vocab: int) -> list[int]:
    """Random token ids from 3 (skips the usual special tokens)."""
    return rng.integers(min(3, vocab - 1), vocab, n).tolist()
