"""``moeinf bench disk``: the disk under the checkpoint, measured the ways memd's expert reads can be judged by.

Side by side, in one run, on the same file (the checkpoint's largest shard, its first ``--bytes``):

* the in-repo probe (``services/bench/diskbw.py``), single-stream: one O_DIRECT read of ``--chunk`` at a time;
* the same probe multi-stream: ``--threads`` reads in flight (memd's ``--read-threads`` and ``--read-chunk``), the
  best of two passes over the same bytes (a disk host may cache what was read lately: ``diskbw.py``);
* fio (Debian's ``fio``, if installed): ``--ioengine=libaio --iodepth=<threads> --direct=1 --rw=read
  --bs=<chunk>``, the independent reference at the same queue depth;
* memd's ``ExpertReader``: about ``--bytes`` of the experts stored in that same file (or ``--experts`` of them), read
  once each as on-demand loads into a page-aligned pool (its pages faulted in first, as in a running memd), 8 loads
  queued at a time, into the slots memd serves a CPU worker, from the checkpoint as stored (O_DIRECT straight into
  the slot where the alignment allows; rows a multiple of 2 KiB long are spread apart, ``services/memd/spread.py``,
  so they are staged and placed row by row);
* the same reader from memd's lossless slot images (``--slot-cache``, ``services/memd/slot_images.py``: converted
  first where missing), beside the multi-stream probe of the same bytes of the image file;
* the same reader from the compressed slot images (``--slot-compression zstd``, ``packed_images.py``): fewer bytes
  from the disk, decoded into the slots by the reader threads, beside the probe of that file's data (its holes
  skipped). Its expert bytes placed per second over the lossless images' reader in the same round (median) say
  whether compression pays on this disk and CPU.

Each reader's bandwidth is bytes read over wall time; the target is >= 90% of the multi-stream probe of its own
file. Probe and reader alternate for ``--rounds`` rounds (medians reported): a VM disk with a burst allowance
gives whichever runs first more.
"""
from __future__ import annotations

import ctypes
import json
import mmap
import shutil
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from common.sizes import format_bytes, parse_bytes
from services.bench.diskbw import CHUNK, PROBE_PASSES, STREAMS, Bandwidth, read_bandwidth

TARGET = 0.9
WINDOW = 8  # on-demand loads queued at once by the reader measurement (memd: an acquire asks for top-k per token)


@dataclass(frozen=True, slots=True)
class ReaderRun:
    bandwidth: Bandwidth
    experts: int
    staged_segments: int
    segments: int
    spread_bytes: int  # of the bytes read, those whose rows memd places apart or reorders (staged, copied by row)
    direct_bytes: int
    bounce_bytes: int
    alignment: str
    placed: int = 0  # expert bytes placed in the slots (the slots' size; compressed images read fewer)


def fio_bandwidth(path: Path, nbytes: int, depth: int, chunk: int) -> Bandwidth | str:
    """fio's sequential O_DIRECT read bandwidth at queue depth ``depth``; a reason string when fio cannot run."""
    if shutil.which("fio") is None:
        return "fio is not installed (Debian: apt-get install -y fio)"
    cmd = ["fio", "--name=moeinf-disk", f"--filename={path}", "--readonly", "--rw=read", f"--bs={chunk}",
           "--direct=1", "--ioengine=libaio", f"--iodepth={depth}", f"--size={nbytes}", "--output-format=json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        return f"fio failed: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}"
    read = json.loads(proc.stdout[proc.stdout.index("{"):])["jobs"][0]["read"]
    return Bandwidth(read["io_bytes"], read["runtime"] / 1e3, True, depth, chunk)


def checkpoint_source(model: Path, file: Path, experts: int | None):
    """``(store, keys)``: the slots memd serves a CPU worker read from the checkpoint as stored (spread.py), the
    first ``experts`` experts stored wholly in ``file`` (the probe's, so both measure the same part of the disk)."""
    from common.checkpoint import Checkpoint
    from services.memd.spread import spread_rows
    from services.memd.store import ExpertStore

    store = spread_rows(ExpertStore(Checkpoint(model)).index())
    segments = store.segments
    keys = sorted(k for k, segs in segments.items() if {s.file for s in segs} == {str(file)})
    if not keys:
        raise ValueError(f"{file}: holds no whole expert (bench disk reads experts from the probe's file)")
    return store, keys[:experts]


def image_source(model: Path, experts: int | None, cache_dir: Path | None, packed: bool = False):
    """``(images, keys)``: the same slots as memd's lossless slot images (``--slot-cache``; ``packed``: compressed,
    ``--slot-compression zstd``), the first ``experts`` of the cache file, converted first if missing (its probe
    reads those bytes of the same file)."""
    from common.config import default_state_dir
    from services.memd.packed_images import PackedImages
    from services.memd.slot_images import LosslessImages, cache_root

    kind = PackedImages if packed else LosslessImages
    images = kind.of(model, cache_root(default_state_dir(), cache_dir)).open()
    keys = sorted(images.segments)[:experts]
    images.prepare_many(keys)
    return images, keys


def reader_bandwidth(store, keys: list, threads: int, chunk: int) -> ReaderRun:
    """``keys`` read once each through memd's ExpertReader, on demand, ``WINDOW`` loads queued at a time."""
    from services.memd.dio import buffer_address
    from services.memd.reader import ExpertReader

    segments = store.segments
    buf = mmap.mmap(-1, WINDOW * store.slot_bytes)
    view = memoryview(buf)
    ctypes.memset(buffer_address(view), 1, len(view))  # fault the pages in, as memd's pool is after its first use
    reader = ExpertReader(store, view, store.slot_bytes, True, threads=threads, chunk=chunk)
    spread = sum(seg.nbytes for k in keys for seg in segments[k] if seg.placed)
    try:
        pending: deque = deque()
        total = 0
        start = time.perf_counter()
        for i, key in enumerate(keys):
            if len(pending) == WINDOW:
                total += pending.popleft().future.result()[0]
            pending.append(reader.submit(key, i % WINDOW, demand=True))  # slot i % WINDOW: its last load is done
        total += sum(job.future.result()[0] for job in pending)
        seconds = time.perf_counter() - start
        direct = reader.direct_io
    finally:
        reader.close()  # (the pool's mapping goes with the reader: rows placed apart keep a NumPy view of it)
    s = reader.stats
    return ReaderRun(Bandwidth(total, seconds, direct, threads, reader.chunk), len(keys), s.staged_segments,
                     s.segments, spread, s.direct_bytes, s.bounce_bytes,
                     reader.align.describe() if reader.align else "no O_DIRECT", len(keys) * store.slot_bytes)


def measure(model: Path, nbytes: int, threads: int, chunk: int, experts: int | None, rounds: int,
            cache_dir: Path | None = None) -> dict:
    """Single-stream probe and fio once; then ``rounds`` rounds of, for each source (the checkpoint as stored, the
    slot images), the multi-stream probe of its file and the reader over about the same bytes, alternating which
    goes first, and the sources' order (a VM disk's burst credit then favours none)."""
    from common.checkpoint import Checkpoint

    files = sorted(Checkpoint(model).files, key=lambda f: f.stat().st_size, reverse=True)[:1]
    progress(f"probe: {files[0]}, {format_bytes(nbytes)}")
    single = read_bandwidth(files, nbytes, chunk, streams=1)
    fio = fio_bandwidth(files[0], nbytes, threads, chunk)
    if experts is None:
        experts = max(1, nbytes // _expert_bytes(model))
    stored, stored_keys = checkpoint_source(model, files[0], experts)
    progress(f"slot images: {experts} experts (converted first where missing)")
    images, image_keys = image_source(model, experts, cache_dir)
    progress(f"compressed slot images: {experts} experts (packed first where missing)")
    packed, packed_keys = image_source(model, experts, cache_dir, packed=True)
    try:
        sources = {"checkpoint": (stored, stored_keys, files, nbytes),
                   "images": (images, image_keys, [images.path], len(image_keys) * images.slot_bytes),
                   "packed": (packed, packed_keys, [packed.path], len(packed_keys) * packed.read_bytes)}
        runs = {name: ([], []) for name in sources}
        for r in range(rounds):
            progress(f"round {r + 1}/{rounds}: multi-stream probe and {experts} expert(s) through the reader, from"
                     " the checkpoint, the slot images and the compressed ones")
            for name, (store, keys, probe_files, probe_bytes) in list(sources.items())[::1 if r % 2 == 0 else -1]:
                multi, readers = runs[name]
                steps = [lambda: multi.append(read_bandwidth(probe_files, probe_bytes, chunk, threads, PROBE_PASSES)),
                         lambda: readers.append(reader_bandwidth(store, keys, threads, chunk))]
                for step in steps[::1 if r % 2 == 0 else -1]:
                    step()
    finally:
        images.close()
        packed.close()
    doc = {"model": str(model), "file": str(files[0]), "images_file": str(images.path), "threads": threads,
           "packed_file": str(packed.path), "packed_share": packed.packed_share,
           "chunk": chunk, "rounds": rounds, "probe_single_gbps": single.gbps,
           "fio_gbps": fio.gbps if isinstance(fio, Bandwidth) else None,
           "fio_note": fio if isinstance(fio, str) else None}
    for name, (multi, readers) in runs.items():
        doc[name] = _source_doc(multi, readers)
    doc["direct"] = single.direct and all(doc[name]["probe_direct"] for name in runs)
    gains = sorted(p.placed / p.bandwidth.seconds / (i.placed / i.bandwidth.seconds)
                   for p, i in zip(runs["packed"][1], runs["images"][1]))
    doc["packed_gain_per_round_median"] = gains[len(gains) // 2]
    return doc


def _source_doc(multi: list, readers: list) -> dict:
    probe, reader = _median(multi, lambda b: b.gbps), _median(readers, lambda x: x.bandwidth.gbps)
    placed = sorted(x.placed / x.bandwidth.seconds / 1e9 for x in readers if x.bandwidth.seconds)
    ratios = sorted(x.bandwidth.gbps / b.gbps for x, b in zip(readers, multi) if b.gbps)
    return {"probe_multi_gbps": probe.gbps, "probe_multi_runs_gbps": [b.gbps for b in multi],
            "probe_direct": probe.direct, "reader_gbps": reader.bandwidth.gbps,
            "reader_runs_gbps": [x.bandwidth.gbps for x in readers],
            "reader_placed_gbps": placed[len(placed) // 2] if placed else None,
            "reader_bytes": reader.bandwidth.bytes_read, "reader_experts": reader.experts,
            "reader_staged_segments": reader.staged_segments, "reader_segments": reader.segments,
            "reader_spread_bytes": reader.spread_bytes, "reader_direct_bytes": reader.direct_bytes,
            "reader_bounce_bytes": reader.bounce_bytes, "alignment": reader.alignment,
            "reader_fraction_of_probe": reader.bandwidth.gbps / probe.gbps if probe.gbps else None,
            "reader_fraction_per_round_median": ratios[len(ratios) // 2] if ratios else None}


def _expert_bytes(model: Path) -> int:
    from common.checkpoint import Checkpoint
    from services.memd.store import ExpertStore

    return ExpertStore(Checkpoint(model)).expert_bytes


def _median(items: list, key):
    return sorted(items, key=key)[len(items) // 2]


def format_report(doc: dict) -> str:
    ckpt, images, packed = doc["checkpoint"], doc["images"], doc["packed"]
    multi = ckpt["probe_multi_gbps"]
    frac = lambda v, of: "-" if v is None or not of else f"{v / of:.0%}"  # noqa: E731
    depth = doc["threads"]
    rows = [("probe, single stream", 1, doc["probe_single_gbps"], multi),
            (f"probe, {depth} streams (memd's depth)", depth, multi, multi),
            ("fio libaio, same depth", depth, doc["fio_gbps"], multi),
            (f"ExpertReader, {ckpt['reader_experts']} experts", depth, ckpt["reader_gbps"], multi),
            (f"probe, {depth} streams, slot images", depth, images["probe_multi_gbps"], images["probe_multi_gbps"]),
            (f"ExpertReader, {images['reader_experts']} slot images", depth, images["reader_gbps"],
             images["probe_multi_gbps"]),
            (f"probe, {depth} streams, compressed images", depth, packed["probe_multi_gbps"],
             packed["probe_multi_gbps"]),
            (f"ExpertReader, {packed['reader_experts']} compressed", depth, packed["reader_gbps"],
             packed["probe_multi_gbps"]),
            ("  placed (vs the images' probe)", depth, packed["reader_placed_gbps"],
             images["probe_multi_gbps"])]
    lines = [f"moeinf bench disk: {doc['file']}; reads of {doc['chunk'] >> 10} KiB,"
             f" {'O_DIRECT' if doc['direct'] else 'page cache (O_DIRECT refused)'}; alignment {ckpt['alignment']}",
             f"slot images (memd --slot-cache): {doc['images_file']}",
             f"compressed slot images (--slot-compression zstd, {doc['packed_share']:.3f} of the bytes):"
             f" {doc['packed_file']}", "",
             f"{'measure':<36} {'depth':>5} {'GB/s':>7} {'of its file multi-stream':>24}"]
    lines += [f"{name:<36} {d:>5} {'-' if v is None else format(v, '.3f'):>7} {frac(v, of):>24}"
              for name, d, v, of in rows]
    lines.append("")
    if doc["fio_note"]:
        lines.append(f"fio: {doc['fio_note']}")
    for name, part in (("checkpoint", ckpt), ("slot images", images), ("compressed images", packed)):
        lines.append(f"{name}: medians of {doc['rounds']} rounds, probe and reader alternating; multi-stream probe"
                     " runs: " + ", ".join(f"{v:.3f}" for v in part["probe_multi_runs_gbps"]) + " GB/s; reader runs: "
                     + ", ".join(f"{v:.3f}" for v in part["reader_runs_gbps"]) + " GB/s")
        lines.append(f"  reader: {format_bytes(part['reader_bytes'])}, {format_bytes(part['reader_direct_bytes'])}"
                     f" straight into slots, {format_bytes(part['reader_bounce_bytes'])} through the bounce buffer"
                     f" ({format_bytes(part['reader_spread_bytes'])} of the bytes rows placed one by one in the slots);"
                     f" {part['reader_staged_segments']} of {part['reader_segments']} segments staged; reader / probe"
                     f" of the same round, median: {frac_text(part['reader_fraction_per_round_median'])}")
    for name, part in (("from the checkpoint as stored (--slot-cache off)", ckpt),
                       ("from the slot images (--slot-cache, memd's default where it pays)", images),
                       ("from the compressed images (the disk's bytes)", packed)):
        lines.append(f"target: expert reads >= {TARGET:.0%} of the multi-stream probe of their file, {name} ->"
                     f" {verdict(part['reader_fraction_per_round_median'])}")
    lines.append(f"compressed images: expert bytes placed at {doc['packed_gain_per_round_median']:.2f}x the rate of the"
                 " lossless images' reader (the median of the rounds' ratios)")
    return "\n".join(lines)


def verdict(frac: float | None) -> str:
    """The target on the median of each round's reads against its own probe; reads faster than their probe were
    measured on another disk state than the probe's, so they say nothing either way."""
    if frac is None:
        return "n/a"
    if frac > 1.0:
        return "not counted: above the probe (the disk's speed changed between the probe and the reads)"
    return "met" if frac >= TARGET else "NOT met"


def frac_text(v: float | None) -> str:
    return "-" if v is None else f"{v:.0%}"


def run(args) -> int:
    model = Path(args.model)
    if not (model / "config.json").is_file():
        raise FileNotFoundError(f"--model {model}: no config.json (give a checkpoint directory)")
    nbytes = parse_bytes(args.bytes, what="--bytes")
    chunk = parse_bytes(args.chunk, what="--chunk")
    if args.threads < 1 or (args.experts is not None and args.experts < 1):
        raise ValueError("--threads and --experts must be >= 1")
    if args.rounds < 1:
        raise ValueError("--rounds must be >= 1")
    doc = measure(model, nbytes, args.threads, chunk, args.experts, args.rounds,
                  Path(args.expert_cache_dir) if args.expert_cache_dir else None)
    print(format_report(doc))
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def add_parser(bench) -> None:
    p = bench.add_parser("disk", help="the disk's O_DIRECT bandwidth at memd's queue depth (probe, fio) against"
                                      " memd's expert reader")
    p.add_argument("--model", required=True)
    p.add_argument("--bytes", default="1GiB", help="bytes of the largest shard each probe reads")
    p.add_argument("--threads", type=int, default=STREAMS, help="reads in flight (memd's --read-threads)")
    p.add_argument("--chunk", default=f"{CHUNK >> 10}KiB", help="read size (memd's --read-chunk)")
    p.add_argument("--experts", type=int, help="experts the reader reads per round (default: about --bytes worth)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of multi-stream probe and reader; medians reported")
    p.add_argument("--expert-cache-dir", help="where the slot images are kept (memd's --expert-cache-dir; default"
                                              " <state-dir>/expert-cache)")
    p.add_argument("--json", help="also write the results here")
    p.set_defaults(func=run)


def progress(text: str) -> None:
    print(f"[bench] {text}", file=sys.stderr, flush=True)
