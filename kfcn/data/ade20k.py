"""ADE20K SceneParsing (the MIT Scene Parsing Benchmark, ADEChallengeData2016), 150 classes.

Zhou et al., "Scene Parsing through ADE20K Dataset", CVPR 2017. The layout of
`ADEChallengeData2016.zip`, as mmsegmentation's `ADE20KDataset` reads it:

    ADEChallengeData2016/images/training/ADE_train_00000001.jpg       (20,210 images)
    ADEChallengeData2016/images/validation/ADE_val_00000001.jpg       (2,000 images)
    ADEChallengeData2016/annotations/{training,validation}/<same name>.png

Each image is paired with the annotation of the same name. Annotations are 8-bit single-channel
PNGs with values 0..150, 0 meaning "other objects" (unlabelled). As mmseg's `reduce_zero_label`,
0 becomes the ignore label 255 and class k becomes k-1, so the 150 classes are 0..149 in
mmseg's order (`CLASS_NAMES`, from "wall" to "flag") with mmseg's palette.

Example:
    >>> from kfcn.data import load_dataset
    >>> ds, info = load_dataset("ade20k", "val", data_dir="/data/ade/ADEChallengeData2016")
    >>> info.num_classes, info.num_examples
    (150, 2000)
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from kfcn.data.images import DataError
from kfcn.data.listfile import ListItem
from kfcn.data.pairs import find_root, load_pairs, reduce_zero_label_lut
from kfcn.metadata import ADE20K_CLASS_NAMES

if TYPE_CHECKING:
    import tensorflow as tf

    from kfcn.data import DatasetInfo

logger = logging.getLogger(__name__)

__all__ = ["CLASS_NAMES", "IGNORE_LABEL", "NUM_CLASSES", "NUM_EXAMPLES", "SPLITS", "load"]

NUM_CLASSES = 150
IGNORE_LABEL = 255
#: mmsegmentation's ADE20KDataset classes (kept once, in `kfcn.metadata`).
CLASS_NAMES = ADE20K_CLASS_NAMES
#: kfcn split name -> the folder name under images/ and annotations/.
SPLITS = {"train": "training", "val": "validation"}
#: Sizes of the real splits (the loader logs a note when a copy differs).
NUM_EXAMPLES = {"train": 20210, "val": 2000}
ROOT_NAME = "ADEChallengeData2016"


def find_ade20k_root(data_dir: str | os.PathLike | None) -> str:
    """Returns the `ADEChallengeData2016` folder: `data_dir` itself or a folder under it.

    Looks in `data_dir`, `data_dir/ADEChallengeData2016` and `data_dir/ade/ADEChallengeData2016`
    (mmsegmentation's `data/ade/ADEChallengeData2016`).

    Raises:
        ValueError: no `data_dir` and no `KFCN_DATA_DIR`.
        DataError: none of them holds `images/training`.
    """
    return find_root(
        data_dir,
        os.path.join("images", "training"),
        ("", ROOT_NAME, os.path.join("ade", ROOT_NAME)),
    )


def _split_folder(split: str) -> str:
    if split in SPLITS:
        return SPLITS[split]
    if split in SPLITS.values():
        return split
    raise ValueError(
        "`split` must be one of 'train', 'val' (or 'training', 'validation'). "
        f"Received: split={split!r}"
    )


def pairs(root: str, split: str) -> list[ListItem]:
    """The (image, annotation) pairs of a split, sorted by file name as mmseg lists them.

    Args:
        root: the `ADEChallengeData2016` folder.
        split: "train" or "val".

    Returns:
        One `ListItem` per JPEG of `images/<split>/`, its annotation
        `annotations/<split>/<name>.png` (which may be missing: validation reports it).

    Raises:
        DataError: the image folder is missing.
    """
    folder = _split_folder(split)
    image_dir = os.path.join(root, "images", folder)
    label_dir = os.path.join(root, "annotations", folder)
    if not os.path.isdir(image_dir):
        raise DataError(f"ADE20K split {split!r}: image folder {image_dir} does not exist")
    names = sorted(f for f in os.listdir(image_dir) if f.lower().endswith(".jpg"))
    items = [
        ListItem(
            os.path.join(image_dir, f),
            os.path.join(label_dir, os.path.splitext(f)[0] + ".png"),
            os.path.join(image_dir, f),
        )
        for f in names
    ]
    if os.path.isdir(label_dir):
        stems = {os.path.splitext(f)[0] for f in names}
        orphans = [f for f in os.listdir(label_dir) if os.path.splitext(f)[0] not in stems]
        if orphans:
            logger.warning(
                "%s: %d annotation(s) have no image in %s and are not used (e.g. %s)",
                label_dir,
                len(orphans),
                image_dir,
                sorted(orphans)[0],
            )
    return items


def load(
    split: str,
    data_dir: str | os.PathLike | None = None,
    *,
    on_error: str = "raise",
    validate: str | None = None,
) -> tuple[tf.data.Dataset, DatasetInfo]:
    """Loads an ADE20K SceneParsing split with mmseg's `reduce_zero_label`.

    Args:
        split: "train" (images/training) or "val" (images/validation).
        data_dir: the `ADEChallengeData2016` folder or a folder holding it (default
            `$KFCN_DATA_DIR`).
        on_error: "raise" or "skip" (drop bad pairs with one warning).
        validate: "header", "full" or "none" (see `kfcn.data.listfile.load_folder`).

    Returns:
        (dataset, info): {"image": uint8 [H, W, 3], "label": uint8 [H, W] in 0..149 or 255,
        "name": string} dicts sorted by file name, and its `DatasetInfo` (150 classes).

    Raises:
        ValueError: invalid arguments.
        DataError: missing folder, missing annotation, image/annotation size mismatch,
            annotation values above 150, unreadable files (each message names the file).
    """
    from kfcn import visualize

    root = find_ade20k_root(data_dir)
    items = pairs(root, split)
    expected = NUM_EXAMPLES[{v: k for k, v in SPLITS.items()}.get(split, split)]
    if len(items) != expected:
        logger.info(
            "ADE20K %s: %d images in %s (the full split has %d)",
            split,
            len(items),
            root,
            expected,
        )
    return load_pairs(
        items,
        source=f"ADE20K split {split!r} ({os.path.join(root, 'images', _split_folder(split))})",
        raw_classes=NUM_CLASSES + 1,
        label_table=reduce_zero_label_lut(IGNORE_LABEL),
        name="ade20k",
        num_classes=NUM_CLASSES,
        class_names=CLASS_NAMES,
        palette=visualize.palette("ade20k").tolist(),
        ignore_label=IGNORE_LABEL,
        on_error=on_error,
        validate=validate,
    )
