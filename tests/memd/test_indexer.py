"""memd indexes the checkpoint in a child process and never imports torch or transformers itself; the index is
the one ``ExpertStore`` computes, cached in the state directory (or ``--index-cache-dir``) until the checkpoint
changes."""
import os
import shutil
import subprocess
import sys

import pytest
from helpers import moeinf_cmd, stop, wait_for_log

from common.checkpoint import Checkpoint, CheckpointError
from services.memd import indexer
from services.memd.indexer import FILE_NAME, load_index, save_index
from services.memd.store import ExpertStore

# Runs the console script in this process after wrapping its exit (a stopped service leaves by os._exit, see
# services/cli.py) so that it first writes which of the heavy modules the process imported.
PROBE = ("import os, sys; out = sys.argv.pop(1); real_exit = os._exit\n"
         "def probe_exit(code):\n"
         "    open(out, 'w').write(' '.join(m for m in ('torch', 'transformers') if m in sys.modules) or 'none')\n"
         "    real_exit(code)\n"
         "os._exit = probe_exit\n"
         "import runpy; sys.argv[0] = 'moeinf'; runpy.run_module({module!r}, run_name='__main__')")


def test_index_matches_the_store(mixtral, state_dir):
    index, fresh = load_index(mixtral, state_dir)
    store = ExpertStore(Checkpoint(mixtral))
    assert fresh and index.key
    assert (index.model_type, index.num_layers, index.num_experts, index.top_k) == ("mixtral", 4, 8, 2)
    assert index.modules == [layer.module for layer in store.layers]
    assert index.tensors == store.tensors and index.slot_bytes == store.slot_bytes
    assert index.segments == dict(store.segments) and index.files == store.files
    assert index.total_expert_bytes == store.total_expert_bytes == 32 * 3 * 128 * 64 * 4


def test_cached_until_the_checkpoint_changes(mixtral, tmp_path, state_dir, monkeypatch):
    model = tmp_path / "model"
    shutil.copytree(mixtral, model)
    state_dir.mkdir()
    first, fresh = load_index(model, state_dir)
    assert fresh
    save_index(state_dir, first)
    assert (state_dir / FILE_NAME).stat().st_mode & 0o777 == 0o600

    def no_child(directory):
        raise AssertionError("indexed again although the checkpoint did not change")

    monkeypatch.setattr(indexer, "_run_indexer", no_child)
    again, fresh = load_index(model, state_dir)
    assert again == first and not fresh
    config = model / "config.json"
    os.utime(config, ns=(config.stat().st_atime_ns, config.stat().st_mtime_ns + 1_000_000_000))
    with pytest.raises(AssertionError, match="indexed again"):
        load_index(model, state_dir)


def test_an_index_cache_dir_is_shared_by_state_directories(mixtral, tmp_path, monkeypatch):
    """``--index-cache-dir``: one file per checkpoint identity there (none in the state directory), found from
    another state directory; another checkpoint is indexed into its own file."""
    cache = tmp_path / "index-cache"
    first, fresh = load_index(mixtral, tmp_path / "a", cache)
    assert fresh
    save_index(tmp_path / "a", first, cache)
    files = list(cache.iterdir())
    assert len(files) == 1 and files[0].stat().st_mode & 0o777 == 0o600
    assert not (tmp_path / "a" / FILE_NAME).exists()

    def no_child(directory):
        raise AssertionError("indexed again")

    monkeypatch.setattr(indexer, "_run_indexer", no_child)
    again, fresh = load_index(mixtral, tmp_path / "b", cache)
    assert again == first and not fresh
    model = tmp_path / "model"
    shutil.copytree(mixtral, model)
    with pytest.raises(AssertionError, match="indexed again"):
        load_index(model, tmp_path / "b", cache)


def test_a_cached_index_others_could_write_is_not_trusted(mixtral, tmp_path, monkeypatch, caplog):
    """The index names the files memd reads into the pool: a file others may write, or a link, is indexed again;
    a directory memd cannot write to costs a warning, not the start."""
    cache = tmp_path / "index-cache"
    index, _ = load_index(mixtral, tmp_path / "a", cache)
    save_index(tmp_path / "a", index, cache)
    (path,) = cache.iterdir()
    calls = []
    monkeypatch.setattr(indexer, "_run_indexer", lambda directory: calls.append(directory) or index)
    path.chmod(0o666)
    assert load_index(mixtral, tmp_path / "b", cache)[1] and "not trusted" in caplog.text
    path.chmod(0o600)
    path.rename(cache / "real")
    path.symlink_to(cache / "real")
    assert load_index(mixtral, tmp_path / "b", cache)[1]
    assert len(calls) == 2
    (tmp_path / "not-a-dir").write_text("")
    save_index(tmp_path / "a", index, tmp_path / "not-a-dir")  # no exception
    assert "could not cache the checkpoint index" in caplog.text


def test_a_corrupt_cache_is_rebuilt(mixtral, state_dir):
    state_dir.mkdir()
    (state_dir / FILE_NAME).write_bytes(b"\x93garbage")
    index, fresh = load_index(mixtral, state_dir)
    assert fresh and index.num_layers == 4


def test_the_indexers_error_reaches_the_caller(mixtral, tmp_path, state_dir):
    """A checkpoint transformers cannot index: the child's CheckpointError message, not a traceback."""
    model = tmp_path / "model"
    shutil.copytree(mixtral, model)
    config = (model / "config.json").read_text().replace('"mixtral"', '"no_such_family"')
    (model / "config.json").write_text(config)
    with pytest.raises(CheckpointError, match="cannot be loaded by transformers"):
        load_index(model, state_dir)
    assert not (state_dir / FILE_NAME).exists()


@pytest.mark.parametrize("heavy,extra", [(False, []), (False, ["--expert-format", "fp8"]), (True, [])],
                         ids=["memd", "memd-compressed-cache", "probe-sees-torch"])
def test_memd_process_never_imports_torch(mixtral, state_dir, tmp_path, heavy, extra):
    """The real ``moeinf memd`` process, started, ready and stopped, has not imported torch nor transformers (its
    indexer child did), with the compressed expert cache too (NumPy converts). The last case imports torch before
    memd starts, to show the probe sees it."""
    state_dir.mkdir(parents=True)
    out, log = tmp_path / "modules.txt", tmp_path / "memd.log"
    module = moeinf_cmd()[2]
    code = ("import torch; " if heavy else "") + PROBE.format(module=module)
    args = [sys.executable, "-c", code, str(out), "memd", "--model", str(mixtral), "--state-dir", str(state_dir),
            *extra]
    proc = subprocess.Popen(args, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_log(proc, log, "memd ready", timeout=120)
    finally:
        assert stop(proc) == 0, log.read_text()
    assert out.read_text() == ("torch" if heavy else "none"), log.read_text()
