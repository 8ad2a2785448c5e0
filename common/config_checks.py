"""Checks of config fields that need more than a type: the admin TCP address with its token, the API key file, CPU
lists."""
from __future__ import annotations

import os
import re
from pathlib import Path

ADMIN_TOKEN_MIN = 16
MAX_CPUS = 1 << 16  # the highest CPU number a --cpus range may name, plus one
CPU_RANGE = re.compile(r"[0-9]{1,5}(-[0-9]{1,5})?")


def check_admin_tcp(addr: str, token: str) -> None:
    if not addr:
        return
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--admin-tcp {addr!r}: give HOST:PORT (127.0.0.1:7070)")
    if len(token) < ADMIN_TOKEN_MIN:
        raise ValueError(f"--admin-tcp needs --admin-token (env MOEINF_ADMIN_TOKEN) of at least {ADMIN_TOKEN_MIN}"
                         " characters: a TCP admin socket has no file permissions to protect it")


def resolve_api_key(cfg) -> None:
    """``--api-key-file``'s content (stripped) becomes ``cfg.api_key``; giving both is an error. A key given directly
    is stripped too (a secret written with its newline); one of whitespace alone is refused, not taken as a key."""
    if cfg.api_key_file is None:
        if cfg.api_key and not cfg.api_key.strip():
            raise ValueError("--api-key (or MOEINF_API_KEY) is whitespace alone: give a key, or none for no auth")
        object.__setattr__(cfg, "api_key", cfg.api_key.strip())
        return
    if cfg.api_key:
        raise ValueError("give one of --api-key and --api-key-file, not both")
    try:
        key = Path(cfg.api_key_file).read_text().strip()
    except OSError as exc:
        raise ValueError(f"--api-key-file {cfg.api_key_file}: {exc.strerror}") from None
    if not key:
        raise ValueError(f"--api-key-file {cfg.api_key_file} is empty")
    object.__setattr__(cfg, "api_key", key)


def parse_cpus(text: str, flag: str = "--cpus") -> frozenset[int]:
    """CPU numbers and ranges (``0-3,8``) as CPU numbers, each one this process may run on; empty: none (no
    pinning)."""
    cpus: set[int] = set()
    for part in text.split(",") if text.strip() else ():
        lo, _, hi = part.strip().partition("-")
        if not CPU_RANGE.fullmatch(part.strip()) or not int(lo) <= int(hi or lo) < MAX_CPUS:
            raise ValueError(f"{flag} {text!r}: give CPU numbers and ranges such as 0-3,8")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    allowed = os.sched_getaffinity(0)
    if not cpus <= allowed:
        raise ValueError(f"{flag} {text!r}: CPUs {format_cpus(cpus - allowed)} are not among those this process may"
                         f" run on ({format_cpus(allowed)})")
    return frozenset(cpus)


def format_cpus(cpus) -> str:
    """CPU numbers as a Linux CPU list: ``0-3,8``."""
    runs: list[list[int]] = []
    for cpu in sorted(cpus):
        if runs and cpu == runs[-1][1] + 1:
            runs[-1][1] = cpu
        else:
            runs.append([cpu, cpu])
    return ",".join(f"{a}-{b}" if b > a else str(a) for a, b in runs)


def pin_cpus(text: str, flag: str = "--cpus") -> frozenset[int]:
    """Run this process on the CPUs of ``text`` (empty: leave it where it is): every thread it has (a library may
    have started one at import) and, since threads inherit it, every thread it starts afterwards."""
    cpus = parse_cpus(text, flag)
    done: set[str] = set()
    while cpus and (threads := set(os.listdir("/proc/self/task")) - done):  # again: one may have started meanwhile
        for tid in threads:
            try:
                os.sched_setaffinity(int(tid), cpus)
            except ProcessLookupError:  # a thread that ended meanwhile
                pass
        done |= threads
    return cpus


LOG_LEVELS = ("debug", "info", "warning", "warn", "error", "critical")


def check_choice(value: str, choices: tuple[str, ...], flag: str) -> None:
    if value not in choices:
        raise ValueError(f"{flag} {value!r}: choose one of {', '.join(choices)}")


def check_log_level(cfg) -> None:
    """``--log-level`` is one of ``LOG_LEVELS`` (any case), not a typo that would quietly mean info."""
    if str(cfg.log_level).lower() not in LOG_LEVELS:
        raise ValueError(f"--log-level {cfg.log_level!r}: one of {', '.join(LOG_LEVELS)}")
