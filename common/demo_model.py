"""``moeinf demo-model DIR``: a Mixtral-architecture checkpoint with random weights and the real Mixtral tokenizer.

The weights are random, so the text it writes is nonsense; the on-disk layout (safetensors, per-expert w1/w2/w3
tensors, optional sharding) is exactly that of a real Mixtral checkpoint, which is what moeinf serves.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

TOKENIZER_RESOURCE = ("mistral_common", "data/tokenizer.model.v1")
MARKER = "moeinf-demo.json"  # written last: a directory with it is a whole demo model


@dataclass(frozen=True, slots=True)
class DemoSize:
    layers: int = 4
    experts: int = 8
    top_k: int = 2
    hidden: int = 256
    intermediate: int = 512
    heads: int = 8
    kv_heads: int = 4
    dtype: str = "bfloat16"
    max_shard_size: str = "2GB"
    seed: int = 0
    arch: str = "mixtral"  # or "gpt_oss"
    format: str = "bf16"  # "bf16" (the dtype above, unquantized), "fp8" (block 128x128) or "mxfp4" (gpt_oss only)


# ``--preset bench``: big enough that offloading matters on a 24 GiB machine. A Mixtral expert is
# 3 x hidden x intermediate x 2 bytes in bf16: 3 x 2048 x 2816 x 2 = 33 MiB; 16 layers x 8 experts = 4.1 GiB of
# experts, plus 0.55 GiB of dense weights (attention, norms, embeddings, LM head).
PRESETS = {"bench": DemoSize(layers=16, experts=8, hidden=2048, intermediate=2816, heads=16, kv_heads=4)}


FORMATS = ("bf16", "fp8", "mxfp4")
ARCHS = ("mixtral", "gpt_oss")
FP8_BLOCK = (128, 128)  # DeepSeek-V3's and Qwen3-FP8's weight_block_size


def check_format(size: DemoSize) -> None:
    """The format and the shape: a ValueError naming the flags when the checkpoint could not be served."""
    for flag, value in (("layers", size.layers), ("experts", size.experts), ("top-k", size.top_k),
                        ("hidden", size.hidden), ("intermediate", size.intermediate), ("heads", size.heads),
                        ("kv-heads", size.kv_heads)):
        if value < 1:
            raise ValueError(f"--{flag} must be at least 1, not {value}")
    if size.top_k > size.experts:
        raise ValueError(f"--top-k {size.top_k} is more than --experts {size.experts}")
    if size.hidden % size.heads or size.heads % size.kv_heads:
        raise ValueError(f"--hidden {size.hidden} must be a multiple of --heads {size.heads}, and --heads of"
                         f" --kv-heads {size.kv_heads}")
    if size.format not in FORMATS or size.arch not in ARCHS:
        raise ValueError(f"--format {size.format} --arch {size.arch}: choose --format from {', '.join(FORMATS)} and"
                         f" --arch from {', '.join(ARCHS)}")
    if size.format == "mxfp4" and size.arch != "gpt_oss":
        raise ValueError("--format mxfp4 needs --arch gpt_oss (transformers reads MXFP4 experts for GPT-OSS only)")
    if size.format == "mxfp4" and (size.hidden % 32 or size.intermediate % 32):
        raise ValueError("--format mxfp4 needs --hidden and --intermediate to be multiples of 32")


def demo_config(size: DemoSize, tokenizer):
    from transformers import GptOssConfig, MixtralConfig

    common = dict(vocab_size=len(tokenizer), hidden_size=size.hidden, intermediate_size=size.intermediate,
                  num_hidden_layers=size.layers, num_attention_heads=size.heads, num_key_value_heads=size.kv_heads,
                  num_local_experts=size.experts, num_experts_per_tok=size.top_k, max_position_embeddings=4096,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    if size.arch == "gpt_oss":
        return GptOssConfig(**common, head_dim=size.hidden // size.heads, sliding_window=128,
                            pad_token_id=tokenizer.eos_token_id, dtype=size.dtype)
    return MixtralConfig(**common)


def tokenizer_model_path() -> Path:
    import importlib.resources

    package, name = TOKENIZER_RESOURCE
    path = Path(str(importlib.resources.files(package) / name))
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall mistral-common (it ships the Mixtral tokenizer)")
    return path


def write_demo_model(out: Path | str, size: DemoSize = DemoSize(), *, build_in_dtype: bool = False) -> Path:
    """``build_in_dtype``: create the parameters in ``size.dtype`` directly rather than in float32 first (half the
    peak RAM for bf16; the random values differ from the default path, so the small demo keeps the old one).
    ``out`` must not exist, be empty, or be an earlier demo model (its ``moeinf-demo.json`` says so): a real
    checkpoint is never overwritten (``FileExistsError``)."""
    check_format(size)
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MARKER).is_file())):
        raise FileExistsError(f"{out} exists and is not a moeinf demo model (it has no {MARKER}): not overwritten;"
                              " remove it or pick another directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.partial-*"):  # what a build killed outright left
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:  # built beside it, then renamed into place: an interrupted build leaves no half checkpoint at ``out``
        staging.chmod(0o777 & ~_umask())  # (mkdtemp's 0700 would keep other users, a container's, from reading it)
        _write(staging, size, build_in_dtype)
        if out.exists():
            shutil.rmtree(out)  # (an earlier demo model: its marker said so)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _umask() -> int:
    """The process's umask, read without setting it (``os.umask`` would change it for every thread meanwhile)."""
    try:
        line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith("Umask:"))
        return int(line.split()[1], 8)
    except (OSError, StopIteration, ValueError, IndexError):
        return 0o022


def _write(out: Path, size: DemoSize, build_in_dtype: bool) -> None:
    import torch
    from transformers import AutoModelForCausalLM, LlamaTokenizer

    shutil.copyfile(tokenizer_model_path(), out / "tokenizer.model")
    tokenizer = LlamaTokenizer.from_pretrained(out, add_bos_token=True)  # (as Mixtral's own: prompts open with <s>)
    config = demo_config(size, tokenizer)
    torch.manual_seed(size.seed)
    dtype = getattr(torch, size.dtype)
    if build_in_dtype:
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            model = AutoModelForCausalLM.from_config(config)
        finally:
            torch.set_default_dtype(previous)
    else:
        model = AutoModelForCausalLM.from_config(config).to(dtype)
    model.save_pretrained(out, max_shard_size=size.max_shard_size)
    del model
    tokenizer.save_pretrained(out)
    if size.format != "bf16":  # the released checkpoints' tensor names and quantization_config
        from common.quant_write import quantize_checkpoint

        quantize_checkpoint(out, size.format, FP8_BLOCK)
    (out / MARKER).write_text(json.dumps(_asdict(size), indent=2))


def _asdict(size: DemoSize) -> dict:
    from dataclasses import asdict

    return {"random_weights": True, **asdict(size)}
