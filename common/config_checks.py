"""Checks of config fields that need more than a type: the admin TCP address with its token, the API key file."""
from __future__ import annotations

from pathlib import Path

ADMIN_TOKEN_MIN = 16


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
    """``--api-key-file``'s content (stripped) becomes ``cfg.api_key``; giving both is an error."""
    if cfg.api_key_file is None:
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
