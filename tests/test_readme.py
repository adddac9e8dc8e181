"""README's commands are true: each parses, and the quick-start ones run at tiny settings.

Every `kfcn ...`, `python recipes/...` and `python export/...` line of README's shell
blocks is collected (continuation lines joined, comments dropped). Each is parsed by
the real command parser: a renamed flag or a removed choice fails here. The blocks
that README marks `<!-- docs-test: run -->` (the demo and "your own data" quick start)
are then run in order in a temporary directory through the installed `kfcn` script,
with the overrides of `TINY` appended so that they finish in seconds.
"""

from __future__ import annotations

import glob
import importlib
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
RUN_MARK = "<!-- docs-test: run -->"

#: Flags appended to README's commands when the docs test runs them (later flags win).
TINY = {
    "demo": ["--quick"],
    "train": ["--steps", "4", "--batch_size", "2", "--crop_size", "64x64", "--log_every", "2"],
    "evaluate": [],
    "predict": [],
    "export": [],
}


def _blocks(text: str) -> list[tuple[bool, str]]:
    """(marked to run, body) of each fenced shell block (bash, sh, shell, console)."""
    blocks, body, language, marked, previous = [], None, "", False, ""
    for line in text.splitlines():
        if body is None and line.startswith("```"):
            body, language = [], line[3:].strip()
            marked = previous.strip() == RUN_MARK
        elif body is not None and line.startswith("```"):
            if language in ("bash", "sh", "shell", "console"):
                blocks.append((marked, "\n".join(body)))
            body = None
        elif body is not None:
            body.append(line)
        if line.strip():
            previous = line
    return blocks


def _commands(body: str) -> list[str]:
    joined = re.sub(r"\\\n\s*", " ", body)
    commands = []
    for line in joined.splitlines():
        line = line.split(" #", 1)[0].strip() if not line.strip().startswith("#") else ""
        for part in line.split("&&"):
            part = re.sub(r"^\.venv/bin/", "", part.strip())
            if part.startswith(("kfcn ", "python recipes/", "python export/", "python -m kfcn ")):
                commands.append(part)
    return commands


def _readme_commands() -> list[tuple[bool, str]]:
    with open(README, encoding="utf-8") as f:
        text = f.read()
    return [(run, cmd) for run, body in _blocks(text) for cmd in _commands(body)]


def _kfcn_argv(command: str) -> list[str]:
    """The `kfcn` argv a README command amounts to (a preset script is its subcommand)."""
    words = shlex.split(command)
    if words[0] == "kfcn":
        return words[1:]
    if words[:3] == ["python", "-m", "kfcn"]:
        return words[3:]
    script = os.path.join(ROOT, words[1])
    presets = {
        "recipes/train_voc.py": "train",
        "recipes/train_camvid.py": "train",
        "recipes/train_cityscapes.py": "train",
        "recipes/evaluate.py": "evaluate",
    }
    assert os.path.exists(script), f"README runs {words[1]}, which does not exist"
    if words[1] in presets:
        return [presets[words[1]], *words[2:]]
    fmt = os.path.splitext(os.path.basename(words[1]))[0]
    return ["export", fmt, *words[2:]]


def test_readme_has_commands_of_every_subcommand():
    from kfcn.cli import COMMANDS

    seen = {_kfcn_argv(cmd)[0] for _, cmd in _readme_commands()}
    assert set(COMMANDS) <= seen, f"README shows no example of {sorted(set(COMMANDS) - seen)}"


def test_every_readme_command_parses():
    from kfcn.cli import COMMANDS, build_parser
    from kfcn.cli.errors import UsageError

    failures = []
    for _, command in _readme_commands():
        argv = _kfcn_argv(command)
        name, rest = argv[0], argv[1:]
        parser = build_parser(name)
        module = importlib.import_module(COMMANDS[name][0])
        parse = getattr(module, "parse_args", None)
        try:
            parse(parser, rest) if parse else parser.parse_args(rest)
        except UsageError as error:
            # README's data and model paths are examples: only a missing path may fail.
            if "does not exist" not in str(error):
                failures.append(f"{command}\n    -> {error}")
        except SystemExit as stop:
            if stop.code:
                failures.append(f"{command}\n    -> exit {stop.code}")
    assert not failures, "README commands that do not parse:\n" + "\n".join(failures)


@pytest.mark.slow
def test_readme_quick_start_runs(tmp_path):
    """README's marked blocks, in order, at tiny settings, as a new user types them."""
    kfcn = shutil.which("kfcn", path=os.path.dirname(sys.executable)) or shutil.which("kfcn")
    assert kfcn, "the kfcn console script is not installed (pip install -e .)"
    runnable = [_kfcn_argv(cmd) for run, cmd in _readme_commands() if run]
    assert [argv[0] for argv in runnable][:1] == ["demo"], runnable
    assert {"train", "evaluate", "predict", "export"} <= {argv[0] for argv in runnable}, runnable
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    for argv in runnable:
        command = " ".join(argv)
        argv = argv + TINY.get(argv[0], [])
        # Globs in README are the shell's: expand them here as the shell would.
        expanded = []
        for word in argv:
            if any(c in word for c in "*?["):
                matches = sorted(glob.glob(str(tmp_path / word)))
                assert matches, f"README's {word!r} matched nothing after the commands before it"
                expanded += [os.path.relpath(m, tmp_path) for m in matches]
            else:
                expanded.append(word)
        result = subprocess.run(
            [kfcn, *expanded],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )
        assert result.returncode == 0, f"{command}\n{result.stderr[-3000:]}"
