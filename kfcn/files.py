"""Atomic writes: the one way kfcn puts a file or directory in place.

Every artifact (a model, a settings or results file, an export) is built under
a temporary name beside its destination and renamed into place only when
complete, so a reader (a model server polling a directory, a resumed run, a
build step) never sees a half-written one, and a failed or killed writer leaves
nothing at the destination but the previous complete version.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from collections.abc import Iterator
from typing import Any


def _temp_sibling(final_path: str, tag: str) -> str:
    parent, name = os.path.split(os.path.abspath(final_path))
    return os.path.join(parent, f".{name}.{tag}-{os.getpid()}")


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def replace_path(tmp_path: str, final_path: str, overwrite: bool) -> None:
    """Renames a finished artifact into place.

    Without `overwrite`, an existing `final_path` is an error (checked again here,
    as another process may have written it meanwhile). With `overwrite`, a file
    is replaced by one `os.replace`; a directory is first renamed aside and
    deleted after the new one is in place, so `final_path` is always either the
    complete old or the complete new artifact (apart from the instant between
    the two renames).

    Raises:
        FileExistsError: If `final_path` exists and `overwrite` is False.
    """
    if os.path.lexists(final_path):
        if not overwrite:
            raise FileExistsError(
                f"Output {final_path!r} already exists; pass overwrite=True (--overwrite) "
                "to replace it"
            )
        if not os.path.isdir(final_path) or os.path.islink(final_path):
            os.replace(tmp_path, final_path)
            return
        old = _temp_sibling(final_path, "old")
        os.rename(final_path, old)
        os.rename(tmp_path, final_path)
        _remove(old)
    else:
        os.rename(tmp_path, final_path)


@contextlib.contextmanager
def atomic_output(
    final_path: str | os.PathLike,
    overwrite: bool = True,
    is_dir: bool = False,
    suffix: str = "",
) -> Iterator[str]:
    """Yields a temporary path to build an artifact in; renames it on success.

    Args:
        final_path: Where the artifact goes.
        overwrite: Replace an existing artifact instead of failing.
        is_dir: Whether the artifact is a directory (created empty) or a file.
        suffix: Ending of the temporary name (e.g. ".keras", which Keras requires).

    Yields:
        The temporary path, in the same directory as `final_path` (so the final
        rename is atomic on POSIX file systems).

    Raises:
        FileExistsError: If `final_path` exists and `overwrite` is False (checked
            before any work is done).
        FileNotFoundError: If the parent directory of `final_path` does not exist.
    """
    final_path = os.path.abspath(os.fspath(final_path))
    if os.path.lexists(final_path) and not overwrite:
        raise FileExistsError(
            f"Output {final_path!r} already exists; pass overwrite=True (--overwrite) to replace it"
        )
    parent = os.path.dirname(final_path)
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"Output directory {parent!r} does not exist")
    tmp = _temp_sibling(final_path, "tmp") + suffix
    _remove(tmp)
    if is_dir:
        os.makedirs(tmp)
    try:
        yield tmp
        replace_path(tmp, final_path, overwrite)
    except BaseException:
        _remove(tmp)
        raise


def write_text_atomically(text: str, path: str | os.PathLike) -> None:
    """Writes `text` (UTF-8) to `path`, creating its directory, atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_output(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)


def json_safe(value: Any) -> Any:
    """`value` with non-finite floats (undefined scores, see `kfcn.metrics.scores`) as None.

    JSON has no NaN; `json.dumps` would write the non-standard `NaN` token.
    """
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def write_json_atomically(obj: Any, path: str | os.PathLike) -> None:
    """Writes `obj` as indented, key-sorted JSON to `path`, atomically; NaN as null."""
    text = json.dumps(json_safe(obj), indent=2, sort_keys=True, allow_nan=False)
    write_text_atomically(text + "\n", path)


def save_model_atomically(model: Any, path: str | os.PathLike) -> None:
    """Saves a Keras model to `path` (ending in ".keras"), atomically.

    Raises:
        ValueError: if `path` does not end in ".keras".
    """
    if not os.fspath(path).endswith(".keras"):
        raise ValueError(f"`path` must end in '.keras'. Received: path={os.fspath(path)!r}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_output(path, suffix=".keras") as tmp:
        model.save(tmp, overwrite=True)
