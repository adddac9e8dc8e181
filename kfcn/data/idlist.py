"""Datasets given by a list of image ids, each id naming several files: NYUDv2 and SIFT Flow.

The FCN authors' data layers (`nyud_layers.py`, `siftflow_layers.py` in
shelhamer/fcn.berkeleyvision.org) read `<root>/<split>.txt`, one image id per line, and build
every file's path from the id: colour image, depth, HHA, and MATLAB `.mat` label files. This
module holds what such loaders share, with the checks of `kfcn.data.listfile`: every missing
file is reported in one error naming the list line, each example is checked before training
starts (headers, `.mat` keys and sizes; `validate="full"` decodes everything), `on_error="skip"`
drops bad examples with one warning, and whatever a check could not see raises while decoding,
naming the file.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from kfcn.data import listfile
from kfcn.data.images import DataError

if TYPE_CHECKING:
    import tensorflow as tf


__all__ = [
    "IdExample",
    "build_dataset",
    "check_examples",
    "check_options",
    "check_same_size",
    "map_label_values",
    "mat_shape",
    "read_id_list",
    "read_mat_variable",
]


@dataclass(frozen=True)
class IdExample:
    """One id of a split list and the files it names.

    Attributes:
        name: the image id.
        files: role (e.g. "image", "depth", "label") -> path.
        where: "list_file:line" for error messages.
    """

    name: str
    files: dict[str, str]
    where: str


def read_id_list(list_file: str | os.PathLike, strict: bool = True) -> list[tuple[str, str]]:
    """Reads a split list of image ids, one per line.

    Blank lines are skipped; surrounding whitespace is stripped.

    Args:
        list_file: the list file.
        strict: refuse lines of several tokens and ids listed twice. False reads the first
            token of each line and keeps repeats, as VOC's and SBD's own lists need.

    Returns:
        (id, "list_file:line") pairs in file order.

    Raises:
        DataError: missing or unreadable list, a line holding more than one token, an id listed
            twice (both lines named), or no ids at all.
    """
    list_file = os.fspath(list_file)
    try:
        with open(list_file, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError as e:
        raise DataError(f"{list_file}: split list not found") from e
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{list_file}: cannot read split list: {e}") from e
    ids: list[tuple[str, str]] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        if not text:
            continue
        if not strict:
            ids.append((text.split()[0], f"{list_file}:{number}"))
            continue
        if len(text.split()) != 1:
            raise DataError(f"{list_file}:{number}: expected one image id per line, got {text!r}")
        if text in seen:
            raise DataError(
                f"{list_file}:{number}: id {text!r} is listed twice (first at line {seen[text]})"
            )
        seen[text] = number
        ids.append((text, f"{list_file}:{number}"))
    if not ids:
        raise DataError(f"{list_file} is empty: the split list has no ids (empty split)")
    return ids


def _loadmat(path: str) -> dict[str, Any]:
    import scipy.io  # Only the .mat readers need scipy.

    try:
        return scipy.io.loadmat(path)
    except FileNotFoundError as e:
        raise DataError(f"{path}: label file does not exist") from e
    except Exception as e:  # scipy raises several types for bad files.
        raise DataError(f"{path}: cannot read .mat label file: {e}") from e


def read_mat_variable(path: str | os.PathLike, key: str) -> np.ndarray:
    """Reads the 2-D integer array stored under `key` in a MATLAB .mat file.

    Args:
        path: the .mat file.
        key: the variable name (NYUDv2 "segmentation", SIFT Flow "S").

    Returns:
        The array as int64 [H, W].

    Raises:
        DataError: unreadable file, no `key` (the message lists the keys present), an array
            that is not 2-D, or values that are not integers.
    """
    path = os.fspath(path)
    mat = _loadmat(path)
    if key not in mat:
        present = sorted(k for k in mat if not k.startswith("__"))
        raise DataError(f"{path}: no variable {key!r} in the .mat file (variables: {present})")
    values = np.asarray(mat[key])
    if values.ndim != 2 or values.size == 0:
        raise DataError(f"{path}: {key!r} must be a 2-D label map; got shape {values.shape}")
    if not np.issubdtype(values.dtype, np.number) or (
        not np.issubdtype(values.dtype, np.integer) and np.any(values != np.round(values))
    ):
        raise DataError(f"{path}: {key!r} must hold integer labels; got dtype {values.dtype}")
    return values.astype(np.int64)


def mat_shape(path: str | os.PathLike, key: str) -> tuple[int, int]:
    """The (height, width) of `key` in a .mat file, read from its header (no decompression).

    Raises:
        DataError: unreadable file, no `key`, or not a 2-D array.
    """
    import scipy.io

    path = os.fspath(path)
    try:
        variables = {name: shape for name, shape, _ in scipy.io.whosmat(path)}
    except Exception as e:
        raise DataError(f"{path}: cannot read .mat label file: {e}") from e
    if key not in variables:
        raise DataError(
            f"{path}: no variable {key!r} in the .mat file (variables: {sorted(variables)})"
        )
    shape = tuple(int(s) for s in variables[key])
    if len(shape) != 2 or 0 in shape:
        raise DataError(f"{path}: {key!r} must be a 2-D label map; got shape {shape}")
    return shape  # type: ignore[return-value]


def map_label_values(
    values: np.ndarray, table: dict[int, int], path: str | os.PathLike, key: str
) -> np.ndarray:
    """Maps raw label values through `table`; any value not in it is an error naming the file.

    Args:
        values: integer array [H, W].
        table: raw value -> training label (class index or the ignore label).
        path: the file, for the message.
        key: the variable, for the message.

    Returns:
        uint8 [H, W].

    Raises:
        DataError: values outside `table` (the message lists them and the allowed range).
    """
    present = np.unique(values)
    bad = [int(v) for v in present if int(v) not in table]
    if bad:
        shown = ", ".join(str(v) for v in bad[:20]) + (" ..." if len(bad) > 20 else "")
        raise DataError(
            f"{os.fspath(path)}: {key!r} holds values {shown}; expected {min(table)}..{max(table)}"
        )
    lo = min(table)
    lut = np.zeros(max(table) - lo + 1, np.uint8)
    for raw, label in table.items():
        lut[raw - lo] = label
    return lut[values - lo]


# One option check and one report for every validating loader (kfcn.data.listfile's).
check_options = listfile.check_options


def check_examples(
    examples: Sequence[IdExample],
    check: Callable[[IdExample], None] | None,
    *,
    source: str,
    on_error: str,
) -> list[IdExample]:
    """Checks that every file exists, then runs `check` on each example.

    Args:
        examples: the split's examples.
        check: raises `DataError` for a bad example (None: existence only).
        source: the split list, for messages.
        on_error: "raise" stops at the first report (all missing files in one error); "skip"
            drops bad examples with one warning.

    Returns:
        The good examples, in order.

    Raises:
        DataError: bad files with `on_error="raise"`, or no example left.
    """
    problems: list[str] = []
    bad: set[int] = set()
    for i, example in enumerate(examples):
        for path in example.files.values():
            if not os.path.isfile(path):
                problems.append(
                    f"{path}: file does not exist (id {example.name!r} at {example.where})"
                )
                bad.add(i)
    if problems and on_error == "raise":
        raise DataError(
            f"{len(problems)} file(s) named by ids in {source} do not exist:"
            f"{listfile._listing(problems)}"
        )
    if check is not None:

        def run(i: int) -> str | None:
            try:
                check(examples[i])
            except DataError as e:
                return f"{e} (id {examples[i].name!r} at {examples[i].where})"
            return None

        todo = [i for i in range(len(examples)) if i not in bad]
        for i, problem in listfile.check_each(todo, run):
            bad.add(i)
            problems.append(problem)
    listfile.settle(
        problems, len(bad), len(examples), source=source, what="examples", on_error=on_error
    )
    return [example for i, example in enumerate(examples) if i not in bad]


def build_dataset(
    examples: Sequence[IdExample],
    read: Callable[..., Sequence[np.ndarray]],
    roles: Sequence[str],
    dtypes: Sequence[tf.DType],
    shapes: Sequence[Sequence[int | None]],
    pack: Callable[[Sequence[tf.Tensor]], dict[str, Any]],
) -> tf.data.Dataset:
    """A dataset that reads each example's files with `read` in `tf.numpy_function`.

    Args:
        examples: the (checked) examples.
        read: called with the paths of `roles` (str) in order; returns the arrays.
        roles: which files `read` takes.
        dtypes: dtype of each array `read` returns.
        shapes: static shape of each array (None for unknown sizes).
        pack: turns the arrays into the element's "image" and "label" entries.

    Returns:
        Dataset of {"image", "label", "name"} in list order, with its file table attached
        (`kfcn.data.pipeline.attach_file_source`) so pipelines shard and shuffle ids before
        decoding.
    """
    import tensorflow as tf

    from kfcn.data.pipeline import attach_file_source

    table = {role: np.array([e.files[role] for e in examples], dtype=object) for role in roles}
    table["name"] = np.array([e.name for e in examples], dtype=object)

    def read_paths(*paths: bytes) -> list[np.ndarray]:
        return list(read(*(p.decode("utf-8") for p in paths)))

    def decode(entry: dict[str, tf.Tensor]) -> dict[str, Any]:
        arrays = tf.numpy_function(
            read_paths, [entry[role] for role in roles], list(dtypes), stateful=False
        )
        arrays = [tf.ensure_shape(a, s) for a, s in zip(arrays, shapes, strict=True)]
        return {**pack(arrays), "name": entry["name"]}

    files = tf.data.Dataset.from_tensor_slices(table)
    dataset = files.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return attach_file_source(dataset, files, decode)


def check_same_size(sizes: dict[str, tuple[int, int]]) -> None:
    """Raises `DataError` naming the files unless all (height, width) sizes agree."""
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{path} ({w}x{h})" for path, (h, w) in sizes.items())
        raise DataError(f"files of one example have different sizes (width x height): {listed}")
