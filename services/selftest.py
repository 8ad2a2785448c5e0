"""``moeinf selftest --device cuda``: the GPU checks a CUDA host runs first (docs/gpu.md; all passed on an H200).

1. Fills a ``CudaPool`` from the checkpoint through the two-tier path (disk -> pinned host tier -> device copy).
2. Exactness: for every MoE layer, transformers' grouped-mm experts forward on the pool's strided slot views
   (at ``--memory``: when a layer's experts do not all fit, they are reloaded into the first slots, so copies
   and events run between layers) must equal, bit for bit, the same forward on transformers' own weights on the
   same GPU. A kernel that refuses the strided views is reported, and retried on contiguous copies.
3. H2D bandwidth of the pool's copy stream (pinned host -> device) against the link's peak (nvidia-smi).
4. Per-layer overhead at 100% residency: moeinf's layer path (unique ids to the host, the one sync per layer,
   remap on the device, the window) against transformers' forward, CUDA-event timed.
5. ``--cpu-experts``: one expert's measured time on this CPU (the worker's measurement) against a copy at the
   measured H2D rate (which ``auto`` would pick for one token), and a layer with two experts computed on the CPU
   from the host tier against transformers' forward on the GPU (close, not equal: the CPU rounds differently).

Prints a table; exits 0 when every check passes, 1 when one fails, 2 without a CUDA device (saying so).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from common.config import PROTOCOL_VERSION

LANE_GBPS = {1: 0.25, 2: 0.5, 3: 0.985, 4: 1.969, 5: 3.938, 6: 7.563}  # PCIe usable GB/s per lane, per direction


def add_parser(sub) -> None:
    p = sub.add_parser("selftest", help="GPU checks for a CUDA host: exactness, H2D bandwidth, per-layer overhead")
    p.add_argument("--device", choices=["cuda"], required=True)
    p.add_argument("--model", help="checkpoint directory (default: a small random demo model, written to a temp dir)")
    p.add_argument("--memory", default="25%", help="expert pool size for the exactness check (as --expert-memory)")
    p.add_argument("--tokens", type=int, default=64, help="tokens per layer in the exactness and overhead checks")
    p.add_argument("--repeats", type=int, default=20)
    p.set_defaults(func=cmd_selftest)


def cuda_missing() -> str:
    """Why this host cannot run the GPU checks; "" when it can."""
    try:
        import torch
    except ImportError as exc:
        return f"torch is not importable: {exc}"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device (a CPU build of torch, no driver, or CUDA_VISIBLE_DEVICES is empty)"
    try:
        from services.memd.cuda_pool import import_cupy

        import_cupy()
    except RuntimeError as exc:
        return str(exc)
    return ""


def check_args(args) -> None:
    """Every flag before any work (a bad one found after minutes of GPU checks would waste them)."""
    from common.sizes import parse_size

    if args.tokens < 1 or args.repeats < 1:
        raise ValueError(f"--tokens {args.tokens} and --repeats {args.repeats} must be at least 1")
    parse_size(args.memory, what="--memory")
    if args.model is not None and not (Path(args.model) / "config.json").is_file():
        raise ValueError(f"--model {args.model}: no config.json there (a checkpoint directory)")


def cmd_selftest(args) -> int:
    check_args(args)
    if why := cuda_missing():
        print(f"moeinf selftest: no CUDA device: {why}")
        return 2
    tmp = None
    model = args.model
    if model is None:
        from common.demo_model import write_demo_model

        tmp = tempfile.mkdtemp(prefix="moeinf-selftest-")
        model = str(write_demo_model(Path(tmp) / "demo"))
    try:
        rows = run_checks(Path(model), args.memory, args.tokens, args.repeats)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    width = max(len(r[0]) for r in rows)
    for name, value, ok in rows:
        print(f"{name:<{width}}  {value:<40}  {'ok' if ok else 'FAIL'}")
    return 0 if all(ok for *_, ok in rows) else 1


def run_checks(model_dir: Path, memory: str, tokens: int, repeats: int) -> list[tuple[str, str, bool]]:
    import torch

    from common.checkpoint import Checkpoint
    from common.sizes import parse_size
    from services.memd.store import ExpertStore

    store = ExpertStore(Checkpoint(model_dir))
    total = store.num_layers * store.num_experts
    budget = parse_size(memory, what="--memory").resolve(total * store.slot_bytes)
    small = max(store.num_experts, min(total, budget // store.slot_bytes))
    ref = _reference(model_dir)
    rows = []
    with _Rig(store, total) as rig:
        t0 = time.monotonic()
        rig.load(list(range(total)))
        rows.append(("fill 100% (disk -> host -> device)", f"{rig.fill_bytes / (time.monotonic() - t0) / 1e9:.2f} GB/s"
                     f" over {total} experts", True))
        rows += rig.exactness(ref, tokens, label="exact at 100%")
        rows.append(rig.bandwidth())
        rows += rig.overhead(ref, tokens, repeats)
        rows += rig.cpu_experts(ref, tokens)
    with _Rig(store, small) as rig:
        rows += rig.exactness(ref, tokens, label=f"exact at {memory} ({small} slots)")
    del ref
    torch.cuda.empty_cache()
    return rows


def _reference(model_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM

    from common.checkpoint import find_moe_layers

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto").to("cuda").eval()
    text = model.config.get_text_config()
    shape = (text.hidden_size, getattr(text, "num_experts_per_tok", None) or 2)
    return [(layer, model.get_submodule(layer.module)) for layer in find_moe_layers(model)], shape


class _Rig:
    """A CUDA pool of ``slots`` slots, its host staging, the reader and the worker-side views, in one process."""

    def __init__(self, store, slots: int):
        from common import messages as m
        from services.memd.cuda_pool import CudaPool, PinnedHost
        from services.memd.reader import ExpertReader
        from services.memd.tiers import TieredReader
        from services.worker.pool_views import CudaPoolViews

        self.store, self.slots, s = store, slots, store.slot_bytes
        self.pool = CudaPool(slots * s, s, store.num_experts)
        try:  # shared, as with --cpu-experts: the CPU-experts check maps it as a worker does
            self.host = PinnedHost(8 * s, f"moeinf-selftest-{os.getpid()}-host")
        except RuntimeError:  # /dev/shm cannot hold 8 experts: private, and that check says it is skipped
            self.host = PinnedHost(8 * s)
        self.reader = ExpertReader(store, self.host.view, s, True, threads=4)
        self.tiers = TieredReader(self.reader, TieredReader.host_table(8, store.num_layers, store.num_experts),
                                  self.host.view, self.pool, s)
        export = self.pool.export()
        hello = m.HelloReply(PROTOCOL_VERSION, os.getpid(), export.backend, "", export.nbytes, s, slots,
                             store.num_layers, store.num_experts, store.tensors, "", export.device, export.chunk_bytes,
                             export.handles, export.event_handles, self.host.name, 8 if self.host.name else 0)
        self.views = CudaPoolViews(hello, ptrs=list(self.pool.chunks.mem))
        self.hello = hello
        self.fill_bytes = 0
        self.contiguous = False
        self.h2d = 0.0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.views.close()
        self.tiers.close()
        self.pool.close()
        self.host.close()

    def load(self, indices: list[int], base: int = 0) -> None:
        """Experts number ``indices`` (layer * experts + expert) into slots ``base``, ``base + 1``, ..."""
        E = self.store.num_experts
        jobs = [self.tiers.submit((i // E, i % E), base + n, demand=True) for n, i in enumerate(indices)]
        for job in jobs:
            self.fill_bytes += job.future.result(600)[0]
        self.pool.synchronize()  # a job is done once its copy is queued (the event ring): this process reads next

    def layer_slots(self, layer: int) -> int:
        """Where ``layer``'s experts are: their home slots when the pool holds them all, else reloaded at 0."""
        E = self.store.num_experts
        if self.slots >= self.store.num_layers * E:
            return layer * E
        self.load(list(range(layer * E, (layer + 1) * E)), 0)
        return 0

    def forward(self, module, base: int, hidden, idx, weights):
        from transformers.integrations.moe import grouped_mm_experts_forward

        from services.worker.experts import SlotExperts

        E = self.store.num_experts
        window = self.views.window(base, base + E)
        if self.contiguous:
            window = {n: t.contiguous() for n, t in window.items()}
        return grouped_mm_experts_forward(SlotExperts(module, window, E), hidden, idx, weights)

    def exactness(self, ref, tokens: int, label: str) -> list[tuple[str, str, bool]]:
        import torch
        from transformers.integrations.moe import grouped_mm_experts_forward

        (layers, shape), bad, rows = ref, [], []
        for layer, module in layers:
            hidden, idx, weights = _inputs(module, shape, tokens, layer.index)
            base = self.layer_slots(layer.index)
            want = grouped_mm_experts_forward(module, hidden, idx, weights)
            try:
                got = self.forward(module, base, hidden, idx, weights)
            except RuntimeError as exc:
                if self.contiguous:
                    raise
                rows.append(("grouped_mm on strided slot views", f"refused: {str(exc)[:60]}", False))
                self.contiguous = True
                got = self.forward(module, base, hidden, idx, weights)
            if not torch.equal(got, want):
                bad.append(layer.index)
        rows.append((label, f"{len(layers) - len(bad)}/{len(layers)} layers bit-identical", not bad))
        return rows

    def cpu_experts(self, ref, tokens: int) -> list[tuple[str, str, bool]]:
        from services.worker.host_experts import HostExperts

        (layers, shape), E = ref, self.store.num_experts
        layer, module = layers[0]
        base = layer.index * E  # the layer's experts loaded again at home: the host tier now holds (most of) them
        self.load(list(range(base, base + E)), base)
        host = HostExperts.open(self.hello)
        if host is None:
            return [("CPU experts", "skipped: /dev/shm cannot hold 8 experts (docker: shm_size)", True)]
        try:
            return self._cpu_rows(host, layer, module, shape, base, tokens)
        finally:
            host.views = None  # (the mapping goes with its tensors)

    def _cpu_rows(self, host, layer, module, shape, base: int, tokens: int) -> list[tuple[str, str, bool]]:
        import torch
        from transformers.integrations.moe import grouped_mm_experts_forward

        from services.worker.experts import ExpertBinding, Routing

        E = self.store.num_experts
        fixed, per_token = host.measure(module, shape[0], next(module.parameters()).dtype, torch.device("cuda"))
        copy = self.store.slot_bytes / self.h2d
        pick = "the CPU" if fixed + per_token < copy else "the copy"
        rows = [("one expert on the CPU vs a copy", f"{1e3 * (fixed + per_token):.3f} ms (+{1e3 * per_token:.3f} ms"
                 f"/token) vs {1e3 * copy:.3f} ms: auto picks {pick} for 1 token", True)]
        hidden, idx, weights = _inputs(module, shape, tokens, layer.index)
        held = {e: self.tiers.host.slot_of[(layer.index, e)] for e in range(E)
                if self.tiers.host.is_resident((layer.index, e))}
        routing = Routing(torch.unique(idx).tolist(), [], [], [], None)
        on_cpu = [j for j, e in enumerate(routing.experts) if e in held][:2]
        slots = [held[e] if j in on_cpu else base + e for j, e in enumerate(routing.experts)]
        binding = ExpertBinding(layer.index, module, self.views, None, None)
        got = host.forward(binding, routing, slots, on_cpu, hidden, idx, weights).float()
        want = grouped_mm_experts_forward(module, hidden, idx, weights).float()
        error = ((got - want).norm() / want.norm()).item()
        rows.append((f"a layer with {len(on_cpu)} experts on the CPU", f"relative error {error:.2e} vs transformers",
                     bool(on_cpu) and error < 0.01))
        return rows

    def bandwidth(self) -> tuple[str, str, bool]:
        s, n = self.store.slot_bytes, self.slots
        src = self.host.view[:s]
        self.pool.write(0, src).wait()  # warm
        t0 = time.perf_counter()
        last = None
        for rep in range(3):
            for slot in range(n):
                last = self.pool.write(slot * s, src)
        last.wait()
        gbps = 3 * n * s / (time.perf_counter() - t0) / 1e9
        peak = link_peak(self.pool.index)
        share = f" ({100 * gbps / peak[1]:.0f}% of {peak[0]} {peak[1]:.1f} GB/s)" if peak else " (link peak unknown)"
        self.h2d = gbps * 1e9  # (the CPU-experts check compares with it)
        return ("H2D copy stream", f"{gbps:.2f} GB/s{share}", True)

    def overhead(self, ref, tokens: int, repeats: int) -> list[tuple[str, str, bool]]:
        import torch
        from transformers.integrations.moe import grouped_mm_experts_forward

        from services.worker.experts import SlotExperts

        layers, shape = ref
        plain = ours = 0.0
        for layer, module in layers:
            hidden, idx, weights = _inputs(module, shape, tokens, layer.index)
            base = layer.index * self.store.num_experts
            plain += _timed(lambda: grouped_mm_experts_forward(module, hidden, idx, weights), repeats)

            def moeinf_path():
                experts = torch.unique(idx)
                ids = experts.tolist()  # the one device-to-host sync per layer (the routed ids)
                lo, hi = base + min(ids), base + max(ids) + 1
                remap = torch.empty(module.num_experts, dtype=idx.dtype, device=idx.device)
                remap[experts] = experts + (base - lo)  # on the device
                window = self.views.window(lo, hi)
                return grouped_mm_experts_forward(SlotExperts(module, window, hi - lo), hidden, remap[idx], weights)

            ours += _timed(moeinf_path, repeats)
        n = len(layers)
        over = (ours - plain) / n
        return [("per-layer time, transformers", f"{1e3 * plain / n:.3f} ms", True),
                ("per-layer time, moeinf at 100%", f"{1e3 * ours / n:.3f} ms (+{1e3 * over:.3f} ms)", True)]


def _inputs(module, shape: tuple[int, int], tokens: int, seed: int):
    """Random hidden states and routing (``shape``: hidden size, top-k) on the experts' device and dtype."""
    import torch

    w = next(p for p in module.parameters())
    hidden_size, top_k = shape
    g = torch.Generator(device=w.device).manual_seed(seed)
    hidden = torch.randn(tokens, hidden_size, generator=g, device=w.device, dtype=w.dtype)
    idx = torch.rand(tokens, module.num_experts, generator=g, device=w.device).topk(top_k, dim=-1).indices
    weights = torch.softmax(torch.randn(tokens, top_k, generator=g, device=w.device), -1).to(w.dtype)
    return hidden, idx, weights


def _timed(fn, repeats: int) -> float:
    import torch

    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / repeats


def link_peak(device: int = 0) -> tuple[str, float] | None:
    """The GPU's current PCIe link and its usable one-direction bandwidth, from nvidia-smi (None if unknown)."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=pcie.link.gen.current,pcie.link.width.current",
                              "--format=csv,noheader,nounits", "-i", str(device)],
                             capture_output=True, text=True, timeout=10, check=True).stdout.split(",")
        gen, width = int(out[0]), int(out[1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None
    if gen not in LANE_GBPS:
        return None
    return f"PCIe {gen}.0 x{width}", LANE_GBPS[gen] * width
