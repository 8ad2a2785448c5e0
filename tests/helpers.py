"""Test helpers: tiny checkpoints of every supported family, and real memd + worker processes."""
from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

COMMON = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.2, tie_word_embeddings=False)

# The six families tested everywhere; their exact settings are part of the other tests' oracle.
FAMILIES = {
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=64, decoder_sparse_step=1),
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=16),
    "olmoe": dict(num_experts=8, num_experts_per_tok=2, eos_token_id=1, pad_token_id=0),
    "deepseek_v3": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
                        first_k_dense_replace=1, n_group=2, topk_group=1, kv_lora_rank=16, q_lora_rank=32,
                        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, num_hidden_layers=5,
                        rope_scaling=None,
                        # as in the real checkpoints: latent attention expands keys to every head (with fewer "kv
                        # heads", transformers 5.24's sdpa repeats them again and a prompt cannot be prefilled in
                        # chunks)
                        num_key_value_heads=4),
    "gpt_oss": dict(num_local_experts=8, num_experts_per_tok=2, head_dim=16, sliding_window=16),
}
SHARDED = "qwen3_moe"  # written in several shards with model.safetensors.index.json

# Any other family: its config class's defaults, every size attribute it has shrunk to these values (an attribute
# the config lacks, or leaves None, is not set), and its per-layer lists cut to the shrunk depth.
SHRINK = dict(
    COMMON, head_dim=16, moe_intermediate_size=32, shared_expert_intermediate_size=32, shared_intermediate_size=32,
    moe_shared_expert_intermediate_size=32, shared_experts_intermediate_size=32, dense_intermediate_size=64,
    prefix_dense_intermediate_size=64,
    num_experts=8, num_local_experts=8, n_routed_experts=8, moe_num_experts=8,
    n_shared_experts=1, num_experts_per_tok=2, num_experts_per_token=2, moe_topk=2, moe_k=2, top_k_experts=2,
    n_group=2, num_expert_group=2, topk_group=1, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8,
    qk_nope_head_dim=8, v_head_dim=16, qk_head_dim=16, index_head_dim=16, index_n_heads=2, index_topk=8,
    indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=16, o_lora_rank=16, o_groups=2,
    sliding_window=16, sliding_window_size=16, swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=16,
    linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
    linear_head_dim=16, linear_num_heads=4, mamba_n_heads=8, mamba_d_head=16, mamba_num_heads=8, mamba_head_dim=16,
    mamba_n_groups=1, n_groups=1, ssm_state_size=16, mamba_d_state=16, mamba_expand=2, mamba_chunk_size=16,
    chunk_size=16, router_hidden_size=32, rotary_dim=8, num_nextn_predict_layers=0, num_mtp_layers=0,
    first_k_dense_replace=1, num_dense_layers=1, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    hidden_size_per_layer_input=16, unpadded_vocab_size=320, vocab_size_per_layer_input=320, ple_embed_dim=16,
    ngram_vocab_size_base=64,
)
MIN_MOE_LAYERS = 4  # 25% of the experts must hold at least one layer's
# set even where the config's default is None (a full-size default, not "off")
MOE_COUNTS = {"head_dim", "unpadded_vocab_size", "num_experts_per_tok", "n_routed_experts", "num_experts",
              "num_local_experts", "n_shared_experts", "moe_intermediate_size", "n_group", "topk_group"}
# Per-family settings the generic shrink cannot guess (test data, not serving code).
EXTRA = {
    "gemma4_text": dict(enable_moe_block=True, num_experts=8, top_k_experts=2, moe_intermediate_size=32),
    "zaya": dict(num_experts_per_tok=1),
    "qwen4_exp_text": dict(indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=16, indexer_budget=16,
                           indexer_compress_ratio=4),
    "jamba": dict(expert_layer_period=2, expert_layer_offset=1, attn_layer_period=2, attn_layer_offset=1,
                  use_mamba_kernels=False),
}

# Per-layer kinds where the default list does not show every kind at a small depth: this pattern, repeated.
LAYER_PATTERNS = {
    "granitemoehybrid": ("layer_types", ["linear_attention", "full_attention"]),
    "lfm2_moe": ("layer_types", ["conv", "full_attention"]),
    "nemotron_h": ("layers_block_type", ["linear_attention", "moe", "full_attention", "moe"]),
}


def _shrink_list(values: list, n: int) -> list:
    """The first ``n`` entries, with every kind of entry of the full list kept (a later kind replaces a repeat)."""
    out = list(values[:n])
    for kind in dict.fromkeys(values):
        if kind not in out:
            repeat = next((i for i in range(len(out) - 1, -1, -1) if out.count(out[i]) > 1), None)
            if repeat is not None:
                out[repeat] = kind
    return out


def family_config(name: str, **overrides):
    """A tiny config of any family: FAMILIES' settings for the six known ones, SHRINK applied generically otherwise."""
    from transformers import AutoConfig

    if name in FAMILIES:
        return AutoConfig.for_model(name, **{**COMMON, **FAMILIES[name], **overrides})
    config = _shrunk_config(name, SHRINK["num_hidden_layers"], overrides)
    moe_layers = _count_moe_layers(config)
    if 0 < moe_layers < MIN_MOE_LAYERS and "num_hidden_layers" not in overrides:  # 25% must hold one layer
        depth = SHRINK["num_hidden_layers"] * -(-MIN_MOE_LAYERS // moe_layers)
        config = _shrunk_config(name, depth, overrides)
    return config


def _count_moe_layers(config) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    from common.checkpoint import is_experts_module

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(map(is_experts_module, model.modules()))


def _shrunk_config(name: str, depth: int, overrides: dict):
    from transformers import AutoConfig

    defaults = AutoConfig.for_model(name).to_dict()
    layers = defaults.get("num_hidden_layers")
    kwargs = {k: v for k, v in SHRINK.items()
              if defaults.get(k) is not None or k in COMMON or (k in defaults and k in MOE_COUNTS)}
    kwargs["num_hidden_layers"] = depth
    if defaults.get("kv_lora_rank") or "dots" in name:  # latent attention: keys expanded to every head
        kwargs.update(num_key_value_heads=kwargs["num_attention_heads"], head_dim=SHRINK["qk_rope_head_dim"])
    n = kwargs.get("num_hidden_layers", 4)
    for key, value in defaults.items():  # per-layer lists follow the shrunk depth
        if isinstance(value, list) and layers and len(value) == layers and layers != n:
            kwargs[key] = _shrink_list(value, n)
    if name in LAYER_PATTERNS:
        key, pattern = LAYER_PATTERNS[name]
        kwargs[key] = (pattern * n)[:n]
    kwargs.update(EXTRA.get(name, {}), **overrides)
    return AutoConfig.for_model(name, **kwargs)


def write_family(name: str, out: Path, dtype: str = "float32", shard: bool | None = None, **overrides) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    config = family_config(name, **overrides)
    torch.manual_seed(1234)
    model = AutoModelForCausalLM.from_config(config).to(getattr(torch, dtype))
    _decisive_routers(model, getattr(config, "initializer_range", 0.2))
    sharded = name == SHARDED if shard is None else shard
    model.save_pretrained(out, max_shard_size="300KB" if sharded else "5GB")
    return out


# Encoder-decoder families with one module per expert (the MoE-Infinity paper's own models), tiny: 2 MoE layers in
# the encoder and 2 in the decoder, 8 experts.
SEQ2SEQ = {
    "switch_transformers": dict(vocab_size=320, d_model=64, d_kv=16, d_ff=128, num_layers=4, num_decoder_layers=4,
                                num_heads=4, num_experts=8, encoder_sparse_step=2, decoder_sparse_step=2,
                                expert_capacity=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1),
    "nllb-moe": dict(vocab_size=320, d_model=64, encoder_layers=4, decoder_layers=4, encoder_attention_heads=4,
                     decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, num_experts=8,
                     encoder_sparse_step=2, decoder_sparse_step=2, max_position_embeddings=256,
                     decoder_start_token_id=2, pad_token_id=1, eos_token_id=2, bos_token_id=0),
}


SEQ2SEQ_STD = {"switch_transformers": 0.1, "nllb-moe": 0.2}  # wide enough that greedy outputs vary with the prompt


def write_seq2seq(name: str, out: Path) -> Path:
    """A tiny random encoder-decoder MoE checkpoint, sharded (weights drawn wider than the default init, so that
    greedy outputs vary with the prompt)."""
    std = SEQ2SEQ_STD[name]
    import torch
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    torch.manual_seed(1234)
    model = AutoModelForSeq2SeqLM.from_config(AutoConfig.for_model(name, **SEQ2SEQ[name])).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, std)
    model.save_pretrained(out, max_shard_size="200KB")
    return out


def write_word_tokenizer(out: Path, vocab_size: int, languages=()) -> None:
    """A word-level tokenizer for a tiny checkpoint: ``<pad>``, ``</s>``, ``<unk>``, words ``w3``.. up to
    ``vocab_size``, and each of ``languages`` (e.g. ``fra_Latn``) as a special token at the top of the vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    vocab.update({f"w{i}": i for i in range(3, vocab_size - len(languages))})
    vocab.update({code: vocab_size - len(languages) + i for i, code in enumerate(languages)})
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                  additional_special_tokens=list(languages))
    tok.save_pretrained(out)


def _decisive_routers(model, std: float) -> None:
    """Router weights some families initialise to zero (every token ties, one expert set for all) get random ones."""
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2 and ("router" in name or "gate." in name) and not param.any():
                param.normal_(0.0, std)


def free_ports(count: int = 1) -> list[int]:
    """``count`` distinct TCP ports free on 127.0.0.1 now, all bound at once: two probes one after the other can
    return the same port, and two services given it collide ("Address already in use")."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


def moeinf_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "services.cli", *args]


def spawn(args: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    out = open(log, "wb")
    return subprocess.Popen(moeinf_cmd(*args), stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                            start_new_session=True)


def wait_for_log(proc: subprocess.Popen, log: Path, text: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in log.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {text!r}:\n{log.read_text()}")
        time.sleep(0.1)
    raise TimeoutError(f"no {text!r} within {timeout}s:\n{log.read_text()}")


def stop(proc: subprocess.Popen, timeout: float = 30) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


class Stack:
    """memd + worker as real processes on ipc:// sockets in a temp state directory."""

    def __init__(self, model: Path, state_dir: Path, expert_memory: str = "25%", extra_memd=(), extra_worker=(),
                 memd_env: dict | None = None):
        self.model, self.state_dir = Path(model), Path(state_dir)
        self.memd_log, self.worker_log = self.state_dir / "memd.log", self.state_dir / "worker.log"
        self.state_dir.mkdir(parents=True, exist_ok=True)
        common = ["--model", str(model), "--state-dir", str(state_dir)]
        self.memd = spawn(["memd", *common, "--expert-memory", expert_memory, *extra_memd], self.memd_log, memd_env)
        self.worker = None
        try:
            wait_for_log(self.memd, self.memd_log, "memd ready")
            self.worker = spawn(["worker", *common, "--threads", "1", *extra_worker], self.worker_log)
            wait_for_log(self.worker, self.worker_log, "worker ready")
        except BaseException:
            self.close()
            raise

    @property
    def worker_addr(self) -> str:
        return f"ipc://{self.state_dir.resolve()}/worker.sock"

    @property
    def memd_addr(self) -> str:
        return f"ipc://{self.state_dir.resolve()}/memd.sock"

    def generate_all(self, prompts, max_tokens: int) -> list[list[int]]:
        """Greedy tokens for each prompt, one request after the other, through the worker's socket."""
        from common.worker_client import WorkerClient

        client = WorkerClient(self.worker_addr)
        try:
            return [client.generate(p, max_tokens)[0] for p in prompts]
        finally:
            client.close()

    def memd_stats(self):
        from services.worker.memd_client import MemdClient

        client = MemdClient(self.memd_addr, f"ipc://{self.state_dir.resolve()}/memd-trace.sock", timeout_s=10)
        try:
            return client.stats()
        finally:
            client.close()

    def close(self) -> list[int]:
        """Stop the worker, then memd (SIGTERM); their exit codes, in that order."""
        codes = [stop(self.worker)] if self.worker is not None else []
        return codes + [stop(self.memd)]

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        """A test that raised keeps its own error; otherwise both processes must have stopped cleanly on SIGTERM
        (a crash at shutdown, or a hang killed after 30 s, fails the test that ran them)."""
        codes = self.close()
        if exc_type is None:
            logs = "\n".join(log.read_text(errors="replace")[-2000:] for log in (self.worker_log, self.memd_log))
            assert codes == [0] * len(codes), f"the stack exited {codes} on SIGTERM (worker, memd):\n{logs}"


def shm_regions() -> set[str]:
    return {p.name for p in Path("/dev/shm").iterdir() if p.name.startswith("moeinf-")}


def new_orphans(before: set[str], wait_s: float = 6.0) -> set[str]:
    """Orphan regions that were not in ``before`` and still are ``wait_s`` later (a region another process is
    creating or removing right now is briefly unmapped: a stopping memd unmaps its pool before it unlinks it, and
    with tests two at a time on 2 cores that can take seconds)."""
    leaked = orphan_regions() - before
    deadline = time.monotonic() + wait_s
    while leaked and time.monotonic() < deadline:
        time.sleep(0.5)
        leaked &= orphan_regions()
    return leaked


def orphan_regions() -> set[str]:
    """moeinf pool regions no live process maps or holds open: leaked ones (a live memd always maps its own; while
    it creates one, posix_fallocate can take a second or more on a large pool, before the mmap, with the file open)."""
    regions = shm_regions()
    if not regions:
        return set()
    used = set()
    for proc in Path("/proc").glob("[0-9]*"):
        seen = _read(proc / "maps") + "\n".join(_link(fd) for fd in _entries(proc / "fd"))
        used.update(r for r in regions if f"/dev/shm/{r}" in seen)
    return regions - used


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:  # the process is gone, or not ours to read
        return ""


def _entries(path: Path) -> list[Path]:
    try:
        return list(path.iterdir())
    except OSError:
        return []


def _link(path: Path) -> str:
    try:
        return os.readlink(path)
    except OSError:  # closed meanwhile
        return ""


# ---------------------------------------------------------------------------------------------------- GGUF files
def write_gguf(path: Path, meta: dict) -> Path:
    """A GGUF (version 3) with no tensors and ``meta``: str, int (u32) and list-of-str (array) values."""
    def string(s: str) -> bytes:
        return struct.pack("<Q", len(s.encode())) + s.encode()

    out = b"GGUF" + struct.pack("<IQQ", 3, 0, len(meta))
    for key, value in meta.items():
        out += string(key)
        if isinstance(value, str):
            out += struct.pack("<I", 8) + string(value)
        elif isinstance(value, list):
            out += struct.pack("<IIQ", 9, 8, len(value)) + b"".join(string(v) for v in value)
        else:
            out += struct.pack("<II", 4, value)
    path.write_bytes(out)
    return path


def gguf_of(model: Path, path: Path, **override) -> Path:
    """A GGUF header that matches the checkpoint ``model`` (a Mixtral: llama.cpp's ``llama`` architecture), with
    ``override``'s values."""
    config = json.loads((model / "config.json").read_text())
    meta = {"general.architecture": "llama", "tokenizer.ggml.tokens": ["<s>", "</s>", "a"],
            "llama.block_count": config["num_hidden_layers"], "llama.embedding_length": config["hidden_size"],
            "llama.expert_count": config["num_local_experts"]}
    return write_gguf(path, {**meta, **override})
