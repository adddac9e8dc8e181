"""The `kfcn` command: every command-line entry point of kfcn, in one place.

    kfcn train     trains an FCN (flags or --config FILE), resumable from its model_dir
    kfcn evaluate  the paper's four metrics of a model on a dataset split
    kfcn predict   class maps and overlays for image files, folders or globs
    kfcn export    SavedModel, TF Serving directory or TFLite file
    kfcn demo      trains FCN-32s/16s/8s on generated data and shows what they do

Each subcommand is a module of this package with `HELP` (one line),
`add_arguments(parser)` and `run(args) -> int`; flags and their help sit in
`add_arguments`, the work in the flag-free library it calls. Modules import
TensorFlow only inside `run`, so `--help` is fast. Errors are one line on stderr
(exit 2 for usage, 1 for failures); `--debug` shows the traceback. `recipes/`
and `export/` are presets that call `main`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from kfcn.cli.errors import FAILURE_EXIT_CODE, USAGE_EXIT_CODE, CommandError, UsageError

#: Subcommand name -> (module, one-line help). Modules are imported on use only.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("kfcn.cli.train", "Train an FCN; resumes from --model_dir."),
    "evaluate": ("kfcn.cli.evaluate", "Evaluate a model on a dataset split (the paper's metrics)."),
    "predict": ("kfcn.cli.predict", "Segment image files, folders or globs."),
    "export": ("kfcn.cli.export", "Export to SavedModel, TF Serving or TFLite."),
    "demo": ("kfcn.cli.demo", "Train FCN-32s/16s/8s on generated data and show the results."),
}


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors become `UsageError` (one line, exit 2)."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        raise UsageError(message)


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


def build_parser(command: str, prog: str = "kfcn") -> argparse.ArgumentParser:
    """The argparse parser of one subcommand (imports only its module)."""
    module = importlib.import_module(COMMANDS[command][0])
    parser = _Parser(
        prog=f"{prog} {command}",
        description=(module.__doc__ or COMMANDS[command][1]).strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    module.add_arguments(parser)
    parser.add_argument("--debug", action="store_true", help="Show tracebacks of errors.")
    return parser


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text


def main(argv: Sequence[str] | None = None, *, prog: str = "kfcn") -> int:
    """Runs `kfcn ARGV`; returns the exit code (0, 1 failure, 2 usage)."""
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
        return run_command(command, rest, prog=prog, debug=debug)
    except UsageError as error:
        return _report(prog, command, error, USAGE_EXIT_CODE, debug)


def run_command(command: str, argv: Sequence[str], *, prog: str = "kfcn", debug: bool = False):
    """Parses `argv` for `command` and runs it, turning errors into one line."""
    module = importlib.import_module(COMMANDS[command][0])
    try:
        parser = build_parser(command, prog)
        parse = getattr(module, "parse_args", None)
        args = parse(parser, list(argv)) if parse else parser.parse_args(list(argv))
        _configure_logging()
        return int(module.run(args) or 0)
    except UsageError as error:
        return _report(prog, command, error, USAGE_EXIT_CODE, debug)
    except (CommandError, FileNotFoundError, OSError, ValueError) as error:
        return _report(prog, command, error, FAILURE_EXIT_CODE, debug)
    except KeyboardInterrupt:
        print(f"{prog} {command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - one line for the user, --debug for us
        return _report(prog, command, error, FAILURE_EXIT_CODE, debug)


def _report(prog: str, command: str, error: BaseException, code: int, debug: bool) -> int:
    if debug:
        import traceback

        traceback.print_exception(error)
    where = f"{prog} {command}" if command in COMMANDS else prog
    print(f"{where}: error: {_one_line(error)}", file=sys.stderr)
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


def entry_point() -> None:
    """The console script `kfcn`."""
    sys.exit(main())
