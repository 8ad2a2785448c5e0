"""``moeinf bench quality``: the report and JSON of the compressed cache's loss on a tiny bf16 checkpoint (values
are not checked beyond their ranges: random weights), and the cache it fills is the one memd would read."""
import json

from helpers import write_family

from services.cli import main
from services.memd.compressed import CACHE_DIR


def test_quality_report_and_json(tmp_path, capsys):
    model = write_family("gpt_oss", tmp_path / "m", dtype="bfloat16")
    out = tmp_path / "q.json"
    rc = main(["bench", "quality", "--model", str(model), "--expert-format", "mxfp4", "--tokens", "3",
               "--state-dir", str(tmp_path / "state"), "--threads", "1", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "KL(ref || mxfp4) per next token: mean" in text and "greedy-token agreement" in text
    r = json.loads(out.read_text())
    assert r["positions"] == 8 * 3 and r["prompts"] == 8 and r["expert_format"] == "mxfp4"
    assert 0 < r["kl_mean"] <= r["kl_max"] and r["reference_dtype"] == "bfloat16"
    agreed = r["top1_agreement"] * r["positions"]
    assert abs(agreed - round(agreed)) < 1e-9  # a share of the 24 positions scored
    assert f"greedy-token agreement (teacher-forced argmax): {r['top1_agreement']:.1%}" in text
    assert f"{r['greedy_identical']} of 8 continuations identical" in text
    assert r["prompt_source"] == "token ids (no tokenizer)"  # the family checkpoints ship no tokenizer
    caches = list((tmp_path / "state" / CACHE_DIR).iterdir())
    assert len(caches) == 1 and (caches[0] / "done.bin").read_bytes() == b"\x01" * 32


def test_a_bad_token_count_is_a_clear_error(tmp_path, capsys):
    assert main(["bench", "quality", "--model", str(tmp_path), "--expert-format", "fp8", "--tokens", "0"]) == 2
    assert "--tokens must be >= 1" in capsys.readouterr().err


def test_a_model_against_itself_agrees_everywhere(tmp_path):
    """The measure itself: the same weights on both sides give KL 0, every argmax and every continuation equal."""
    from transformers import AutoModelForCausalLM

    from services.bench.quality import compare, fixed_prompts

    model_dir = write_family("mixtral", tmp_path / "m")
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    model.generation_config.eos_token_id = None
    prompts, _ = fixed_prompts(model_dir)
    r = compare(model, model, prompts, 3)
    assert r["positions"] == 3 * len(prompts) and r["kl_max"] == 0.0
    assert r["top1_agreement"] == 1.0 and r["greedy_identical"] == len(prompts) and r["greedy_prefix_mean"] == 3
