"""Parsing of human-written sizes: ``4GiB``, ``512MiB``, ``1.5GB``, ``123456`` bytes, or ``25%`` of a total."""
from __future__ import annotations

import re
from dataclasses import dataclass

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3, "t": 1000**4, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}
MAX_BYTES = 2.0**64  # a size past this is a typo (and past a float's range, inf), not a machine's memory
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")
_PCT_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*%\s*$")


@dataclass(frozen=True, slots=True)
class SizeSpec:
    """Either an absolute byte count or a fraction (0, 1] of some total decided later."""

    nbytes: int | None = None
    fraction: float | None = None

    def resolve(self, total: int) -> int:
        if self.fraction is not None:
            return int(total * self.fraction)
        assert self.nbytes is not None
        return self.nbytes

    def __str__(self) -> str:
        return f"{self.fraction * 100:g}%" if self.fraction is not None else format_bytes(self.nbytes or 0)


def parse_size(text: str | int, *, what: str = "size") -> SizeSpec:
    """Parse ``text``; raise ValueError naming ``what`` and the accepted forms when it is malformed."""
    if isinstance(text, int):
        return SizeSpec(nbytes=text)
    if m := _PCT_RE.match(text):
        pct = float(m.group(1))
        if not 0 < pct <= 100:
            raise ValueError(f"{what} {text!r}: a percentage must be in (0, 100]")
        return SizeSpec(fraction=pct / 100)
    m = _SIZE_RE.match(text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"{what} {text!r} is not a size: use bytes (1048576), units (512MiB, 4GiB, 2GB)"
                         " or a percentage (25%)")
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if not value < MAX_BYTES:  # (digits beyond a float's range are inf, which int() cannot take)
        raise ValueError(f"{what} {text!r} is beyond any machine's memory or disk (at most {MAX_BYTES:.0e} bytes)")
    nbytes = int(value)
    if nbytes <= 0:
        raise ValueError(f"{what} {text!r} must be positive")
    return SizeSpec(nbytes=nbytes)


def parse_bytes(text: str | int, *, what: str = "size") -> int:
    """A size that must be bytes (a read's piece, a probe's length): ``parse_size`` refusing a percentage, which
    would resolve against no total and silently mean 0."""
    spec = parse_size(text, what=what)
    if spec.fraction is not None:
        raise ValueError(f"{what} {text!r}: give a size in bytes (1048576, 4MiB, 1GB), not a percentage")
    return spec.resolve(0)


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
