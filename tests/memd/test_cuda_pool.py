"""The CUDA pool on a GPU (marker ``cuda``; skipped without a CUDA device and cupy; run on an H200, docs/gpu.md).

- IPC across processes: memd's side fills a CudaPool from a checkpoint through the tiers; a spawned process opens
  the chunk handles from the HELLO reply, builds the strided slot views (DLPack) and sees every expert's weights.
- Exactness at 25% for two families: ``moeinf selftest``'s per-layer check (slot views vs transformers' own
  weights on the GPU, bit for bit, experts reloaded between layers).
- Ordering under revocations: a slot rewritten while a reader's compute on it is still queued on another stream
  (the reader's event as the write-after-read fence) never shows the reader the new bytes.
- A live shrink frees whole chunks (the driver sees the memory back) and refuses to grow into them.
- The copy-event ring across processes: a spawned worker-side process told a ring entry waits on it on its own
  stream and reads the new bytes of a copy memd's stream still holds back.
"""
import multiprocessing as mp

import pytest

from services.selftest import cuda_missing

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(bool(cuda_missing()), reason=cuda_missing() or "CUDA")]


@pytest.fixture(scope="module")
def bf16(tmp_path_factory):
    from helpers import write_family

    root = tmp_path_factory.mktemp("cuda-ckpt")
    return {name: write_family(name, root / name, dtype="bfloat16") for name in ("mixtral", "qwen3_moe")}


def _open_in_child(frame: bytes, queue) -> None:
    import torch

    from common.codec import decode
    from services.worker.pool_views import CudaPoolViews

    _, _, hello = decode(frame, reply=True)
    views = CudaPoolViews(hello)
    # plain bytes: a CPU tensor would be pickled as a file descriptor this process must outlive to hand over
    queue.put({name: [t.cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes() for t in chunk[name]]
               for chunk in views.chunks[:1] for name in chunk})
    views.close()


def test_ipc_handles_open_in_another_process(bf16):
    import torch
    from transformers import AutoModelForCausalLM

    from common.codec import encode
    from common.protocol import Op
    from services.selftest import _Rig
    from common.checkpoint import Checkpoint, find_moe_layers
    from services.memd.store import ExpertStore

    store = ExpertStore(Checkpoint(bf16["mixtral"]))
    E = store.num_experts
    with _Rig(store, store.num_layers * E) as rig:
        rig.load(list(range(E)))  # layer 0 at its home slots 0..E-1 (chunk 0)
        export = rig.pool.export()
        hello = rig.views.hello
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        child = ctx.Process(target=_open_in_child, args=(encode(Op.HELLO, 1, hello), queue))
        child.start()
        seen = queue.get(timeout=300)
        child.join(60)
        assert child.exitcode == 0 and len(export.handles) == store.num_layers
    model = AutoModelForCausalLM.from_pretrained(bf16["mixtral"], dtype=torch.bfloat16)
    layer = find_moe_layers(model)[0]
    module = model.get_submodule(layer.module)
    for name, param in module.named_parameters(recurse=False):
        for e in range(E):
            got = torch.frombuffer(bytearray(seen[name][e]), dtype=torch.uint8).view(param.dtype).view(param[e].shape)
            assert torch.equal(got, param[e]), f"{name} of expert {e} differs through IPC"


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_layers_bit_identical_to_transformers_at_25_percent(bf16, family):
    from services.selftest import run_checks

    rows = run_checks(bf16[family], "25%", tokens=32, repeats=2)
    failed = [r for r in rows if not r[2]]
    assert not failed, failed
    assert any(name.startswith("exact at 25%") for name, *_ in rows)


def test_rewrite_waits_for_the_readers_event_under_revocations(bf16):
    import torch

    from common.checkpoint import Checkpoint
    from services.memd.cuda_pool import CudaEvent
    from services.memd.store import ExpertStore
    from services.selftest import _Rig

    store = ExpertStore(Checkpoint(bf16["mixtral"]))
    L, E = store.num_layers, store.num_experts
    with _Rig(store, E) as rig:
        name = next(iter(rig.views.chunks[0]))
        truth = {}
        for layer in range(L):  # expert 0 of each layer, as slot 0 shows it once written
            rig.load([layer * E], 0)
            truth[layer] = rig.views.chunks[0][name][0].clone()
        assert not torch.equal(truth[0], truth[1])
        compute, current = torch.cuda.Stream(), L - 1
        for round_ in range(50):  # revoke slot 0 and rewrite it while a reader of it is still queued
            nxt = (current + 1 + round_ % (L - 1)) % L
            with torch.cuda.stream(compute):
                torch.cuda._sleep(2_000_000)  # keep the reader queued behind a busy kernel
                seen = rig.views.chunks[0][name][0].clone()
            ev = rig.pool.cupy.cuda.Event(block=False, disable_timing=True)
            ev.record(rig.pool.cupy.cuda.ExternalStream(compute.cuda_stream))
            rig.tiers.fences.read_done(0, CudaEvent(ev))
            rig.load([nxt * E], 0)  # the copy stream waits for the reader's event
            compute.synchronize()
            assert torch.equal(seen, truth[current]), f"round {round_}: the reader saw bytes written after it"
            assert torch.equal(rig.views.chunks[0][name][0], truth[nxt])
            current = nxt


def _wait_in_child(frame: bytes, commands, results) -> None:
    import torch

    from common.codec import decode
    from services.worker.pool_views import CudaPoolViews

    _, _, hello = decode(frame, reply=True)
    views = CudaPoolViews(hello)
    name = next(iter(views.chunks[0]))
    results.put(len(views.events))
    ring = commands.get(timeout=300)
    pending = not views.events[ring].query()  # memd's copy is still held back
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        views.wait([ring])
        seen = views.chunks[0][name][0].clone()
    stream.synchronize()
    results.put((pending, seen.view(-1).view(torch.uint8).cpu().numpy().tobytes()))
    views.close()


def test_a_worker_waits_on_the_copy_event_ring_across_processes(bf16):
    import torch

    from common.checkpoint import Checkpoint
    from common.codec import encode
    from common.protocol import Op
    from services.memd.cuda_pool import RING_EVENTS, CudaEvent
    from services.memd.store import ExpertStore
    from services.selftest import _Rig

    store = ExpertStore(Checkpoint(bf16["mixtral"]))
    E = store.num_experts
    with _Rig(store, E) as rig:
        assert len(rig.pool.export().event_handles) == RING_EVENTS
        rig.load([0], 0)
        name = next(iter(rig.views.chunks[0]))
        old = rig.views.chunks[0][name][0].clone()
        hello = rig.views.hello
        ctx = mp.get_context("spawn")
        commands, results = ctx.Queue(), ctx.Queue()
        child = ctx.Process(target=_wait_in_child, args=(encode(Op.HELLO, 1, hello), commands, results))
        child.start()
        assert results.get(timeout=300) == RING_EVENTS  # the child opened every entry
        busy = torch.cuda.Stream()
        with torch.cuda.stream(busy):
            torch.cuda._sleep(4_000_000_000)  # ~2 s: memd's copy stream waits for this "reader"
        ev = rig.pool.cupy.cuda.Event(block=False, disable_timing=True)
        ev.record(rig.pool.cupy.cuda.ExternalStream(busy.cuda_stream))
        rig.tiers.fences.read_done(0, CudaEvent(ev))
        job = rig.tiers.submit((1, 0), 0, demand=True)  # layer 1's expert 0 into slot 0, behind the reader
        job.future.result(60)  # done at once: the copy is queued (the ring), not run
        ring = rig.tiers.pending_events([0])
        assert len(ring) == 1
        commands.put(ring[0])
        pending, seen = results.get(timeout=120)
        child.join(60)
        assert child.exitcode == 0 and pending, "the copy had already run: the test proves nothing"
        new = rig.views.chunks[0][name][0]
        assert not torch.equal(new, old)
        assert seen == new.view(-1).view(torch.uint8).cpu().numpy().tobytes(), "the child read before the copy"


def test_a_live_shrink_frees_whole_chunks_on_the_gpu(bf16):
    """``moeinf admin resize`` on a CUDA pool: releasing every slot of a chunk gives its device memory back to the
    driver (cudaMemGetInfo sees it), a chunk with a slot still held stays, and growing into a freed chunk is refused
    with the fix; a new worker is refused too (its HELLO would name a freed handle)."""
    from services.memd.cuda_pool import CudaPool, PinnedHost
    from services.memd.pools import refusal

    slot = 32 << 20  # 32 MiB slots, 4 per chunk: 128 MiB chunks, large enough for the driver to hand back
    pool = CudaPool(8 * slot, slot, 4)
    try:
        cp = pool.cupy
        with pool.device:
            free_before = cp.cuda.runtime.memGetInfo()[0]
        pool.release(4 * slot, 3 * slot)  # three of chunk 1's four slots: nothing freed
        assert pool.resident_bytes() == 8 * slot
        pool.release(7 * slot, slot)
        assert pool.resident_bytes() == 4 * slot
        with pool.device:
            assert cp.cuda.runtime.memGetInfo()[0] - free_before >= 4 * slot - (2 << 20)
        with pytest.raises(RuntimeError, match="restart memd"):
            pool.ensure(4 * slot, slot)
        assert refusal(pool.export(), pool.uuid)[0] == "capacity"
        host = PinnedHost(slot)
        try:
            pool.write(0, host.view, demand=True).wait()  # chunk 0 still takes writes
        finally:
            host.close()
    finally:
        pool.close()
