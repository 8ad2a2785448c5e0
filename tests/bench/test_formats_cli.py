"""``moeinf demo-model --format`` writes the released checkpoints' quantized layout, and ``moeinf bench formats``
compares the same model in bf16 and MXFP4 under one memory limit (the table's shape; timings are not checked);
``bench overhead`` checks a quantized model's tokens against transformers' ``dequantize=True`` model."""
import json
import subprocess

import pytest
from helpers import moeinf_cmd
from quant_helpers import dequantized_reference
from safetensors import safe_open

SIZE = ["--layers", "2", "--hidden", "128", "--intermediate", "256", "--heads", "4", "--kv-heads", "2"]


def demo(out, *args):
    return subprocess.run(moeinf_cmd("demo-model", str(out), *SIZE, *args), capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    out = {}
    for name, args in (("bf16", ["--arch", "gpt_oss"]), ("mxfp4", ["--format", "mxfp4"]), ("fp8", ["--format", "fp8"])):
        proc = demo(root / name, *args)
        assert proc.returncode == 0, proc.stderr
        out[name] = root / name
    return out


def keys(path):
    with safe_open(next(path.glob("*.safetensors")), "pt") as f:
        return {k: (f.get_slice(k).get_dtype(), f.get_slice(k).get_shape()) for k in f.keys()}


def test_demo_formats_use_the_released_names_and_config(models):
    mx, fp8 = keys(models["mxfp4"]), keys(models["fp8"])
    assert mx["model.layers.0.mlp.experts.gate_up_proj_blocks"] == ("U8", [8, 512, 4, 16])
    assert mx["model.layers.0.mlp.experts.gate_up_proj_scales"] == ("U8", [8, 512, 4])
    assert mx["model.layers.0.mlp.experts.down_proj_blocks"] == ("U8", [8, 128, 8, 16])
    assert "model.layers.0.mlp.experts.gate_up_proj" not in mx
    assert fp8["model.layers.1.block_sparse_moe.experts.3.w1.weight"] == ("F8_E4M3", [256, 128])
    assert fp8["model.layers.1.block_sparse_moe.experts.3.w1.weight_scale_inv"] == ("F32", [2, 1])
    assert fp8["model.layers.1.self_attn.q_proj.weight_scale_inv"] == ("F32", [1, 1])
    assert fp8["model.layers.1.block_sparse_moe.gate.weight"][0] == "BF16"  # routers stay
    qc = json.loads((models["fp8"] / "config.json").read_text())["quantization_config"]
    assert qc == {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    assert json.loads((models["mxfp4"] / "config.json").read_text())["quantization_config"]["quant_method"] == "mxfp4"
    for name in ("mxfp4", "fp8"):
        dequantized_reference(models[name])  # transformers loads them


def test_mxfp4_needs_gpt_oss(tmp_path):
    proc = demo(tmp_path / "x", "--format", "mxfp4", "--arch", "mixtral")
    assert proc.returncode == 2 and "needs --arch gpt_oss" in proc.stderr and "Traceback" not in proc.stderr


def test_bench_formats_table(models, tmp_path):
    out = tmp_path / "formats.json"
    proc = subprocess.run(moeinf_cmd("bench", "formats", "--model", f"bf16={models['bf16']}",
                                     f"mxfp4={models['mxfp4']}", "--memory", "100%", "--tokens", "3",
                                     "--prompt-len", "5", "--repeats", "1", "--threads", "1", "--json", str(out)),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines() if line.strip().startswith("100%")]
    assert [r[1] for r in rows] == ["bf16", "mxfp4"]
    doc = json.loads(out.read_text())
    sizes = doc["pool_bytes_all_experts"]
    assert sizes["bf16"][0] > 3 * sizes["mxfp4"][0]  # bf16 vs 4.25 bits a weight (+ bf16 biases, slot padding aside)
    results = doc["results"]["100%"]
    assert results[0]["ms_vs_base"] == 1.0 and all(r["decode_ms_p50"] > 0 for r in results)
    assert results[1]["resident_share"] == 1.0


def test_bench_overhead_checks_quantized_tokens_against_dequantized_transformers(models):
    proc = subprocess.run(moeinf_cmd("bench", "overhead", "--model", str(models["fp8"]), "--memory", "100%",
                                     "--tokens", "3", "--prompt-len", "5", "--repeats", "1", "--threads", "1"),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    row = next(line for line in proc.stdout.splitlines() if line.startswith("moeinf-100%"))
    assert row.split()[-1] == "yes"
