"""``--io-cpus`` (memd) and ``--cpus`` (worker): every thread of each process, the ones started after the setting
(memd's readers, torch's and ZMQ's) included, runs only on its CPUs."""
import os
from pathlib import Path

import pytest
from helpers import Stack


def allowed_cpus(pid: int) -> dict[str, str]:
    """Each thread's ``Cpus_allowed_list`` (thread name + id -> list)."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            status = (task / "status").read_text()
        except FileNotFoundError:  # a thread that ended meanwhile
            continue
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        out[f"{fields['Name'].strip()}/{task.name}"] = fields["Cpus_allowed_list"].strip()
    return out


def test_each_service_runs_on_its_own_cpus(mixtral, tmp_path):
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs 2 CPUs")
    worker, memd = str(cpus[0]), str(cpus[1])
    with Stack(mixtral, tmp_path / "state", extra_memd=["--io-cpus", memd], extra_worker=["--cpus", worker]) as stack:
        stack.generate_all([[3, 4, 5]], 4)  # memd's reader threads and the worker's compute threads have run
        memd_threads, worker_threads = allowed_cpus(stack.memd.pid), allowed_cpus(stack.worker.pid)
    assert len(memd_threads) > 4 and set(memd_threads.values()) == {memd}, memd_threads
    assert len(worker_threads) > 2 and set(worker_threads.values()) == {worker}, worker_threads
    assert f"memd's threads run on CPUs {memd} (--io-cpus)" in (tmp_path / "state" / "memd.log").read_text()
