"""Device identity shared by memd and the worker: GPU UUIDs compared whatever their spelling."""
from __future__ import annotations


def same_device(a: str, b: str) -> bool:
    """GPU UUIDs compared whatever their spelling (nvidia-smi writes ``GPU-`` before them, torch does not)."""
    def norm(u: str) -> str:
        return u.lower().removeprefix("gpu-").replace("-", "")
    return norm(a) == norm(b)
