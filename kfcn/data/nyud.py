"""NYUDv2 (NYU Depth v2) semantic segmentation, 40 classes, in the FCN authors' layout.

The FCN paper (Long et al., CVPR 2015, Sec. 4.3 / TPAMI 2017, Sec. 5.3) trains on NYUDv2 with
the 40-class task of Gupta, Arbelaez and Malik ("Perceptual Organization and Recognition of
Indoor Scenes from RGB-D Images", CVPR 2013), on colour, depth and HHA (Gupta et al., ECCV 2014)
inputs. This loader reads the authors' copy (`nyud.tar.gz` of fcn.berkeleyvision.org, made
from Gupta et al.'s data) as their `nyud_layers.py` does::

    <data_dir>/train.txt, val.txt, test.txt     image ids, one per line (e.g. 5001)
    <data_dir>/trainval.txt                      optional; else train.txt + val.txt
    <data_dir>/data/images/img_<id>.png          RGB, 8 bit
    <data_dir>/data/depth/img_<id>.png           depth, 16-bit single channel
    <data_dir>/data/hha/img_<id>.png             HHA, 8 bit, 3 channels
    <data_dir>/segmentation/img_<id>.mat         variable `segmentation`: 0 void, 1..40 classes

Labels: `segmentation` value 0 (void) becomes the ignore label 255 and class k becomes k-1,
exactly the authors' `label -= 1` on uint8 (their classes.txt: "0 is void (and converted to
255)"). Any other value is an error naming the file.

Depth, for models that take `modality="rgbd"`: the element's 4th channel is the depth PNG's raw
uint16 value, in millimetres (Gupta et al.'s code reads it as `double(imread(f)) / 1000` metres;
Gupta's depth is filled in, so it has no zeros). The authors feed `log(depth) - 7.844` to
conv1 (`MEAN_LOG_DEPTH`, the mean log depth: exp(7.844) mm is about 2.55 m), unscaled; RGB and
HHA have their means subtracted (`MEAN_RGB`, `MEAN_HHA`, given here in RGB / stored channel
order). A model should do that normalisation inside itself, guarding log(0).

Example:
    >>> from kfcn.data import nyud
    >>> ds, info = nyud.load_nyud("train", "/data/nyud", modality="rgb+hha")
    >>> sorted(next(iter(ds))["image"])
    ['hha', 'rgb']
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import numpy as np

from kfcn.data import idlist
from kfcn.data.images import DataError, ImageHeader, _open, read_header, read_image
from kfcn.data.pairs import find_root

if TYPE_CHECKING:
    import tensorflow as tf

    from kfcn.data import DatasetInfo

__all__ = [
    "CLASS_NAMES",
    "IGNORE_LABEL",
    "MEAN_HHA",
    "MEAN_LOG_DEPTH",
    "MEAN_RGB",
    "MODALITIES",
    "NUM_CLASSES",
    "load",
    "load_nyud",
    "read_depth",
    "read_nyud_label",
]

NUM_CLASSES = 40
IGNORE_LABEL = 255
# fcn.berkeleyvision.org data/nyud/classes.txt (Gupta et al. 2013's 40 classes), model order;
# "refridgerator" spelled as there.
CLASS_NAMES = (
    "wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf",
    "picture", "counter", "blinds", "desk", "shelves", "curtain", "dresser", "pillow", "mirror",
    "floor mat", "clothes", "ceiling", "books", "refridgerator", "television", "paper", "towel",
    "shower curtain", "box", "whiteboard", "person", "night stand", "toilet", "sink", "lamp",
    "bathtub", "bag", "otherstructure", "otherfurniture", "otherprop",
)  # fmt: skip
MODALITIES = ("rgb", "hha", "rgbd", "rgb+hha")
SPLITS = ("train", "val", "test", "trainval")
LABEL_KEY = "segmentation"
# nyud_layers.py: mean_bgr (116.190, 97.203, 92.318) reversed to RGB; mean_hha in the PNG's
# channel order (the authors do not reorder HHA); mean_logd.
MEAN_RGB = (92.318, 97.203, 116.190)
MEAN_HHA = (132.431, 94.076, 118.477)
MEAN_LOG_DEPTH = 7.844

# Raw `segmentation` value -> training label.
_LABEL_TABLE = {0: IGNORE_LABEL, **{k: k - 1 for k in range(1, NUM_CLASSES + 1)}}
# Which files each modality reads, in `_read` argument order.
_ROLES = {
    "rgb": ("image", "label"),
    "hha": ("hha", "label"),
    "rgbd": ("image", "depth", "label"),
    "rgb+hha": ("image", "hha", "label"),
}
_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def read_nyud_label(path: str | os.PathLike) -> np.ndarray:
    """Reads `segmentation/img_<id>.mat`: 0 (void) -> 255, class k (1..40) -> k-1.

    Args:
        path: the .mat file.

    Returns:
        uint8 [H, W] with values in [0, 40) or 255.

    Raises:
        DataError: unreadable file, no `segmentation` variable, not a 2-D integer map, or
            values outside 0..40 (the message names the file).
    """
    values = idlist.read_mat_variable(path, LABEL_KEY)
    return idlist.map_label_values(values, _LABEL_TABLE, path, LABEL_KEY)


def read_depth(path: str | os.PathLike) -> np.ndarray:
    """Reads a depth PNG's raw 16-bit values (millimetres).

    Args:
        path: `data/depth/img_<id>.png`, a 16-bit single-channel PNG.

    Returns:
        uint16 [H, W].

    Raises:
        DataError: unreadable file, or not a 16-bit single-channel image (an 8-bit depth map
            has lost its units).
    """
    path = os.fspath(path)
    im = _open(path, "depth")
    with im:
        _check_depth_mode(path, im.mode)
        try:
            depth = np.asarray(im)
        except Exception as e:
            raise DataError(f"{path}: corrupt or truncated depth file: {e}") from e
    if depth.ndim != 2:
        raise DataError(f"{path}: depth must be a 2-D map; got shape {depth.shape}")
    if depth.dtype != np.uint16 and (depth.min() < 0 or depth.max() > 65535):
        raise DataError(
            f"{path}: depth values must fit in 16 bits; got {depth.min()}..{depth.max()}"
        )
    return depth.astype(np.uint16)


def _check_depth_mode(path: str, mode: str) -> None:
    if mode not in _WIDE_MODES:
        raise DataError(
            f"{path}: depth must be a 16-bit single-channel PNG (raw depth in millimetres); got "
            f"PIL mode {mode}"
        )


def _check_hha_header(header: ImageHeader) -> None:
    # read_image would quietly turn a gray or 16-bit map into 8-bit RGB: not HHA.
    if header.mode != "RGB" or header.bit_depth != 8:
        raise DataError(
            f"{header.path}: HHA must be an 8-bit 3-channel image; got mode {header.mode}, "
            f"{header.bit_depth} bit"
        )


def _read_hha(path: str) -> np.ndarray:
    _check_hha_header(read_header(path, verify=False))
    return read_image(path)


def _paths(root: str, name: str) -> dict[str, str]:
    return {
        "image": os.path.join(root, "data", "images", f"img_{name}.png"),
        "depth": os.path.join(root, "data", "depth", f"img_{name}.png"),
        "hha": os.path.join(root, "data", "hha", f"img_{name}.png"),
        "label": os.path.join(root, "segmentation", f"img_{name}.mat"),
    }


def _ids(root: str, split: str) -> tuple[list[tuple[str, str]], str]:
    if split not in SPLITS:
        raise ValueError(f"`split` must be one of {SPLITS}. Received: split={split!r}")
    list_file = os.path.join(root, f"{split}.txt")
    if split == "trainval" and not os.path.isfile(list_file):
        # The authors' solvers train on "trainval"; without its list it is train + val.
        ids = idlist.read_id_list(os.path.join(root, "train.txt"))
        ids += idlist.read_id_list(os.path.join(root, "val.txt"))
        return ids, f"{root}/train.txt + val.txt"
    return idlist.read_id_list(list_file), list_file


def _read(modality: str, *paths: str) -> list[np.ndarray]:
    files = dict(zip(_ROLES[modality], paths, strict=True))
    label = read_nyud_label(files["label"])
    arrays: dict[str, np.ndarray] = {}
    if "image" in files:
        arrays["image"] = read_image(files["image"])
    if "hha" in files:
        arrays["hha"] = _read_hha(files["hha"])
    if "depth" in files:
        arrays["depth"] = read_depth(files["depth"])
    sizes = {files[role]: a.shape[:2] for role, a in arrays.items()}
    sizes[files["label"]] = label.shape
    idlist.check_same_size(sizes)
    if modality == "rgbd":
        rgbd = np.concatenate([arrays["image"].astype(np.uint16), arrays["depth"][..., None]], -1)
        return [rgbd, label]
    return [arrays[role] for role in files if role != "label"] + [label]


def _check_header(example: idlist.IdExample) -> None:
    sizes: dict[str, tuple[int, int]] = {}
    for role, path in example.files.items():
        if role == "label":
            sizes[path] = idlist.mat_shape(path, LABEL_KEY)
            continue
        header = read_header(path, what="depth" if role == "depth" else "image")
        if role == "depth":
            _check_depth_mode(path, header.mode)
        elif role == "hha":
            _check_hha_header(header)
        sizes[path] = header.size
    idlist.check_same_size(sizes)


def load_nyud(
    split: str,
    data_dir: str | os.PathLike | None = None,
    *,
    modality: str = "rgb",
    on_error: str = "raise",
    validate: str | None = None,
) -> tuple[tf.data.Dataset, DatasetInfo]:
    """Loads an NYUDv2 split (40 classes) in the FCN authors' layout.

    Args:
        split: "train", "val", "test" (the authors' lists) or "trainval" (`trainval.txt`, else
            train + val; the authors' solvers train on it and test on "test").
        data_dir: the folder holding the split lists, `data/` and `segmentation/` (default
            `$KFCN_DATA_DIR/nyud`).
        modality: what "image" holds: "rgb" (uint8 [H, W, 3]), "hha" (uint8 [H, W, 3]),
            "rgbd" (uint16 [H, W, 4]: R, G, B 0..255, then raw depth in millimetres) or
            "rgb+hha" (a dict {"rgb": uint8 [H, W, 3], "hha": uint8 [H, W, 3]}).
        on_error: "raise" (default) stops at bad files; "skip" drops bad examples with one
            warning.
        validate: "header" (default with "raise"): check existence, image headers and integrity,
            the .mat variable and every file's size up front, label values while decoding;
            "full" (default with "skip"): decode everything up front; "none": existence only.

    Returns:
        (dataset, info): dataset of {"image": see `modality`, "label": uint8 [H, W] in [0, 40)
        or 255, "name": string id} in list order, and its `DatasetInfo` (name "nyud").

    Raises:
        ValueError: unknown `split`, `modality`, `on_error` or `validate`; no `data_dir` and
            no `KFCN_DATA_DIR`.
        DataError: missing list or files (all listed in one error, each with its list line),
            unreadable files, a .mat without `segmentation`, sizes that differ between an
            image and its label or depth, or label values outside 0..40; the message names
            the file.
    """
    import tensorflow as tf

    from kfcn.data import DatasetInfo
    from kfcn.visualize import palette

    if modality not in MODALITIES:
        raise ValueError(f"`modality` must be one of {MODALITIES}. Received: modality={modality!r}")
    validate = idlist.check_options(on_error, validate)
    root = find_root(data_dir, 'data', ("", 'nyud'))
    ids, source = _ids(root, split)
    roles = _ROLES[modality]
    examples = []
    for name, where in ids:
        paths = _paths(root, name)
        examples.append(idlist.IdExample(name, {role: paths[role] for role in roles}, where))
    check = {
        "none": None,
        "header": _check_header,
        "full": lambda example: _read(modality, *example.files.values()),
    }
    examples = idlist.check_examples(examples, check[validate], source=source, on_error=on_error)
    if modality == "rgbd":
        dtypes, shapes = [tf.uint16, tf.uint8], [[None, None, 4], [None, None]]
    elif modality == "rgb+hha":
        dtypes = [tf.uint8, tf.uint8, tf.uint8]
        shapes = [[None, None, 3], [None, None, 3], [None, None]]
    else:
        dtypes, shapes = [tf.uint8, tf.uint8], [[None, None, 3], [None, None]]

    def pack(arrays: list[tf.Tensor]) -> dict[str, Any]:
        if modality == "rgb+hha":
            return {"image": {"rgb": arrays[0], "hha": arrays[1]}, "label": arrays[2]}
        return {"image": arrays[0], "label": arrays[1]}

    def read(*paths: str) -> list[np.ndarray]:
        return _read(modality, *paths)

    dataset = idlist.build_dataset(examples, read, roles, dtypes, shapes, pack)
    info = DatasetInfo(
        name="nyud",
        num_classes=NUM_CLASSES,
        ignore_label=IGNORE_LABEL,
        class_names=CLASS_NAMES,
        num_examples=len(examples),
        palette=tuple(map(tuple, palette("nyud").tolist())),
    )
    return dataset, info


load = load_nyud
