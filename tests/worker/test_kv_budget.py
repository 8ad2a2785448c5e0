"""``--kv-cache-memory``: the bytes a token of KV cache costs, from the config, and the budget in tokens."""
import pytest
import torch
from transformers import AutoConfig

from services.worker import kv_budget
from services.worker.kv_budget import kv_tokens, token_bytes


def config(model_type: str, **fields):
    return AutoConfig.for_model(model_type, **fields)


def test_a_token_costs_every_layers_keys_and_values():
    mixtral = config("mixtral", num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=4, hidden_size=2048)
    assert token_bytes(mixtral, torch.bfloat16) == 16 * 2 * 4 * 128 * 2  # the bench preset: 32 KiB
    assert token_bytes(mixtral, torch.float32) == 2 * token_bytes(mixtral, torch.bfloat16)
    deepseek = config("deepseek_v3", num_hidden_layers=3, num_attention_heads=8, kv_lora_rank=64,
                      qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32)
    assert token_bytes(deepseek, torch.bfloat16) == 3 * 8 * (32 + 16 + 32) * 2  # expanded keys and values


def test_the_budget_in_tokens_and_its_errors(monkeypatch):
    mixtral = config("mixtral", num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=4, hidden_size=2048)
    cpu = torch.device("cpu")
    assert kv_tokens("64MiB", mixtral, torch.bfloat16, cpu)[0] == 2048
    monkeypatch.setattr(kv_budget, "available_bytes", lambda device: 1 << 30)
    assert kv_tokens("50%", mixtral, torch.bfloat16, cpu)[0] == 16384
    tokens, how = kv_tokens("auto", mixtral, torch.bfloat16, cpu)
    assert tokens == int((1 << 30) * 0.8) // (32 << 10) and "auto: 80% of the 1.0 GiB available" in how
    with pytest.raises(ValueError, match="--kv-cache-memory 1KiB leaves 1.0 KiB .* less than one token"):
        kv_tokens("1KiB", mixtral, torch.bfloat16, cpu)


def test_available_memory_is_bounded_by_the_cgroup(monkeypatch, tmp_path):
    limit, usage = tmp_path / "memory.max", tmp_path / "memory.current"
    limit.write_text("1073741824\n")
    usage.write_text("268435456\n")
    monkeypatch.setattr(kv_budget, "CGROUP_FILES", ((str(limit), str(usage)),))
    assert kv_budget.available_bytes(torch.device("cpu")) <= 768 << 20
    limit.write_text("max\n")  # no limit: the host's MemAvailable
    assert kv_budget.available_bytes(torch.device("cpu")) == kv_budget._meminfo_available()
