"""``moeinf bench quality --model DIR --expert-format F``: what the compressed expert cache (memd
``--expert-format``) costs in model quality, against the checkpoint's own bf16/fp16/fp32 experts.

Two transformers models of the checkpoint: the reference as stored, and the same model with every expert replaced
by what the worker computes from memd's compressed slots: each expert converted by the cache's own code
(``CompressedStore.convert``) and dequantized by the worker's own code (``services/worker/quant.py``, bit-identical
to transformers' dequantization). Nothing else differs, so the numbers are the format's loss, not the serving path's
(the serving path's tokens equal this model's: tests/memd/test_compressed.py).

On a fixed prompt set, the reference continues each prompt greedily; both models then score the prompt and that
continuation in one teacher-forced forward. Reported per next-token position: KL(reference || compressed) of the
softmax distributions (mean, p95, max, in nats), the share of positions whose argmax agrees (greedy-token
agreement), and how many of the compressed model's own greedy tokens match the reference's before the first
divergence.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

PROMPTS = (  # fixed: the numbers of two runs compare
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "In 1969, the first humans to walk on the Moon were",
    "Mixture-of-experts models route each token to a few experts, so",
    "Translate to German: The weather is nice today.",
    "1, 1, 2, 3, 5, 8, 13,",
    "Once upon a time, in a small village by the sea,",
    "The derivative of x squared with respect to x is",
)


def round_trip(model, model_dir: Path, fmt: str, cache_dir: Path) -> int:
    """Replace ``model``'s experts in place by their compressed-then-dequantized values, read from the expert cache
    in ``cache_dir`` (filled on the way, as memd fills it); returns the number of experts."""
    from services.memd.compressed import CompressedStore
    from services.worker.quant import QuantParam

    store = CompressedStore.of(model_dir, fmt, cache_dir).open()
    try:
        modules = dict(model.named_modules())
        for index, name in enumerate(store.modules):
            module = modules[name]
            images = [store.image((index, e)) for e in range(store.num_experts)]
            by_slot = torch.frombuffer(bytearray(b"".join(images)), dtype=torch.uint8).view(store.num_experts, -1)
            params = dict(module.named_parameters(recurse=False))
            for spec in store.tensors:
                param = params[spec.name]
                if spec.format:
                    q = QuantParam(spec, by_slot, tuple(param.shape[1:]), param.dtype, store.num_experts,
                                   transposed=bool(module.is_transposed))
                    values = q.dequantize(list(range(store.num_experts)))
                else:
                    values = _plain(by_slot, spec)
                with torch.no_grad():
                    param.copy_(values)
        return store.num_layers * store.num_experts
    finally:
        store.close()


def _plain(by_slot: torch.Tensor, spec) -> torch.Tensor:
    dtype = getattr(torch, spec.dtype)
    n = dtype.itemsize
    for d in spec.shape:
        n *= d
    return by_slot[:, spec.offset:spec.offset + n].contiguous().view(dtype).view(by_slot.shape[0], *spec.shape)


def fixed_prompts(model_dir: Path) -> tuple[list[list[int]], str]:
    """The prompt set tokenized by the checkpoint's tokenizer; a checkpoint without one gets fixed token ids
    (seeded, the same every run), said in the report."""
    from transformers import AutoConfig, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        return [tokenizer(p)["input_ids"] for p in PROMPTS], "text"
    except (OSError, ValueError):
        vocab = AutoConfig.from_pretrained(model_dir).get_text_config().vocab_size
        rng = torch.Generator().manual_seed(0)
        return [torch.randint(1, vocab, (8 + 4 * i,), generator=rng).tolist() for i in range(len(PROMPTS))], \
            "token ids (no tokenizer)"


def compare(reference, compressed, prompts: list[list[int]], new_tokens: int) -> dict:
    kls, agree, prefix = [], [], []
    for ids in prompts:
        prompt = torch.tensor([ids])
        with torch.no_grad():
            ref_out = reference.generate(prompt, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
            own_out = compressed.generate(prompt, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
            ref_logits = reference(ref_out).logits[0, len(ids) - 1:-1].float()
            cmp_logits = compressed(ref_out).logits[0, len(ids) - 1:-1].float()
        p_log, q_log = ref_logits.log_softmax(-1), cmp_logits.log_softmax(-1)
        kls.append((p_log.exp() * (p_log - q_log)).sum(-1))
        agree.append(ref_logits.argmax(-1) == cmp_logits.argmax(-1))
        ref_new, own_new = ref_out[0, len(ids):].tolist(), own_out[0, len(ids):].tolist()
        prefix.append(next((i for i, (a, b) in enumerate(zip(ref_new, own_new)) if a != b), len(ref_new)))
    kl, agreement = torch.cat(kls), torch.cat(agree).float()
    return {"positions": int(kl.numel()), "kl_mean": float(kl.mean()), "kl_p95": float(kl.quantile(0.95)),
            "kl_max": float(kl.max()), "top1_agreement": float(agreement.mean()),
            "greedy_prefix_mean": sum(prefix) / len(prefix), "greedy_identical": sum(p == new_tokens for p in prefix),
            "prompts": len(prompts), "new_tokens": new_tokens}


def run(args) -> int:
    from transformers import AutoModelForCausalLM

    from common.config import default_state_dir
    from services.bench.overhead import _quiet_logging

    if args.tokens < 1:
        raise ValueError("--tokens must be >= 1")
    _quiet_logging()
    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = Path(args.model)
    from services.memd.compressed import cache_root

    cache_dir = cache_root(args.state_dir or default_state_dir(), args.expert_cache_dir)
    prompts, source = fixed_prompts(model_dir)
    reference = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    compressed = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    for model in (reference, compressed):
        model.generation_config.eos_token_id = None  # every prompt scores the same number of positions
    round_trip(compressed, model_dir, args.expert_format, cache_dir)
    print(f"[bench] {len(prompts)} prompts x {args.tokens} tokens: {args.expert_format} vs the checkpoint's experts",
          file=sys.stderr, flush=True)
    result = compare(reference, compressed, prompts, args.tokens)
    result |= {"model": str(model_dir), "expert_format": args.expert_format, "prompt_source": source,
               "reference_dtype": str(next(reference.parameters()).dtype).removeprefix("torch.")}
    print(report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


def report(r: dict) -> str:
    return "\n".join([
        f"moeinf bench quality: {r['model']}, experts in {r['expert_format']} vs {r['reference_dtype']}"
        f" ({r['prompts']} prompts as {r['prompt_source']}, {r['new_tokens']} greedy tokens each,"
        f" {r['positions']} positions scored)",
        f"  KL(ref || {r['expert_format']}) per next token: mean {r['kl_mean']:.4g}, p95 {r['kl_p95']:.4g},"
        f" max {r['kl_max']:.4g} nats",
        f"  greedy-token agreement (teacher-forced argmax): {r['top1_agreement']:.1%}",
        f"  free-running greedy: {r['greedy_identical']} of {r['prompts']} continuations identical, first"
        f" divergence after {r['greedy_prefix_mean']:.1f} tokens on average"])


def add_parser(bench) -> None:
    p = bench.add_parser("quality", help="KL divergence and greedy agreement of memd's --expert-format vs bf16")
    p.add_argument("--model", required=True, help="a bf16/fp16/fp32 checkpoint directory")
    p.add_argument("--expert-format", required=True, choices=["fp8", "mxfp4"])
    p.add_argument("--tokens", type=int, default=32, help="greedy tokens per prompt (the positions scored)")
    p.add_argument("--state-dir", help="where the expert cache goes (memd's --state-dir; default"
                                       " ~/.local/state/moeinf)")
    p.add_argument("--expert-cache-dir", help="memd's --expert-cache-dir (default <state-dir>/expert-cache)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", help="also write the results here")
    p.set_defaults(func=run)
