"""The machinery behind the services' config dataclasses (common/config.py): a field with its help (``knob``), one
flag and one ``MOEINF_*`` variable per field, and building a dataclass from flags, then variables, then defaults."""
from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from dataclasses import field
from pathlib import Path

ENV_PREFIX = "MOEINF_"


def knob(default, help: str, **extra):
    """A config field with its help text (shown by ``--help``, together with its env variable)."""
    return field(default=default, metadata={"help": help, **extra})


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(tp):
    union = typing.get_origin(tp) in (typing.Union, types.UnionType)
    return next(a for a in typing.get_args(tp) if a is not type(None)) if union else tp


def _convert(tp, raw: str, name: str):
    base = _base_type(tp)
    if base is bool:
        low = str(raw).strip().lower()
        if low in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return low in ("1", "true", "yes", "on")
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
            parser.add_argument(flag_name(f.name), dest=f.name, default=None, nargs="?", const="on", metavar="on|off",
                                help=help_text)
        else:
            parser.add_argument(flag_name(f.name), dest=f.name, default=None, metavar=f.name.upper(), help=help_text)


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
            if raw == "" and _base_type(hints[f.name]) is Path:
                raw = None  # an empty path variable (compose's ${VAR:-}) is unset, not the working directory
        if raw is None:
            continue
        values[f.name] = raw if not isinstance(raw, str) else _convert(hints[f.name], raw, flag_name(f.name))
    return cls(**values)
