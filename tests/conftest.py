import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# whatever falls back to the default state directory (a bench's expert cache, `moeinf convert`, an in-process
# MemdConfig) writes under a temp directory, not the user's ~/.local/state (set before common.config is imported)
_STATE_HOME = tempfile.mkdtemp(prefix="moeinf-state-home-")
os.environ["XDG_STATE_HOME"] = _STATE_HOME

from helpers import FAMILIES, new_orphans, orphan_regions, write_family  # noqa: E402


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """A tiny random-weight checkpoint of every supported family (one of them sharded)."""
    root = tmp_path_factory.mktemp("ckpt")
    return {name: write_family(name, root / name) for name in FAMILIES}


@pytest.fixture(scope="session")
def mixtral(checkpoints) -> Path:
    return checkpoints["mixtral"]


@pytest.fixture(scope="session", autouse=True)
def shared_index_cache(tmp_path_factory) -> Path:
    """Every memd the tests start (they inherit the environment) keeps its checkpoint index in one directory
    (``--index-cache-dir``): a memd on a checkpoint another test indexed skips its indexer child (~8 s here)."""
    path = tmp_path_factory.mktemp("index-cache")
    os.environ["MOEINF_INDEX_CACHE_DIR"] = str(path)
    return path


@pytest.fixture(scope="session", autouse=True)
def kernel_cache(tmp_path_factory) -> Path:
    """Every worker the tests start keeps its compiled kernels in one directory (``--kernel-cache-dir``): a worker
    with a fresh state directory loads the library another test built instead of compiling it (~7 s here); in-process
    tests pass it to ``dequant_kernel.load`` where they test no build."""
    path = tmp_path_factory.mktemp("kernel-cache")
    os.environ["MOEINF_KERNEL_CACHE_DIR"] = str(path)
    return path


@pytest.fixture(scope="session", autouse=True)
def private_state_home() -> Path:
    """The temp default state directory (above), removed after the session."""
    yield Path(_STATE_HOME)
    shutil.rmtree(_STATE_HOME, ignore_errors=True)


@pytest.fixture
def state_dir(tmp_path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def bench_tmp():
    """An empty directory with a short path for a bench's TMPDIR: its memd state directories (and their Unix
    sockets, at most 107 bytes of path) land here, so a leftover one is seen. tmp_path is too long for the sockets
    under pytest-xdist (``/tmp/pytest-of-USER/pytest-N/popen-gwK/<test name>0/...``)."""
    path = Path(tempfile.mkdtemp(prefix="mb-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(autouse=True)
def no_leaked_shm():
    """No test may leave a pool region that no process maps (every memd exit path must unlink it)."""
    before = orphan_regions()
    yield
    leaked = new_orphans(before)
    assert not leaked, f"shared memory leaked: {leaked}"


@pytest.fixture(autouse=True)
def logger_levels():
    """A command run in-process (``main(["bench", ...])``) may quiet loggers for its run; the next test's caplog must
    still see warnings, so every logger's level is put back."""
    import logging

    manager = logging.Logger.manager
    saved = {name: lg.level for name, lg in manager.loggerDict.items() if isinstance(lg, logging.Logger)}
    root = logging.getLogger().level
    yield
    logging.getLogger().setLevel(root)
    for name, lg in list(manager.loggerDict.items()):
        if isinstance(lg, logging.Logger):
            lg.setLevel(saved.get(name, logging.NOTSET))
