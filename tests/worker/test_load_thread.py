"""The worker loads its model on a thread that ends with the load (``main.on_a_thread_of_its_own``): the OpenMP
pool of threads that the load's parallel regions gave that thread ends with it, so that the compute thread's pool is
the process's only one (with two, libgomp cuts its threads' spinning short and every product waits for one to wake).
Run in a fresh interpreter: the OpenMP runtime's pools belong to the process."""
import os
import subprocess
import sys
import textwrap
import threading

import pytest

from services.worker.main import on_a_thread_of_its_own

CHILD = textwrap.dedent("""
    import os, threading, time, torch
    from services.worker.main import on_a_thread_of_its_own

    torch.set_num_threads(2)
    tasks = lambda: len(os.listdir("/proc/self/task"))
    before = tasks()
    on_a_thread_of_its_own(lambda: torch.ones(1 << 24).exp().sum())  # a parallel region: a pool for that thread
    deadline = time.monotonic() + 5
    while tasks() > before and time.monotonic() < deadline:  # (its threads end a moment after it)
        time.sleep(0.05)
    after_load = tasks()
    torch.ones(1 << 24).exp().sum()  # the same on the main thread: its pool stays
    print(before, after_load, tasks())
""")


def test_returns_the_value_and_raises_the_error_on_the_callers_thread():
    assert on_a_thread_of_its_own(lambda a, b: a + b, 1, 2) == 3
    assert on_a_thread_of_its_own(threading.get_ident) != threading.get_ident()
    with pytest.raises(KeyError, match="missing"):
        on_a_thread_of_its_own(lambda: {}["missing"])


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one CPU: OpenMP starts no pool threads")
def test_the_loads_openmp_pool_ends_with_its_thread():
    proc = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert proc.returncode == 0, proc.stderr
    before, after_load, after_main = map(int, proc.stdout.split())
    assert after_load == before, "the load thread's OpenMP pool outlived it"
    assert after_main > before, "no pool on the main thread: the check above proves nothing on this machine"
