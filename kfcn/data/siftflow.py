"""SIFT Flow: 33 semantic and 3 geometric classes per pixel, for one-trunk, two-head FCNs.

The FCN paper (Long et al., CVPR 2015, Sec. 4.3 / TPAMI 2017, Sec. 5.3) trains one net with
two heads on SIFT Flow (Liu, Yuen and Torralba, "Nonparametric Scene Parsing", CVPR 2009;
2,688 LabelMe images of 256x256, as released by Tighe and Lazebnik, `SiftFlowDataset.zip`).
This loader reads that release as the authors' `siftflow_layers.py` does::

    <data_dir>/Images/spatial_envelope_256x256_static_8outdoorcategories/<id>.jpg
    <data_dir>/SemanticLabels/spatial_envelope_256x256_static_8outdoorcategories/<id>.mat
    <data_dir>/GeoLabels/spatial_envelope_256x256_static_8outdoorcategories/<id>.mat

Both .mat files hold the label map in variable `S`. Semantic: 0 unlabelled, 1..33 classes;
geometric: -1 (and 0) unlabelled, 1..3 sky, horizontal, vertical. As in the authors' layer,
unlabelled becomes the ignore label 255 and class k becomes k-1; any other value is an error
naming the file.

Split: the standard 2,488 training / 200 test images (Liu et al.). The authors'
`data/sift-flow/trainval.txt` and `test.txt` (fcn.berkeleyvision.org) hold 2,486 and 200 ids:
their README says the lists leave out the unannotated images (highway_bost181 and
street_urb506). Those two public lists ship with kfcn (`kfcn/data/siftflow_splits/`) and are
used unless `data_dir` has its own `trainval.txt` / `test.txt` (the authors keep them there).
Note for evaluation: cow, desert and moon never occur in the test set, so the authors exclude
them from the semantic scores (the confusion matrix gives them no pixels: their IU is undefined).

Example:
    >>> from kfcn.data import siftflow
    >>> ds, info = siftflow.load_siftflow("test", "/data/SiftFlow")
    >>> info.num_classes
    {'sem': 33, 'geo': 3}
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import numpy as np

from kfcn.data import idlist
from kfcn.data.images import read_header, read_image
from kfcn.data.pairs import find_root

if TYPE_CHECKING:
    import tensorflow as tf

    from kfcn.data import DatasetInfo

__all__ = [
    "GEO_CLASS_NAMES",
    "IGNORE_LABEL",
    "MEAN_RGB",
    "NUM_CLASSES",
    "SEM_CLASS_NAMES",
    "TASKS",
    "load",
    "load_siftflow",
    "read_geo_label",
    "read_sem_label",
]

TASKS = ("sem", "geo")
NUM_CLASSES = {"sem": 33, "geo": 3}
IGNORE_LABEL = 255
# fcn.berkeleyvision.org data/sift-flow/classes.txt, model order.
SEM_CLASS_NAMES = (
    "awning", "balcony", "bird", "boat", "bridge", "building", "bus", "car", "cow", "crosswalk",
    "desert", "door", "fence", "field", "grass", "moon", "mountain", "person", "plant", "pole",
    "river", "road", "rock", "sand", "sea", "sidewalk", "sign", "sky", "staircase",
    "streetlight", "sun", "tree", "window",
)  # fmt: skip
GEO_CLASS_NAMES = ("sky", "horizontal", "vertical")
CLASS_NAMES = {"sem": SEM_CLASS_NAMES, "geo": GEO_CLASS_NAMES}
# Semantic classes absent from the test set (the authors' classes.txt).
ABSENT_FROM_TEST = ("cow", "desert", "moon")
# siftflow_layers.py's mean (114.578, 115.294, 108.353) is BGR; here in RGB order.
MEAN_RGB = (108.353, 115.294, 114.578)
SPLITS = ("train", "trainval", "test")
NUM_EXAMPLES = {"trainval": 2486, "test": 200}
LABEL_KEY = "S"
FOLDER = "spatial_envelope_256x256_static_8outdoorcategories"

_SPLIT_LISTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "siftflow_splits")
_SEM_TABLE = {0: IGNORE_LABEL, **{k: k - 1 for k in range(1, 34)}}
# The authors set -1 to 0 and then subtract 1 in uint8, so both become 255.
_GEO_TABLE = {-1: IGNORE_LABEL, 0: IGNORE_LABEL, 1: 0, 2: 1, 3: 2}
_ROLES = ("image", "sem", "geo")


def read_sem_label(path: str | os.PathLike) -> np.ndarray:
    """Reads a `SemanticLabels/.../<id>.mat` map: 0 -> 255, class k (1..33) -> k-1.

    Returns:
        uint8 [H, W] in [0, 33) or 255.

    Raises:
        DataError: unreadable file, no `S`, not a 2-D integer map, or values outside 0..33.
    """
    return idlist.map_label_values(idlist.read_mat_variable(path, LABEL_KEY), _SEM_TABLE, path, "S")


def read_geo_label(path: str | os.PathLike) -> np.ndarray:
    """Reads a `GeoLabels/.../<id>.mat` map: -1 and 0 -> 255, 1..3 -> 0..2.

    Returns:
        uint8 [H, W] in [0, 3) or 255.

    Raises:
        DataError: unreadable file, no `S`, not a 2-D integer map, or values outside -1..3.
    """
    return idlist.map_label_values(idlist.read_mat_variable(path, LABEL_KEY), _GEO_TABLE, path, "S")


def _paths(root: str, name: str) -> dict[str, str]:
    return {
        "image": os.path.join(root, "Images", FOLDER, f"{name}.jpg"),
        "sem": os.path.join(root, "SemanticLabels", FOLDER, f"{name}.mat"),
        "geo": os.path.join(root, "GeoLabels", FOLDER, f"{name}.mat"),
    }


def split_list(split: str, data_dir: str | os.PathLike | None = None) -> str:
    """The id list of `split`: `data_dir/<list>.txt` when present, else the one kfcn ships.

    Args:
        split: "train" or "trainval" (the same 2,486 ids) or "test" (200).
        data_dir: the dataset folder, or None for the shipped list.

    Returns:
        The list file's path.
    """
    if split not in SPLITS:
        raise ValueError(f"`split` must be one of {SPLITS}. Received: split={split!r}")
    stem = "test" if split == "test" else "trainval"
    if data_dir is not None:
        own = os.path.join(os.fspath(data_dir), f"{stem}.txt")
        if os.path.isfile(own):
            return own
    return os.path.join(_SPLIT_LISTS, f"{stem}.txt")


def _read(image_path: str, sem_path: str, geo_path: str) -> list[np.ndarray]:
    image = read_image(image_path)
    sem = read_sem_label(sem_path)
    geo = read_geo_label(geo_path)
    idlist.check_same_size({image_path: image.shape[:2], sem_path: sem.shape, geo_path: geo.shape})
    return [image, sem, geo]


def _check_header(example: idlist.IdExample) -> None:
    files = example.files
    idlist.check_same_size(
        {
            files["image"]: read_header(files["image"]).size,
            files["sem"]: idlist.mat_shape(files["sem"], LABEL_KEY),
            files["geo"]: idlist.mat_shape(files["geo"], LABEL_KEY),
        }
    )


def load_siftflow(
    split: str,
    data_dir: str | os.PathLike | None = None,
    *,
    on_error: str = "raise",
    validate: str | None = None,
) -> tuple[tf.data.Dataset, DatasetInfo]:
    """Loads a SIFT Flow split with its semantic and geometric labels.

    Args:
        split: "trainval" (2,486 annotated training images; "train" is the same) or "test"
            (200).
        data_dir: the folder holding `Images/`, `SemanticLabels/` and `GeoLabels/` (default
            `$KFCN_DATA_DIR/siftflow`). Its own `trainval.txt` / `test.txt` replace the
            shipped lists.
        on_error: "raise" (default) stops at bad files; "skip" drops bad examples with one
            warning.
        validate: "header" (default with "raise"): check existence, JPEG headers and
            integrity, the .mat variable and sizes up front, label values while decoding;
            "full" (default with "skip"): decode everything up front; "none": existence only.

    Returns:
        (dataset, info): dataset of {"image": uint8 [256, 256, 3], "label": {"sem": uint8
        [256, 256] in [0, 33) or 255, "geo": uint8 [256, 256] in [0, 3) or 255}, "name":
        string id} in list order, and its `DatasetInfo` (name "siftflow") whose
        `num_classes` and `class_names` are dicts keyed by task: {"sem": 33, "geo": 3}.

    Raises:
        ValueError: unknown `split`, `on_error` or `validate`; no `data_dir` and no
            `KFCN_DATA_DIR`.
        DataError: missing files (all listed in one error, each with its list line),
            unreadable files, a .mat without `S`, sizes that differ between an image and its
            labels, or label values outside the ranges above; the message names the file.
    """
    import tensorflow as tf

    from kfcn.data import DatasetInfo
    from kfcn.visualize import palette

    validate = idlist.check_options(on_error, validate)
    root = find_root(data_dir, 'Images', ("", 'siftflow'))
    list_file = split_list(split, root)
    examples = [
        idlist.IdExample(name, _paths(root, name), where)
        for name, where in idlist.read_id_list(list_file)
    ]
    check = {
        "none": None,
        "header": _check_header,
        "full": lambda example: _read(*example.files.values()),
    }
    examples = idlist.check_examples(examples, check[validate], source=list_file, on_error=on_error)

    def pack(arrays: list[tf.Tensor]) -> dict[str, Any]:
        return {"image": arrays[0], "label": {"sem": arrays[1], "geo": arrays[2]}}

    dataset = idlist.build_dataset(
        examples,
        _read,
        _ROLES,
        [tf.uint8, tf.uint8, tf.uint8],
        [[None, None, 3], [None, None], [None, None]],
        pack,
    )
    info = DatasetInfo(
        name="siftflow",
        num_classes=dict(NUM_CLASSES),
        ignore_label=IGNORE_LABEL,
        class_names=dict(CLASS_NAMES),
        num_examples=len(examples),
        palette={
            "sem": tuple(map(tuple, palette("siftflow").tolist())),
            "geo": tuple(map(tuple, palette("siftflow_geo").tolist())),
        },
    )
    return dataset, info


load = load_siftflow
