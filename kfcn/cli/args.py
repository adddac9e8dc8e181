"""Argument types and helpers shared by every `kfcn` subcommand.

One syntax for each kind of value: sizes are "HxW" or "N" (`parse_size`),
ranges "min,max" (`range_type`), lists "a,b,c" (`names_type`), booleans absl's
`--flag`, `--noflag`, `--flag=true|false` (`add_bool`). In a `--config` file the
same values may also be YAML lists (`crop_size: [360, 480]`), as runs write them.
Nothing here imports TensorFlow or Keras: `kfcn --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

from kfcn.cli.errors import UsageError

_TRUE = ("1", "true", "t", "yes", "y")
_FALSE = ("0", "false", "f", "no", "n")


def parse_size(text: str | Sequence[int], flag: str = "size") -> tuple[int, int]:
    """Parses "HxW" (e.g. "360x480") or "N" (square) into (height, width).

    Args:
        text: The flag's value; a sequence of one or two ints (from a settings
            file) is accepted too.
        flag: The flag's name, for the error message.

    Raises:
        UsageError: naming `--flag` for anything but positive integers in that form.
    """
    parts = list(text) if isinstance(text, (list, tuple)) else str(text).strip().lower().split("x")
    try:
        values = [int(p) for p in parts]
    except (TypeError, ValueError):
        values = []
    if len(values) == 1:
        values *= 2
    if len(values) != 2 or min(values) < 1:
        shown = "x".join(str(p) for p in text) if isinstance(text, (list, tuple)) else text
        raise UsageError(
            f"--{flag} must be HxW (e.g. 360x480) or N, with positive integers. "
            f"Received: --{flag}={shown!r}"
        )
    return values[0], values[1]


def _sequence_type(parse: Callable[[Any], Any], name: str) -> Callable[[Any], Any]:
    parse.__name__ = name
    parse.accepts_sequence = True  # a settings file may hold a YAML list
    return parse


def size_type(flag: str) -> Callable[[Any], tuple[int, int]]:
    """An argparse `type=` that parses sizes with `parse_size`, naming `--flag`."""
    return _sequence_type(lambda text: parse_size(text, flag), "size")


def range_type(flag: str) -> Callable[[Any], tuple[float, float]]:
    """An argparse `type=` for "min,max" with 0 < min <= max, naming `--flag`."""

    def parse(text: Any) -> tuple[float, float]:
        parts = list(text) if isinstance(text, (list, tuple)) else str(text).split(",")
        try:
            low, high = (float(p) for p in parts)
        except (TypeError, ValueError):
            low = high = float("nan")
        if not 0 < low <= high:
            raise UsageError(
                f"--{flag} must be 'min,max' with 0 < min <= max (e.g. 0.5,2.0). "
                f"Received: --{flag}={text!r}"
            )
        return low, high

    return _sequence_type(parse, "range")


def scales_type(flag: str) -> Callable[[Any], tuple[float, ...]]:
    """An argparse `type=` for comma-separated positive resize factors, naming `--flag`."""

    def parse(text: Any) -> tuple[float, ...]:
        parts = list(text) if isinstance(text, (list, tuple)) else str(text).split(",")
        try:
            values = tuple(float(p) for p in parts)
        except (TypeError, ValueError):
            values = ()
        if not values or not all(v > 0 for v in values):
            raise UsageError(
                f"--{flag} must be comma-separated positive numbers (e.g. 0.75,1.0,1.25). "
                f"Received: --{flag}={text!r}"
            )
        return values

    return _sequence_type(parse, "scales")


def names_type(flag: str) -> Callable[[Any], tuple[str, ...]]:
    """An argparse `type=` for a comma-separated list of names, naming `--flag`."""

    def parse(text: Any) -> tuple[str, ...]:
        parts = list(text) if isinstance(text, (list, tuple)) else str(text).split(",")
        names = tuple(str(p).strip() for p in parts)
        if not names or not all(names):
            raise UsageError(
                f"--{flag} must be comma-separated non-empty names (e.g. sky,road,car). "
                f"Received: --{flag}={text!r}"
            )
        return names

    return _sequence_type(parse, "names")


def mapping_type(flag: str, value_type: Callable[[Any], Any]) -> Callable[[Any], dict[str, Any]]:
    """An argparse `type=` for "key:value,key:value" (e.g. sem:33,geo:3), naming `--flag`.

    A settings file may hold a YAML mapping (`heads: {sem: 33, geo: 3}`) instead.
    """

    def parse(text: Any) -> dict[str, Any]:
        items = (
            list(text.items())
            if isinstance(text, dict)
            else [part.partition(":")[::2] for part in str(text).split(",")]
        )
        try:
            values = {str(k).strip(): value_type(v) for k, v in items}
        except (TypeError, ValueError):
            values = {}
        if not values or not all(values) or len(values) != len(items):
            raise UsageError(
                f"--{flag} must be comma-separated name:value pairs (e.g. sem:33,geo:3). "
                f"Received: --{flag}={text!r}"
            )
        return values

    parse.__name__ = "mapping"
    parse.accepts_mapping = True
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
    """Adds an absl-style boolean: `--name`, `--noname`, `--name=true|false`.

    `--name` takes no separate value (as in absl), so `--probabilities image.png`
    leaves `image.png` a positional argument; `--name=false` is rewritten to
    `--noname` by `normalize_bools` before parsing.
    """
    group = parser.add_mutually_exclusive_group()
    action = group.add_argument(
        f"--{name}",
        action="store_true",
        default=default,
        help=f"{help} (default: %(default)s; --no{name} or --{name}=false to disable)",
    )
    action.kfcn_bool = True
    group.add_argument(f"--no{name}", dest=name, action="store_false", help=argparse.SUPPRESS)


def normalize_bools(actions: list[argparse.Action], argv: list[str]) -> list[str]:
    """Rewrites `--name=VALUE` of `add_bool` flags as `--name` or `--noname`.

    Raises:
        UsageError: naming the flag when VALUE is not a boolean spelling.
    """
    names = {
        option[2:]
        for action in actions
        if getattr(action, "kfcn_bool", False)
        for option in action.option_strings
    }
    out = []
    for arg in argv:
        flag, sep, value = arg.partition("=")
        if sep and flag.startswith("--") and flag[2:] in names:
            arg = flag if parse_bool(value, flag[2:]) else f"--no{flag[2:]}"
        out.append(arg)
    return out


def existing_path(flag: str):
    """An argparse `type=` that requires an existing file or directory."""

    def check(text: str) -> str:
        if not os.path.exists(text):
            raise UsageError(f"--{flag}: {text!r} does not exist.")
        return text

    check.__name__ = "path"
    return check


def model_path(flag: str):
    """An argparse `type=` for a model: an existing path, or a preset's name.

    A preset name (`kfcn.list_presets()`) becomes the path of its `.keras` file,
    written once to the cache (`kfcn.presets.preset_model_path`); an existing
    path of the same name wins.
    """

    def check(text: str) -> str:
        from kfcn import presets

        if os.path.exists(text):
            return text
        if presets.is_preset(text):
            try:
                return presets.preset_model_path(text)
            except presets.PresetError as error:
                raise UsageError(f"--{flag}: {error}") from error
        known = ", ".join(presets.preset_names()) or "none"
        raise UsageError(
            f"--{flag}: {text!r} does not exist and is not a preset (shipped presets: {known})."
        )

    check.__name__ = "model"
    return check


def add_input_scale(parser: argparse.ArgumentParser) -> None:
    """The `--input_scale` flag of the commands that take a `--model`."""
    parser.add_argument(
        "--input_scale",
        type=float,
        default=None,
        metavar="S",
        help="Run the net at S times each image's height and width, its logits resized back "
        "(kfcn.with_input_scale; a .keras model or a preset). Default: the model's own, which "
        "for a preset is its card's input_scale; 1.0 gives the plain net.",
    )


def apply_input_scale(args: argparse.Namespace) -> None:
    """Points `args.model` at the model rescaled to `--input_scale`, if given.

    The rescaled file is written once to the cache (`kfcn.input_scale.scaled_model_file`).

    Raises:
        UsageError: naming `--input_scale`.
    """
    if getattr(args, "input_scale", None) is None:
        return
    from kfcn.input_scale import scaled_model_file

    try:
        args.model = scaled_model_file(args.model, args.input_scale)
    except ValueError as error:
        raise UsageError(f"--input_scale: {error}") from error


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
    known: dict[str, argparse.Action] = {}
    for action in parser._actions:
        if action.dest not in ("help", "config"):
            known.setdefault(action.dest, action)  # the flag itself, not its --no twin
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise UsageError(
            f"--config: {path!r} has unknown settings {unknown}; "
            f"known settings are the flags of this command."
        )
    converted = {}
    for name, value in values.items():
        action = known[name]
        sequence = isinstance(value, (list, tuple))
        if action.type is not None and (
            isinstance(value, str)
            or (sequence and getattr(action.type, "accepts_sequence", 0))
            or (isinstance(value, dict) and getattr(action.type, "accepts_mapping", 0))
        ):
            value = action.type(value)
        if action.choices is not None and value is not None and value not in action.choices:
            raise UsageError(
                f"--config: {path!r} sets {name}={value!r}; allowed: {', '.join(action.choices)}"
            )
        converted[name] = value
    parser.set_defaults(**converted)
    return parser.parse_args(argv)
