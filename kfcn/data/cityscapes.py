"""Cityscapes fine semantic segmentation through tfds' `cityscapes/semantic_segmentation`.

tfds' builder reads the manually downloaded `leftImg8bit_trainvaltest.zip` and
`gtFine_trainvaltest.zip` and stores the `*_gtFine_labelIds.png` masks, whose values are the 34
Cityscapes label ids. `load` maps them to the 19 evaluation classes ("trainIds") and the ignore
label 255 with the official table of cityscapesScripts (`helpers/labels.py`), as in the
benchmark and in FCN's Cityscapes results (Long et al., TPAMI 2017, Sec. 6).

The data are prepared by `ValidatedCityscapes`, tfds' builder with the same name, config and
on-disk records, plus a check of every file while preparing: missing label files, corrupt PNGs,
images that are not 1024x2048, and masks with values that are not label ids raise `DataError`
naming the file. Records prepared earlier by plain tfds are reused as they are; `load` checks
label values again while reading.

Example:
    >>> from kfcn.data import cityscapes
    >>> ds = cityscapes.load("val", data_dir="/data/tfds", manual_dir="/data/manual")
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.datasets.cityscapes import cityscapes_dataset_builder as _tfds_cityscapes

from kfcn.data import images, voc
from kfcn.data.images import DataError


class CityscapesLabel(NamedTuple):
    """One row of cityscapesScripts' label table (name, labelId, trainId)."""

    name: str
    id: int
    train_id: int


# cityscapesScripts helpers/labels.py: name, id, trainId. trainId 255 and -1 are not evaluated.
LABELS = (
    CityscapesLabel("unlabeled", 0, 255),
    CityscapesLabel("ego vehicle", 1, 255),
    CityscapesLabel("rectification border", 2, 255),
    CityscapesLabel("out of roi", 3, 255),
    CityscapesLabel("static", 4, 255),
    CityscapesLabel("dynamic", 5, 255),
    CityscapesLabel("ground", 6, 255),
    CityscapesLabel("road", 7, 0),
    CityscapesLabel("sidewalk", 8, 1),
    CityscapesLabel("parking", 9, 255),
    CityscapesLabel("rail track", 10, 255),
    CityscapesLabel("building", 11, 2),
    CityscapesLabel("wall", 12, 3),
    CityscapesLabel("fence", 13, 4),
    CityscapesLabel("guard rail", 14, 255),
    CityscapesLabel("bridge", 15, 255),
    CityscapesLabel("tunnel", 16, 255),
    CityscapesLabel("pole", 17, 5),
    CityscapesLabel("polegroup", 18, 255),
    CityscapesLabel("traffic light", 19, 6),
    CityscapesLabel("traffic sign", 20, 7),
    CityscapesLabel("vegetation", 21, 8),
    CityscapesLabel("terrain", 22, 9),
    CityscapesLabel("sky", 23, 10),
    CityscapesLabel("person", 24, 11),
    CityscapesLabel("rider", 25, 12),
    CityscapesLabel("car", 26, 13),
    CityscapesLabel("truck", 27, 14),
    CityscapesLabel("bus", 28, 15),
    CityscapesLabel("caravan", 29, 255),
    CityscapesLabel("trailer", 30, 255),
    CityscapesLabel("train", 31, 16),
    CityscapesLabel("motorcycle", 32, 17),
    CityscapesLabel("bicycle", 33, 18),
    CityscapesLabel("license plate", -1, -1),
)

NUM_CLASSES = 19
IGNORE_LABEL = 255
CLASS_NAMES = tuple(
    label.name for label in sorted(LABELS, key=lambda x: x.train_id) if 0 <= label.train_id < 19
)
# Label id -> trainId with every non-evaluated id (trainId 255 or -1) sent to IGNORE_LABEL.
LABEL_ID_TO_TRAIN_ID = {
    label.id: label.train_id if 0 <= label.train_id < NUM_CLASSES else IGNORE_LABEL
    for label in LABELS
}
NUM_LABEL_IDS = 34  # ids 0..33 appear in *_labelIds.png
SPLITS = ("train", "val", "test")
NUM_EXAMPLES = {"train": 2975, "val": 500, "test": 1525}
IMAGE_SIZE = (1024, 2048)  # (height, width) of every Cityscapes frame and tfds' feature shape

_TFDS_SPLITS = {"train": "train", "val": "validation", "validation": "validation", "test": "test"}


def label_id_lookup() -> np.ndarray:
    """Returns an int32 [256] table: labelId byte -> trainId or 255; -1 marks invalid bytes.

    Byte 255 is -1 ("license plate") stored as uint8 and maps to the ignore label; the official
    masks never draw it (negative ids are skipped by cityscapesScripts' json2labelImg).
    """
    table = np.full(256, -1, np.int32)
    for label_id, train_id in LABEL_ID_TO_TRAIN_ID.items():
        table[label_id % 256] = train_id
    return table


class ValidatedCityscapes(_tfds_cityscapes.Builder, skip_registration=True):
    """tfds' Cityscapes builder, checking every image and mask while preparing.

    Same name ("cityscapes"), configs, version and records as tfds' builder; not registered, so
    `tfds.builder("cityscapes")` still returns tfds' own class.
    """

    name = "cityscapes"
    # tfds 4.9 resolves the default `code_path` through `importlib_resources`, which it only
    # installs on Python < 3.9; point at tfds' module so its metadata files are found.
    code_path = epath.Path(_tfds_cityscapes.__file__)

    def _generate_examples(self, **paths) -> Iterator[tuple[str, dict]]:
        examples = list(super()._generate_examples(**paths))
        keys = ("image_left", "segmentation_label")
        voc.require_files(
            [os.fspath(features[k]) for _, features in examples for k in keys if k in features],
            f"Cityscapes {os.path.basename(paths['images_left'])!r}",
        )
        for key, features in examples:
            image_path = os.fspath(features["image_left"])
            image = images.read_image(image_path)
            if image.shape[:2] != IMAGE_SIZE:
                raise DataError(
                    f"{image_path}: Cityscapes frames are {IMAGE_SIZE[1]}x{IMAGE_SIZE[0]}; got "
                    f"{image.shape[1]}x{image.shape[0]}"
                )
            if "segmentation_label" in features:
                label_path = os.fspath(features["segmentation_label"])
                # labelIds: 0..33, and 255 for license plate (-1) should a mask hold it.
                label = images.read_label(label_path, NUM_LABEL_IDS, ignore_label=255)
                images.check_pair(image, label, image_path, label_path)
            yield key, features


def builder(data_dir: str | None = None) -> ValidatedCityscapes:
    """Returns the `cityscapes/semantic_segmentation` builder (fine labels, train/val/test)."""
    return ValidatedCityscapes(
        config="semantic_segmentation", data_dir=voc.resolve_data_dir(data_dir)
    )


def _to_train_ids(example: dict, table: tf.Tensor) -> dict:
    label_ids = tf.cast(example["segmentation_label"][..., 0], tf.int32)
    train_ids = tf.gather(table, label_ids)
    bad = tf.boolean_mask(label_ids, train_ids < 0)
    check = tf.debugging.Assert(
        tf.size(bad) == 0,
        [
            tf.strings.join([example["image_id"], "_gtFine_labelIds.png: label ids"]),
            bad[:10],
            "are not Cityscapes label ids (0..33)",
        ],
    )
    with tf.control_dependencies([check]):
        label = tf.cast(train_ids, tf.uint8)
    return {"image": example["image_left"], "label": label, "name": example["image_id"]}


def load(split: str, data_dir: str | None = None, manual_dir: str | None = None) -> tf.data.Dataset:
    """Loads a Cityscapes fine split with labels as the 19 trainIds and 255.

    Args:
        split: "train" (2975), "val" (500; also "validation") or "test" (1525; its public masks
            hold no evaluation labels).
        data_dir: tfds data directory; None for tfds' default (`TFDS_DATA_DIR` or
            ~/tensorflow_datasets).
        manual_dir: directory holding leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip;
            None for `<data_dir>/downloads/manual`.

    Returns:
        A dataset of {"image": uint8 [1024, 2048, 3], "label": uint8 [1024, 2048] in [0, 19) or
        255, "name": string image id such as "frankfurt_000000_000294"}.

    Raises:
        ValueError: unknown split.
        DataError: missing or corrupt files found while preparing (the message names them).
        AssertionError: the zips are not in the manual directory (raised by tfds, naming them).
    """
    if split not in _TFDS_SPLITS:
        raise ValueError(f"`split` must be one of {SPLITS}. Received: split={split!r}")
    b = builder(data_dir)
    b.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    table = tf.constant(label_id_lookup())
    ds = b.as_dataset(split=_TFDS_SPLITS[split], shuffle_files=False)
    return ds.map(
        lambda ex: _to_train_ids(ex, table),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
