"""The compiled kernels (``dequant.c``, ``matvec.c``, ``matvec_exact.c``, ``matvec_onednn.c``): built on first use,
checked against torch's ops, or absent.

The torch-op path in ``quant.py`` makes an int32 index per value, adds the scales to it and gathers from a table:
about five passes over memory per value. ``dequant.c`` reads each quantized byte once and writes each value once
(MXFP4 -> bfloat16 computes most values directly, two blocks at a time by word shuffles with AVX-512BW; FP8 looks
64 values up at once by byte shuffles with AVX-512 VBMI, else computes bfloat16 values with AVX2 (16 at a time),
else looks 32 up with AVX-512BW (gcc); everything else is a scalar table gather): 4x (MXFP4 without AVX-512BW) to
8x faster than torch's ops on one core.
There is no maintained CPU kernel for these formats in torch or on PyPI that reads the pool's slots in place, so
the worker builds this small file itself with the system's C compiler (``$CC``, else ``cc``; ``-O3 -march=native``:
it only ever runs on the machine that built it) into ``<dir>/kernels-<uid>/`` (the user's alone; ``dir`` the worker's
``--kernel-cache-dir``, else its state directory), keyed by
the source, the compiler and the CPU, once per machine. Before first use the kernels run on every MXFP4 (scale,
byte) pair and on FP8 blocks of extreme scales, and must give the torch path's exact bits; otherwise the worker
warns and keeps the torch path (``--dequant-kernel auto``) or refuses to start (``c``). The same library holds the
bfloat16 matrix-vector kernels of ``--matvec-kernel`` (``matvec.py``): ``fast`` checked against float64 products
within a rounding tolerance (its sums are added in another order than torch's: not bit-equal by design), ``exact``
(the default where it holds) against torch's own products, bit for bit; ``attention.c`` (``decode_attention.py``);
``rms_norm.c`` (``rms_norm.py``: checked against each norm's own forward before use); ``router.c``
(``router_kernel.py``: likewise, each router); and ``guess.c``
(``speculate.py``: one token's hidden-state guesses, which only choose what to prefetch).

Each call releases the GIL (ctypes). With ``--threads N`` a matrix-vector call's output rows are shared among N
threads inside C (``parallel.h``: OpenMP on the runtime torch already loaded, so they are torch's own threads; built
without OpenMP, and for the dequantization and attention kernels, Python's threads split the call)."""
from __future__ import annotations

import contextlib
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
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from services.worker.kernel_matvec import MatvecCalls

log = logging.getLogger("moeinf.worker")
SOURCES = tuple(Path(__file__).with_name(name)  # one library
                for name in ("dequant.c", "matvec.c", "matvec_mxfp4.c", "matvec_exact.c", "matvec_exact_xw.c",
                             "matvec_onednn.c", "matvec_threads.c", "moe_token.c", "attention.c", "attention_exact.c",
                             "attention_block.c", "rms_norm.c", "router.c", "guess.c", "rotary.c"))
HEADERS = tuple(Path(__file__).with_name(h)  # (part of the build's key)
                for h in ("fp8_lookup.h", "mxfp4_decode.h", "matvec_common.h", "parallel.h"))
FLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-std=gnu11")
OPENMP = "-fopenmp"  # the matrix-vector kernels share their rows among torch's own threads (parallel.h); without it
#                      (a compiler with no OpenMP runtime) the library is built plain and Python splits the calls
NAMES = " and ".join(path.name for path in SOURCES)
MODES = ("auto", "c", "torch")
_P = ctypes.c_void_p
_I = ctypes.c_int64


class KernelError(RuntimeError):
    pass


class Kernels(MatvecCalls):
    """The loaded kernels; ``threads`` > 1 splits each call's rows over that many threads."""

    def __init__(self, lib: ctypes.CDLL, threads: int):
        self.lib = lib
        for name in ("moeinf_mxfp4_bf16", "moeinf_mxfp4_u32", "moeinf_mxfp4_u64"):
            getattr(lib, name).argtypes = [_P, _P, _P, _P, _I]
        for name in ("moeinf_fp8_u16", "moeinf_fp8_u32", "moeinf_fp8_bf16_direct"):
            getattr(lib, name).argtypes = [_P, _P, _P, _I, _I, _I, _I, _I]
        # FP8 -> bfloat16 computed with AVX2 where the lookup is the scalar gather (no AVX-512 shuffles): 1.3-1.4x it
        self.fp8_direct = bool(lib.moeinf_fp8_direct_fast()) and not lib.moeinf_fp8_lookup_fast()
        # the matrix-vector kernels end with the threads to share their rows among (1 without OpenMP: Python splits)
        self.openmp = bool(lib.moeinf_openmp()) and _torchs_openmp(lib)
        lib.moeinf_mv_bf16_nt.argtypes = [_P, _I, _P, _I, _I, _I, _I, _P, _I, _I]
        lib.moeinf_mv_bf16_nt.restype = ctypes.c_int
        self.matvec_fast = bool(lib.moeinf_mv_fast())  # AVX-512 BF16 or AVX2+FMA (else plain C, slower than oneDNN)
        lib.moeinf_mv_fp8_nt.argtypes = [_P, _I, _P, _P, _I, _I, _P, _I, _I, _I, _I, _P, _I, _I]
        lib.moeinf_mv_fp8_nt.restype = ctypes.c_int
        self.matvec_fp8_fast = bool(lib.moeinf_mv_fp8_fast())  # AVX-512 BF16 and VBMI, or AVX2+FMA
        lib.moeinf_mv_mxfp4_nt.argtypes = [_P, _I, _P, _I, _P, _I, _I, _I, _I, _P, _I, _I]
        lib.moeinf_mv_mxfp4_nt.restype = ctypes.c_int
        self.matvec_mxfp4_fast = bool(lib.moeinf_mv_mxfp4_fast())
        lib.moeinf_mv_exact_nt.argtypes = [_P, _I, _P, _I, _I, _I, _I, _P, _I, _I]
        lib.moeinf_mv_exact_nt.restype = ctypes.c_int
        self.matvec_exact_avx2 = bool(lib.moeinf_mv_exact_avx2())  # torch's AVX2 summation order (else absent)
        lib.moeinf_mv_exact_fp8_nt.argtypes = lib.moeinf_mv_fp8_nt.argtypes  # ... from FP8 slots
        lib.moeinf_mv_exact_fp8_nt.restype = ctypes.c_int
        for name in ("moeinf_mv_exact_mxfp4_nt", "moeinf_mv_exact_xw_mxfp4"):  # ... from MXFP4 slots (and x @ W's)
            getattr(lib, name).argtypes = lib.moeinf_mv_mxfp4_nt.argtypes
            getattr(lib, name).restype = ctypes.c_int
        lib.moeinf_mv_onednn_nt.argtypes = [_P, _I, _P, _I, _I, _I, _I, _P, _I, _I, _I]
        lib.moeinf_mv_onednn_nt.restype = ctypes.c_int
        self.matvec_exact_onednn = bool(lib.moeinf_mv_exact_onednn())  # oneDNN's order (AVX-512 BF16; else absent)
        lib.moeinf_mv_onednn_fp8_nt.argtypes = [_P, _I, _P, _P, _I, _I, _P, _I, _I, _I, _I, _P, _I, _I, _I]
        lib.moeinf_mv_onednn_fp8_nt.restype = ctypes.c_int
        self.matvec_exact_onednn_fp8 = bool(lib.moeinf_mv_exact_onednn_fp8())  # ... from FP8 slots (and VBMI)
        self.matvec_exact_onednn_mxfp4 = bool(lib.moeinf_mv_exact_onednn_mxfp4())  # ... from MXFP4 slots (and VBMI)
        lib.moeinf_mv_onednn_mxfp4_nt.argtypes = [_P, _I, _P, _I, _P, _P, _I, _I, _I, _I, _P, _I, _I, _I]
        lib.moeinf_mv_onednn_mxfp4_nt.restype = ctypes.c_int
        self.exact_order: str | None = None  # whose order the exact kernel reproduces here: check_exact's
        self.matvec_exact_fp8 = False  # ATen's AVX2 order from FP8 slots: matvec_checks.check_exact's
        self.matvec_exact_mxfp4 = False  # ... from MXFP4 slots, in ATen's dot order
        self.matvec_exact_mxfp4_xw = False  # ... and in its x @ W order (an [in, out] weight)
        self.threads = max(1, threads)
        self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="dequant") if self.threads > 1 else None

    def mxfp4(self, blocks: torch.Tensor, scales: torch.Tensor, pairs: torch.Tensor, out: torch.Tensor,
              bf16: bool) -> None:
        """``blocks`` [n, 16] uint8 and ``scales`` [n] uint8 (contiguous) into ``out`` ([n * 16] pairs of ``pairs``'s
        dtype, contiguous): both values of each byte under its block's scale, low nibble first."""
        n, size = scales.numel(), pairs.element_size()
        if blocks.numel() != n * 16 or out.numel() != n * 16 or out.dtype != pairs.dtype or size not in (4, 8):
            raise ValueError(f"mxfp4 kernel: {blocks.numel()} bytes, {n} scales, {out.numel()} {out.dtype} outputs")
        fn = self.lib.moeinf_mxfp4_bf16 if bf16 else (self.lib.moeinf_mxfp4_u32 if size == 4 else
                                                      self.lib.moeinf_mxfp4_u64)
        b, s, o = blocks.data_ptr(), scales.data_ptr(), out.data_ptr()
        self.split(n, lambda lo, hi: fn(b + lo * 16, s + lo, pairs.data_ptr(), o + lo * 16 * size, hi - lo))

    def fp8(self, values: torch.Tensor, table: torch.Tensor, out: torch.Tensor, block_r: int, block_c: int) -> None:
        """``values`` [rows, cols] float8 bytes into ``out`` (same shape): each value looked up in its block's
        256-entry ``table`` row (``[blocks, 256]`` in ``out``'s dtype, blocks row-major: the scaled and rounded
        values torch computed, so the bits are torch's by construction)."""
        rows, cols = values.shape
        if out.shape != values.shape or out.element_size() not in (2, 4) or block_r < 1 or block_c < 1 \
                or rows % block_r or cols % block_c or table.numel() < (rows // block_r) * (cols // block_c) * 256:
            raise ValueError(f"fp8 kernel: {list(values.shape)} values in {block_r}x{block_c} blocks into"
                             f" {list(out.shape)} {out.dtype} with a {table.numel()}-entry table")
        fn = self.lib.moeinf_fp8_u16 if out.element_size() == 2 else self.lib.moeinf_fp8_u32
        v, t, o = values.data_ptr(), table.data_ptr(), out.data_ptr()

        def run(lo: int, hi: int) -> None:
            fn(v, t, o, lo * block_r, min(rows, hi * block_r) - lo * block_r, cols, block_r, block_c)
        self.split((rows + block_r - 1) // block_r, run)  # whole block rows per thread

    def fp8_bf16(self, values: torch.Tensor, scales: torch.Tensor, out: torch.Tensor, block_r: int,
                 block_c: int) -> None:
        """``values`` [rows, cols] float8 bytes into bfloat16 ``out`` under ``scales`` ([rows / block_r, cols /
        block_c] float32, contiguous), computed (``fp8_direct``: AVX2, ``block_c`` a multiple of 16) with the bits of
        ``fp8``'s table: ``self_check`` compares the two before either is used."""
        rows, cols = values.shape
        if not self.fp8_direct or out.shape != values.shape or out.dtype != torch.bfloat16 or block_c % 16 \
                or block_r < 1 or rows % block_r or cols % block_c or scales.dtype != torch.float32 \
                or not scales.is_contiguous() or scales.numel() != (rows // block_r) * (cols // block_c):
            raise ValueError(f"fp8 kernel: {list(values.shape)} values in {block_r}x{block_c} blocks into"
                             f" {list(out.shape)} {out.dtype} under {list(scales.shape)} {scales.dtype} scales")
        fn = self.lib.moeinf_fp8_bf16_direct
        v, s, o = values.data_ptr(), scales.data_ptr(), out.data_ptr()
        self.split((rows + block_r - 1) // block_r,
                    lambda lo, hi: fn(v, s, o, lo * block_r, min(rows, hi * block_r) - lo * block_r, cols, block_r,
                                      block_c))

    def rows(self, n: int, run, align: int = 1) -> None:
        """``run(lo, hi, threads)`` for a matrix-vector kernel's ``n`` output rows: one call that shares them among
        ``threads`` in C (``matvec_threads.c``, in the kernel's own runs of rows), or, without OpenMP on torch's
        runtime, ``split`` among Python's threads in runs of ``align`` rows (the same)."""
        if self.openmp:
            run(0, n, self.threads)
        else:
            self.split(n, lambda lo, hi: run(lo, hi, 1), align)

    def split(self, n: int, run, align: int = 1) -> None:
        if self.pool is None or n < 2 * self.threads:
            run(0, n)
            return
        bounds = [min(n, (n * i // self.threads + align - 1) // align * align) for i in range(self.threads + 1)]
        for f in [self.pool.submit(run, lo, hi) for lo, hi in zip(bounds, bounds[1:]) if hi > lo]:
            f.result()


def compiler() -> list[str] | None:
    """The C compiler's command (``$CC``, else ``cc``), or None when it is not installed."""
    cc = shlex.split(os.environ.get("CC") or "cc")
    return cc if cc and shutil.which(cc[0]) else None


def load(mode: str, state_dir: Path, threads: int, check=None, flag: str = "--dequant-kernel c",
         advice: str = "pass --dequant-kernel torch",
         fallback: str = "dequantizing with torch's ops (quantized experts decode 2-3x slower)") -> Kernels | None:
    """The checked kernels, or None for the torch path (``mode`` torch, or auto when they cannot be built or
    disagree with torch, said once in the log). ``check``: what must hold before use (default: the dequantization
    kernels' bits, ``self_check``; ``matvec_checks.check`` for ``--matvec-kernel``, named by ``flag``, whose errors end
    with ``advice``; ``fallback``: what ``auto`` does instead, for the log). A cached library that no longer loads
    or checks is built again."""
    check = check or self_check
    if mode not in MODES:
        raise ValueError(f"--dequant-kernel must be one of {', '.join(MODES)}, not {mode!r}")
    if mode == "torch":
        return None
    try:
        with _pinned(Path(state_dir) / f"kernels-{os.getuid()}") as cache:
            name, built = build(cache)
            try:
                return _open(cache / name, threads, check)
            except (KernelError, OSError) as exc:
                if built:
                    raise
                log.info("building the dequantization kernels again: the cached %s: %s", name, exc)
                (cache / name).unlink(missing_ok=True)
                return _open(cache / build(cache)[0], threads, check)
    except (KernelError, OSError) as exc:
        if mode == "c":
            raise KernelError(f"{flag}: {exc}, or {advice}") from exc
        log.warning("%s: %s", fallback, exc)
        return None


@contextlib.contextmanager
def _pinned(cache: Path):
    """``cache`` created if needed and checked to be this user's alone (owned by it, no link, writable by nobody
    else), as a path through a descriptor held open (``/proc/PID/fd/N``): with ``--group`` the state directory is
    the group's to rename entries in, and a directory swapped in after the check is never built into or loaded."""
    cache.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(cache, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if st.st_uid != os.getuid() or st.st_mode & 0o022:
            raise KernelError(f"{cache} is another user's or writable by others: not used (remove it)")
        yield Path(f"/proc/{os.getpid()}/fd/{fd}")  # (the compiler, a child process, writes through it too)
    finally:
        os.close(fd)


def _open(library: Path, threads: int, check=None) -> Kernels:
    """Load ``library`` if it is a regular file of this user's that nobody else can write, then ``check`` its bits."""
    fd = os.open(library, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise KernelError(f"{library.name} is not a file of this user's that only it can write: not loaded")
    kernels = Kernels(ctypes.CDLL(str(library)), threads)  # in a directory only this user can change
    (check or self_check)(kernels)
    return kernels


def build(cache: Path) -> tuple[str, bool]:
    """The shared library's name for this source, compiler and CPU in ``cache``, and whether it was compiled now."""
    cc = compiler()
    if cc is None:
        raise KernelError(f"no C compiler ({os.environ.get('CC') or 'cc'} not found); install gcc or set CC")
    source = b"".join(path.read_bytes() for path in SOURCES + HEADERS)
    key = hashlib.sha256(source + " ".join(cc + list(FLAGS)).encode() + _compiler_id(cc) + _cpu_id()).hexdigest()[:16]
    name = f"dequant-{key}.so"
    if (cache / name).exists():
        return name, False
    _remove_stale(cache)
    fd, tmp = tempfile.mkstemp(prefix=".dequant-", suffix=".so", dir=cache)
    os.close(fd)
    try:
        done = _compile(cc, tmp, OPENMP)
        if done.returncode != 0:
            log.warning("%s -fopenmp failed (%s): the kernels are built without OpenMP (Python's threads split their"
                        " calls; once the compiler has OpenMP, remove %s from kernels-%d/ in"
                        " --kernel-cache-dir, else the state directory, to rebuild)", " ".join(cc),
                        done.stderr.strip()[-200:], name, os.getuid())
            done = _compile(cc, tmp)
        if done.returncode != 0:
            raise KernelError(f"{' '.join(cc)} could not build {NAMES}: {done.stderr.strip()[-500:]}")
        os.chmod(tmp, 0o700)  # the linker gives its output the umask's mode
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # whole before it gets its name: a crash leaves no truncated library behind
        os.replace(tmp, cache / name)  # atomic: workers starting together each build and the last rename wins
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return name, True


def _torchs_openmp(lib: ctypes.CDLL) -> bool:
    """Does ``lib`` (built with OpenMP) run on the OpenMP runtime torch uses? Its ``GOMP_parallel`` must be the one
    torch's own libraries resolve (another package may load a second copy under another name: sentencepiece does; a
    clang build would bring LLVM's runtime). If not, its calls run on one thread each and Python splits them: two
    runtimes' spinning threads would fight for the cores."""
    try:
        ours = ctypes.cast(lib.GOMP_parallel, ctypes.c_void_p).value
        torchs = ctypes.cast(ctypes.CDLL(torch._C.__file__).GOMP_parallel, ctypes.c_void_p).value
    except (AttributeError, OSError):
        ours, torchs = 0, None
    if ours != torchs:
        log.warning("the matrix-vector kernels' OpenMP runtime is not torch's: their calls run on one thread each and"
                    " Python's threads split them")
    return ours == torchs


def _compile(cc: list[str], out: str, *extra: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([*cc, *FLAGS, *extra, "-I", str(HEADERS[0].parent), "-o", out, *map(str, SOURCES)],
                              capture_output=True, text=True, errors="replace", timeout=120)
    except subprocess.TimeoutExpired as exc:
        raise KernelError(f"{' '.join(cc)} took over {exc.timeout:.0f} s to build {NAMES}") from exc


def _remove_stale(cache: Path, age_s: float = 600.0) -> None:
    """Temporary files of builds that were killed (a build takes seconds)."""
    now = time.time()
    for path in cache.glob(".dequant-*"):
        with contextlib.suppress(OSError):
            if now - path.lstat().st_mtime > age_s:
                path.unlink()


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
    mixed = scales[torch.randperm(scales.numel(), generator=torch.Generator().manual_seed(0))]  # neighbours differ
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        pairs = mxfp4_pairs(dtype)
        out = torch.empty(blocks.numel(), dtype=pairs.dtype)
        for s in (scales, mixed):  # (blocks decoded together with their own scales each)
            kernels.mxfp4(blocks, s, pairs, out, dtype == torch.bfloat16)
            if not torch.equal(out, mxfp4_reference(blocks, s, pairs)):
                raise KernelError(f"the built MXFP4 kernel disagrees with torch's ops ({dtype}): not used")
    gen = torch.Generator().manual_seed(0)
    scales8 = torch.tensor([[1e-38, 3e-40, 7.3e35, float("nan")], [0.37, 1.0, 3.1e-3, 6e4]], dtype=torch.float32)
    small = torch.rand(16, 3, generator=gen) * 4  # blocks whose width is no multiple of 32: the scalar path
    for (block_r, block_c), scales in (((128, 128), scales8), ((8, 48), small)):
        grid_r, grid_c = scales.shape
        rows, cols = grid_r * block_r, grid_c * block_c
        values = torch.randint(0, 256, (rows, cols), dtype=torch.uint8, generator=gen)
        index = values.view(grid_r, block_r, grid_c, block_c).to(torch.int64) + (
            torch.arange(grid_r * grid_c) * 256).view(grid_r, 1, grid_c, 1)
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            table = fp8_block_table(scales, dtype)
            out = torch.empty(rows, cols, dtype=dtype)
            kernels.fp8(values, table, out, block_r, block_c)
            want = table.view(-1)[index].view(rows, cols).view(torch.uint8)
            if not torch.equal(out.view(torch.uint8), want):
                raise KernelError(f"the built FP8 kernel disagrees with torch's ops ({dtype}, {block_r}x{block_c}"
                                  " blocks): not used")
            if dtype == torch.bfloat16 and kernels.fp8_direct:
                out.zero_()
                kernels.fp8_bf16(values, scales.contiguous(), out, block_r, block_c)
                if not torch.equal(out.view(torch.uint8), want):
                    raise KernelError(f"the built FP8 -> bfloat16 AVX2 kernel disagrees with torch's ops"
                                      f" ({block_r}x{block_c} blocks): not used")
