"""services/worker/dequant_kernel.py: the compiled kernels give transformers' bits on every MXFP4 (scale, byte) pair
and on FP8 blocks of extreme scales, in every dtype; a kernel with wrong bits, no compiler or a cached library
someone else could have written is refused with a message (``c``) or replaced by torch's ops (``auto``)."""
import logging
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.integrations.finegrained_fp8 import Fp8Dequantize
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from common import messages as m
from common.config import WorkerConfig
from common.quant_write import fp8_tensors
from services.worker import dequant_kernel as dk
from services.worker.quant import QuantParam

from worker.test_quant import DTYPES, pool_of

pytestmark = pytest.mark.skipif(dk.compiler() is None, reason="no C compiler")


@pytest.fixture(scope="module")
def kernels(kernel_cache):
    return dk.load("c", kernel_cache, threads=1)


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("dtype", DTYPES)
def test_mxfp4_every_scale_and_byte_equals_transformers(kernels, tmp_path, dtype, threads):
    """Row r of the expert has scale byte r in every block, and its 16 blocks hold the 256 byte values: every
    (scale, byte) pair, subnormal, overflow and NaN scales included, against ``convert_moe_packed_tensors``."""
    run = dk.Kernels(kernels.lib, threads)
    blocks = torch.arange(256, dtype=torch.uint8).view(16, 16).expand(256, 16, 16).unsqueeze(0).contiguous()
    scales = torch.arange(256, dtype=torch.uint8).view(256, 1).expand(256, 16).unsqueeze(0).contiguous()
    pool, (bo, so) = pool_of([blocks, scales], 1)
    spec = m.TensorSpec("gate_up_proj", bo, [256, 16, 16], "uint8", "mxfp4", so, [256, 16], "uint8")
    param = QuantParam(spec, pool, (512, 256), dtype, capacity=1, kernels=run, transposed=True)
    want = convert_moe_packed_tensors(blocks, scales, dtype=dtype)
    got = param.dequantize([0])[0].contiguous()
    assert got.view(torch.uint8).equal(want[0].contiguous().view(torch.uint8))


@pytest.mark.parametrize("dtype, path", [(dtype, "lookup") for dtype in DTYPES] + [(torch.bfloat16, "computed")],
                         ids=[f"{str(d).split('.')[-1]}-lookup" for d in DTYPES] + ["bfloat16-computed"])
@pytest.mark.parametrize("threads", [1, 2])  # computed: AVX2's bfloat16 kernel (no table; bfloat16 only)
@pytest.mark.parametrize("block", [(16, 32), (16, 64)], ids=["32-wide", "64-wide"])  # 64-wide: the VBMI path
def test_fp8_extreme_scales_equal_transformers(kernels, dtype, threads, block, path):
    if path == "computed" and not kernels.lib.moeinf_fp8_direct_fast():
        pytest.skip("the computed FP8 kernel needs AVX2")
    run = dk.Kernels(kernels.lib, threads)
    run.fp8_direct = path == "computed"  # (a CPU with AVX-512 VBMI looks up by default)
    torch.manual_seed(0)
    rows, cols = 4 * block[0], 3 * block[1]
    values, scales = fp8_tensors(torch.randn(rows, cols), block)
    scales = torch.tensor([1e-38, 3e-40, 1.0, 7.3e35, 3e38, float("nan"), 0.37, 2.0 ** -126, 5.0, 1e-45, 6e4, 1.5],
                          dtype=torch.float32).view(4, 3)
    pool, (vo, so) = pool_of([values.unsqueeze(0), scales.unsqueeze(0)], 1)
    spec = m.TensorSpec("down_proj", vo, [rows, cols], "float8_e4m3fn", "fp8", so, [4, 3], "float32")
    param = QuantParam(spec, pool, (rows, cols), dtype, capacity=1, kernels=run, transposed=False)
    want = Fp8Dequantize(None)._dequantize_one(values, scales, output_dtype=dtype)
    assert param.dequantize([0])[0].view(torch.uint8).equal(want.view(torch.uint8))


@settings(max_examples=15, deadline=None)
@given(grid=st.tuples(st.integers(1, 3), st.integers(1, 3)),
       block=st.sampled_from([(8, 16), (16, 16), (32, 8), (4, 64), (2, 128), (8, 192)]),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16), order=st.permutations([0, 1, 2]))
def test_fp8_shapes_equal_the_torch_path(kernels, grid, block, dtype, seed, order):
    torch.manual_seed(seed)
    rows, cols = grid[0] * block[0], grid[1] * block[1]
    pairs = [fp8_tensors(torch.randn(rows, cols) * (e + 1), block) for e in range(3)]
    pool, (vo, so) = pool_of([torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])], 3)
    spec = m.TensorSpec("down_proj", vo, [rows, cols], "float8_e4m3fn", "fp8", so, list(grid), "float32")
    fast, ref = (QuantParam(spec, pool, (rows, cols), dtype, capacity=3, kernels=k, transposed=False)
                 for k in (kernels, None))
    assert fast.dequantize(order).view(torch.uint8).equal(ref.dequantize(order).view(torch.uint8))


def test_a_kernel_with_wrong_bits_is_refused(tmp_path, monkeypatch, caplog):
    source = tmp_path / "dequant.c"  # one scale byte too many on the computed paths: 253 overflows differently
    source.write_text(dk.SOURCES[0].read_text())
    header = dk.SOURCES[0].with_name("mxfp4_decode.h").read_text()  # included from dequant.c's own directory first
    assert "s <= 252" in header and "<= 250u" in header
    (tmp_path / "mxfp4_decode.h").write_text(header.replace("s <= 252", "s <= 253").replace("<= 250u", "<= 251u"))
    monkeypatch.setattr(dk, "SOURCES", (source, *dk.SOURCES[1:]))
    monkeypatch.setattr(dk, "HEADERS", (*dk.HEADERS[:-1], tmp_path / "mxfp4_decode.h"))  # (a library of its own)
    with pytest.raises(dk.KernelError, match=r"MXFP4 kernel disagrees with torch's ops"):
        dk.load("c", tmp_path / "a", 1)
    with caplog.at_level(logging.WARNING, logger="moeinf.worker"):
        assert dk.load("auto", tmp_path / "b", 1) is None
    assert "dequantizing with torch's ops" in caplog.text and "disagrees" in caplog.text


def test_no_compiler_falls_back_or_says_what_to_do(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.raises(dk.KernelError, match=r"no C compiler .*install gcc or set CC, or pass --dequant-kernel torch"):
        dk.load("c", tmp_path, 1)
    with caplog.at_level(logging.WARNING, logger="moeinf.worker"):
        assert dk.load("auto", tmp_path, 1) is None
    assert "no C compiler" in caplog.text
    assert dk.load("torch", tmp_path, 1) is None
    with pytest.raises(ValueError, match=r"--dequant-kernel must be auto, c or torch"):
        WorkerConfig(model=tmp_path, dequant_kernel="fast")


def test_built_once_private_and_rebuilt_when_others_could_have_written_it(tmp_path):
    dk.load("c", tmp_path, 1)
    cache = tmp_path / f"kernels-{os.getuid()}"
    (built,) = cache.glob("dequant-*.so")
    assert cache.stat().st_mode & 0o777 == 0o700 and built.stat().st_mode & 0o077 == 0
    first = built.stat()
    dk.load("c", tmp_path, 1)
    assert [p.name for p in cache.iterdir()] == [built.name]
    assert (built.stat().st_ino, built.stat().st_mtime_ns) == (first.st_ino, first.st_mtime_ns)  # not rebuilt
    built.chmod(0o722)
    with pytest.raises(dk.KernelError, match=r"not a file of this user's that only it can write: not loaded"):
        dk._open(built, 1)
    assert dk.load("c", tmp_path, 1) is not None  # never loaded: built again, private
    assert built.stat().st_mode & 0o077 == 0
    built.write_bytes(b"truncated")  # a library that no longer loads: built again (in a fresh process: dlopen
    loader = "from services.worker import dequant_kernel as dk; import sys; dk.load('c', sys.argv[1], 1)"
    subprocess.run([sys.executable, "-c", loader, str(tmp_path)], check=True, timeout=120)  # reuses a loaded name)
    assert built.stat().st_size > 1000 and built.stat().st_mode & 0o077 == 0
    cache.chmod(0o777)
    with pytest.raises(dk.KernelError, match=r"another user's or writable by others: not used \(remove it\)"):
        dk.load("c", tmp_path, 1)


def test_the_worker_keeps_its_kernels_in_the_kernel_cache_dir(tmp_path, kernel_cache):
    """``--kernel-cache-dir`` (env ``MOEINF_KERNEL_CACHE_DIR``): the worker loads (or builds) its library there, not in
    its state directory, so workers of fresh state directories compile it once; unset, the state directory."""
    from common.config import build_config
    from services.worker.main import load_kernels

    state = tmp_path / "state"
    state.mkdir()
    cfg = build_config(WorkerConfig, env={"MOEINF_KERNEL_CACHE_DIR": str(kernel_cache)}, model=tmp_path,
                       state_dir=state)
    assert cfg.kernel_dir == kernel_cache
    dequant, mv = load_kernels(cfg, quantized=True)
    assert dequant is not None and list((kernel_cache / f"kernels-{os.getuid()}").glob("dequant-*.so"))
    assert list(state.iterdir()) == []
    assert WorkerConfig(model=tmp_path, state_dir=state).kernel_dir == state


def test_layouts_the_kernels_do_not_take_use_torch_or_are_refused(kernels):
    blocks, scales = torch.randint(0, 256, (1, 32, 4, 8), dtype=torch.uint8), torch.full((1, 32, 4), 127,
                                                                                          dtype=torch.uint8)
    pool, (bo, so) = pool_of([blocks, scales], 1)
    spec = m.TensorSpec("w", bo, [32, 4, 8], "uint8", "mxfp4", so, [32, 4], "uint8")  # 16-value blocks
    bf16 = QuantParam(spec, pool, (64, 32), torch.bfloat16, capacity=1, kernels=kernels, transposed=True)
    assert bf16.kernels is None
    spec = m.TensorSpec("w", bo, [32, 2, 16], "uint8", "mxfp4", so, [32, 2], "uint8")
    half = QuantParam(spec, pool, (64, 32), torch.float16, capacity=1, kernels=kernels, transposed=True)
    assert half.kernels is kernels
    spec = m.TensorSpec("w", bo, [32, 32], "float8_e4m3fn", "fp8", so, [2, 2], "float32")
    double = QuantParam(spec, pool, (32, 32), torch.float64, capacity=1, kernels=kernels, transposed=True)
    assert double.kernels is None
    spec = m.TensorSpec("w", bo, [30, 32], "float8_e4m3fn", "fp8", so, [4, 2], "float32")
    with pytest.raises(RuntimeError, match=r"scales \[4, 2\] that do not tile its \[30, 32\] values"):
        QuantParam(spec, pool, (30, 32), torch.bfloat16, capacity=1, kernels=kernels, transposed=True)
