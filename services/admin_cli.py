"""``moeinf admin [--socket PATH] [--json] COMMAND``: inspect and steer a running memd (docs/admin.md).

It talks to memd's admin socket (``<state-dir>/admin.sock``, mode 0600, or ``tcp://HOST:PORT`` with a token) in
the admin vocabulary (``common/admin_messages.py``). Tables for people by default, ``--json`` for scripts. Exit
status: 0 done, 1 memd refused (the message says why), 2 memd could not be asked (no socket, no permission, no
answer) or the command line is wrong.
"""
from __future__ import annotations

import argparse
import json
import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

from common import admin_messages as a
from common import messages as m
from common.config import ADMIN_SOCKET, add_config_args, build_config, default_state_dir, knob
from common.protocol import Op
from common.sizes import parse_size
from services.admin_format import PRINTERS


@dataclass(frozen=True, slots=True)
class AdminConfig:
    state_dir: Path = knob(default_state_dir(), "memd's state directory: its admin socket is <state-dir>/admin.sock")
    admin_socket: str = knob("", "the admin socket: a path, or tcp://HOST:PORT for memd's --admin-tcp (default"
                                 " <state-dir>/admin.sock)")
    admin_token: str = knob("", "token for a TCP admin socket: memd's --admin-token")
    timeout_s: float = knob(10.0, "seconds to wait for memd's answer (env MOEINF_TIMEOUT_S, which moeinf health reads"
                                  " too)")

    def __post_init__(self):
        object.__setattr__(self, "state_dir", Path(self.state_dir))
        if self.timeout_s <= 0:
            raise ValueError("--timeout-s must be > 0")

    @property
    def tcp(self) -> bool:
        return self.admin_socket.startswith("tcp://")

    @property
    def path(self) -> Path:
        return Path(self.admin_socket or self.state_dir / ADMIN_SOCKET).absolute()


class AdminRefused(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(f"{message} [{code}]")
        self.code = code


PIN_WAIT_S = 30.0  # beyond --timeout-s for a pin: memd may wait 10 s for workers' leases, then read the experts


def call(cfg: AdminConfig, op: Op, request):
    """Send one admin request and return memd's reply; raises AdminRefused for an error reply, and
    FileNotFoundError, PermissionError or RuntimeError when memd cannot be asked."""
    import zmq

    from common import messages as m
    from common.codec import decode, encode
    from common.zmq_utils import make_socket

    addr = cfg.admin_socket if cfg.tcp else f"ipc://{check_socket(cfg.path, cfg.state_dir)}"
    ctx = zmq.Context()
    sock = make_socket(ctx, zmq.DEALER, addr, bind=False)
    try:
        sock.send(encode(op, 1, request))
        wait_s = cfg.timeout_s + (PIN_WAIT_S if op is Op.ADMIN_PIN else 0.0)
        if not sock.poll(int(wait_s * 1000)):
            raise RuntimeError(f"memd is not answering at {addr} (waited {wait_s:g}s): is it running, or stuck?"
                               " (--timeout-s waits longer)")
        _, _, reply = decode(sock.recv(), reply=True)
    finally:
        sock.close()
        ctx.term()
    if isinstance(reply, m.ErrorReply):
        raise AdminRefused(reply.code, reply.message)
    return reply


def check_socket(path: Path, state_dir: Path) -> Path:
    """The admin socket at ``path``, or an error that says what is wrong with it."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise FileNotFoundError(f"no memd admin socket at {path}: is memd running with --state-dir {path.parent}?"
                                " (give the state directory with --state-dir or env MOEINF_STATE_DIR, or the"
                                " socket with --socket)") from None
    except PermissionError:
        raise PermissionError(f"permission denied reaching the memd admin socket {path}: a directory on the way is"
                              " closed to this user") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise ValueError(f"{path} is not a socket (give memd's <state-dir>/admin.sock)")
    if not os.access(path, os.R_OK | os.W_OK):
        raise PermissionError(f"permission denied on the memd admin socket {path} (mode {stat.S_IMODE(st.st_mode):04o},"
                              f" owner uid {st.st_uid}): run moeinf admin as the user memd runs as")
    return path


# ---------------------------------------------------------------- commands
def _expert_key(text: str) -> a.ExpertKey:
    layer, sep, expert = text.partition(":")
    if not sep or not layer.isdigit() or not expert.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not LAYER:EXPERT (MoE layer and expert numbers, as 3:5)")
    return a.ExpertKey(int(layer), int(expert))


def _size(text: str) -> str:
    try:
        parse_size(text, what="size")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _resolved(text: str) -> str:
    return str(Path(text).expanduser().absolute())  # memd reads and writes it: relative to here, not to memd


REQUESTS = {  # command -> (op, request from the parsed arguments and the token)
    "stats": (Op.ADMIN_STATS, lambda args, t: a.AdminStatsRequest(t)),
    "experts": (Op.ADMIN_EXPERTS, lambda args, t: a.AdminExpertsRequest(t)),
    "resize": (Op.ADMIN_RESIZE, lambda args, t: a.ResizeRequest(t, args.size)),
    "policy": (Op.ADMIN_POLICY, lambda args, t: a.PolicyRequest(t, args.name)),
    "prefetch": (Op.ADMIN_PREFETCH, lambda args, t: a.PrefetchRequest(t, args.state == "on")),
    "eamc save": (Op.ADMIN_EAMC_SAVE, lambda args, t: a.EamcSaveRequest(t, _resolved(args.file))),
    "eamc load": (Op.ADMIN_EAMC_LOAD, lambda args, t: a.EamcLoadRequest(t, _resolved(args.file))),
    "eamc clear": (Op.ADMIN_EAMC_CLEAR, lambda args, t: a.EamcClearRequest(t)),
    "eamc match": (Op.ADMIN_EAMC_MATCH, lambda args, t: a.EamcMatchRequest(t, args.experts)),
    "pin": (Op.ADMIN_PIN, lambda args, t: a.PinRequest(t, args.experts)),
    "unpin": (Op.ADMIN_UNPIN, lambda args, t: a.UnpinRequest(t, args.experts)),
    "drop": (Op.ADMIN_DROP, lambda args, t: a.DropRequest(t)),
    "health": (Op.ADMIN_HEALTH, lambda args, t: a.AdminHealthRequest(t)),
}
assert set(REQUESTS) == set(PRINTERS)


def run(args: argparse.Namespace) -> int:
    cfg = build_config(AdminConfig, args)
    command = args.admin_command if args.admin_command != "eamc" else f"eamc {args.eamc_command}"
    op, make = REQUESTS[command]
    try:
        reply = call(cfg, op, make(args, cfg.admin_token))
    except AdminRefused as exc:
        print(f"moeinf admin {command}: memd refused: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(m.to_dict(reply), indent=2))
    else:
        print(PRINTERS[command](reply))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("admin", help="inspect and steer a running memd (stats, resize, policy, EAMC, pins)",
                       description="Talk to memd's admin socket (<state-dir>/admin.sock, mode 0600). Every knob is"
                                   " also an environment variable (shown in brackets).")
    add_config_args(p, AdminConfig, skip=("admin_socket",))
    p.add_argument("--socket", dest="admin_socket", metavar="PATH",
                   help="the admin socket: a path, or tcp://HOST:PORT [env MOEINF_ADMIN_SOCKET; default"
                        " <state-dir>/admin.sock]")
    p.add_argument("--json", action="store_true", help="print memd's reply as JSON")
    commands = p.add_subparsers(dest="admin_command", required=True, metavar="COMMAND")
    commands.add_parser("stats", help="pool occupancy, hits, misses, prefetch precision/recall, stall, reads per layer")
    commands.add_parser("experts", help="which experts are resident, pinned, loading, leaving, per layer")
    commands.add_parser("resize", help="change the pool size live (at most the size memd started with)").add_argument(
        "size", type=_size, metavar="SIZE", help="bytes (512MiB, 4GiB) or a share of all expert bytes (25%%)")
    commands.add_parser("policy", help="switch the eviction policy live").add_argument(
        "name", metavar="NAME", help="lru, lfu or activation")
    commands.add_parser("prefetch", help="switch prefetching on or off live (off cancels those in flight)"
                        ).add_argument("state", choices=["on", "off"])
    eamc = commands.add_parser("eamc", help="the EAM collection: save FILE, load FILE, clear, match L:E ...")
    eamc_commands = eamc.add_subparsers(dest="eamc_command", required=True, metavar="ACTION")
    eamc_commands.add_parser("save", help="write it to FILE (memd writes it)").add_argument("file", metavar="FILE")
    eamc_commands.add_parser("load", help="replace it with FILE's").add_argument("file", metavar="FILE")
    eamc_commands.add_parser("clear", help="forget every pattern")
    eamc_commands.add_parser("match", help="what it predicts for a request that routed these experts").add_argument(
        "experts", nargs="+", type=_expert_key, metavar="L:E")
    for name, text in (("pin", "load (if needed) and keep these experts until unpinned"),
                       ("unpin", "release experts the admin pinned")):
        commands.add_parser(name, help=text).add_argument("experts", nargs="+", type=_expert_key, metavar="L:E")
    commands.add_parser("drop", help="evict every expert not in use (those in use leave when released)")
    commands.add_parser("health", help="memd's pid, uptime and attached workers")
    p.set_defaults(func=run)
