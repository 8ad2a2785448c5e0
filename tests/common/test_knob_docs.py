"""The README's knob table agrees with the config dataclasses: every knob it lists for a service exists there, and
every default it states is the dataclass default; and the knobs that did nothing or surprised stay gone
(memd's handshake timeout, a prefetch budget share that meant 0 bytes)."""
import dataclasses
import re
from pathlib import Path

import pytest

from common.config import GatewayConfig, MemdConfig, WorkerConfig, build_config
from common.serve_config import ServeConfig
from common.sizes import parse_size
from services.memd.core import CacheSettings

README = Path(__file__).resolve().parents[2] / "README.md"
CONFIGS = {"memd": MemdConfig, "worker": WorkerConfig, "gateway": GatewayConfig, "serve": ServeConfig}
ROW = re.compile(r"^\| (`--[a-z0-9-]+[^`]*`(?:, `--[a-z0-9-]+[^`]*`)*) \| ([a-z, ]+) \| ([^|]+) \|")
EMPTY = {"none", "unset", "off", "any"}  # how the table says a knob is empty by default


def rows():
    """``(flags, services, default)`` per row; a row of several flags (`--port`, `--host`) states their defaults
    in order, and a default may differ by service (``100% (memd), 25% (serve)``)."""
    for line in README.read_text().splitlines():
        if m := ROW.match(line):
            yield re.findall(r"`(--[a-z0-9-]+)", m.group(1)), [s.strip() for s in m.group(2).split(",")], \
                m.group(3).strip()


def stated(default: str, flags: list[str], services: list[str]) -> dict[tuple[str, str], str]:
    """The default the row states for each (flag, service)."""
    parts = [p.strip() for p in default.split(", ")]
    if len(flags) > 1:
        return {(f, s): d for f, d in zip(flags, parts) for s in services} if len(parts) == len(flags) else {}
    by_service = {m.group(2): m.group(1) for p in parts if (m := re.fullmatch(r"(\S+) \(([a-z]+)\)", p))}
    return {(flags[0], s): by_service.get(s, default) for s in services}


def same(doc: str, code) -> bool | None:
    """Does the table's ``doc`` state the dataclass default ``code``? None: a phrase this does not compare."""
    doc = doc.strip("`")
    if isinstance(code, bool):
        return {"on": True, "off": False}.get(doc) == code if doc in ("on", "off") else None
    if code in ("", None):
        return doc in EMPTY if doc in EMPTY or re.fullmatch(r"[0-9.]+", doc) else None
    if re.fullmatch(r"[0-9]+(\.[0-9]+)?", doc):
        return doc == str(code) or (isinstance(code, (int, float)) and float(doc) == float(code))
    try:  # a size: 1MiB, 1 MiB, 25%
        size = parse_size(doc)
    except ValueError:
        return doc == code if isinstance(code, str) else None  # a word (auto), or a phrase (model's)
    return size == parse_size(code) if isinstance(code, (int, str)) else None


def test_readme_knobs_exist_with_their_stated_defaults():
    """Numbers, on/off, sizes (``1 MiB`` is ``1 << 20``), words (``auto``) and empty knobs (``none``) are compared;
    phrases (``the state directory``) are not."""
    checked = 0
    for flags, services, default in rows():
        for (flag, service), doc in stated(default, flags, services).items():
            cls = CONFIGS.get(service)
            if cls is None:
                continue
            name = flag[2:].replace("-", "_")
            fields = {f.name: f.default for f in dataclasses.fields(cls)}
            assert name in fields, f"README lists {flag} for {service}, which has no such knob"
            verdict = same(doc, fields[name])
            assert verdict is not False, f"{service} {flag}: README says {doc!r}, the code's default is" \
                                         f" {fields[name]!r}"
            checked += verdict is True
    assert checked >= 75, checked  # (80 on 6 December: fewer means some rows are no longer read)


def test_memd_has_no_handshake_timeout():
    """memd waits for no peer at start-up, so a timeout knob there would do nothing."""
    assert "handshake_timeout_s" not in {f.name for f in dataclasses.fields(MemdConfig)}
    assert build_config(WorkerConfig, env={}, model="/m").handshake_timeout_s == 60.0


def test_prefetch_budget_percentage_is_a_share_of_the_pool():
    cfg = build_config(MemdConfig, env={}, model="/m", prefetch_budget="25%")
    assert CacheSettings.from_config(cfg, pool_bytes=400 << 20).budget_bytes == 100 << 20
    with pytest.raises(ValueError, match="--prefetch-budget 25%: a percentage is a share of the pool"):
        CacheSettings.from_config(cfg)
    assert CacheSettings.from_config(build_config(MemdConfig, env={}, model="/m", prefetch_budget="64MiB"),
                             pool_bytes=1 << 30).budget_bytes == 64 << 20


def test_every_knob_of_every_service_is_in_the_readme():
    """The other direction: a knob added to a config dataclass has a row in the README's table for its service (a
    row's first cell may name several flags: `--port`, `--host`)."""
    documented: dict[str, set[str]] = {}
    for line in README.read_text().splitlines():
        cells = re.split(r"(?<!\\)\|", line)  # (not at `\|` inside a cell: `--leases on\|off`)
        if line.startswith("| `--") and len(cells) > 3:
            services = [s.strip() for s in cells[2].split(",")]
            for service in CONFIGS if services == ["all"] else services:
                documented.setdefault(service, set()).update(re.findall(r"`(--[a-z0-9-]+)", cells[1]))
    for service, cls in CONFIGS.items():
        missing = [f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(cls)
                   if f.init and f"--{f.name.replace('_', '-')}" not in documented.get(service, ())]
        assert not missing, f"README's knob table has no row for {service}'s {', '.join(missing)}"
