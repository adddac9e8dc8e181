"""Segmentation datasets and the tf.data input pipeline.

`load_dataset(name, split, data_dir)` returns a `tf.data.Dataset` of
`{"image": uint8 [H, W, 3], "label": uint8 [H, W], "name": string}` dicts plus a `DatasetInfo`.
Labels are class indices in [0, num_classes) or the dataset's ignore label; anything else is an
error naming the file. `kfcn.data.pipeline` turns such a dataset into training batches (random
scale, crop, flip) or evaluation images at native size.

Datasets: "camvid" and "folder" (`kfcn.data.listfile`, list files of image/label pairs), "voc",
"sbd" and "cityscapes" (`kfcn.data.voc`, `.sbd`, `.cityscapes`), "ade20k" (`kfcn.data.ade20k`,
SceneParsing, 150 classes), "pascal_context" and "pascal_context59" (`kfcn.data.pascal_context`,
mmsegmentation's layout, 60 or 59 classes), "nyud" (`kfcn.data.nyud`, NYUDv2's 40 classes on
RGB, HHA, RGB-D or RGB+HHA images) and "siftflow" (`kfcn.data.siftflow`, a {"sem", "geo"} label
dict). Each loader module is imported only when its dataset is requested, so `import kfcn.data`
does not import TensorFlow.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kfcn.data.images import DataError, read_image, read_label

if TYPE_CHECKING:
    import tensorflow as tf

__all__ = [
    "DATASETS",
    "DataError",
    "DatasetNotReadyError",
    "DatasetInfo",
    "eval_pipeline",
    "load_dataset",
    "read_image",
    "read_label",
    "train_pipeline",
]

# Imported on first use (PEP 562) so that `import kfcn.data` does not import TensorFlow.
_LAZY_ATTRS = {"train_pipeline": "kfcn.data.pipeline", "eval_pipeline": "kfcn.data.pipeline"}

# Datasets whose loader module (written separately) exposes `load()` and the class constants.
_MODULE_DATASETS = ("voc", "sbd", "cityscapes")
# Datasets whose module's `load(split, data_dir, **kwargs)` returns (dataset, DatasetInfo):
# name -> (module, fixed keyword arguments).
_INFO_DATASETS = {
    "ade20k": ("kfcn.data.ade20k", {}),
    "pascal_context": ("kfcn.data.pascal_context", {"num_classes": 60}),
    "pascal_context59": ("kfcn.data.pascal_context", {"num_classes": 59}),
    "nyud": ("kfcn.data.nyud", {}),
    "siftflow": ("kfcn.data.siftflow", {}),
}
DATASETS = ("camvid", "folder", *_MODULE_DATASETS, *_INFO_DATASETS)


class DatasetNotReadyError(DataError):
    """A tfds dataset whose manually downloaded files are not in place yet.

    The message says which directory to put them in and where to get them.
    """


@dataclass(frozen=True)
class DatasetInfo:
    """What a training or evaluation script needs to know about a dataset.

    Attributes:
        name: dataset name as passed to `load_dataset`.
        num_classes: classes are 0..num_classes-1.
        ignore_label: label value excluded from loss and metrics.
        class_names: one name per class, in index order.
        num_examples: number of elements in the split, or None when unknown.
        palette: one (r, g, b) colour per class, or None (then `kfcn.metadata` picks the
            colours of a dataset it knows by name, else generic ones).

    A multi-task dataset, whose elements' "label" is a dict (SIFT Flow: {"sem", "geo"}), gives
    `num_classes`, `class_names` and `palette` as dicts with the same keys, e.g.
    `num_classes={"sem": 33, "geo": 3}`; `ignore_label` is shared by all tasks.
    """

    name: str
    num_classes: int | dict[str, int]
    ignore_label: int
    class_names: tuple[str, ...] | dict[str, tuple[str, ...]]
    num_examples: int | None
    palette: (
        tuple[tuple[int, int, int], ...] | dict[str, tuple[tuple[int, int, int], ...]] | None
    ) = None


def load_dataset(
    name: str, split: str, data_dir: str | None = None, **kwargs: Any
) -> tuple[tf.data.Dataset, DatasetInfo]:
    """Loads one split of a segmentation dataset.

    Args:
        name: one of "camvid", "folder", "voc", "sbd", "cityscapes", "ade20k",
            "pascal_context", "pascal_context59", "nyud", "siftflow".
        split: split name, e.g. "train", "val" (CamVid also "test" when root/test.txt exists).
        data_dir: dataset root. For "camvid" the folder holding train.txt/val.txt (SegNet
            layout); for "folder" the folder holding `<split>.txt` (or pass `list_file=`);
            for "ade20k" the `ADEChallengeData2016` folder (or its parent); for
            "pascal_context*" the `VOCdevkit/VOC2010` folder (or `VOCdevkit`, or its parent);
            for "nyud" the folder holding train.txt, data/ and segmentation/; for "siftflow"
            the folder holding Images/, SemanticLabels/ and GeoLabels/.
            None: `$KFCN_DATA_DIR` (for "camvid", "nyud", "siftflow" `$KFCN_DATA_DIR/<name>`).
        **kwargs: passed to the loader: for "camvid"/"folder" see
            `kfcn.data.listfile.load_camvid` / `load_folder` (e.g. `on_error="skip"`,
            `num_classes=` for folder); for "voc"/"sbd"/"cityscapes" e.g. `manual_dir=`;
            for "ade20k"/"pascal_context*"/"nyud"/"siftflow" `on_error=`, `validate=`; for
            "nyud" `modality=` ("rgb", "hha", "rgbd" or "rgb+hha").

    Returns:
        (dataset, info): dataset of {"image", "label", "name"} dicts and its `DatasetInfo`.

    Raises:
        ValueError: unknown `name`.
        DataError: missing, unreadable or inconsistent files (the message names them).
        DatasetNotReadyError: "voc", "sbd" or "cityscapes" whose downloads are not in the
            manual directory yet (the message names it and the files to put there).

    Example:
        >>> ds, info = load_dataset("camvid", "train", data_dir="/data/camvid")
        >>> info.num_classes, info.ignore_label
        (11, 255)
    """
    if name in ("camvid", "folder"):
        from kfcn.data import listfile

        loader = listfile.load_camvid if name == "camvid" else listfile.load_folder
        return loader(split, data_dir=data_dir, **kwargs)
    if name in _INFO_DATASETS:
        module_name, fixed = _INFO_DATASETS[name]
        return importlib.import_module(module_name).load(split, data_dir, **fixed, **kwargs)
    if name in _MODULE_DATASETS:
        module = importlib.import_module(f"kfcn.data.{name}")
        try:
            dataset = module.load(split, data_dir=data_dir, **kwargs)
        except AssertionError as error:  # tfds' way of saying the manual files are missing
            raise _not_ready(name, str(error)) from error
        info = DatasetInfo(
            name=name,
            num_classes=int(module.NUM_CLASSES),
            ignore_label=int(module.IGNORE_LABEL),
            class_names=tuple(module.CLASS_NAMES),
            num_examples=_known_cardinality(dataset),
        )
        return dataset, info
    raise ValueError(
        "`dataset` must be one of "
        + ", ".join(repr(d) for d in DATASETS)
        + f". Received: dataset={name!r}"
    )


def _not_ready(name: str, message: str) -> Exception:
    match = re.match(r"Manual directory (.*?) does not exist or is empty", message)
    if not match:
        return DataError(f"Dataset {name!r} could not be prepared: {message}")
    instructions = message.split("instructions:", 1)[-1].strip()
    return DatasetNotReadyError(
        f"Dataset {name!r} is not downloaded yet: put its files in {match.group(1)} (tfds' "
        "manual directory under `data_dir`), or pass the folder holding them as "
        f"`manual_dir`. {instructions}"
    )


def _known_cardinality(dataset: tf.data.Dataset) -> int | None:
    import tensorflow as tf

    n = int(dataset.cardinality())
    return n if n >= 0 and n != int(tf.data.INFINITE_CARDINALITY) else None


def __getattr__(name: str) -> Any:
    if name in _LAZY_ATTRS:
        return getattr(importlib.import_module(_LAZY_ATTRS[name]), name)
    raise AttributeError(f"module 'kfcn.data' has no attribute {name!r}")
