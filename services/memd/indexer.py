"""memd's checkpoint index, built in a short-lived child so that memd never imports torch or transformers.

``python -m services.memd.indexer DIR`` builds the ``ExpertStore`` of DIR (transformers' meta model and
conversion mapping) and writes an ``IndexResult`` as msgpack on its stdout: the index, or the ``CheckpointError``
message to show the user. memd (``load_index``) runs it only when its cached index does not match the
checkpoint's identity, and saves the new one (``save_index``) once it holds its state directory's lock. The cache is
``<state-dir>/expert-index.msgpack``, or with ``--index-cache-dir`` one file per checkpoint identity there, shared by
every memd of the same user that uses the directory (several state directories, a test suite). An index says which
files memd reads into the pool, so only a regular file this user owns and nobody else may write is trusted (another
user's, a link: indexed again); saving is atomic and best effort (a directory memd cannot write costs a warning).
"""
from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import msgspec

from common.checkpoint import Checkpoint, CheckpointError
from common.expert_index import ExpertIndex, IndexResult, checkpoint_key
from common.procs import die_with_parent

log = logging.getLogger("moeinf.memd")
FILE_NAME = "expert-index.msgpack"
ROOT = Path(__file__).resolve().parents[2]  # the directory holding ``common`` and ``services``
# The code that decides the index: a change to any of it invalidates every cached index.
CODE = [ROOT / "common" / "checkpoint.py", ROOT / "common" / "expert_index.py", ROOT / "services" / "memd" / "store.py"]
_decode = msgspec.msgpack.Decoder(IndexResult).decode
_decode_index = msgspec.msgpack.Decoder(ExpertIndex).decode


def index_file(state_dir: Path, cache_dir: Path | None, key: str) -> Path:
    """Where the index of the checkpoint identified by ``key`` is cached (``--index-cache-dir``, else the state
    directory's one file)."""
    return Path(cache_dir) / f"expert-index-{key[:32]}.msgpack" if cache_dir else Path(state_dir) / FILE_NAME


def load_index(model: Path, state_dir: Path, cache_dir: Path | None = None) -> tuple[ExpertIndex, bool]:
    """``(index of the checkpoint at model, fresh)``: the cached one if it matches the checkpoint (``fresh``
    False), else one built by the indexer child (``fresh`` True: save it with ``save_index``).
    Raises ``CheckpointError`` with the indexer's message when the checkpoint cannot be served."""
    checkpoint = Checkpoint(model)  # headers and file sizes checked here: a broken file fails before any child
    key = checkpoint_key(checkpoint.dir, checkpoint.files, CODE)
    cached = _cached(index_file(state_dir, cache_dir, key), key)
    if cached is not None:
        return cached, False
    return msgspec.structs.replace(_run_indexer(checkpoint.dir), key=key), True


def save_index(state_dir: Path, index: ExpertIndex, cache_dir: Path | None = None) -> None:
    """Write ``index`` where ``load_index`` looks for it, atomically (a reader sees the old file or the new one),
    0600; a failure is a warning (the next start indexes again), never an error."""
    path = index_file(state_dir, cache_dir, index.key)
    tmp = None
    try:
        if cache_dir:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # 0600, a name no other writer has
        with os.fdopen(fd, "wb") as out:
            out.write(msgspec.msgpack.encode(index))
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("could not cache the checkpoint index in %s (%s): memd indexes the checkpoint again at its next"
                    " start", path.parent, exc)
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def _cached(path: Path, key: str) -> ExpertIndex | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:  # none yet, or a link
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
            log.warning("%s is not this user's own file: not trusted, indexing again", path)
            return None
        with os.fdopen(os.dup(fd), "rb") as f:
            index = _decode_index(f.read())
    except (OSError, msgspec.DecodeError):  # unreadable, or written by another version: index again
        return None
    finally:
        os.close(fd)
    return index if index.key == key else None


def _run_indexer(directory: Path) -> ExpertIndex:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-m", "services.memd.indexer", str(directory)], stdout=subprocess.PIPE,
                            env=env, preexec_fn=die_with_parent)  # its stderr (transformers' warnings) is memd's
    try:
        out, _ = proc.communicate()
    finally:  # memd stopped meanwhile (SIGTERM raises in it): the indexer goes with it, never orphaned
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    try:
        result = _decode(out)
    except msgspec.DecodeError:
        raise CheckpointError(f"indexing {directory} failed: the indexer ({sys.executable} -m"
                              f" services.memd.indexer) exited with status {proc.returncode}") from None
    if result.error or result.index is None:
        raise CheckpointError(result.error or f"indexing {directory} failed: the indexer returned no index")
    return result.index


def main(argv: list[str]) -> int:
    from services.memd.store import ExpertStore  # imports transformers and torch: this process only

    for noisy in ("transformers", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    out, sys.stdout = sys.stdout.buffer, sys.stderr  # stdout carries the result alone; stray prints go to stderr
    try:
        result = IndexResult(index=ExpertStore(Checkpoint(argv[0])).index())
    except CheckpointError as exc:
        result = IndexResult(error=str(exc))
    out.write(msgspec.msgpack.encode(result))
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
