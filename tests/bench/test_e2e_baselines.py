"""``moeinf bench e2e`` with its baselines on a tiny checkpoint (the JSON schema and types; timings are not checked),
the memory cgroup helper (skipped without root or a cgroup memory controller), the O_DIRECT bandwidth probe and the
memory budget."""
import json
import os
import subprocess
from pathlib import Path

import pytest
from helpers import moeinf_cmd, new_orphans, orphan_regions, write_family

from services.bench.budget import derive, derive_total, model_bytes
from services.bench.cgroup import CgroupUnavailable, MemoryCgroup, find_memory_hierarchy
from services.bench.diskbw import read_bandwidth

ROW_TYPES = {"system": str, "ttft_s": float, "decode_ms_per_token_p50": float, "decode_ms_per_token_p90": float,
             "tokens_per_s": float, "bytes_read_per_token": (float, type(None)), "hit_rate": (float, type(None))}


def _cgroups_usable() -> bool:
    try:
        MemoryCgroup.create(64 << 20, "probe").remove()
        return True
    except (CgroupUnavailable, OSError):
        return False


def _leftover_cgroups() -> list[Path]:
    try:
        root, _ = find_memory_hierarchy()
    except CgroupUnavailable:
        return []
    return list(root.glob("moeinf-bench-*"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_family("mixtral", tmp_path_factory.mktemp("e2e") / "m", dtype="bfloat16")


@pytest.mark.serial  # no other test may create a memory cgroup meanwhile: it checks that none is left over
def test_baselines_and_moeinf_json(tiny, tmp_path, bench_tmp):
    out, tmp = tmp_path / "e2e.json", bench_tmp
    before = set(_leftover_cgroups())
    stale = orphan_regions()  # another run's leftovers are not this bench's
    cmd = moeinf_cmd("bench", "e2e", "--model", str(tiny), "--expert-memory", "50%", "--systems",
                     "transformers-resident", "accelerate-offload", "moeinf-ondemand-lru", "--requests", "2",
                     "--max-tokens", "4", "--warmup-tokens", "2", "--threads", "1", "--repeats", "2", "--json",
                     str(out), "--plot", str(tmp_path / "e2e.png"), "--floor-probe", "64MiB")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "TMPDIR": str(tmp)})
    assert proc.returncode == 0, proc.stderr
    assert "memory limit for --expert-memory 50%" in proc.stdout and "floors" in proc.stdout

    doc = json.loads(out.read_text())
    assert isinstance(doc["disk_read_gbps"], float) and doc["disk_read_gbps"] > 0
    rows = {r["system"]: r for r in doc["systems"]}
    expected = {"transformers-resident", "moeinf-ondemand-lru"}
    if "accelerate-offload is not installed" not in proc.stdout:
        expected.add("accelerate-offload")
    assert set(rows) == expected, proc.stdout
    for row in rows.values():
        assert "error" not in row, (row, proc.stderr[-3000:])
        for key, kind in ROW_TYPES.items():
            assert isinstance(row[key], kind), (key, row[key])
    for row in rows.values():  # baselines get as many repeats as moeinf, each on its own prompts
        assert row["repeats"] == 2 and len(row["tokens_per_s_all"]) == 2 and row["eamc"] == "fresh"
    assert doc["disk_read_streams"] == 4 and doc["disk_read_gbps_single_stream"] > 0
    assert rows["transformers-resident"]["memory_limit_bytes"] is None
    assert rows["transformers-resident"]["bytes_read_per_token"] is None
    lru = rows["moeinf-ondemand-lru"]  # its greedy tokens are transformers' own (the bench's correctness gate)
    assert lru["tokens_identical"] is True and lru["tokens_identical_to"] == "transformers-resident", lru
    assert "MISMATCH" not in proc.stdout + proc.stderr
    assert 0 < rows["moeinf-ondemand-lru"]["hit_rate"] < 1  # 50%: some experts were read, some found resident
    assert rows["moeinf-ondemand-lru"]["stall_ms_per_token"] > 0  # and the worker waited for them
    limit = doc["memory_limit_bytes"]
    if doc["memory_fair"]:  # every offloading system under the one limit
        assert isinstance(limit, int)
        assert all(row["memory_limit_bytes"] == limit for name, row in rows.items() if name != "transformers-resident")
    else:
        assert limit is None and "NOT memory-fair" in proc.stdout
    floor, compute = doc["floors"][0], doc["compute_floor"]
    assert floor["compute_floor_ms"] == compute["ms"] and compute["threads"] == 1 and compute["gbps"] > 0
    assert compute["ms"] < min(row["decode_ms_per_token_p50"] for row in rows.values())  # a floor nobody beats
    assert floor["bound_ms"] == max(floor["compute_floor_ms"], floor["io_floor_ms"])
    assert (tmp_path / "e2e.png").stat().st_size > 0
    assert list(tmp.iterdir()) == [] and not new_orphans(stale), "the bench left a state directory or a pool"
    assert set(_leftover_cgroups()) == before, "the bench left a cgroup"


def test_bad_system_is_a_usage_error(tiny):
    proc = subprocess.run(moeinf_cmd("bench", "e2e", "--model", str(tiny), "--systems", "vllm"),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


# ---------------------------------------------------------------------------------------------------- cgroup
def test_find_memory_hierarchy(tmp_path):
    mounts = tmp_path / "mounts"
    mounts.write_text("cgroup2 /x cgroup2 rw 0 0\ncgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0\n")
    assert find_memory_hierarchy(mounts) == (Path("/sys/fs/cgroup/memory"), 1)
    (tmp_path / "cgroup.controllers").write_text("cpu io memory pids\n")
    mounts.write_text(f"proc /proc proc rw 0 0\ncgroup2 {tmp_path} cgroup2 rw 0 0\n")
    assert find_memory_hierarchy(mounts) == (tmp_path, 2)
    (tmp_path / "cgroup.controllers").write_text("cpu io\n")
    with pytest.raises(CgroupUnavailable, match="no cgroup memory controller"):
        find_memory_hierarchy(mounts)


@pytest.mark.skipif(not _cgroups_usable(), reason="needs root and a cgroup memory controller")
def test_cgroup_limits_and_holds_a_process():
    with MemoryCgroup.create(256 << 20, "test") as group:
        limit_file = "memory.limit_in_bytes" if group.version == 1 else "memory.max"
        assert abs(int((group.path / limit_file).read_text()) - (256 << 20)) < 4096
        proc = subprocess.run([*group.exec_prefix(), "cat", "/proc/self/cgroup"], capture_output=True, text=True,
                              timeout=30)
        assert proc.returncode == 0 and group.path.name in proc.stdout
        assert group.pids() == [] and isinstance(group.peak_bytes(), int) and group.oom_kills() == 0
    assert not group.path.exists()
    group.remove()  # idempotent


def test_cgroup_unavailable_without_a_hierarchy(tmp_path):
    with pytest.raises(CgroupUnavailable, match="cannot create"):
        MemoryCgroup.create(1 << 20, "x", root=tmp_path / "missing", version=1)


# ---------------------------------------------------------------------------------------------------- disk, budget
def test_disk_probe_refuses_an_unaligned_chunk(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(ValueError, match="page size"):
        read_bandwidth([path], chunk=1000)


def test_budget_is_dense_plus_experts_plus_allowance(tiny):
    sizes = model_bytes(tiny)
    quarter, full = derive(sizes, "25%", "1GiB"), derive(sizes, "100%", "1GiB")
    assert full.slots == sizes.num_experts and quarter.slots == sizes.num_experts // 4
    assert full.fraction == 1.0 and quarter.fraction == 0.25  # shares of experts, not of bytes (slots are larger)
    assert quarter.limit_bytes == sizes.dense_bytes + quarter.slots * sizes.slot_bytes + (1 << 30)
    assert quarter.accelerate_cpu_bytes == quarter.limit_bytes - (1 << 30)
    assert "runtime allowance 1.0 GiB" in quarter.describe()


def test_no_memory_limit_needs_no_measured_runtime(tiny):
    """``--memory-limit off`` with the default ``--runtime-allowance measured``: nothing is measured (no limit is
    set), and the budget still sizes the pool (it failed with "--runtime-allowance '0' must be positive")."""
    from types import SimpleNamespace
    from services.bench.e2e_runtime import Runtimes
    from services.bench.e2e_sweep import Sweep
    sweep = SimpleNamespace(opts=SimpleNamespace(memory_limit_total=None, runtime_allowance="measured"),
                            sizes=model_bytes(tiny), runtimes=Runtimes(), kind=Sweep.kind, limits_applied=False)
    budget = Sweep.budget(sweep, "25%", "moeinf")
    assert budget.slots == sweep.sizes.num_experts // 4 and budget.allowance_bytes == 0
    sweep.limits_applied = True  # limits on, and the measurement failed: no limit of weights alone, an error
    with pytest.raises(ValueError, match="--runtime-allowance SIZE"):
        Sweep.budget(sweep, "25%", "moeinf")


def test_a_total_gives_each_system_what_its_runtime_leaves(tiny):
    sizes = model_bytes(tiny)
    total = sizes.dense_bytes + (200 << 20) + 3 * sizes.slot_bytes + 100  # 3 slots and change beyond a 200 MiB runtime
    lean, heavy = derive_total(sizes, str(total), 200 << 20), derive_total(sizes, str(total), 200 << 20 + 4096 * 1024)
    assert lean.limit_bytes == heavy.limit_bytes == total  # every system runs under the total
    assert lean.slots == 3 and lean.expert_budget_bytes == 3 * sizes.slot_bytes \
        and lean.memd_memory == str(3 * sizes.slot_bytes)
    assert heavy.slots < lean.slots, "a heavier runtime leaves fewer experts"
    assert lean.fraction == 3 / sizes.num_experts
    assert lean.allowance_bytes == total - sizes.dense_bytes - lean.expert_budget_bytes
    assert lean.expert_memory == f"total {total}" and "total memory limit" in lean.describe()
    nothing = derive_total(sizes, str(sizes.dense_bytes // 2), 200 << 20)
    assert nothing.slots == 0 and nothing.allowance_bytes < 0  # below the dense weights: the sweep refuses to start it


def test_runtime_allowance_is_measured_with_a_margin():
    from services.bench.e2e_runtime import MARGIN, ProcMemory, Runtimes, baseline_runtime

    me = ProcMemory.of()
    assert me.anon > 0 and me.file > 0  # the interpreter's own pages
    libs = {line.split()[-1] for line in open("/proc/self/maps") if ".so" in line}
    assert ProcMemory.of(skip=frozenset(libs)).file < me.file  # the checkpoint's files are skipped the same way
    from multiprocessing import shared_memory

    region = shared_memory.SharedMemory(create=True, size=64 << 20)  # a pool-like /dev/shm region, touched
    try:
        region.buf[::4096] = bytes(len(region.buf[::4096]))
        assert ProcMemory.of().file < me.file + (32 << 20), "shared memory is the pool, not runtime"
    finally:
        region.close()
        region.unlink()
    assert baseline_runtime(ProcMemory(900 << 20, 300 << 20), 700 << 20) == 500 << 20
    runtimes = Runtimes({"moeinf": 100 << 20, "baselines": 300 << 20})
    assert runtimes.allowance("moeinf") == -(-int((100 << 20) * MARGIN) // (1 << 20)) * (1 << 20)
    # one limit: the largest
    assert runtimes.allowance() == runtimes.allowance("baselines") > runtimes.allowance("moeinf")
    assert Runtimes().allowance() == 0


def test_total_and_expert_memory_are_exclusive(tiny):
    proc = subprocess.run(moeinf_cmd("bench", "e2e", "--model", str(tiny), "--expert-memory", "25%",
                                     "--memory-limit-total", "3GiB"), capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "give one" in proc.stderr
    proc = subprocess.run(moeinf_cmd("bench", "e2e", "--model", str(tiny), "--memory-limit-total", "50%"),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "give bytes" in proc.stderr


@pytest.mark.slow  # CI's time: test_baselines_and_moeinf_json runs every system under cgroup limits already
@pytest.mark.skipif(not _cgroups_usable(), reason="needs root and a cgroup memory controller")
def test_equal_memory_run(tiny, tmp_path, bench_tmp):
    """``--memory-limit-total``: runtimes measured, every limited system under the same total, its expert share from
    what its runtime leaves; a total below the dense weights and runtime gives failed rows, not a crash."""
    out, tmp = tmp_path / "e2e.json", bench_tmp
    stale = orphan_regions()
    cmd = moeinf_cmd("bench", "e2e", "--model", str(tiny), "--memory-limit-total", "64MiB", "3GiB", "--systems",
                     "transformers-resident", "moeinf-ondemand-lru", "--requests", "1", "--max-tokens", "3",
                     "--warmup-tokens", "2", "--threads", "1", "--json", str(out), "--plot", str(tmp_path / "t.png"),
                     "--floor-probe", "64MiB")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "TMPDIR": str(tmp)})
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    runtime = doc["runtime_bytes"]
    assert runtime["moeinf"] > 50 << 20 and runtime["baselines"] > 50 << 20, runtime  # interpreters, torch: measured
    rows = {(r["system"], r["expert_memory"]): r for r in doc["systems"]}
    small, big = rows[("moeinf-ondemand-lru", "total 64MiB")], rows[("moeinf-ondemand-lru", "total 3GiB")]
    assert "raise the total" in small["error"]
    assert "error" not in big and big["memory_limit_bytes"] == 3 << 30 and big["expert_fraction"] == 1.0
    budget = doc["system_budgets"]["3GiB moeinf-ondemand-lru"]
    assert budget["limit_bytes"] == 3 << 30 and budget["runtime_bytes"] >= runtime["moeinf"]
    assert "total memory limit 3GiB" in proc.stdout and (tmp_path / "t.png").stat().st_size > 0
    assert list(tmp.iterdir()) == [] and not new_orphans(stale)


def test_parameters_mapped_from_the_checkpoint_are_not_anonymous(tmp_path):
    import numpy as np
    import torch

    from services.bench.e2e_runtime import anonymous_parameter_bytes, checkpoint_files, mapped_ranges

    (tmp_path / "model.safetensors").write_bytes(bytes(1 << 20))
    mapped = np.memmap(tmp_path / "model.safetensors", dtype=np.float32, mode="r+")
    model = torch.nn.Module()
    model.a = torch.nn.Parameter(torch.from_numpy(mapped), requires_grad=False)  # a view of the file: weights
    model.b = torch.nn.Parameter(torch.zeros(1000))  # a copy in anonymous memory: 4000 bytes
    ranges = mapped_ranges(checkpoint_files(tmp_path))
    assert len(ranges) >= 1 and anonymous_parameter_bytes(model, ranges) == 4000
    assert anonymous_parameter_bytes(model, []) == 4000 + (1 << 20)


def test_accelerate_alone_needs_a_runtime_to_measure(tiny):
    proc = subprocess.run(moeinf_cmd("bench", "e2e", "--model", str(tiny), "--systems", "accelerate-offload"),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "add it to --systems" in proc.stderr and "Traceback" not in proc.stderr


def test_total_refuses_what_it_cannot_size(tiny):
    for extra, said in ((["--workers", "2"], "--workers > 1"), (["--runtime-allowance", "1GiB"], "drop")):
        proc = subprocess.run(moeinf_cmd("bench", "e2e", "--model", str(tiny), "--systems", "moeinf",
                                         "--memory-limit-total", "3GiB", *extra),
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode != 0 and said in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_file_pages_leave_out_copy_on_write_pages(tmp_path):
    """A private file mapping that was written holds anonymous (copy-on-write) pages: they count in RssAnon, not
    again as file pages."""
    import mmap

    from services.bench.e2e_runtime import ProcMemory

    path = tmp_path / "blob"
    path.write_bytes(bytes(32 << 20))
    with open(path, "r+b") as f:
        before = ProcMemory.of()
        region = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        region[::4096] = b"\1" * len(region[::4096])  # every page copied on write
        after = ProcMemory.of()
        region.close()
    assert after.anon - before.anon >= 30 << 20
    assert after.file - before.file < 8 << 20, "the written pages were counted as file pages too"
