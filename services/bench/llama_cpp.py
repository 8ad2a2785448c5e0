"""``bench e2e``'s GGUF runtime: llama.cpp's ``llama-server`` on a GGUF of the same checkpoint, the lean runtime a
CPU user would otherwise pick.

The server maps the GGUF file (llama.cpp's default ``mmap``), so under a memory cgroup its weights are page cache the
limit counts: what fits stays, the rest is read from disk again at each token (page faults on its compute threads,
the kernel's readahead, no expert awareness). It runs with ``--threads`` threads (its batch threads too), one slot
(the baselines serve one request at a time), a context of the longest prompt plus ``--max-tokens``, no prompt cache
(neither the slot's nor the host-memory one, ``--cache-ram 0``, which would grow inside the limit), and decodes
greedily (``top_k`` 1) the same token ids every system gets, ignoring end-of-sequence as the other systems never
stop early on these prompts. Its tokens come back with each streamed chunk (``return_tokens``); timings are taken at
their arrival, as for every other system. A token that ends inside a UTF-8 character is not streamed on its own
(the server holds it back until the character is whole): it counts as arriving with the next chunk, its id unknown
(-1, so the token comparison stops there). Its kernels are not transformers', so its tokens may differ: the row
says how many of its tokens equal the reference's (transformers', else moeinf's) on the same prompts. Before it runs,
the GGUF's header is checked against the checkpoint (layers, hidden size, experts per layer).

The GGUF is made once with llama.cpp's own converter (``make llama-cpp`` builds the server and keeps the converter;
``make gguf MODEL=DIR`` writes ``DIR.gguf``). ``--llama-server`` (env ``MOEINF_LLAMA_SERVER``) and ``--gguf`` name them.
"""
from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from services.bench.e2e_runtime import ProcMemory
from services.bench.service_proc import ServiceProcess, exited_with

LLAMA = "llama.cpp"
BUILT = Path(__file__).resolve().parents[2] / ".cache" / "llama.cpp" / "build" / "bin" / "llama-server"
READY_TIMEOUT_S = 600.0  # mapping a large GGUF from a cold disk


def find_server(given: str | None) -> Path | None:
    """``--llama-server``, else ``MOEINF_LLAMA_SERVER``, else ``make llama-cpp``'s build, else ``llama-server`` on
    PATH; None if none exists."""
    for candidate in (given, os.environ.get("MOEINF_LLAMA_SERVER")):
        if candidate:
            return Path(candidate)
    if BUILT.is_file():
        return BUILT
    found = shutil.which("llama-server")
    return Path(found) if found else None


def llama_missing(server: Path | None, gguf: Path | None, model: Path | None = None) -> str | None:
    """Why the llama.cpp system cannot run (with ``model``: also a GGUF of another model), or None."""
    if server is None:
        return ("llama.cpp: no llama-server (build it with `make llama-cpp`, or give --llama-server PATH /"
                " MOEINF_LLAMA_SERVER)")
    if not (server.is_file() and os.access(server, os.X_OK)):
        return f"llama.cpp: --llama-server {server} is not an executable file"
    if gguf is None:
        return "llama.cpp: give --gguf FILE, a GGUF of --model (`make gguf MODEL=DIR` writes DIR.gguf)"
    if not gguf.is_file():
        return f"llama.cpp: --gguf {gguf}: no such file (`make gguf MODEL=DIR` writes DIR.gguf)"
    return None if model is None else gguf_mismatch(gguf, model)


def gguf_mismatch(gguf: Path, model: Path) -> str | None:
    """Why ``gguf`` is not a conversion of the checkpoint ``model`` (its layers, hidden size or experts per layer
    differ, or it is no GGUF), or None."""
    try:
        meta = gguf_metadata(gguf)
    except (OSError, ValueError, struct.error, KeyError) as exc:
        return f"llama.cpp: --gguf {gguf}: {exc}"
    config = json.loads((Path(model) / "config.json").read_text())
    config = config.get("text_config", config)
    arch = meta.get("general.architecture", "")
    pairs = [("block_count", config.get("num_hidden_layers")), ("embedding_length", config.get("hidden_size")),
             ("expert_count", next((config[k] for k in EXPERT_KEYS if k in config), None))]
    wrong = [f"{name} {meta.get(f'{arch}.{name}')} (checkpoint: {want})" for name, want in pairs
             if want is not None and meta.get(f"{arch}.{name}") != want]
    if wrong:
        return f"llama.cpp: --gguf {gguf} is not a conversion of --model {model}: {', '.join(wrong)}"
    return None


EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")  # experts per layer in transformers' configs
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


def gguf_metadata(path: Path) -> dict:
    """A GGUF file's (version 2 or 3) scalar and string metadata from its header, arrays skipped."""
    found = {}
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF" or struct.unpack("<I", f.read(4))[0] not in (2, 3):
            raise ValueError("not a GGUF file (version 2 or 3)")
        _, count = struct.unpack("<QQ", f.read(16))
        for _ in range(count):
            key = _gguf_string(f)
            found[key] = _gguf_value(f, struct.unpack("<I", f.read(4))[0])
    return found


def _gguf_string(f) -> str:
    (n,) = struct.unpack("<Q", f.read(8))
    return f.read(n).decode("utf-8", errors="replace")


def _gguf_value(f, kind: int):
    if kind == _STRING:
        return _gguf_string(f)
    if kind == _ARRAY:
        item, n = struct.unpack("<IQ", f.read(12))
        if item in _SCALARS:
            f.seek(n * struct.calcsize(_SCALARS[item]), 1)
        else:
            for _ in range(n):
                _gguf_value(f, item)
        return None
    fmt = _SCALARS[kind]
    return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]


def read_ahead_kb(path: Path) -> int | None:
    """The read-ahead of the disk holding ``path`` (what one page fault on a mapped file reads), or None."""
    from services.bench.blkio import SYS_DEV_BLOCK, whole_disk
    from services.bench.cgroup import CgroupUnavailable

    try:
        return int((SYS_DEV_BLOCK / whole_disk(path) / "queue" / "read_ahead_kb").read_text())
    except (OSError, ValueError, CgroupUnavailable):
        return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer(ServiceProcess):
    """``llama-server`` as a child of the bench (in the system's cgroup through ``prefix``), ready when its
    ``/health`` answers 200 (the model is loaded)."""

    def __init__(self, server: Path, gguf: Path, threads: int, context: int, log_path: Path, prefix: list[str] = ()):
        self.port = _free_port()
        args = ["-m", str(gguf), "--host", "127.0.0.1", "--port", str(self.port), "-c", str(context), "-np", "1",
                "--cache-ram", "0", "--no-webui"]
        if threads > 0:
            args += ["-t", str(threads), "-tb", str(threads)]
        super().__init__("llama-server", args, log_path, "", ready_timeout_s=READY_TIMEOUT_S, prefix=prefix)
        self.server = server

    @property
    def what(self) -> str:
        return "llama-server"

    def launch(self) -> None:
        cmd = [*self.prefix, str(self.server), *self.args]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self.ready_timeout_s
        while not self.healthy():
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server {exited_with(self.proc.returncode)}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"llama-server not ready within {self.ready_timeout_s:g}s:\n{self.log_tail()}")
            time.sleep(0.1)

    def healthy(self) -> bool:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
            try:
                conn.request("GET", "/health")
                return conn.getresponse().status == 200
            finally:
                conn.close()
        except OSError:
            return False


class LlamaCppSystem:
    """The ``llama.cpp`` row of ``bench e2e``: one ``llama-server``, driven like the moeinf systems (``measure``)."""

    def __init__(self, server: Path, gguf: Path, threads: int, context: int, log_dir: Path | None = None,
                 prefix: list[str] = ()):
        """``log_dir``: where the server's log goes (None: a temporary directory, removed on ``stop``)."""
        self.name = LLAMA
        self.gguf = gguf
        self.temp_dir = None if log_dir is not None else Path(tempfile.mkdtemp(prefix="moeinf-llama-"))
        log_path = Path(log_dir or self.temp_dir) / "llama-server.log"
        context = -(-context // 256) * 256  # tokens the slot must hold, in whole 256-token blocks
        self.process = LlamaServer(server, gguf, threads, context, log_path, prefix)

    def start(self) -> LlamaCppSystem:
        try:
            self.process.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the server; its temporary log goes too, unless the server had died (its path is then printed)."""
        self.process.stop()
        if self.temp_dir is not None:
            code = self.process.proc.returncode if self.process.proc is not None else None
            if code not in (None, 0, -15):
                print(f"[bench] llama-server {exited_with(code)}: its log is kept in {self.process.log_path}",
                      file=sys.stderr, flush=True)
            else:
                shutil.rmtree(self.temp_dir, ignore_errors=True)

    def client(self) -> LlamaClient:
        return LlamaClient(self.process.port, self.process.gone)

    def counters(self) -> None:
        return None  # no memd

    def pss_bytes(self) -> int | None:
        from services.bench.e2e_system import pss

        return pss([self.process.pid]) if self.process.pid is not None else None

    def runtime_bytes(self) -> int:
        """What the server holds besides its weights: anonymous memory (KV cache, compute buffers) plus file-backed
        pages outside the GGUF (its libraries)."""
        memory = ProcMemory.of(self.process.pid, frozenset({str(self.gguf.resolve())}))
        return memory.anon + memory.file


class LlamaClient:
    """One request at a time over ``/completion`` (server-sent events), yielding each chunk's token ids. Each request
    has its own connection: the server closes a streamed response's."""

    def __init__(self, port: int, gone, timeout_s: float = 600.0):
        self.port, self.gone, self.timeout_s = port, gone, timeout_s

    def stream(self, prompt: list[int], max_tokens: int):
        """Each streamed chunk's token ids, a held-back token (``tokens_predicted`` jumped) as -1 before them; raises
        unless ``max_tokens`` tokens came."""
        body = {"prompt": list(prompt), "n_predict": max_tokens, "stream": True, "return_tokens": True,
                "cache_prompt": False, "ignore_eos": True, "samplers": ["top_k"], "top_k": 1, "temperature": 0.0}
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout_s)
        try:
            reply = self._post(conn, body)
            seen = 0
            for chunk in self._chunks(reply):
                tokens = list(chunk.get("tokens") or [])
                held = max(0, int(chunk.get("tokens_predicted", seen + len(tokens))) - seen - len(tokens))
                if tokens or held:
                    seen += held + len(tokens)
                    yield [-1] * held + tokens
                if chunk.get("stop"):
                    if seen != max_tokens:
                        raise RuntimeError(f"llama-server generated {seen} tokens, not {max_tokens}: its context"
                                           f" is too small or it stopped early ({chunk.get('stop_type')})")
                    return
            raise RuntimeError(f"llama-server: the stream ended before its last chunk ({self.gone() or 'no reason'})")
        finally:
            conn.close()

    def _post(self, conn, body: dict):
        try:
            conn.request("POST", "/completion", json.dumps(body), {"Content-Type": "application/json"})
            reply = conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            raise RuntimeError(f"llama-server: {self.gone() or exc}") from exc
        if reply.status != 200:
            raise RuntimeError(f"llama-server refused the request ({reply.status}):"
                               f" {reply.read(500).decode(errors='replace')} (is --gguf a model it can run?)")
        return reply

    def _chunks(self, reply):
        """The server-sent events' JSON payloads; an ``error`` event or a broken stream raises with the reason."""
        try:
            for line in reply:
                if line.startswith(b"error: ") or line.startswith(b"data: {\"error\""):
                    raise RuntimeError(f"llama-server: {line.decode(errors='replace').strip()}")
                if line.startswith(b"data: "):
                    yield json.loads(line[6:])
        except (OSError, http.client.HTTPException) as exc:
            raise RuntimeError(f"llama-server: {self.gone() or exc}") from exc

    def close(self) -> None:
        pass


def agreement(tokens: list[list[int]], reference: list[list[int]]) -> float | None:
    """The share of ``tokens`` equal to ``reference`` position by position (requests in the same order), up to each
    request's first difference (greedy decoding diverges after one): 1.0 when every request matched throughout."""
    if not reference or len(tokens) != len(reference):
        return None
    same = total = 0
    for mine, theirs in zip(tokens, reference):
        total += len(theirs)
        for a, b in zip(mine, theirs):
            if a != b:
                break
            same += 1
    return same / total if total else None
