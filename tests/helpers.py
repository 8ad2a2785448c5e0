"""Test helpers: tiny checkpoints of every supported family, and real memd + worker processes."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

COMMON = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.2, tie_word_embeddings=False)

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
                        # heads", transformers 5.24's sdpa repeats them again and a prompt cannot be prefilled in chunks)
                        num_key_value_heads=4),
    "gpt_oss": dict(num_local_experts=8, num_experts_per_tok=2, head_dim=16, sliding_window=16),
}
SHARDED = "qwen3_moe"  # written in several shards with model.safetensors.index.json


def write_family(name: str, out: Path, dtype: str = "float32", **overrides) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = {**COMMON, **FAMILIES[name], **overrides}
    config = AutoConfig.for_model(name, **kwargs)
    torch.manual_seed(1234)
    model = AutoModelForCausalLM.from_config(config).to(getattr(torch, dtype))
    model.save_pretrained(out, max_shard_size="300KB" if name == SHARDED else "5GB")
    return out


def moeinf_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "common.cli", *args]


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

    def __init__(self, model: Path, state_dir: Path, expert_memory: str = "25%", extra_memd=(), extra_worker=()):
        self.model, self.state_dir = Path(model), Path(state_dir)
        self.memd_log, self.worker_log = self.state_dir / "memd.log", self.state_dir / "worker.log"
        self.state_dir.mkdir(parents=True, exist_ok=True)
        common = ["--model", str(model), "--state-dir", str(state_dir)]
        self.memd = spawn(["memd", *common, "--expert-memory", expert_memory, *extra_memd], self.memd_log)
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

    def memd_stats(self):
        from services.worker.memd_client import MemdClient

        client = MemdClient(self.memd_addr, f"ipc://{self.state_dir.resolve()}/memd-trace.sock", timeout_s=10)
        try:
            return client.stats()
        finally:
            client.close()

    def close(self) -> None:
        if self.worker is not None:
            stop(self.worker)
        stop(self.memd)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def shm_regions() -> set[str]:
    return {p.name for p in Path("/dev/shm").iterdir() if p.name.startswith("moeinf-")}


def orphan_regions() -> set[str]:
    """moeinf pool regions no live process maps: leaked ones (a live memd always maps its own)."""
    regions = shm_regions()
    if not regions:
        return set()
    mapped = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            text = maps.read_text()
        except OSError:
            continue
        mapped.update(r for r in regions if f"/dev/shm/{r}" in text)
    return regions - mapped
