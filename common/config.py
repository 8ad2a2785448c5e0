"""Service configuration: one frozen dataclass per service, parsed once at the edge.

Every field is a CLI flag (``--expert-memory``) and an environment variable (``MOEINF_EXPERT_MEMORY``); the flag
wins over the variable, which wins over the default. Nothing below ``main()`` reads ``os.environ``.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

ENV_PREFIX = "MOEINF_"
PROTOCOL_VERSION = 1


def knob(default, help: str, **extra):
    """A config field with its help text (shown by ``--help``, together with its env variable)."""
    return field(default=default, metadata={"help": help, **extra})


def default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "moeinf"


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(tp):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def _convert(tp, raw: str, name: str):
    base = _base_type(tp)
    if base is bool:
        low = str(raw).strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{name}: {raw!r} is not a boolean (use on/off, true/false, 1/0)")
    try:
        return base(raw)
    except ValueError as exc:
        raise ValueError(f"{name}: {raw!r} is not a valid {base.__name__}") from exc


def add_config_args(parser: argparse.ArgumentParser, cls, *, skip: tuple[str, ...] = ()) -> None:
    """Add one flag per field of ``cls``; the help text names the env variable and the default."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = f"{f.metadata.get('help', '')} [env {env_name(f.name)}; default {default}]"
        help_text = help_text.replace("%", "%%")  # argparse %-formats help ("25%" would crash --help)
        if _base_type(hints[f.name]) is bool:
            parser.add_argument(_flag(f.name), dest=f.name, default=None, nargs="?", const="on", metavar="on|off",
                                help=help_text)
        else:
            parser.add_argument(_flag(f.name), dest=f.name, default=None, metavar=f.name.upper(), help=help_text)


def build_config(cls, args: argparse.Namespace | None = None, env: typing.Mapping[str, str] | None = None, **overrides):
    """Build ``cls`` from flags, then ``MOEINF_*`` variables, then defaults. Raises ValueError on a bad value."""
    env = os.environ if env is None else env
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        raw = overrides.get(f.name)
        if raw is None and args is not None:
            raw = getattr(args, f.name, None)
        if raw is None:
            raw = env.get(env_name(f.name))
        if raw is None:
            continue
        values[f.name] = raw if not isinstance(raw, str) else _convert(hints[f.name], raw, _flag(f.name))
    return cls(**values)


@dataclass(frozen=True, slots=True)
class MemdConfig:
    model: Path = knob(None, "Hugging Face checkpoint directory (config.json + *.safetensors)")
    expert_memory: str = knob("100%", "expert pool size: bytes (4GiB, 512MiB) or a share of all expert bytes (25%)")
    state_dir: Path = knob(default_state_dir(), "directory for sockets, the pool lock and the EAMC file")
    read_threads: int = knob(4, "threads reading experts from the checkpoint")
    direct_io: bool = knob(True, "read experts with O_DIRECT (bypass the page cache) where the file system allows")
    max_clients: int = knob(16, "most workers attached at once")
    handshake_timeout_s: float = knob(60.0, "seconds to wait for a peer during start-up")
    log_level: str = knob("info", "debug, info, warning or error")

    def __post_init__(self):
        if self.model is None:
            raise ValueError("--model is required (a checkpoint directory; env MOEINF_MODEL)")
        object.__setattr__(self, "model", Path(self.model))
        object.__setattr__(self, "state_dir", Path(self.state_dir))
        if self.read_threads < 1:
            raise ValueError("--read-threads must be >= 1")

    @property
    def rpc_addr(self) -> str:
        return f"ipc://{self.state_dir.resolve() / 'memd.sock'}"

    @property
    def trace_addr(self) -> str:
        return f"ipc://{self.state_dir.resolve() / 'memd-trace.sock'}"


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    model: Path = knob(None, "Hugging Face checkpoint directory (the one memd serves)")
    state_dir: Path = knob(default_state_dir(), "directory for sockets, the pool lock and the EAMC file")
    max_model_len: int = knob(0, "longest prompt + completion in tokens (0: the model's max_position_embeddings)")
    max_queued: int = knob(64, "most generation requests waiting in the worker before it refuses new ones")
    threads: int = knob(0, "torch intra-op threads (0: torch's default)")
    handshake_timeout_s: float = knob(60.0, "seconds to wait for memd during start-up")
    memd_timeout_s: float = knob(120.0, "seconds one expert acquire may take before memd is declared dead")
    log_level: str = knob("info", "debug, info, warning or error")

    def __post_init__(self):
        if self.model is None:
            raise ValueError("--model is required (a checkpoint directory; env MOEINF_MODEL)")
        object.__setattr__(self, "model", Path(self.model))
        object.__setattr__(self, "state_dir", Path(self.state_dir))

    @property
    def memd_rpc_addr(self) -> str:
        return f"ipc://{self.state_dir.resolve() / 'memd.sock'}"

    @property
    def memd_trace_addr(self) -> str:
        return f"ipc://{self.state_dir.resolve() / 'memd-trace.sock'}"

    @property
    def rpc_addr(self) -> str:
        return f"ipc://{self.state_dir.resolve() / 'worker.sock'}"


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    model: Path = knob(None, "checkpoint directory (its tokenizer is used; the worker serves the weights)")
    served_model_name: str = knob("", "model id clients send (default: the checkpoint directory's name)")
    host: str = knob("127.0.0.1", "address to listen on")
    port: int = knob(8000, "HTTP port")
    state_dir: Path = knob(default_state_dir(), "directory for sockets, the pool lock and the EAMC file")
    max_queued: int = knob(32, "requests admitted at once (running or waiting); beyond it the gateway answers 429")
    max_tokens_limit: int = knob(4096, "largest max_tokens a request may ask for")
    max_body_bytes: int = knob(1 << 20, "largest request body in bytes (413 above)")
    step_timeout_s: float = knob(600.0, "seconds without a token from the worker before a request fails with 503")
    log_level: str = knob("info", "debug, info, warning or error")

    def __post_init__(self):
        if self.model is None:
            raise ValueError("--model is required (a checkpoint directory; env MOEINF_MODEL)")
        object.__setattr__(self, "model", Path(self.model))
        object.__setattr__(self, "state_dir", Path(self.state_dir))
        if not self.served_model_name:
            object.__setattr__(self, "served_model_name", self.model.resolve().name)
        if self.max_queued < 1 or self.max_tokens_limit < 1:
            raise ValueError("--max-queued and --max-tokens-limit must be >= 1")

    @property
    def worker_addr(self) -> str:
        return f"ipc://{self.state_dir.resolve() / 'worker.sock'}"


@dataclass(frozen=True, slots=True)
class ServeConfig:
    """``moeinf serve``: the three services as supervised child processes."""

    model: Path | None = knob(None, "checkpoint directory; without it the demo model is built once and served")
    expert_memory: str = knob("25%", "expert pool size: bytes (4GiB, 512MiB) or a share of all expert bytes (25%)")
    state_dir: Path = knob(default_state_dir(), "directory for sockets, the pool lock and the EAMC file")
    host: str = knob("127.0.0.1", "address the gateway listens on")
    port: int = knob(8000, "gateway HTTP port")
    served_model_name: str = knob("", "model id clients send (default: the checkpoint directory's name)")
    max_queued: int = knob(32, "requests admitted at once (running or waiting); beyond it the gateway answers 429")
    demo_dir: Path = knob(Path(".cache/demo-model"), "where the demo model is built when --model is not given")
    startup_timeout_s: float = knob(600.0, "seconds each service may take to become ready")
    max_restarts: int = knob(5, "restarts of a crashing service before serve gives up")
    log_level: str = knob("info", "debug, info, warning or error")

    def __post_init__(self):
        object.__setattr__(self, "state_dir", Path(self.state_dir))
        object.__setattr__(self, "demo_dir", Path(self.demo_dir))
        if self.model is not None:
            object.__setattr__(self, "model", Path(self.model))
