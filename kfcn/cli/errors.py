"""The command layer's two kinds of error and their exit codes.

A command prints one line on stderr for either, never a traceback (`--debug`
shows it): `UsageError` (exit 2) for what the user typed (a flag, a size, an
unknown dataset, a missing input file), `CommandError` (exit 1) for a job that
failed (a model that does not load, a dataset not downloaded yet).
"""

from __future__ import annotations

USAGE_EXIT_CODE = 2
FAILURE_EXIT_CODE = 1


class UsageError(ValueError):
    """A flag or argument is wrong; the message names it and says what to do."""

    exit_code = USAGE_EXIT_CODE


class CommandError(RuntimeError):
    """The job could not be done; the message names the file or flag and what to do."""

    exit_code = FAILURE_EXIT_CODE
