"""ExpertStore on quantized checkpoints: one slot per expert holds its quantized values and scales (read
together), which dequantize to exactly transformers' ``dequantize=True`` parameters; unsupported quantizations
and experts that mix formats are refused at start-up with the format's name and the supported ones."""
import json
import shutil
import subprocess

import pytest
import torch
from helpers import moeinf_cmd, write_family
from quant_helpers import QUANTIZED, dequantized_reference, write_quantized
from safetensors.torch import load_file, save_file

from common import messages as m
from common.checkpoint import Checkpoint, CheckpointError
from services.memd.reader import ExpertReader
from services.memd.store import ALIGN, ExpertStore
from services.worker.quant import Dequantizer


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    return {name: write_quantized(name, root / name) for name in QUANTIZED}


@pytest.fixture(scope="module")
def float_gpt_oss(tmp_path_factory):
    return write_family("gpt_oss", tmp_path_factory.mktemp("f") / "gpt_oss")


def read_pool(store: ExpertStore, layers) -> tuple[torch.Tensor, dict]:
    keys = [(layer, e) for layer in layers for e in range(store.num_experts)]
    pool = torch.zeros(len(keys) * store.slot_bytes, dtype=torch.uint8)
    reader = ExpertReader(store, memoryview(pool.numpy()), store.slot_bytes, direct_io=True)
    try:
        for slot, key in enumerate(keys):
            nbytes, _ = reader.read(key, slot)
            assert nbytes == store.expert_bytes
    finally:
        reader.close()
    return pool.view(len(keys), store.slot_bytes), {key: slot for slot, key in enumerate(keys)}


@pytest.mark.parametrize("name", list(QUANTIZED))
def test_slots_dequantize_to_transformers_parameters(name, quantized):
    store = ExpertStore(Checkpoint(quantized[name]))
    family, fmt, _ = QUANTIZED[name]
    assert store.format == fmt and store.num_experts == 8
    assert all(s.offset % ALIGN == 0 and (not s.format or s.scale_offset % ALIGN == 0) for s in store.tensors)
    assert {s.format for s in store.tensors if len(s.shape) >= 2} == {fmt}
    pool, slots = read_pool(store, [0, store.num_layers - 1])
    model = dequantized_reference(quantized[name])
    hello = m.HelloReply(1, 1, "shm", "test", pool.numel(), store.slot_bytes, len(slots), store.num_layers, 8,
                         store.tensors)
    plain = {s.name: pool[:, s.offset:s.offset + torch.Size(s.shape).numel() * getattr(torch, s.dtype).itemsize]
             .view(getattr(torch, s.dtype)).unflatten(1, s.shape) for s in store.tensors if not s.format}
    first = model.get_submodule(store.layers[0].module)
    dequant = Dequantizer.build(hello, pool, plain, first, capacity=8)
    for layer in (0, store.num_layers - 1):
        module = model.get_submodule(store.layers[layer].module)
        experts = [7, 0, 5, 2]  # any order: row i is experts[i]
        got = dequant.params(layer, experts, [slots[(layer, e)] for e in experts])
        assert set(got) == {n for n, _ in module.named_parameters(recurse=False)}
        for pname, tensor in got.items():
            want = getattr(module, pname)[experts]
            assert tensor.dtype == want.dtype and torch.equal(tensor, want), f"layer {layer} {pname} differs"


def test_quantized_experts_take_fewer_bytes(quantized, float_gpt_oss):
    mx = ExpertStore(Checkpoint(quantized["gpt_oss-mxfp4"]))
    bf = ExpertStore(Checkpoint(float_gpt_oss))
    # float32 test weights: MXFP4 is 4.25 bits a weight; the float32 biases stay
    assert bf.expert_bytes / mx.expert_bytes > 6


def test_mxfp4_blocks_of_one_expert_and_its_scales_are_read_into_one_slot(quantized):
    store = ExpertStore(Checkpoint(quantized["gpt_oss-mxfp4"]))
    segs = store.segments[(1, 3)]
    files = load_file(store.checkpoint.files[0])
    names = {t.name for t in store.tensors}
    assert names == {"gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias"}
    assert sum(s.nbytes for s in segs) == store.expert_bytes == sum(
        files[f"model.layers.1.mlp.experts.{k}"][3].numel() * files[f"model.layers.1.mlp.experts.{k}"].element_size()
        for k in ("gate_up_proj_blocks", "gate_up_proj_scales", "gate_up_proj_bias", "down_proj_blocks",
                  "down_proj_scales", "down_proj_bias"))


def set_quantization(path, qc):
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = qc
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("qc, name", [
    ({"quant_method": "gptq", "bits": 4, "group_size": 128}, "gptq"),
    ({"quant_method": "awq", "bits": 4, "version": "gemm"}, "awq"),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "bitsandbytes"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized"}, "compressed-tensors"),
    ({"quant_method": "fp8", "activation_scheme": "dynamic"}, "fp8"),  # per-tensor: no weight_block_size
])
def test_unsupported_quantization_is_refused_by_name(qc, name, float_gpt_oss, tmp_path):
    path = shutil.copytree(float_gpt_oss, tmp_path / "q")
    set_quantization(path, qc)
    with pytest.raises(CheckpointError) as info:
        ExpertStore(Checkpoint(path))
    msg = str(info.value)
    assert f"'{name}'" in msg or f"{name} without" in msg
    assert "mxfp4" in msg and "weight_block_size" in msg and "unquantized" in msg


def test_refusal_at_startup_names_the_format_without_traceback(float_gpt_oss, tmp_path):
    path = shutil.copytree(float_gpt_oss, tmp_path / "q")
    set_quantization(path, {"quant_method": "awq", "bits": 4})
    for service in ("memd", "worker"):
        result = subprocess.run(moeinf_cmd(service, "--model", str(path), "--state-dir", str(tmp_path / "state"),
                                           *(("--handshake-timeout-s", "5") if service == "worker" else ())),
                                capture_output=True, text=True, timeout=120)
        assert result.returncode != 0
        assert "'awq' is not supported" in result.stderr and "mxfp4" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


def rewrite(src, dst, convert):
    shutil.copytree(src, dst)
    for file in dst.glob("*.safetensors"):
        tensors = load_file(file)
        save_file(convert(tensors), file, metadata={"format": "pt"})
    return dst


def test_experts_that_mix_formats_are_refused(quantized, tmp_path):
    """Layer 3's experts stored unquantized (bf16, no scales) in an fp8 checkpoint."""
    def unquantize_layer_3(tensors):
        out = {}
        for key, value in tensors.items():
            if key.startswith("model.layers.3.mlp.experts."):
                if key.endswith("_scale_inv"):
                    continue
                value = value.to(torch.bfloat16)
            out[key] = value
        return out

    path = rewrite(quantized["deepseek_v3-fp8"], tmp_path / "mixed", unquantize_layer_3)
    with pytest.raises(CheckpointError, match=r"^model\.layers\.3\.mlp\.experts\.\d\.\w+\.weight: expert dtype BF16"
                                              r" differs from the other experts' F8_E4M3 \(experts that mix formats"):
        ExpertStore(Checkpoint(path))


def test_expert_missing_its_scales_is_refused(quantized, tmp_path):
    def drop(tensors):
        return {k: v for k, v in tensors.items() if k != "model.layers.2.mlp.experts.4.up_proj.weight_scale_inv"}

    path = rewrite(quantized["deepseek_v3-fp8"], tmp_path / "noscale", drop)
    with pytest.raises(CheckpointError, match=r"expert 4 of model\.layers\.\d\.mlp\.experts has \d+ of its \d+ bytes"
                                              r".*mix formats"):
        ExpertStore(Checkpoint(path))


def test_unquantized_checkpoint_with_fp8_experts_is_refused(quantized, tmp_path):
    path = shutil.copytree(quantized["deepseek_v3-fp8"], tmp_path / "noconfig")
    config = json.loads((path / "config.json").read_text())
    del config["quantization_config"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"expert dtype F8_E4M3 is not supported \(config\.json"
                                              r" has no quantization_config\)"):
        ExpertStore(Checkpoint(path))


def test_scales_that_do_not_tile_the_weight_are_refused(quantized, tmp_path):
    path = shutil.copytree(quantized["deepseek_v3-fp8"], tmp_path / "block")
    set_quantization(path, {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]})
    with pytest.raises(CheckpointError, match=r"weight_scale_inv: scales \[4, 4\] do not tile \[32, 64\] in"
                                              r" weight_block_size \[128, 128\] blocks"):
        ExpertStore(Checkpoint(path))


def test_scales_of_another_dtype_are_refused(quantized, tmp_path):
    """E8M0 exponents stored as U8 (2^(b - 127) each) would be multiplied as raw bytes: refused by name."""
    def bytes_scales(tensors):
        return {k: (v.to(torch.uint8) if k.endswith("experts.1.down_proj.weight_scale_inv") else v)
                for k, v in tensors.items()}

    path = rewrite(quantized["deepseek_v3-fp8"], tmp_path / "u8", bytes_scales)
    with pytest.raises(CheckpointError, match=r"weight_scale_inv: fp8 scales of dtype .*U8.*; moeinf takes one of"
                                              r" BF16, F16, F32 for every expert"):
        ExpertStore(Checkpoint(path))


def test_convert_reads_memds_environment(monkeypatch):
    """`docker compose exec memd moeinf convert` in a memd set up by MOEINF_* variables converts what that memd
    reads (it built lossless slot images whatever MOEINF_EXPERT_FORMAT said)."""
    from services.cli import build_parser

    monkeypatch.setenv("MOEINF_EXPERT_FORMAT", "fp8")
    monkeypatch.setenv("MOEINF_STATE_DIR", "/srv/state")
    args = build_parser().parse_args(["convert", "--model", "/m"])
    assert (args.expert_format, args.state_dir) == ("fp8", "/srv/state")
    assert build_parser().parse_args(["convert", "--model", "/m", "--expert-format", "mxfp4"]).expert_format == "mxfp4"
