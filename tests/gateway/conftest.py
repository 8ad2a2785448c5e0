from pathlib import Path

import pytest
from serving import Served, free_port  # noqa: F401 (the tests import them from here)


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory) -> Path:
    from common.demo_model import DemoSize, write_demo_model

    return write_demo_model(tmp_path_factory.mktemp("demo") / "demo", DemoSize(layers=4, hidden=64, intermediate=128,
                                                                               heads=4, kv_heads=2, dtype="float32"))


@pytest.fixture(scope="module")
def served(demo_model, tmp_path_factory):
    s = Served(demo_model, tmp_path_factory.mktemp("serve") / "state")
    yield s
    s.close()
    assert s.proc.returncode == 0, s.log.read_text(errors="replace")
