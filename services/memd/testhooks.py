"""TEST-ONLY fault injection for tests/fault (never a user knob): ``MOEINF_TEST_READ_LATENCY_MS`` makes every
expert read of this memd process sleep that long first (a slow disk), by wrapping ``os.preadv``, the reader's only
read call. Installed by memd's ``run()`` (services/memd/main.py) only when the variable is set."""
from __future__ import annotations

import logging
import os
import time

VARIABLE = "MOEINF_TEST_READ_LATENCY_MS"


def install_from_env() -> None:
    ms = float(os.environ.get(VARIABLE, "0") or 0)
    if ms <= 0 or getattr(os.preadv, "_moeinf_slow", False):
        return
    real = os.preadv

    def slow_preadv(fd, buffers, offset, *flags):
        time.sleep(ms / 1e3)
        return real(fd, buffers, offset, *flags)

    slow_preadv._moeinf_slow = True
    os.preadv = slow_preadv
    logging.getLogger("moeinf.memd").warning("TEST ONLY: every expert read sleeps %g ms first (%s)", ms, VARIABLE)
