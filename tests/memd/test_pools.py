"""The pool interface: the shm backend, the chunk bookkeeping the CUDA backend shares with the stand-in, the
device check at HELLO, and the backend knobs."""
import os

import pytest

from common.config import MemdConfig, build_config
from services.memd.chunks import Chunks
from services.memd.pools import PoolExport, ShmPool, device_mismatch, refusal, same_device
from services.memd.standin import StandInPool

SLOT = 4096


@pytest.fixture
def shm():
    pool = ShmPool(f"moeinf-test-pools-{os.getpid()}", 4 * SLOT, SLOT)
    yield pool
    pool.close()


def test_shm_pool_writes_exports_and_resizes(shm):
    assert shm.num_slots == 4 and shm.export() == PoolExport("shm", shm.name, 4 * SLOT)
    done = shm.write(SLOT, memoryview(b"\x07" * SLOT))
    assert done.done() and bytes(shm.host_view()[SLOT:2 * SLOT]) == b"\x07" * SLOT
    full = shm.resident_bytes()
    assert full == 4 * SLOT
    shm.release(2 * SLOT, 2 * SLOT)
    assert shm.resident_bytes() == 2 * SLOT
    assert bytes(shm.host_view()[2 * SLOT:2 * SLOT + 8]) == bytes(8)  # a released range reads as zeros
    shm.ensure(2 * SLOT, 2 * SLOT)
    assert shm.resident_bytes() == full


def test_chunks_free_whole_chunks_only_and_refuse_to_grow_back():
    freed = []
    chunks = Chunks(5 * SLOT, SLOT, 2, bytearray, freed.append)  # chunks of 2, 2 and 1 slots
    assert [len(m) for m in chunks.mem] == [2 * SLOT, 2 * SLOT, SLOT]
    assert chunks.release(3 * SLOT, SLOT) == []  # half of chunk 1: nothing freed
    chunks.ensure(3 * SLOT, SLOT)  # taken back: chunk 1 is whole again
    assert chunks.release(2 * SLOT, SLOT) == []
    assert chunks.release(3 * SLOT, 2 * SLOT) == [1, 2]  # slots 2-3 (chunk 1) and 4 (chunk 2) all released
    assert chunks.mem[1] is None and len(freed) == 2
    assert chunks.resident_bytes() == 2 * SLOT
    with pytest.raises(RuntimeError, match="freed by a shrink.*restart memd"):
        chunks.ensure(2 * SLOT, SLOT)
    with pytest.raises(ValueError, match="not inside one chunk"):
        chunks.locate(SLOT, 2 * SLOT)  # crosses chunks 0 and 1
    with pytest.raises(ValueError, match="which a shrink freed"):
        chunks.locate(4 * SLOT, SLOT)
    mem, within = chunks.locate(SLOT, SLOT)
    assert mem is chunks.mem[0] and within == SLOT
    chunks.close()
    assert len(freed) == 3 and chunks.resident_bytes() == 0


def test_standin_pool_exports_one_handle_per_chunk_and_writes_in_stream_order():
    pool = StandInPool(6 * SLOT, SLOT, 4)
    export = pool.export()
    assert (export.chunk_bytes, len(export.handles)) == (4 * SLOT, 2)
    ev = pool.write(5 * SLOT, memoryview(b"\x05" * SLOT))
    assert ev.done() and pool.read(5 * SLOT, 4) == b"\x05" * 4 and pool.stream.log == ["write 5"]
    assert refusal(export, "standin") is None
    pool.release(4 * SLOT, 2 * SLOT)
    assert pool.frees == 1 and pool.resident_bytes() == 4 * SLOT
    code, message = refusal(pool.export(), "standin")
    assert code == "capacity" and "a live shrink freed chunks" in message


def test_device_check_names_both_devices():
    gpu = PoolExport("cuda-ipc", "", 1 << 20, "GPU-0123abcd-0000-1111-2222-333344445555", 1 << 20, [b"h" * 64])
    assert device_mismatch(gpu, "0123abcd-0000-1111-2222-333344445555") == ""  # torch spells it without GPU-
    assert same_device("GPU-AB-CD", "abcd")
    wrong = device_mismatch(gpu, "GPU-ffffffff-0000-1111-2222-333344445555")
    assert "GPU-0123abcd" in wrong and "GPU-ffffffff" in wrong
    assert "run the worker with --device cuda" in device_mismatch(gpu, "cpu")
    assert device_mismatch(PoolExport("shm", "x", 1), "cpu") == "" and refusal(PoolExport("shm", "x", 1), "cpu") is None
    assert refusal(gpu, "cpu")[0] == "device"
    on_gpu = refusal(PoolExport("shm", "x", 1), "0123abcd-0000-1111-2222-333344445555")  # a GPU worker, a host pool
    assert on_gpu[0] == "device" and "--pool-backend cuda" in on_gpu[1] and "0123abcd" in on_gpu[1]


def test_backend_knobs():
    assert build_config(MemdConfig, env={}, model="/m").pool_backend == "shm"
    cfg = build_config(MemdConfig, env={"MOEINF_POOL_BACKEND": "cuda", "MOEINF_HOST_MEMORY": "64GiB"}, model="/m")
    assert (cfg.pool_backend, cfg.host_memory) == ("cuda", "64GiB")
    with pytest.raises(ValueError, match="--pool-backend 'rocm': choose one of shm, cuda"):
        build_config(MemdConfig, env={}, model="/m", pool_backend="rocm")
    with pytest.raises(ValueError, match="--host-memory is the cuda backend's host tier"):
        build_config(MemdConfig, env={}, model="/m", host_memory="1GiB")
    with pytest.raises(ValueError, match="--host-memory 'lots' is not a size"):
        build_config(MemdConfig, env={}, model="/m", pool_backend="cuda", host_memory="lots")
    assert build_config(MemdConfig, env={"MOEINF_COPY_EVENTS": "host"}, model="/m", pool_backend="cuda").copy_events \
        == "host"
    with pytest.raises(ValueError, match="--copy-events 'never': choose ipc or host"):
        build_config(MemdConfig, env={}, model="/m", pool_backend="cuda", copy_events="never")
    with pytest.raises(ValueError, match="--copy-events orders the cuda backend's copies"):
        build_config(MemdConfig, env={}, model="/m", copy_events="host")
    assert build_config(MemdConfig, env={"MOEINF_CPU_EXPERTS": "auto"}, model="/m", pool_backend="cuda").cpu_experts \
        == "auto"
    with pytest.raises(ValueError, match="--cpu-experts 'yes': choose one of off, auto, always"):
        build_config(MemdConfig, env={}, model="/m", pool_backend="cuda", cpu_experts="yes")
    with pytest.raises(ValueError, match="--cpu-experts computes the cuda backend's host-tier experts"):
        build_config(MemdConfig, env={}, model="/m", cpu_experts="always")


def test_host_tier_is_at_least_the_readers_staging_and_at_most_every_expert():
    from types import SimpleNamespace

    from services.memd.backend import host_slots

    store = SimpleNamespace(num_layers=4, num_experts=8, slot_bytes=1 << 20)  # 32 experts of 1 MiB

    def slots(host_memory, threads=4):
        return host_slots(build_config(MemdConfig, env={}, model="/m", pool_backend="cuda", host_memory=host_memory,
                                       read_threads=threads), store)

    assert slots("0") == 8  # staging only: two per reader thread
    assert slots("0", threads=2) == 4
    assert slots("25%") == 8 and slots("50%") == 16
    assert slots("20MiB") == 20 and slots("1GiB") == 32
