"""The `kfcn` command: every command-line entry point of kfcn, in one place.

    kfcn train     trains an FCN (flags or --config FILE), resumable from its model_dir
    kfcn evaluate  the paper's four metrics of a model on a dataset split
    kfcn predict   class maps and overlays for image files, folders or globs
    kfcn export    SavedModel, TF Serving directory, TFLite or ONNX file
    kfcn demo      trains FCN-32s/16s/8s on generated data and shows what they do
    kfcn presets   the trained models that ship with kfcn (names work as --model)

Each subcommand is a module of this package with `HELP` (one line),
`add_arguments(parser)` and `run(args) -> int`; flags and their help sit in
`add_arguments`, the work in the flag-free library it calls. Modules import
TensorFlow only inside `run`, so `--help` is fast. Errors are one line on stderr
(exit 2 for usage, 1 for failures); `--debug` shows the traceback. A library
error that names a setting Keras-style ("`batch_size` must be ... Received:
batch_size=0") is shown with the flag's spelling ("--batch_size ... --batch_size=0").
`recipes/` and `export/` are presets that call `main` (with their own defaults).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from kfcn.cli.args import normalize_bools
from kfcn.cli.errors import FAILURE_EXIT_CODE, USAGE_EXIT_CODE, UsageError

#: Subcommand name -> (module, one-line help). Modules are imported on use only.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("kfcn.cli.train", "Train an FCN; resumes from --model_dir."),
    "evaluate": ("kfcn.cli.evaluate", "Evaluate a model on a dataset split (the paper's metrics)."),
    "predict": ("kfcn.cli.predict", "Segment image files, folders or globs."),
    "export": ("kfcn.cli.export", "Export to SavedModel, TF Serving, TFLite or ONNX."),
    "demo": ("kfcn.cli.demo", "Train FCN-32s/16s/8s on generated data and show the results."),
    "presets": ("kfcn.cli.presets", "List the shipped trained models and their model cards."),
}


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors become `UsageError` (one line, exit 2)."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        raise UsageError(message)

    def parse_known_args(self, args=None, namespace=None):  # noqa: D102 - argparse's
        if args is not None:
            args = normalize_bools(self._actions, list(args))
        return super().parse_known_args(args, namespace)

    def _get_value(self, action: argparse.Action, arg_string: str) -> Any:
        # argparse turns a `type=` function's ValueError into "invalid <type> value";
        # kfcn's types raise UsageError with a better message (the flag, the syntax).
        parse = self._registry_get("type", action.type, action.type)
        if callable(parse):
            try:
                return parse(arg_string)
            except UsageError:
                raise
            except Exception:  # noqa: BLE001 - argparse words the others
                pass
        return super()._get_value(action, arg_string)


def _top_help(prog: str) -> str:
    width = max(len(name) for name in COMMANDS)
    lines = [
        f"usage: {prog} [--debug] COMMAND [flags]",
        "",
        "Fully Convolutional Networks (Long, Shelhamer, Darrell) in Keras.",
        "",
        "commands:",
    ]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", f"`{prog} COMMAND --help` lists a command's flags. --debug shows tracebacks."]
    return "\n".join(lines)


def build_parser(
    command: str,
    prog: str = "kfcn",
    *,
    defaults: Mapping[str, Any] | None = None,
    choices: Mapping[str, Sequence[str]] | None = None,
) -> argparse.ArgumentParser:
    """The argparse parser of one subcommand (imports only its module).

    Args:
        command: A key of `COMMANDS`.
        prog: The program name shown in usage and errors.
        defaults: A preset's flag defaults (flag name -> value as typed on the
            command line, e.g. "512x512"); `--help` shows them.
        choices: Narrower allowed values of some flags (flag name -> values).

    Raises:
        ValueError: if `defaults` or `choices` name flags the command does not have.
    """
    module = importlib.import_module(COMMANDS[command][0])
    parser = _Parser(
        prog=f"{prog} {command}" if prog == "kfcn" else prog,
        description=(module.__doc__ or COMMANDS[command][1]).strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    module.add_arguments(parser)
    parser.add_argument("--debug", action="store_true", help="Show tracebacks of errors.")
    actions = {a.dest: a for a in reversed(parser._actions)}  # the flag, not its --no twin
    unknown = sorted((set(defaults or {}) | set(choices or {})) - set(actions))
    if unknown:
        raise ValueError(f"Preset names flags that `{prog} {command}` does not have: {unknown}")
    if defaults:
        parser.set_defaults(**defaults)
    for name, allowed in (choices or {}).items():
        actions[name].choices = tuple(allowed)
    return parser


def _flag_spelling(message: str, parser: argparse.ArgumentParser) -> str:
    """Rewrites a library message's Keras-style setting names as this command's flags."""
    dests = {a.dest for a in parser._actions if a.option_strings}

    def backticked(match: re.Match) -> str:
        return f"--{match.group(1)}" if match.group(1) in dests else match.group(0)

    def assigned(match: re.Match) -> str:
        return f"--{match.group(1)}=" if match.group(1) in dests else match.group(0)

    message = re.sub(r"`(\w+)`", backticked, message)
    return re.sub(r"(?<![\w-])(\w+)=", assigned, message)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text


def main(
    argv: Sequence[str] | None = None,
    *,
    prog: str = "kfcn",
    defaults: Mapping[str, Any] | None = None,
    choices: Mapping[str, Sequence[str]] | None = None,
) -> int:
    """Runs `kfcn ARGV`; returns the exit code (0, 1 failure, 2 usage).

    Args:
        argv: The command line after the program name (default `sys.argv[1:]`).
        prog: The program name in usage lines and error messages.
        defaults: A preset's flag defaults for the subcommand (see `build_parser`).
        choices: A preset's narrower flag choices (see `build_parser`).

    Example:
        ```python
        # recipes/train_camvid.py: a preset of `kfcn train`
        sys.exit(kfcn.cli.main(["train", *sys.argv[1:]], prog="train_camvid.py",
                               defaults={"dataset": "camvid", "crop_size": "360x480"}))
        ```
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if debug:
        argv.remove("--debug")
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_top_help(prog))
        return 0 if argv else USAGE_EXIT_CODE
    command, rest = argv[0], argv[1:]
    try:
        if command not in COMMANDS:
            raise UsageError(
                f"unknown command {command!r}; choose one of {', '.join(COMMANDS)} "
                f"(`{prog} --help`)."
            )
        return run_command(
            command, rest, prog=prog, debug=debug, defaults=defaults, choices=choices
        )
    except UsageError as error:
        return _report(prog, command, error, USAGE_EXIT_CODE, debug)


def run_command(
    command: str,
    argv: Sequence[str],
    *,
    prog: str = "kfcn",
    debug: bool = False,
    defaults: Mapping[str, Any] | None = None,
    choices: Mapping[str, Sequence[str]] | None = None,
) -> int:
    """Parses `argv` for `command` and runs it, turning errors into one line."""
    module = importlib.import_module(COMMANDS[command][0])
    parser = None
    try:
        parser = build_parser(command, prog, defaults=defaults, choices=choices)
        parse = getattr(module, "parse_args", None)
        args = parse(parser, list(argv)) if parse else parser.parse_args(list(argv))
        _configure_logging()
        if not debug:
            _start_tensorflow_quietly()
        return int(module.run(args) or 0)
    except UsageError as error:
        return _report(prog, command, error, USAGE_EXIT_CODE, debug)
    except KeyboardInterrupt:
        print(f"{_where(prog, command)}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - one line for the user, --debug for us
        # CommandError and UsageError carry their code; anything else is a failure.
        code = getattr(error, "exit_code", FAILURE_EXIT_CODE)
        return _report(prog, command, error, code, debug, parser)


def _where(prog: str, command: str) -> str:
    # A preset (prog "train_camvid.py") is its own program; `kfcn` names the command.
    if prog != "kfcn" or command not in COMMANDS:
        return prog
    return f"{prog} {command}"


def _report(
    prog: str,
    command: str,
    error: BaseException,
    code: int,
    debug: bool,
    parser: argparse.ArgumentParser | None = None,
) -> int:
    if debug:
        import traceback

        traceback.print_exception(error)
    message = _one_line(error)
    if parser is not None:
        message = _flag_spelling(message, parser)
    print(f"{_where(prog, command)}: error: {message}", file=sys.stderr)
    return code


def _configure_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=os.environ.get("KFCN_LOG_LEVEL", "INFO"),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            datefmt="%H:%M:%S",
        )
    # TensorFlow's C++ start-up chatter is not the user's business.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _start_tensorflow_quietly() -> None:
    """Imports TensorFlow and lists its devices with file descriptor 2 silenced.

    TF 2.21 writes its C++ start-up lines (oneDNN, CPU features, "Could not find
    cuda drivers", "failed call to cuInit") straight to fd 2 before any log
    setting applies, so no environment variable hides them; a command's stderr
    is for its own one-line errors. `--debug` leaves them visible. Listing
    physical devices does not initialise the runtime, so `--cpu_replicas` can
    still split the CPU afterwards.
    """
    if "tensorflow" in sys.modules:
        return
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        import tensorflow as tf

        tf.config.list_physical_devices()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def entry_point() -> None:
    """The console script `kfcn`."""
    sys.exit(main())
