"""The layering, read from the import graph (every ``import``, at module level or inside a function):

- ``common/`` is the shared vocabulary: it imports nothing from ``services/``;
- a service (gateway, worker, memd) imports ``common`` and its own modules, never another service's: code two
  services share goes to ``common``;
- the tools that compose the services (``services/bench``, ``services/cli.py`` and the other top-level
  ``services/*.py``: supervisor, health, admin) may import everything.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SERVICES = ("gateway", "worker", "memd")


def imports(path: Path) -> set[str]:
    """The absolute module names ``path`` imports (relative imports resolved against its package)."""
    package = path.relative_to(ROOT).with_suffix("").parts[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else ()
            module = ".".join([*base, *([node.module] if node.module else [])])
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names if not node.module)
    return found


def violations(path: Path) -> list[str]:
    """The imports of ``path`` that break the layering."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    owner = parts[1] if parts[0] == "services" and len(parts) > 2 else None
    bad = []
    for module in sorted(imports(path)):
        top, _, rest = module.partition(".")
        if parts[0] == "common" and top == "services":
            bad.append(f"{module} (common imports no service)")
        elif owner in SERVICES and top == "services" and rest.split(".")[0] != owner:
            bad.append(f"{module} (the {owner} imports another service's internals: share it through common)")
    return bad


def sources() -> list[Path]:
    return sorted([*ROOT.glob("common/**/*.py"), *ROOT.glob("services/**/*.py")])


def test_every_module_respects_the_layering():
    assert len(sources()) > 50  # the tree was found (a wrong root would pass vacuously)
    broken = {str(p.relative_to(ROOT)): v for p in sources() if (v := violations(p))}
    assert not broken, broken


@pytest.mark.parametrize(("where", "source", "expected"), [
    ("common/x.py", "from services.memd.pool import pool_name", ["services.memd.pool"]),
    ("common/x.py", "def f():\n    import services.cli", ["services.cli"]),
    ("services/gateway/x.py", "from services.worker.memd_client import MemdClient", ["services.worker.memd_client"]),
    ("services/memd/x.py", "from ..worker import engine", ["services.worker"]),
    ("services/memd/x.py", "from services.memd.pool import pool_name\nfrom . import core\nimport common.codec", []),
    ("services/bench/x.py", "from services.worker.engine import Engine\nfrom services.memd import core", []),
    ("services/cli.py", "from services.gateway.app import build_app", []),
])
def test_the_check_finds_what_it_should(tmp_path, monkeypatch, where, source, expected):
    """The rule itself can fail: planted imports of each kind are reported, allowed ones are not."""
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    path = tmp_path / where
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(source)
    assert [v.split(" (")[0] for v in violations(path)] == expected
