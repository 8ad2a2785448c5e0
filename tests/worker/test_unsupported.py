"""A checkpoint without ExpertsInterface experts fails at load with a message naming the family and why."""
import subprocess

from helpers import moeinf_cmd


def test_dense_checkpoint_is_refused_by_worker_and_memd(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    for service, extra in (("worker", ["--handshake-timeout-s", "5"]), ("memd", [])):
        result = subprocess.run(moeinf_cmd(service, "--model", str(tmp_path / "llama"), "--state-dir",
                                           str(tmp_path / "state"), *extra),
                                capture_output=True, text=True, timeout=120)
        assert result.returncode != 0
        assert "LlamaForCausalLM" in result.stderr and "llama" in result.stderr
        assert "ExpertsInterface" in result.stderr
        assert "Traceback" not in result.stderr
