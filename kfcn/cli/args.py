"""Argument types and helpers shared by every `kfcn` subcommand.

One syntax for each kind of value: sizes are "HxW" or "N" (`parse_size`),
booleans are absl's `--flag`, `--noflag`, `--flag=true|false` (`add_bool`).
Nothing here imports TensorFlow or Keras: `kfcn --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from kfcn.cli.errors import UsageError

_TRUE = ("1", "true", "t", "yes", "y")
_FALSE = ("0", "false", "f", "no", "n")


def parse_size(text: str, flag: str = "size") -> tuple[int, int]:
    """Parses "HxW" (e.g. "360x480") or "N" (square) into (height, width).

    Args:
        text: The flag's value.
        flag: The flag's name, for the error message.

    Raises:
        UsageError: naming `--flag` for anything but positive integers in that form.
    """
    parts = str(text).strip().lower().split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) == 1:
        values *= 2
    if len(values) != 2 or min(values) < 1:
        raise UsageError(
            f"--{flag} must be HxW (e.g. 360x480) or N, with positive integers. "
            f"Received: --{flag}={text!r}"
        )
    return values[0], values[1]


def size_type(flag: str):
    """An argparse `type=` that parses sizes with `parse_size`, naming `--flag`."""

    def parse(text: str) -> tuple[int, int]:
        return parse_size(text, flag)

    parse.__name__ = "size"
    return parse


def parse_bool(text: str | bool, flag: str = "flag") -> bool:
    """Parses absl's boolean spellings ("true", "false", "1", "0", ...)."""
    if isinstance(text, bool):
        return text
    value = str(text).strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise UsageError(f"--{flag} must be true or false. Received: --{flag}={text!r}")


def add_bool(parser: argparse.ArgumentParser, name: str, default: bool, help: str) -> None:
    """Adds an absl-style boolean: `--name`, `--noname`, `--name=true|false`."""

    def parse(text: str) -> bool:
        return parse_bool(text, name)

    parse.__name__ = "bool"
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        f"--{name}",
        nargs="?",
        const=True,
        default=default,
        type=parse,
        metavar="BOOL",
        help=f"{help} (default: {str(default).lower()}; --no{name} to disable)",
    )
    group.add_argument(f"--no{name}", dest=name, action="store_false", help=argparse.SUPPRESS)


def existing_path(flag: str):
    """An argparse `type=` that requires an existing file or directory."""

    def check(text: str) -> str:
        if not os.path.exists(text):
            raise UsageError(f"--{flag}: {text!r} does not exist.")
        return text

    check.__name__ = "path"
    return check


def read_settings_file(path: str) -> dict[str, Any]:
    """Reads a YAML or JSON settings file (a mapping of flag name to value).

    Raises:
        UsageError: naming `--config` when the file is missing or not a mapping.
    """
    if not os.path.isfile(path):
        raise UsageError(f"--config: {path!r} does not exist or is not a file.")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        if path.endswith(".json"):
            values = json.loads(text)
        else:
            import yaml

            values = yaml.safe_load(text)
    except Exception as error:  # noqa: BLE001 - any parse error is the user's file
        raise UsageError(f"--config: {path!r} is not valid YAML/JSON: {error}") from error
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise UsageError(
            f"--config: {path!r} must hold a mapping of setting name to value. "
            f"Received a {type(values).__name__}."
        )
    return values


def parse_with_config(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parses `argv`; values from `--config FILE` become defaults that flags override.

    The file's keys are the parser's flag names (as written by a run into its
    model_dir). An unknown key is a usage error naming the file and the key.
    """
    args = parser.parse_args(argv)
    path = getattr(args, "config", None)
    if not path:
        return args
    values = read_settings_file(path)
    known = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise UsageError(
            f"--config: {path!r} has unknown settings {unknown}; "
            f"known settings are the flags of this command."
        )
    converted = {}
    for name, value in values.items():
        action = known[name]
        if value is not None and action.type is not None and isinstance(value, str):
            value = action.type(value)
        elif value is not None and action.type is not None and name in _size_dests(parser):
            value = action.type("x".join(str(v) for v in value))
        if action.choices is not None and value is not None and value not in action.choices:
            raise UsageError(
                f"--config: {path!r} sets {name}={value!r}; allowed: {sorted(action.choices)}"
            )
        converted[name] = value
    parser.set_defaults(**converted)
    return parser.parse_args(argv)


def _size_dests(parser: argparse.ArgumentParser) -> set[str]:
    return {a.dest for a in parser._actions if getattr(a.type, "__name__", "") == "size"}
