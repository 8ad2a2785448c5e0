"""``bench e2e``'s GGUF runtime: llama.cpp's ``llama-server`` on a GGUF of the same checkpoint, the lean runtime a
CPU user would otherwise pick.

The server maps the GGUF file (llama.cpp's default ``mmap``), so under a memory cgroup its weights are page cache the
limit counts: what fits stays, the rest is read from disk again at each token (the kernel's readahead, no expert
awareness). It runs with ``--threads`` threads (its batch threads too), one slot (the baselines serve one request at a
time), a context of the longest prompt plus ``--max-tokens`` and no prompt cache, and decodes greedily (``top_k`` 1)
the same token ids every system gets, ignoring end-of-sequence as the other systems never stop early on these
prompts. Its tokens come back with each streamed chunk (``return_tokens``); timings are taken at their arrival, as
for every other system. Its kernels are not transformers', so its tokens may differ: the row says how many of its
tokens equal moeinf's on the same prompts.

The GGUF is made once with llama.cpp's own converter (``make llama-cpp`` builds the server and keeps the converter;
``make gguf MODEL=DIR`` writes ``DIR.gguf``). ``--llama-server`` (env ``MOEINF_LLAMA_SERVER``) and ``--gguf`` name them.
"""
from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
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


def llama_missing(server: Path | None, gguf: Path | None) -> str | None:
    """Why the llama.cpp system cannot run, or None."""
    if server is None:
        return ("llama.cpp: no llama-server (build it with `make llama-cpp`, or give --llama-server PATH /"
                " MOEINF_LLAMA_SERVER)")
    if not (server.is_file() and os.access(server, os.X_OK)):
        return f"llama.cpp: --llama-server {server} is not an executable file"
    if gguf is None:
        return "llama.cpp: give --gguf FILE, a GGUF of --model (`make gguf MODEL=DIR` writes DIR.gguf)"
    if not gguf.is_file():
        return f"llama.cpp: --gguf {gguf}: no such file (`make gguf MODEL=DIR` writes DIR.gguf)"
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
                "--no-webui"]
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
        self.process = LlamaServer(server, gguf, threads, context, log_path, prefix)

    def start(self) -> LlamaCppSystem:
        self.process.start()
        return self

    def stop(self) -> None:
        self.process.stop()
        if self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def client(self) -> LlamaClient:
        return LlamaClient(self.process.port, self.process.gone)

    def counters(self) -> None:
        return None  # no memd

    def pss_bytes(self) -> int | None:
        from services.bench.e2e_system import _pss

        return _pss([self.process.pid]) if self.process.pid is not None else None

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
        body = {"prompt": list(prompt), "n_predict": max_tokens, "stream": True, "return_tokens": True,
                "cache_prompt": False, "ignore_eos": True, "samplers": ["top_k"], "top_k": 1, "temperature": 0.0}
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout_s)
        try:
            try:
                conn.request("POST", "/completion", json.dumps(body), {"Content-Type": "application/json"})
                reply = conn.getresponse()
            except OSError as exc:
                raise RuntimeError(f"llama-server: {self.gone() or exc}") from exc
            if reply.status != 200:
                raise RuntimeError(f"llama-server answered {reply.status}: {reply.read(500).decode(errors='replace')}")
            for line in reply:
                if not line.startswith(b"data: "):
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("tokens"):
                    yield list(chunk["tokens"])
                if chunk.get("stop"):
                    return
            raise RuntimeError(f"llama-server: the stream ended before its last chunk ({self.gone() or 'no reason'})")
        finally:
            conn.close()

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
