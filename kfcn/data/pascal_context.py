"""PASCAL-Context (Mottaghi et al., CVPR 2014) in mmsegmentation's layout: 60 or 59 classes.

PASCAL-Context labels every pixel of the PASCAL VOC 2010 images with 459 classes; the common
benchmarks keep the 59 most frequent, plus background. mmsegmentation's converter
(`tools/dataset_converters/pascal_context.py`, from the Detail API's `trainval_merged.json`)
maps them to 0..59 (0 = background and everything outside the 59, then the 59 classes in
alphabetical order) and writes:

    VOCdevkit/VOC2010/JPEGImages/<id>.jpg
    VOCdevkit/VOC2010/SegmentationClassContext/<id>.png     (8-bit, values 0..59)
    VOCdevkit/VOC2010/ImageSets/SegmentationContext/train.txt   (4,996 ids)
    VOCdevkit/VOC2010/ImageSets/SegmentationContext/val.txt     (5,104 ids)

Two variants, as mmseg's two dataset classes:

- "pascal_context" (`PascalContextDataset`, the FCN paper's 60-class task): labels as stored,
  background is class 0.
- "pascal_context59" (`PascalContextDataset59`): `reduce_zero_label`, background becomes the
  ignore label 255 and class k becomes k-1 (the FCN paper's 59-class scores ignore background).

Example:
    >>> from kfcn.data import load_dataset
    >>> ds, info = load_dataset("pascal_context59", "val", data_dir="/data/VOCdevkit/VOC2010")
    >>> info.num_classes, info.class_names[:2]
    (59, ('aeroplane', 'bag'))
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from kfcn.data.idlist import read_id_list
from kfcn.data.listfile import ListItem
from kfcn.data.pairs import find_root, load_pairs, reduce_zero_label_lut

if TYPE_CHECKING:
    import tensorflow as tf

    from kfcn.data import DatasetInfo

logger = logging.getLogger(__name__)

__all__ = ["CLASS_NAMES", "CLASS_NAMES_59", "IGNORE_LABEL", "NUM_EXAMPLES", "SPLITS", "load"]

IGNORE_LABEL = 255
#: mmsegmentation's PascalContextDataset classes: background, then the converter's order.
CLASS_NAMES = tuple(
    "background|aeroplane|bag|bed|bedclothes|bench|bicycle|bird|boat|book|bottle|building|bus|"
    "cabinet|car|cat|ceiling|chair|cloth|computer|cow|cup|curtain|dog|door|fence|floor|flower|"
    "food|grass|ground|horse|keyboard|light|motorbike|mountain|mouse|person|plate|platform|"
    "pottedplant|road|rock|sheep|shelves|sidewalk|sign|sky|snow|sofa|table|track|train|tree|"
    "truck|tvmonitor|wall|water|window|wood".split("|")
)
#: mmsegmentation's PascalContextDataset59 classes (background dropped).
CLASS_NAMES_59 = CLASS_NAMES[1:]
SPLITS = ("train", "val")
#: Sizes of the real splits (the loader logs a note when a copy differs).
NUM_EXAMPLES = {"train": 4996, "val": 5104}
LIST_DIR = os.path.join("ImageSets", "SegmentationContext")
IMAGE_DIR = "JPEGImages"
LABEL_DIR = "SegmentationClassContext"


def find_voc2010_root(data_dir: str | os.PathLike | None) -> str:
    """Returns the `VOC2010` folder: `data_dir` itself, `data_dir/VOC2010` or
    `data_dir/VOCdevkit/VOC2010`, whichever holds `ImageSets/SegmentationContext`.

    Raises:
        ValueError: no `data_dir` and no `KFCN_DATA_DIR`.
        DataError: none of them does (the converter has not been run there).
    """
    return find_root(data_dir, LIST_DIR, ("", "VOC2010", os.path.join("VOCdevkit", "VOC2010")))


def pairs(root: str, split: str) -> tuple[str, list[ListItem]]:
    """Reads `ImageSets/SegmentationContext/<split>.txt` into (JPEG, PNG) pairs.

    Args:
        root: the `VOC2010` folder.
        split: "train" or "val".

    Returns:
        (list file, pairs), each pair's `where` being "list_file:line".

    Raises:
        ValueError: unknown `split`.
        DataError: missing or empty list file, a line that is not one image id or an id
            listed twice (file:line).
    """
    if split not in SPLITS:
        raise ValueError(f"`split` must be one of 'train', 'val'. Received: split={split!r}")
    list_file = os.path.join(root, LIST_DIR, split + ".txt")
    items = [
        ListItem(
            os.path.join(root, IMAGE_DIR, image_id + ".jpg"),
            os.path.join(root, LABEL_DIR, image_id + ".png"),
            where,
        )
        for image_id, where in read_id_list(list_file)
    ]
    return list_file, items


def load(
    split: str,
    data_dir: str | os.PathLike | None = None,
    *,
    num_classes: int = 60,
    on_error: str = "raise",
    validate: str | None = None,
) -> tuple[tf.data.Dataset, DatasetInfo]:
    """Loads a PASCAL-Context split, 60 classes (background 0) or 59 (background ignored).

    Args:
        split: "train" or "val".
        data_dir: the `VOC2010` folder, `VOCdevkit`, or the folder holding `VOCdevkit`
            (default `$KFCN_DATA_DIR`).
        num_classes: 60 (`load_dataset("pascal_context")`) or 59 (`"pascal_context59"`).
        on_error: "raise" or "skip" (drop bad pairs with one warning).
        validate: "header", "full" or "none" (see `kfcn.data.listfile.load_folder`).

    Returns:
        (dataset, info): {"image": uint8 [H, W, 3], "label": uint8 [H, W], "name": string}
        dicts in list order, and its `DatasetInfo`.

    Raises:
        ValueError: invalid arguments.
        DataError: missing folder or list file, malformed list line (file:line), missing
            images or annotations, size mismatches, annotation values above 59 (each
            message names the file).
    """
    from kfcn import visualize

    if num_classes not in (59, 60):
        raise ValueError(f"`num_classes` must be 59 or 60. Received: num_classes={num_classes}")
    root = find_voc2010_root(data_dir)
    list_file, items = pairs(root, split)
    if len(items) != NUM_EXAMPLES[split]:
        logger.info(
            "PASCAL-Context %s: %d ids in %s (the full split has %d)",
            split,
            len(items),
            list_file,
            NUM_EXAMPLES[split],
        )
    reduce = num_classes == 59
    name = "pascal_context59" if reduce else "pascal_context"
    return load_pairs(
        items,
        source=list_file,
        raw_classes=60,
        label_table=reduce_zero_label_lut(IGNORE_LABEL) if reduce else None,
        name=name,
        num_classes=num_classes,
        class_names=CLASS_NAMES_59 if reduce else CLASS_NAMES,
        palette=visualize.palette(name).tolist(),
        ignore_label=IGNORE_LABEL,
        on_error=on_error,
        validate=validate,
    )
