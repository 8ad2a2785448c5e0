"""``moeinf bench soak``: N concurrent clients against a running server (``--url``) or one it starts itself
(``moeinf serve``), for ``--duration`` seconds; half the requests stream. Reports errors by kind, p50/p99 latency
(streaming and not), and the RSS of each service sampled every ``--sample-s`` seconds as a table: flat RSS and zero
errors is the target.

RSS counts the pages each process has touched, shared ones included (memd's pool, the worker's mapping of it).
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import numpy as np
import psutil

from common.config import default_state_dir

SERVICES = ("gateway", "worker", "memd")
WORDS = ("the quick brown fox jumps over a lazy dog while seven small robots count every expert in the pool"
         " before the next token arrives").split()


@dataclass
class Tally:
    latencies: dict[bool, list[float]] = field(default_factory=lambda: {False: [], True: []})  # stream? -> seconds
    errors: dict[str, int] = field(default_factory=dict)
    done: int = 0

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    @property
    def failed(self) -> int:
        return sum(self.errors.values())


async def one_request(session: aiohttp.ClientSession, url: str, model: str, stream: bool, max_tokens: int,
                      rng: random.Random, tally: Tally) -> None:
    prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 24)))
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": stream,
            "temperature": rng.choice([0.0, 0.7]), "seed": rng.randint(0, 1 << 30)}
    start = time.monotonic()
    try:
        async with session.post(f"{url}/v1/completions", json=body) as resp:
            if resp.status != 200:
                await resp.read()
                tally.error(f"HTTP {resp.status}")
                return
            if stream:
                kind = await _read_stream(resp)
                if kind:
                    tally.error(kind)
                    return
            else:
                reply = await resp.json()
                if not reply.get("choices"):
                    tally.error("no choices")
                    return
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        tally.error(type(exc).__name__)
        return
    tally.latencies[stream].append(time.monotonic() - start)
    tally.done += 1


async def _read_stream(resp) -> str:
    """'' when the stream ended with [DONE]; otherwise what went wrong."""
    async for raw in resp.content:
        line = raw.decode(errors="replace").strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return ""
        if '"error"' in data and "error" in json.loads(data):
            return "stream error event"
    return "stream ended without [DONE]"


async def client(url: str, model: str, index: int, deadline: float, max_tokens: int, tally: Tally,
                 timeout_s: float) -> None:
    rng = random.Random(index)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(timeout=timeout, headers=_auth()) as session:
        n = 0
        while time.monotonic() < deadline:
            await one_request(session, url, model, stream=(index + n) % 2 == 0, max_tokens=max_tokens, rng=rng,
                              tally=tally)
            n += 1


def _auth() -> dict:
    key = os.environ.get("MOEINF_API_KEY", "")
    return {"Authorization": f"Bearer {key}"} if key else {}


def service_processes(state_dir: Path, root: int | None = None) -> dict[str, psutil.Process]:
    """The gateway, worker and memd of ``state_dir`` (children of ``root`` when given), by their command lines:
    ``moeinf serve``'s children (``python -m services.cli NAME``) or services started one by one (``moeinf NAME``),
    their state directory from ``--state-dir``, else their ``MOEINF_STATE_DIR``, else the default one."""
    procs = psutil.Process(root).children(recursive=True) if root else psutil.process_iter()
    found = {}
    want = os.path.realpath(state_dir)
    for p in procs:
        try:
            cmd = p.cmdline()
            name = _service_of(cmd)
            theirs = _state_dir_of(p, cmd) if name is not None else None
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if theirs is not None and os.path.realpath(theirs) == want:
            found[name] = p
    return found


def _service_of(cmd: list[str]) -> str | None:
    """The service a moeinf command line runs (the word after ``services.cli`` or the ``moeinf`` script)."""
    for i, arg in enumerate(cmd[:-1]):
        if arg == "services.cli" or os.path.basename(arg) == "moeinf":
            return cmd[i + 1] if cmd[i + 1] in SERVICES else None
    return None


def _state_dir_of(p: psutil.Process, cmd: list[str]) -> str:
    """The process's ``--state-dir`` (``--state-dir X`` or ``=X``, relative to its working directory), else its
    ``MOEINF_STATE_DIR``, else the default one in its own environment (``XDG_STATE_HOME``, ``HOME``)."""
    given = next((a.split("=", 1)[1] for a in cmd if a.startswith("--state-dir=")), None)
    if given is None and "--state-dir" in cmd[:-1]:
        given = cmd[cmd.index("--state-dir") + 1]
    env = p.environ()
    if given is None:
        given = env.get("MOEINF_STATE_DIR")
    if given is None:
        home = env.get("HOME") or os.path.expanduser("~")
        return os.path.join(env.get("XDG_STATE_HOME") or os.path.join(home, ".local", "state"), "moeinf")
    return os.path.join(p.cwd(), given)  # (an absolute path stays itself)


def rss_mib(procs: dict[str, psutil.Process]) -> dict[str, float | None]:
    out = {}
    for name in SERVICES:
        try:
            out[name] = procs[name].memory_info().rss / 2**20
        except (KeyError, psutil.NoSuchProcess, psutil.AccessDenied):
            out[name] = None
    return out


async def sampler(state_dir: Path, root: int | None, every_s: float, deadline: float, tally: Tally, rows: list,
                  t0: float) -> None:
    procs = service_processes(state_dir, root)
    while True:
        if any(not p.is_running() for p in procs.values()) or len(procs) < len(SERVICES):
            procs = service_processes(state_dir, root)  # a restarted child
        rows.append((time.monotonic() - t0, rss_mib(procs), tally.done, tally.failed))
        if time.monotonic() >= deadline:
            return
        await asyncio.sleep(min(every_s, max(0.0, deadline - time.monotonic())))


async def soak(url: str, model: str, clients: int, duration_s: float, max_tokens: int, state_dir: Path,
               root: int | None, sample_s: float, timeout_s: float) -> tuple[Tally, list]:
    tally, rows = Tally(), []
    t0 = time.monotonic()
    deadline = t0 + duration_s
    tasks = [client(url, model, i, deadline, max_tokens, tally, timeout_s) for i in range(clients)]
    await asyncio.gather(sampler(state_dir, root, sample_s, deadline, tally, rows, t0), *tasks)
    rows.append((time.monotonic() - t0, rss_mib(service_processes(state_dir, root)), tally.done, tally.failed))
    return tally, rows


def report(tally: Tally, rows: list, clients: int, duration_s: float) -> str:
    lines = [f"moeinf bench soak: {clients} clients for {duration_s:g}s, half streaming"]
    total = tally.done + tally.failed
    lines.append(f"requests: {total} ({tally.done} ok, {tally.failed} errors"
                 + (": " + ", ".join(f"{k} x{v}" for k, v in sorted(tally.errors.items())) if tally.errors else "")
                 + f"); {tally.done / max(duration_s, 1e-9):.2f} ok/s")
    for stream, name in ((False, "plain"), (True, "stream")):
        lat = np.array(tally.latencies[stream]) * 1e3
        if len(lat):
            lines.append(f"latency {name:<6}: p50 {np.percentile(lat, 50):8.1f} ms   p99 {np.percentile(lat, 99):8.1f}"
                         f" ms   ({len(lat)} requests)")
    lines.append("")
    lines.append(f"{'t (s)':>7} " + " ".join(f"{s + ' MiB':>12}" for s in SERVICES) + f" {'ok':>7} {'errors':>7}")
    for t, rss, done, failed in rows:
        cells = " ".join(f"{v:>12.1f}" if v is not None else f"{'-':>12}" for v in (rss[s] for s in SERVICES))
        lines.append(f"{t:>7.1f} {cells} {done:>7} {failed:>7}")
    return "\n".join(lines)


# ---------------------------------------------------------------- a server of its own
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, state_dir: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    cmd = [sys.executable, "-m", "services.cli", "serve", "--state-dir", str(state_dir), "--port", str(port),
           "--expert-memory", args.expert_memory, "--max-queued", str(max(args.clients, 1))]
    if args.model:
        cmd += ["--model", args.model]
    log = open(state_dir.parent / "serve.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.startup_timeout_s
    while not _healthy(url):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_server(proc)
            tail = (state_dir.parent / "serve.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"moeinf serve did not become healthy (status {proc.returncode}):\n{tail}")
        time.sleep(0.5)
    return proc, url


def _healthy(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def served_model(url: str) -> str:
    import urllib.request

    req = urllib.request.Request(f"{url}/v1/models", headers=_auth())
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.load(resp)["data"][0]["id"]


def run(args) -> int:
    if args.clients < 1 or args.duration <= 0 or args.sample_s <= 0:
        raise ValueError("--clients must be >= 1, --duration and --sample-s > 0")
    with tempfile.TemporaryDirectory(prefix="moeinf-soak-") as tmp:
        proc = None
        if args.url:
            url, state_dir, root = args.url.rstrip("/"), Path(args.state_dir), None
        else:
            state_dir = Path(tmp) / "state"
            print(f"[soak] starting moeinf serve ({args.model or 'the demo model'}, {args.expert_memory}) ...",
                  file=sys.stderr, flush=True)
            proc, url = start_server(args, state_dir)
            root = proc.pid
        try:
            tally, rows = asyncio.run(soak(url, served_model(url), args.clients, args.duration, args.max_tokens,
                                           state_dir, root, args.sample_s, args.request_timeout_s))
        finally:
            if proc is not None:
                stop_server(proc)
    print(report(tally, rows, args.clients, args.duration))
    return 1 if tally.failed else 0


def add_parser(bench) -> None:
    p = bench.add_parser("soak", help="N concurrent clients for a while: errors, p50/p99 latency, RSS of each service")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--duration", type=float, default=300, help="seconds")
    p.add_argument("--max-tokens", type=int, default=16, help="per request")
    p.add_argument("--sample-s", type=float, default=10, help="RSS sampling period (seconds)")
    p.add_argument("--request-timeout-s", type=float, default=300)
    p.add_argument("--url", help="a running server (default: start `moeinf serve` for the run)")
    p.add_argument("--state-dir", default=str(default_state_dir()), help="with --url: the server's state directory"
                                                                          " (to find its processes)")
    p.add_argument("--model", help="without --url: checkpoint to serve (default: the demo model)")
    p.add_argument("--expert-memory", default="25%", help="without --url")
    p.add_argument("--startup-timeout-s", type=float, default=900, help="without --url")
    p.set_defaults(func=run)
