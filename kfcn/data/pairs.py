"""Image/annotation pairs found by a loader (not listed in a pair list file), with a label map.

ADE20K and PASCAL-Context pair each image with an annotation by file name; their annotations
hold raw values that a lookup table turns into training labels (mmsegmentation's
`reduce_zero_label`: 0 becomes the ignore label and k becomes k-1). This module validates such
pairs with the checks of `kfcn.data.listfile` (every missing file in one error, headers, sizes,
`on_error="skip"` with one warning) and decodes them the same way, then applies the table.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from kfcn.data.images import DataError
from kfcn.data.listfile import ListItem, _build_dataset, _validate, check_options

if TYPE_CHECKING:
    import tensorflow as tf

    from kfcn.data import DatasetInfo

__all__ = ["find_root", "load_pairs", "reduce_zero_label_lut"]


def reduce_zero_label_lut(ignore_label: int = 255) -> np.ndarray:
    """mmsegmentation's `reduce_zero_label` as a 256-entry table: 0 -> ignore, k -> k-1.

    mmseg computes `gt[gt == 0] = 255; gt = gt - 1; gt[gt == 254] = 255`, so the ignore value
    itself stays the ignore value.

    Args:
        ignore_label: the ignore value (0..255).

    Returns:
        uint8 array [256]: `table[raw]` is the training label.
    """
    table = np.arange(-1, 255, dtype=np.int64)
    table[0] = ignore_label
    table[ignore_label] = ignore_label
    return table.astype(np.uint8)


def find_root(data_dir: str | os.PathLike | None, marker: str, candidates: Sequence[str]) -> str:
    """Returns the first of `data_dir/<candidate>` that holds `marker`.

    Args:
        data_dir: the folder the user gave (None: `$KFCN_DATA_DIR`).
        marker: a relative path that exists in the dataset's root, e.g. "images/training".
        candidates: relative paths to try under `data_dir`, "" for `data_dir` itself.

    Returns:
        The dataset root.

    Raises:
        ValueError: no `data_dir` and no `KFCN_DATA_DIR`.
        DataError: no candidate holds `marker` (the message names every path tried).
    """
    if data_dir is None:
        data_dir = os.environ.get("KFCN_DATA_DIR")
        if not data_dir:
            raise ValueError(
                f"`data_dir` must name the dataset folder (holding {marker}) or KFCN_DATA_DIR "
                "must be set. Received: data_dir=None"
            )
    data_dir = os.fspath(data_dir)
    tried = [os.path.normpath(os.path.join(data_dir, c)) for c in candidates]
    for root in tried:
        if os.path.isdir(os.path.join(root, marker)):
            return root
    raise DataError(
        f"No {marker} folder under data_dir={data_dir}; looked in: "
        + ", ".join(os.path.join(root, marker) for root in tried)
    )


def load_pairs(
    items: list[ListItem],
    *,
    source: str,
    raw_classes: int,
    label_table: np.ndarray | None,
    name: str,
    num_classes: int,
    class_names: Sequence[str],
    palette: Sequence[Sequence[int]] | None,
    ignore_label: int = 255,
    on_error: str = "raise",
    validate: str | None = None,
) -> tuple[tf.data.Dataset, DatasetInfo]:
    """Validates image/annotation pairs and returns them as a kfcn dataset.

    Args:
        items: the pairs; `where` says where each came from ("list.txt:12" or the image path).
        source: what the pairs were read from, for messages (a split list file or folder).
        raw_classes: annotation values 0..raw_classes-1 (and `ignore_label`) are valid;
            anything else is an error naming the file.
        label_table: uint8 [256] map from annotation value to label (None: identity).
        name: the dataset name put in the `DatasetInfo`.
        num_classes: classes after the map.
        class_names: one name per class after the map.
        palette: one RGB colour per class after the map.
        ignore_label: the ignore value.
        on_error: "raise" stops at the first bad pair(s); "skip" drops them with one warning.
        validate: "header", "full" or "none", as `kfcn.data.listfile.load_folder`.

    Returns:
        (dataset, info): {"image": uint8 [H, W, 3], "label": uint8 [H, W], "name": string}
        dicts in `items` order, and its `DatasetInfo`.

    Raises:
        ValueError: invalid `on_error` or `validate`.
        DataError: missing or bad files (the message names them and where they came from).
    """
    import tensorflow as tf

    from kfcn.data import DatasetInfo
    from kfcn.data.pipeline import _file_source, attach_file_source

    validate = check_options(on_error, validate)
    if not items:
        raise DataError(f"{source}: no image/annotation pairs found (empty split)")
    settings = dict(
        num_classes=raw_classes, ignore_label=ignore_label, void_labels=(), palette=None
    )
    items, plans = _validate(
        items, list_file=source, on_error=on_error, validate=validate, **settings
    )
    raw = _build_dataset(items, plans, **settings)
    if label_table is not None:
        files, decode_raw = _file_source(raw).files, _file_source(raw).decode
        table = tf.constant(label_table, tf.uint8)

        def decode(entry: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
            element = decode_raw(entry)
            label = tf.gather(table, tf.cast(element["label"], tf.int32))
            return {**element, "label": label}

        dataset = files.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        raw = attach_file_source(dataset, files, decode)
    info = DatasetInfo(
        name=name,
        num_classes=num_classes,
        ignore_label=ignore_label,
        class_names=tuple(class_names),
        num_examples=len(items),
        palette=None if palette is None else tuple(tuple(int(c) for c in rgb) for rgb in palette),
    )
    return raw, info
