"""memd's compressed expert cache (``--expert-format fp8|mxfp4``): the slot images hold the released formats'
encoding of each expert (the worker's dequantization of them equals transformers' of the same encoding), experts
convert once and the cache survives a restart, a changed checkpoint gets a fresh cache, a quantized checkpoint is
refused, and greedy tokens served at 25% memory equal transformers' model with the same round-tripped experts (also
with ``--matvec-kernel`` multiplying MXFP4 slots of ``[out, in]`` experts in place)."""
import os
from pathlib import Path

import pytest
import torch
from helpers import Stack, moeinf_cmd, write_family
from transformers.integrations.finegrained_fp8 import Fp8Dequantize
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from common.checkpoint import Checkpoint, CheckpointError
from services.memd.compressed import CACHE_DIR, CompressedStore, fp8_block

PROMPTS = [[1, 5, 9, 22, 7], [3] * 11, list(range(2, 60, 2))]


@pytest.fixture(scope="module")
def oss(tmp_path_factory):
    return write_family("gpt_oss", tmp_path_factory.mktemp("oss") / "gpt_oss", dtype="bfloat16")


def store_of(path, fmt, state_dir):
    return CompressedStore.of(path, fmt, state_dir / CACHE_DIR).open()


def expert_weights(path, layer, expert):
    from safetensors import safe_open

    out = {}
    for f in Checkpoint(path).files:
        with safe_open(f, "pt") as st:
            for key in st.keys():
                if f"layers.{layer}.mlp.experts." in key:
                    out[key.rsplit(".", 1)[-1]] = st.get_tensor(key)[expert]
    return out


@pytest.mark.parametrize("fmt", ["fp8", "mxfp4"])
def test_slot_image_is_the_formats_encoding(oss, fmt, tmp_path):
    store = store_of(oss, fmt, tmp_path)
    try:
        assert store.source.transposed  # GPT-OSS holds its experts [in, out]
        image = torch.frombuffer(bytearray(store.image((1, 3))), dtype=torch.uint8)
        weights = expert_weights(oss, 1, 3)
        for spec in store.tensors:
            weight = weights[spec.name]
            if not spec.format:  # biases as stored
                n = weight.numel() * weight.element_size()
                assert torch.equal(image[spec.offset:spec.offset + n].view(weight.dtype), weight.reshape(-1))
                continue
            assert spec.format == fmt
            values, scales = _encoded(image, spec)
            if fmt == "mxfp4":  # against the format's rule written here, not the encoder memd runs
                blocks, exps = mxfp4_reference(weight.t())
                assert torch.equal(values, blocks) and torch.equal(scales, exps)
            else:
                q, inv = fp8_reference(weight, fp8_block(spec.name, tuple(weight.shape)))  # as the module holds it
                assert torch.equal(values.view(torch.uint8), q.view(torch.uint8)) and torch.equal(scales, inv)
            got = transformers_dequantized(image, spec, weight.dtype)
            err = (got.float() - weight.float()).abs().max() / weight.float().abs().max()
            assert got.shape == weight.shape and 0 < err < (0.2 if fmt == "mxfp4" else 0.07), err
        assert store.expert_bytes * (3.5 if fmt == "mxfp4" else 1.9) < store.source.expert_bytes
    finally:
        store.close()


E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)


def mxfp4_reference(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP4 of ``weight [..., K]`` by the rule, in float64: each 32 values share the exponent floor(log2(amax)) - 2
    (so the largest lands in [4, 8)); each value is the nearest E2M1 magnitude of value / 2**exponent, clipped to 6,
    a tie going to the smaller; codes packed two per byte, the even element low."""
    x = weight.double().reshape(*weight.shape[:-1], -1, 32)
    amax = x.abs().amax(dim=-1, keepdim=True)
    exponent = torch.where(amax > 0, torch.floor(torch.log2(amax)) - 2, torch.full_like(amax, -127)).clamp(-127, 127)
    scaled = (x / torch.pow(2.0, exponent)).clamp(-6.0, 6.0)
    code = (scaled.abs().unsqueeze(-1) - E2M1).abs().argmin(dim=-1)  # (argmin: the first, smaller, of a tie)
    code = (code | ((scaled < 0).long() << 3)).to(torch.uint8)
    return code[..., 0::2] | (code[..., 1::2] << 4), (exponent[..., 0] + 127).to(torch.uint8)


def fp8_reference(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Block FP8 of ``weight [R, C]`` by torch's own float8 cast: per block, scale = amax / 448 in float32 (at least
    2**-40), values = weight / scale rounded to float8_e4m3fn."""
    (rows, cols), (br, bc) = weight.shape, block
    tiles = weight.float().reshape(rows // br, br, cols // bc, bc)
    scale = (tiles.abs().amax(dim=(1, 3)) / 448.0).clamp(min=2.0 ** -40)
    q = (tiles / scale[:, None, :, None]).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    return q.reshape(rows, cols), scale


def test_mxfp4_blocks_run_along_the_input_dimension_of_out_in_experts(tmp_path):
    """Mixtral's experts are ``[out, in]``: their MXFP4 rows are stored as they are (no transpose), blocks along
    ``in``, so a slot row is one output's weights, as in GPT-OSS's slots (the worker's kernel reads either)."""
    store = store_of(write_family("mixtral", tmp_path / "m", dtype="bfloat16"), "mxfp4", tmp_path)
    try:
        assert not store.source.transposed
        source = torch.frombuffer(store._read_source((1, 2)), dtype=torch.uint8)
        image = torch.frombuffer(bytearray(store.image((1, 2))), dtype=torch.uint8)
        for src, spec in zip(store.source.tensors, store.tensors):
            weight = source[src.offset:].narrow(0, 0, _nbytes(src.shape, src.dtype)).view(torch.bfloat16)
            weight = weight.view(src.shape)
            values = image[spec.offset:].narrow(0, 0, _nbytes(spec.shape, spec.dtype)).view(spec.shape)
            scales = image[spec.scale_offset:].narrow(0, 0, _nbytes(spec.scale_shape, "uint8")).view(spec.scale_shape)
            blocks, exps = mxfp4_reference(weight)
            assert spec.shape == [weight.shape[0], weight.shape[1] // 32, 16]
            assert torch.equal(values, blocks) and torch.equal(scales, exps)
            got = convert_moe_packed_tensors(values[None], scales[None], dtype=torch.bfloat16)[0].T  # [in, out].T
            err = (got.float() - weight.float()).abs().max() / weight.float().abs().max()
            assert got.shape == weight.shape and 0 < err < 0.2, err
    finally:
        store.close()


def test_experts_convert_once_and_the_cache_survives_a_restart(oss, tmp_path):
    store = store_of(oss, "fp8", tmp_path)
    first = store.image((0, 1))
    assert store.converted_now == 1 and store.missing == [k for k in store.segments if k != (0, 1)]
    store.prepare((0, 1))
    assert store.converted_now == 1
    store.close()
    again = store_of(oss, "fp8", tmp_path)
    try:
        assert again.directory == store.directory and again.image((0, 1)) == first and again.converted_now == 0
    finally:
        again.close()


def test_an_expert_holding_nan_is_not_re_encoded(tmp_path, monkeypatch):
    """MXFP4 would zero the rest of a NaN's block, FP8 turn the whole block NaN: a clear refusal instead."""
    store = store_of(write_family("mixtral", tmp_path / "m", dtype="bfloat16"), "fp8", tmp_path)
    try:
        poisoned = bytearray(store._read_source((1, 2)))
        spec = store.source.tensors[0]
        poisoned[spec.offset:spec.offset + 2] = torch.tensor([float("nan")], dtype=torch.bfloat16).view(
            torch.uint8).numpy().tobytes()
        monkeypatch.setattr(store, "_read_source", lambda key: poisoned)
        with pytest.raises(ValueError, match=r"expert 2 of MoE layer 1: .* holds NaN or infinite values"):
            store.convert((1, 2))
    finally:
        store.close()


def test_the_encoders_code_names_the_compressed_cache(tmp_path, monkeypatch):
    """Another encoding (a changed quant_encode.py) is another compressed cache: its old images are never reused;
    the lossless images (no encoding) keep their name."""
    from services.memd.slot_images import LosslessImages

    path = write_family("mixtral", tmp_path / "m")
    cache = tmp_path / "s" / CACHE_DIR
    before = CompressedStore.of(path, "fp8", cache).directory, LosslessImages.of(path, cache).directory
    read = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: read(self) + b"#" * (self.name == "quant_encode.py"))
    after = CompressedStore.of(path, "fp8", cache).directory, LosslessImages.of(path, cache).directory
    assert after[0] != before[0] and after[1] == before[1]


def test_a_changed_checkpoint_gets_a_fresh_cache(tmp_path):
    path = write_family("mixtral", tmp_path / "m")
    before = CompressedStore.of(path, "fp8", tmp_path / "s" / CACHE_DIR).directory
    shard = Checkpoint(path).files[0]
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
    assert CompressedStore.of(path, "fp8", tmp_path / "s" / CACHE_DIR).directory != before


def test_a_quantized_checkpoint_is_refused_by_name(tmp_path):
    from quant_helpers import write_quantized

    path = write_quantized("gpt_oss-mxfp4", tmp_path / "q")
    with pytest.raises(CheckpointError, match=r"--expert-format fp8: .* stores its experts in mxfp4 already"):
        CompressedStore.of(path, "fp8", tmp_path / "s" / CACHE_DIR)


def test_convert_cli_fills_the_cache(oss, tmp_path):
    import subprocess

    proc = subprocess.run(moeinf_cmd("convert", "--model", str(oss), "--expert-format", "mxfp4", "--state-dir",
                                     str(tmp_path), "--quiet"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "32 experts as mxfp4 (32 converted now)" in proc.stdout and "per expert against" in proc.stdout
    store = store_of(oss, "mxfp4", tmp_path)
    try:
        assert store.missing == [] and store.converted_now == 0
    finally:
        store.close()


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["fp8", "mxfp4"])
def test_served_tokens_equal_transformers_with_the_round_tripped_experts(oss, fmt, state_dir, tmp_path):
    expected = round_trip_reference(oss, fmt, tmp_path / "reference-cache")
    with Stack(oss, state_dir, expert_memory="25%", extra_memd=("--expert-format", fmt)) as stack:
        got = stack.generate_all(PROMPTS, 16)
        stats = stack.memd_stats()
    assert got == expected
    assert len(set(map(tuple, expected))) > 1, "degenerate oracle: all prompts gave the same output"
    assert stats.evictions > 0, "25% memory must evict and reload experts"


def test_the_matvec_kernel_multiplies_compressed_mxfp4_slots_in_place(state_dir, tmp_path, kernel_cache):
    """memd ``--expert-format mxfp4`` of a bf16 Mixtral (``[out, in]`` experts) with the worker's
    ``--matvec-kernel``: decode steps multiply the slots' MXFP4 bytes in place (the worker says so), prompts
    dequantize them into untransposed rows, and on these prompts the greedy tokens equal transformers' model with
    the same round-tripped experts (opt-in kernel: another summation order, nothing promises it elsewhere)."""
    from services.worker import dequant_kernel, matvec_checks
    try:  # (where the bf16 kernel loads, so does the MXFP4 one: AVX-512 BF16, or AVX2 and FMA)
        dequant_kernel.load("c", kernel_cache, 1, check=matvec_checks.check)
    except dequant_kernel.KernelError as exc:
        pytest.skip(f"no matrix-vector kernel here: {exc}")
    path = write_family("mixtral", tmp_path / "m", dtype="bfloat16")
    expected = round_trip_reference(path, "mxfp4", tmp_path / "reference-cache")
    with Stack(path, state_dir, expert_memory="25%", extra_memd=("--expert-format", "mxfp4"),
               extra_worker=("--matvec-kernel", "fast")) as stack:
        got = stack.generate_all(PROMPTS, 16)
        log = stack.worker_log.read_text()
    assert "multiply the quantized slots in place" in log, log[-2000:]
    assert "decode steps' products on the quantized slots in place by matvec.c" in log, log[-2000:]  # they ran
    assert len(set(map(tuple, expected))) > 1, "degenerate oracle: all prompts gave the same output"
    assert got == expected


def _encoded(image: torch.Tensor, spec) -> tuple[torch.Tensor, torch.Tensor]:
    """A slot image's values and scales of one tensor, as their dtypes and shapes."""
    values = image[spec.offset:].narrow(0, 0, _nbytes(spec.shape, spec.dtype))
    scales = image[spec.scale_offset:].narrow(0, 0, _nbytes(spec.scale_shape, spec.scale_dtype))
    return (values.view(getattr(torch, spec.dtype)).view(spec.shape),
            scales.view(getattr(torch, spec.scale_dtype)).view(spec.scale_shape))


def transformers_dequantized(image: torch.Tensor, spec, dtype: torch.dtype, transposed: bool = True) -> torch.Tensor:
    """One expert's tensor decoded from its slot image by transformers' own converters (MXFP4's
    ``convert_moe_packed_tensors``, which gives GPT-OSS's ``[in, out]``: transposed back for ``[out, in]`` experts;
    block FP8's ``Fp8Dequantize``), not by moeinf's code; as stored if uncompressed."""
    if not spec.format:
        n = _nbytes(spec.shape, spec.dtype)
        return image[spec.offset:spec.offset + n].view(getattr(torch, spec.dtype)).view(spec.shape).to(dtype)
    values, scales = _encoded(image, spec)
    if spec.format == "mxfp4":
        out = convert_moe_packed_tensors(values[None], scales[None], dtype=dtype)[0]
        return out if transposed else out.T
    return Fp8Dequantize(None)._dequantize_one(values, scales, output_dtype=dtype)


def round_trip_reference(path, fmt: str, cache_dir) -> list[list[int]]:
    """Transformers' greedy tokens for ``PROMPTS`` with the model's experts replaced by their ``fmt`` round trip:
    memd's slot images (the encoding, checked against the formats' own above) decoded by transformers' converters,
    so the served tokens are compared with an oracle that shares no dequantization code with the worker."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    model.generation_config.eos_token_id = None
    store = CompressedStore.of(path, fmt, cache_dir).open()
    try:
        modules = dict(model.named_modules())
        for index, name in enumerate(store.modules):
            params = dict(modules[name].named_parameters(recurse=False))
            for expert in range(store.num_experts):
                image = torch.frombuffer(bytearray(store.image((index, expert))), dtype=torch.uint8)
                for spec in store.tensors:
                    param = params[spec.name]
                    values = transformers_dequantized(image, spec, param.dtype, store.source.transposed)
                    assert values.shape == param.shape[1:], (name, spec.name, values.shape, param.shape)
                    with torch.no_grad():
                        param[expert].copy_(values)
    finally:
        store.close()
    return [model.generate(torch.tensor([p]), max_new_tokens=16, do_sample=False, pad_token_id=0)[0, len(p):]
            .tolist() for p in PROMPTS]


def _nbytes(shape, dtype):
    n = getattr(torch, dtype).itemsize
    for d in shape:
        n *= d
    return n
