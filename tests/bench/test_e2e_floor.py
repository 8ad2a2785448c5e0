"""services/bench/e2e_floor.py: the weights one decode token reads, counted from the checkpoint's headers, equal what
transformers' own model holds (its non-expert parameters but the input embedding's unread rows, plus top-k experts
of every MoE layer); the bandwidth is measured on the threads asked for."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from services.bench import e2e_floor

from helpers import write_family, write_seq2seq


def _reference(path) -> int:
    """From transformers' model: every parameter once (tied ones too), less the input embedding but one row unless
    the LM head is the same tensor, plus top-k experts of each MoE layer."""
    model = AutoModelForCausalLM.from_pretrained(path)
    text = model.config.get_text_config()
    experts = [m for name, m in model.named_modules() if name.endswith(".experts")]
    expert_params = {id(p) for m in experts for p in m.parameters()}
    dense = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in expert_params)
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    if embed is not head:
        dense -= embed.numel() * embed.element_size()
    per_expert = sum(p.numel() * p.element_size() for p in experts[0].parameters()) // text.num_local_experts
    return dense + text.num_experts_per_tok * len(experts) * per_expert


@pytest.mark.parametrize("tied", [False, True])
def test_decode_bytes_are_what_the_model_reads_per_token(tmp_path, tied):
    path = write_family("mixtral", tmp_path / "m", dtype="bfloat16", tie_word_embeddings=tied)
    assert e2e_floor.decode_bytes(path) == _reference(path)


def test_the_floor_is_measured_on_the_threads_asked_for(tmp_path):
    path = write_family("mixtral", tmp_path / "m", dtype="bfloat16")
    before = torch.get_num_threads()
    floor = e2e_floor.measure(path, 1, 8 << 20)
    assert torch.get_num_threads() == before
    assert floor.threads == 1 and floor.gbps > 0 and floor.bytes_per_token == e2e_floor.decode_bytes(path)
    assert floor.ms == pytest.approx(floor.bytes_per_token / floor.gbps / 1e6)
    assert "MiB of weights per decode token" in floor.describe()


def test_no_floor_for_an_encoder_decoder_model(tmp_path):
    assert e2e_floor.decode_bytes(write_seq2seq("switch_transformers", tmp_path / "s")) is None
