"""The compiled dequantization kernels (``dequant.c``): built on first use, checked against torch's ops, or absent.

The torch-op path in ``quant.py`` makes an int32 index per value, adds the scales to it and gathers from a table:
about five passes over memory per value. ``dequant.c`` reads each quantized byte once and writes each value once
(MXFP4 -> bfloat16 computes most values directly; FP8 looks 32 values up at once with AVX-512BW; everything else
is a scalar table gather): 4x faster than torch's ops on one core for MXFP4, more for FP8.
There is no maintained CPU kernel for these formats in torch or on PyPI that reads the pool's slots in place, so
the worker builds this small file itself with the system's C compiler (``$CC``, else ``cc``; ``-O3 -march=native``:
it only ever runs on the machine that built it) into ``<state-dir>/kernels-<uid>/`` (the user's alone), keyed by
the source, the compiler and the CPU, once per machine. Before first use the kernels run on every MXFP4 (scale,
byte) pair and on FP8 blocks of extreme scales, and must give the torch path's exact bits; otherwise the worker
warns and keeps the torch path (``--dequant-kernel auto``) or refuses to start (``c``).

Each call releases the GIL (ctypes), so with ``--threads N`` an expert's rows are split over N threads."""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shlex
import shutil
import stat
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

log = logging.getLogger("moeinf.worker")
SOURCE = Path(__file__).with_name("dequant.c")
FLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-std=gnu11")
MODES = ("auto", "c", "torch")
_P = ctypes.c_void_p
_I = ctypes.c_int64


class KernelError(RuntimeError):
    pass


class Kernels:
    """The loaded kernels; ``threads`` > 1 splits each call's rows over that many threads."""

    def __init__(self, lib: ctypes.CDLL, threads: int):
        self.lib = lib
        for name in ("moeinf_mxfp4_bf16", "moeinf_mxfp4_u32", "moeinf_mxfp4_u64"):
            getattr(lib, name).argtypes = [_P, _P, _P, _P, _I]
        for name in ("moeinf_fp8_u16", "moeinf_fp8_u32"):
            getattr(lib, name).argtypes = [_P, _P, _P, _I, _I, _I, _I, _I]
        self.threads = max(1, threads)
        self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="dequant") if self.threads > 1 else None

    def mxfp4(self, blocks: torch.Tensor, scales: torch.Tensor, pairs: torch.Tensor, out: torch.Tensor,
              bf16: bool) -> None:
        """``blocks`` [n, 16] uint8 and ``scales`` [n] uint8 (contiguous) into ``out`` ([n * 16] pairs of ``pairs``'s
        dtype, contiguous): both values of each byte under its block's scale, low nibble first."""
        n, size = scales.numel(), pairs.element_size()
        fn = self.lib.moeinf_mxfp4_bf16 if bf16 else (self.lib.moeinf_mxfp4_u32 if size == 4 else
                                                      self.lib.moeinf_mxfp4_u64)
        b, s, o = blocks.data_ptr(), scales.data_ptr(), out.data_ptr()
        self._split(n, lambda lo, hi: fn(b + lo * 16, s + lo, pairs.data_ptr(), o + lo * 16 * size, hi - lo))

    def fp8(self, values: torch.Tensor, table: torch.Tensor, out: torch.Tensor, block_r: int, block_c: int) -> None:
        """``values`` [rows, cols] float8 bytes into ``out`` (same shape): each value looked up in its block's
        256-entry ``table`` row (``[blocks, 256]`` in ``out``'s dtype, blocks row-major: the scaled and rounded
        values torch computed, so the bits are torch's by construction)."""
        rows, cols = values.shape
        fn = self.lib.moeinf_fp8_u16 if out.element_size() == 2 else self.lib.moeinf_fp8_u32
        v, t, o = values.data_ptr(), table.data_ptr(), out.data_ptr()

        def run(lo: int, hi: int) -> None:
            fn(v, t, o, lo * block_r, min(rows, hi * block_r) - lo * block_r, cols, block_r, block_c)
        self._split((rows + block_r - 1) // block_r, run)  # whole block rows per thread

    def _split(self, n: int, run) -> None:
        if self.pool is None or n < 2 * self.threads:
            run(0, n)
            return
        bounds = [n * i // self.threads for i in range(self.threads + 1)]
        for f in [self.pool.submit(run, lo, hi) for lo, hi in zip(bounds, bounds[1:]) if hi > lo]:
            f.result()


def load(mode: str, state_dir: Path, threads: int) -> Kernels | None:
    """The checked kernels, or None for the torch path (``mode`` torch, or auto when they cannot be built or
    disagree with torch, said once in the log)."""
    if mode not in MODES:
        raise ValueError(f"--dequant-kernel must be one of {', '.join(MODES)}, not {mode!r}")
    if mode == "torch":
        return None
    try:
        kernels = Kernels(ctypes.CDLL(str(build(Path(state_dir) / f"kernels-{os.getuid()}"))), threads)
        self_check(kernels)
        return kernels
    except (KernelError, OSError) as exc:
        if mode == "c":
            raise KernelError(f"--dequant-kernel c: {exc}") from exc
        log.warning("dequantizing with torch's ops (quantized experts decode 2-3x slower): %s", exc)
        return None


def build(cache: Path) -> Path:
    """The shared library for this source, compiler and CPU, compiled once into ``cache``."""
    cc = shlex.split(os.environ.get("CC") or "cc")
    if not cc or shutil.which(cc[0]) is None:
        raise KernelError(f"no C compiler ({cc[0] if cc else 'CC is empty'} not found; install gcc or set CC, or"
                          " pass --dequant-kernel torch)")
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join(cc + list(FLAGS)).encode() + _compiler_id(cc) + _cpu_id()).hexdigest()[:16]
    target = cache / f"dequant-{key}.so"
    cache.mkdir(mode=0o700, parents=True, exist_ok=True)
    _private(cache)
    if target.exists():
        _private(target)
        return target
    fd, tmp = tempfile.mkstemp(prefix=".dequant-", suffix=".so", dir=cache)
    os.close(fd)
    try:
        try:
            done = subprocess.run([*cc, *FLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True, timeout=120)
        except subprocess.TimeoutExpired as exc:
            raise KernelError(f"{' '.join(cc)} took over {exc.timeout:.0f} s to build {SOURCE.name}") from exc
        if done.returncode != 0:
            raise KernelError(f"{' '.join(cc)} could not build {SOURCE.name}: {done.stderr.strip()[-500:]}")
        os.chmod(tmp, 0o700)  # the linker gives its output the umask's mode
        os.replace(tmp, target)  # atomic: workers starting together each build and the last rename wins
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _private(path: Path) -> None:
    """Code the worker loads must be its user's alone: owned by it, no symlink, writable by nobody else."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise KernelError(f"{path} is a link, another user's, or writable by others: not loaded (remove it)")


def _compiler_id(cc: list[str]) -> bytes:
    try:
        return subprocess.run([*cc, "--version"], capture_output=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise KernelError(f"{cc[0]} --version failed: {exc}") from exc


def _cpu_id() -> bytes:
    """-march=native code for this CPU only: its model and feature flags, as Linux reports them."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor().encode()
    wanted = ("model name", "flags", "Features", "CPU part")
    return "\n".join(sorted({ln for ln in lines if ln.split(":")[0].strip() in wanted})).encode()


def self_check(kernels: Kernels) -> None:
    """The kernels' bits equal the torch path's on every MXFP4 (scale, byte) pair, for each dtype, and on FP8
    blocks whose scales reach the subnormal, overflow and NaN ends."""
    from services.worker.quant import fp8_block_table, mxfp4_pairs, mxfp4_reference

    blocks = torch.arange(256, dtype=torch.uint8).repeat(256).view(-1, 16)  # each scale meets every byte
    scales = torch.arange(256, dtype=torch.uint8).repeat_interleave(16)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        pairs = mxfp4_pairs(dtype)
        out = torch.empty(blocks.numel(), dtype=pairs.dtype)
        kernels.mxfp4(blocks, scales, pairs, out, dtype == torch.bfloat16)
        if not torch.equal(out, mxfp4_reference(blocks, scales, pairs)):
            raise KernelError(f"the built MXFP4 kernel disagrees with torch's ops ({dtype}): not used")
    gen = torch.Generator().manual_seed(0)
    values = torch.randint(0, 256, (256, 512), dtype=torch.uint8, generator=gen)
    scales8 = torch.tensor([[1e-38, 3e-40, 7.3e35, float("nan")], [0.37, 1.0, 3.1e-3, 6e4]], dtype=torch.float32)
    index = values.view(2, 128, 4, 128).to(torch.int64) + (torch.arange(8) * 256).view(2, 1, 4, 1)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        table = fp8_block_table(scales8, dtype)
        out = torch.empty(256, 512, dtype=dtype)
        kernels.fp8(values, table, out, 128, 128)
        if not torch.equal(out.view(torch.uint8), table.view(-1)[index].view(256, 512).view(torch.uint8)):
            raise KernelError(f"the built FP8 kernel disagrees with torch's ops ({dtype}): not used")
