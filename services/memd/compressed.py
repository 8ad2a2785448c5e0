"""The compressed expert cache (opt-in, memd ``--expert-format fp8|mxfp4``): a bf16/fp16/fp32 checkpoint's experts
served in block FP8 or MXFP4, so the pool holds 2x (FP8) or ~3.8x (MXFP4) more experts per byte and reads that
many fewer bytes per miss. It is lossy (``moeinf bench quality`` measures how much).

Each expert is converted once, on its first read, by the reader thread that takes its first piece (the read then
goes on from the cache file), and kept in one cache file per (checkpoint, format) under
``--expert-cache-dir`` (default ``<state-dir>/expert-cache/``): the slot-image cache of
``services/memd/slot_images.py``, whose file format and bookkeeping this store shares with the lossless
``--slot-cache``. ``moeinf convert`` fills the whole cache ahead, with a progress bar.

The encoding (``common/quant_encode.py``) is the one the released checkpoints use; the worker dequantizes the
slots with the same code as a natively quantized checkpoint (``services/worker/quant.py``):

- ``fp8``: float8_e4m3fn values and one float32 ``weight_scale_inv`` per 128x128 block (smaller dimensions make
  one block), of the parameter as the experts module holds it;
- ``mxfp4``: 32-value blocks along the reduction (input) dimension, as the MX formats define them, stored
  ``[out, in / 32, 16]`` as GPT-OSS stores its ``*_blocks``/``*_scales``: the transpose of an ``[in, out]``
  parameter (GPT-OSS's, ``ExpertIndex.transposed``), the rows of an ``[out, in]`` one (Mixtral's) as they are. Either
  way a row of the slot is one output's weights, the order the worker's matrix-vector kernel reads in place.

Biases (1-D parameters) stay in the checkpoint's dtype. The conversion is NumPy: memd loads no torch for it.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.checkpoint import CheckpointError
from common.config import env_name
from common.messages import TensorSpec
from common.quant_encode import MXFP4_BLOCK, fp8_encode, mxfp4_encode, numpy_dtype
from common.expert_index import ExpertIndex, align_up
# (CACHE_DIR, cache_root: re-exported)
from services.memd.slot_images import CACHE_DIR, PLACEMENT, SlotImageCache, cache_root  # noqa: F401

log = logging.getLogger("moeinf.memd.compressed")
FORMATS = ("fp8", "mxfp4")
FP8_BLOCK = 128


@dataclass(frozen=True, slots=True)
class _Plan:
    """Where one parameter of the source slot lands in the compressed slot."""

    name: str
    source: TensorSpec
    fmt: str  # "" (copied as is), "fp8" or "mxfp4"
    values: tuple[int, tuple[int, ...], str]  # (offset, shape, torch dtype)
    scales: tuple[int, tuple[int, ...], str] | None


def fp8_block(name: str, shape: tuple[int, ...]) -> tuple[int, int]:
    block = (min(FP8_BLOCK, shape[0]), min(FP8_BLOCK, shape[1]))
    if shape[0] % block[0] or shape[1] % block[1]:
        raise CheckpointError(f"--expert-format fp8: {name} {list(shape)} does not tile into {FP8_BLOCK}x{FP8_BLOCK}"
                              " blocks (both dimensions must be multiples of 128, or smaller than 128)")
    return block


def encoded_parts(name: str, shape: tuple[int, ...], fmt: str, transposed: bool) -> tuple[tuple, tuple]:
    """``((values shape, dtype), (scales shape, dtype))`` of one 2-D expert parameter in ``fmt``; ``transposed``:
    the parameter is ``[in, out]``."""
    if fmt == "fp8":
        block = fp8_block(name, shape)
        return (shape, "float8_e4m3fn"), ((shape[0] // block[0], shape[1] // block[1]), "float32")
    out_dim, in_dim = (shape[1], shape[0]) if transposed else shape
    if in_dim % MXFP4_BLOCK:
        raise CheckpointError(f"--expert-format mxfp4: {name} {list(shape)}: the input dimension ({in_dim}) must be a"
                              f" multiple of {MXFP4_BLOCK} (MXFP4 blocks)")
    groups = in_dim // MXFP4_BLOCK
    return ((out_dim, groups, MXFP4_BLOCK // 2), "uint8"), ((out_dim, groups), "uint8")


def encode(weight: np.ndarray, fmt: str, transposed: bool) -> tuple[np.ndarray, np.ndarray]:
    """One expert parameter (as the experts module holds it; ``transposed``: ``[in, out]``) -> its stored values
    and scales."""
    if fmt == "fp8":
        return fp8_encode(weight, fp8_block("weight", tuple(weight.shape)))
    return mxfp4_encode(weight.T if transposed else weight)  # [out, in / 32, 16]: blocks along the input dimension


class CompressedStore(SlotImageCache):
    """The expert index of the same checkpoint whose slots hold its experts in ``fmt``, read from the cache file."""

    def __init__(self, source: ExpertIndex, model_dir: Path | str, fmt: str, cache_root: Path | str):
        """``source``: the checkpoint's own index; ``cache_root``: the expert-cache directory."""
        if fmt not in FORMATS:
            raise ValueError(f"--expert-format {fmt!r}: choose one of {', '.join(FORMATS)} (or leave it unset)")
        if source.format:
            raise CheckpointError(f"--expert-format {fmt}: {model_dir} stores its experts in {source.format}"
                                  " already; the compressed cache is for bf16/fp16/fp32 checkpoints")
        self.source, self.format = source, fmt
        self.plans, self.tensors, self.slot_bytes, self.expert_bytes = self._layout()
        super().__init__(source, model_dir, cache_root)

    def encoders(self) -> list[Path]:
        return [PLACEMENT, Path(__file__), Path(__file__).parents[2] / "common" / "quant_encode.py"]

    @classmethod
    def of(cls, model_dir: Path | str, fmt: str, cache_root: Path | str) -> "CompressedStore":
        """Index ``model_dir`` in this process (imports transformers: the CLI and the benchmarks, not memd)."""
        from common.checkpoint import Checkpoint
        from services.memd.store import ExpertStore

        return cls(ExpertStore(Checkpoint(model_dir)).index(), model_dir, fmt, cache_root)

    def convert(self, key: tuple[int, int]) -> bytes:
        """Expert ``key``'s compressed slot image, from its bytes in the checkpoint."""
        source = np.frombuffer(self._read_source(key), dtype=np.uint8)
        out = np.zeros(self.slot_bytes, dtype=np.uint8)
        for plan in self.plans:
            spec = plan.source
            tensor = _view(source, spec.offset, tuple(spec.shape), spec.dtype)
            if not plan.fmt:
                _put(out, plan.values, tensor)
                continue
            if not np.isfinite(tensor).all():  # (MXFP4 would zero its block around a NaN, FP8 make it all NaN)
                raise ValueError(f"expert {key[1]} of MoE layer {key[0]}: {spec.name} holds NaN or infinite values;"
                                 f" it is not re-encoded as {plan.fmt} (serve the checkpoint as stored)")
            values, scales = encode(tensor, plan.fmt, self.source.transposed)
            _put(out, plan.values, values)
            _put(out, plan.scales, scales)
        return out.tobytes()

    def _layout(self) -> tuple[list[_Plan], list[TensorSpec], int, int]:
        plans, specs, offset, nbytes = [], [], 0, 0
        for spec in self.source.tensors:
            shape = tuple(spec.shape)
            if len(shape) != 2:  # biases: as stored
                size = _nbytes(shape, spec.dtype)
                plans.append(_Plan(spec.name, spec, "", (offset, shape, spec.dtype), None))
                specs.append(TensorSpec(spec.name, offset, list(shape), spec.dtype))
                offset, nbytes = align_up(offset + size), nbytes + size
                continue
            (vshape, vdtype), (sshape, sdtype) = encoded_parts(spec.name, shape, self.format, self.source.transposed)
            values_at = offset
            offset = align_up(offset + _nbytes(vshape, vdtype))
            plans.append(_Plan(spec.name, spec, self.format, (values_at, vshape, vdtype), (offset, sshape, sdtype)))
            specs.append(TensorSpec(spec.name, values_at, list(vshape), vdtype, self.format, offset, list(sshape),
                                    sdtype))
            nbytes += _nbytes(vshape, vdtype) + _nbytes(sshape, sdtype)
            offset = align_up(offset + _nbytes(sshape, sdtype))
        return plans, specs, offset, nbytes


def _view(flat: np.ndarray, offset: int, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    return flat[offset:offset + _nbytes(shape, dtype)].view(numpy_dtype(dtype)).reshape(shape)


def _put(out: np.ndarray, where: tuple[int, tuple[int, ...], str], array: np.ndarray) -> None:
    offset, shape, dtype = where
    if tuple(array.shape) != shape or array.dtype != numpy_dtype(dtype):
        raise RuntimeError(f"encoded {list(array.shape)} {array.dtype}, the layout says {list(shape)} {dtype}")
    raw = np.ascontiguousarray(array).view(np.uint8).reshape(-1)
    out[offset:offset + raw.size] = raw


def _nbytes(shape, dtype: str) -> int:
    n = numpy_dtype(dtype).itemsize
    for d in shape:
        n *= d
    return n


def run_convert(args) -> int:
    """``moeinf convert``: fill the whole cache ahead of memd, with a progress bar; a rerun converts what is left.
    Without ``--expert-format``: the lossless slot images memd's ``--slot-cache`` reads (a CPU worker's layout)."""
    from tqdm import tqdm

    from common.config import default_state_dir
    from common.sizes import format_bytes

    if args.expert_format is not None and args.expert_format not in FORMATS:  # (MOEINF_EXPERT_FORMAT's value)
        raise SystemExit(f"moeinf convert: MOEINF_EXPERT_FORMAT={args.expert_format!r}: choose one of"
                         f" {', '.join(FORMATS)}, or unset it")
    root = cache_root(args.state_dir or default_state_dir(), args.expert_cache_dir)
    if args.slot_compression not in (None, "off", "zstd"):  # (MOEINF_SLOT_COMPRESSION's value)
        raise SystemExit(f"moeinf convert: MOEINF_SLOT_COMPRESSION={args.slot_compression!r}: choose off or zstd")
    packed = args.slot_compression == "zstd"
    if args.expert_format and packed:
        raise SystemExit("moeinf convert: --slot-compression zstd compresses the lossless slot images; it does not"
                         " apply with --expert-format")
    if args.expert_format:
        store = CompressedStore.of(args.model, args.expert_format, root).open()
    elif packed:
        from services.memd.packed_images import PackedImages

        store = PackedImages.of(args.model, root).open()
    else:
        from services.memd.slot_images import LosslessImages

        store = LosslessImages.of(args.model, root).open()
    what = args.expert_format or ("compressed lossless slot images" if packed else "lossless slot images")
    try:
        total = store.num_layers * store.num_experts
        with tqdm(total=len(store.missing), desc=what, unit="expert", disable=args.quiet) as bar:
            converted = store.fill(bar.update)
        read = getattr(store, "read_bytes", store.expert_bytes)
        print(f"{store.directory}: {total} experts as {what} ({converted} converted now); a read is"
              f" {format_bytes(read)} per expert against {format_bytes(store.source.expert_bytes)} as stored")
    finally:
        store.close()
    return 0


def add_convert_parser(sub) -> None:
    p = sub.add_parser("convert", help="fill memd's expert cache ahead: lossless slot images (--slot-cache) or a"
                                       " compressed format (--expert-format fp8|mxfp4)",
                       description="Fill <state-dir>/expert-cache/ with every expert, as memd does on first read;"
                                   " memd then reads them from the cache. Without --expert-format: the experts as"
                                   " memd lays them into a CPU worker's slots, unchanged (--slot-cache).")
    p.add_argument("--model", required=True, help="a checkpoint directory (bf16/fp16/fp32 for --expert-format)")
    env = {name: os.environ.get(env_name(name)) or None for name in ("expert_format", "state_dir", "expert_cache_dir",
                                                            "slot_compression")}
    p.add_argument("--expert-format", choices=list(FORMATS), default=env["expert_format"],
                   help="compress (lossy); unset: lossless slot images [env MOEINF_EXPERT_FORMAT, as memd reads it]")
    p.add_argument("--slot-compression", choices=["off", "zstd"], default=env["slot_compression"],
                   help="the lossless slot images compressed, as memd's --slot-compression keeps them"
                        " [env MOEINF_SLOT_COMPRESSION]")
    p.add_argument("--state-dir", default=env["state_dir"],
                   help="memd's --state-dir [env MOEINF_STATE_DIR, as memd reads it; default ~/.local/state/moeinf]")
    p.add_argument("--expert-cache-dir", default=env["expert_cache_dir"],
                   help="memd's --expert-cache-dir [env MOEINF_EXPERT_CACHE_DIR; default <state-dir>/expert-cache]")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_convert)
