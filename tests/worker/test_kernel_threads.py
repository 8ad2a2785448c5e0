"""The matrix-vector kernels share a call's output rows among threads in C (``parallel.h``, OpenMP on torch's own
runtime), or in Python where the library has no OpenMP: every kernel, on row counts that are no multiple of its
row groups, gives the same bits on one thread, on three in C and on three in Python; the library runs on the one
OpenMP runtime torch loaded, not a second one of its own."""
import ctypes
import types
from pathlib import Path

import pytest
import torch

from common.quant_write import fp8_tensors, mxfp4_tensors
from services.worker import dequant_kernel as dk
from services.worker import matvec_checks
from services.worker.quant import fp8_table, mxfp4_pairs

pytestmark = pytest.mark.skipif(dk.compiler() is None, reason="no C compiler")
ROWS, COLS = 208, 512  # 208: rows in FP8 blocks of 16, but no multiple of 64 (the fast kernels' groups)


@pytest.fixture(scope="module")
def state(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("state")


def loaded(state: Path, threads: int, openmp: bool = True) -> dk.Kernels:
    kernels = dk.load("c", state, threads)
    if not kernels.matvec_fast:
        pytest.skip("this CPU has neither AVX-512 BF16 nor AVX2 with FMA")
    matvec_checks.check(kernels)
    kernels.openmp = kernels.openmp and openmp  # False: Python's threads split the calls, as without OpenMP
    return kernels


def products(kernels: dk.Kernels) -> dict[str, torch.Tensor]:
    """Every kernel this CPU has, on one probe each (``None`` where it declines)."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(ROWS, COLS + 16, generator=gen).to(torch.bfloat16)[:, :COLS]  # a slot's strided rows
    x = torch.randn(2, COLS, generator=gen).to(torch.bfloat16)
    values, scales = fp8_tensors(torch.randn(ROWS, COLS, generator=gen), (16, 128))
    blocks, e8m0 = (t.view(torch.uint8) for t in mxfp4_tensors(torch.randn(ROWS, COLS, generator=gen)))
    blocks, e8m0 = blocks.reshape(ROWS, COLS // 32, 16), e8m0.reshape(ROWS, COLS // 32)
    e8m0.clamp_(2, 252)  # (the range the fast MXFP4 kernel computes)
    fp8 = (values.view(torch.uint8), scales.float().contiguous(), fp8_table(), (16, 128))
    runs = {"bf16 fast": lambda out: kernels.matvec(weight, x, out)}
    if kernels.matvec_exact_avx2:
        runs["bf16 aten order"] = lambda out: kernels.matvec(weight, x, out, exact=True)
        runs["fp8 aten order"] = lambda out: kernels.matvec_fp8(*fp8, x, out, exact=True)
        runs["mxfp4 aten order"] = lambda out: kernels.matvec_mxfp4(blocks, e8m0, x, out, exact=True)
        runs["mxfp4 x @ W"] = lambda out: kernels.matvec_mxfp4(blocks, e8m0, x, out, exact=True, xw=True)
    if kernels.matvec_exact_onednn:
        runs["bf16 onednn order"] = lambda out: kernels.matvec(weight, x, out, exact=True, block=256)
    if kernels.matvec_exact_onednn_fp8:
        runs["fp8 onednn order"] = lambda out: kernels.matvec_fp8(*fp8, x, out, exact_block=256)
    if kernels.matvec_exact_onednn_mxfp4:
        pairs = mxfp4_pairs(torch.bfloat16).view(torch.int32)
        runs["mxfp4 onednn order"] = lambda out: kernels.matvec_mxfp4(blocks, e8m0, x, out, exact_block=256,
                                                                      pairs=pairs)
    if kernels.matvec_fp8_fast:
        runs["fp8 fast"] = lambda out: kernels.matvec_fp8(*fp8, x, out)
    if kernels.matvec_mxfp4_fast:
        runs["mxfp4 fast"] = lambda out: kernels.matvec_mxfp4(blocks, e8m0, x, out)
    got = {}
    for name, run in runs.items():
        out = torch.full((2, ROWS), float("nan"))
        done = run(out)
        got[name] = out if done is not False else None
    return got


def test_every_kernel_gives_the_same_bits_on_any_threads(state):
    one = products(loaded(state, 1))
    assert one["bf16 fast"].isfinite().all()
    for threads, openmp in ((3, True), (3, False), (2, True)):
        many = products(loaded(state, threads, openmp))
        assert many.keys() == one.keys()
        for name, want in one.items():
            if want is None:
                assert many[name] is None, name
            else:
                assert many[name] is not None, (name, threads, openmp)  # (a share declined what one thread took)
                assert torch.equal(many[name], want), (name, threads, openmp)


def test_the_library_runs_on_torchs_openmp_runtime(state):
    """Built with OpenMP, the kernels' ``GOMP_parallel`` is the one torch's libraries resolve (other packages may map
    other copies: sentencepiece's is in this process when its tests ran first)."""
    kernels = loaded(state, 2)
    if not kernels.lib.moeinf_openmp():
        pytest.skip("the compiler here builds without OpenMP (Python splits the calls)")
    assert kernels.openmp and dk._torchs_openmp(kernels.lib)


def test_another_openmp_runtime_has_python_split_the_calls(caplog):
    """A library whose runtime is not torch's (a clang build, a torch with a renamed runtime) is called on one
    thread at a time, said once in the log."""
    other = types.SimpleNamespace(GOMP_parallel=ctypes.CDLL(None).free)  # an address that is not torch's runtime
    assert not dk._torchs_openmp(other)
    assert "not torch's" in caplog.text


def test_the_threads_each_compute_their_own_rows(state):
    """Every output row written once: a share lost or computed twice would leave NaN or race on the same row."""
    kernels, rows = loaded(state, 3), 203  # (no multiple of any kernel's row groups)
    weight = torch.arange(rows).unsqueeze(1).expand(rows, 64).to(torch.bfloat16).contiguous()
    for exact in (False, True):
        out = torch.full((1, rows), float("nan"))
        kernels.matvec(weight, torch.ones(1, 64, dtype=torch.bfloat16), out, exact=exact and kernels.matvec_exact_avx2)
        assert torch.equal(out[0], weight[:, 0].float() * 64), exact


def test_a_compiler_without_openmp_builds_the_kernels_plain(tmp_path, monkeypatch, caplog):
    """``-fopenmp`` refused: the library is built without it (a warning that says how to rebuild) and Python's threads
    split the calls, with the same bits."""
    compile_ = dk._compile

    def no_openmp(cc, out, *extra):
        return compile_(["false"] if dk.OPENMP in extra else cc, out, *extra)
    monkeypatch.setattr(dk, "_compile", no_openmp)
    # another build key, so another library file name: the loader opens libraries through /proc/self/fd/N paths, and
    # dlopen hands back an already loaded library of the same name
    monkeypatch.setattr(dk, "FLAGS", (*dk.FLAGS, "-DMOEINF_PLAIN_BUILD_TEST"))
    kernels = loaded(tmp_path, 3)
    assert not kernels.openmp and not kernels.lib.moeinf_openmp()
    assert "built without OpenMP" in caplog.text
    monkeypatch.undo()
    plain, want = products(kernels), products(loaded(tmp_path / "with", 1))
    assert plain.keys() == want.keys()
    for name, one in want.items():
        assert (plain[name] is None) == (one is None) and (one is None or torch.equal(plain[name], one)), name
