"""pid_alive: a running process is alive; a killed one is dead at once, even before its parent reaps it."""
import os
import signal
import subprocess
import time

from common.procs import pid_alive


def test_a_killed_child_is_dead_before_it_is_reaped():
    proc = subprocess.Popen(["sleep", "30"])
    try:
        assert pid_alive(proc.pid) and pid_alive(os.getpid())
        os.kill(proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while pid_alive(proc.pid):  # a zombie until proc.wait(): must not count as alive
            assert time.monotonic() < deadline, "a zombie counts as alive"
            time.sleep(0.01)
    finally:
        proc.kill()
        proc.wait()
    assert not pid_alive(proc.pid)
