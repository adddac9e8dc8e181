"""PASCAL VOC 2012 semantic segmentation as a tfds builder over manually downloaded data.

tfds' own `voc` builder carries detection boxes only, so this module ships `VocSegmentation`, a
`tfds.core.GeneratorBasedBuilder` that reads an extracted `VOCdevkit` (or the original
`VOCtrainval_11-May-2012.tar`) from tfds' manual directory and writes the usual tfds records
under `data_dir`. Splits:

- `train` (1464 images) and `val` (1449 images): `ImageSets/Segmentation/{train,val}.txt`.
- `seg11valid` (736 images): the validation set of Long et al., "Fully Convolutional Networks for
  Semantic Segmentation" (CVPR 2015), Sec. 5: the VOC2011 segmentation val images that are not in
  the SBD training set. The authors ship the list as `data/pascal/seg11valid.txt`.

Masks are the palette PNGs of `SegmentationClass`, read as palette indices (never through RGB).
Index 255 marks object boundaries and "difficult" regions and is kept as the ignore label.

Example:
    >>> from kfcn.data import voc
    >>> ds = voc.load("train", data_dir="/data/tfds", manual_dir="/data/manual")
    >>> ex = next(iter(ds))  # {"image": uint8 [H, W, 3], "label": uint8 [H, W], "name": string}
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from kfcn.data import images
from kfcn.data.images import DataError

logger = logging.getLogger(__name__)

NUM_CLASSES = 21
IGNORE_LABEL = 255
CLASS_NAMES = (
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)
SPLITS = ("train", "val", "seg11valid")
# Sizes of the real splits, for documentation and for users' sanity checks.
NUM_EXAMPLES = {"train": 1464, "val": 1449, "seg11valid": 736}

VOC2012_TAR = "VOCtrainval_11-May-2012.tar"
SEG11VALID_LIST = "seg11valid.txt"
# How many missing files an error message lists before summarising the rest.
MAX_LISTED_MISSING = 20

_CITATION = """\
@article{everingham2015pascal,
  title={The Pascal Visual Object Classes Challenge: A Retrospective},
  author={Everingham, M. and Eslami, S. M. A. and Van Gool, L. and Williams, C. K. I. and
          Winn, J. and Zisserman, A.},
  journal={International Journal of Computer Vision},
  volume={111}, number={1}, pages={98--136}, year={2015}
}
"""

# One example for the builders: (name, image path, label path).
Example = tuple[str, str, str]


# ---------------------------------------------------------------------------------------------
# Helpers shared with the SBD builder.
# ---------------------------------------------------------------------------------------------


def read_id_list(path: os.PathLike | str) -> list[str]:
    """Reads a split list with one image id per line (extra columns and blank lines ignored).

    `kfcn.data.idlist.read_id_list`, the one split-list reader, in its lenient mode.

    Args:
        path: the list file, e.g. `VOCdevkit/VOC2012/ImageSets/Segmentation/train.txt`.

    Returns:
        The ids in file order.

    Raises:
        DataError: the file is missing or holds no ids.
    """
    from kfcn.data import idlist

    return [name for name, _ in idlist.read_id_list(path, strict=False)]


def require_files(paths: Iterable[str], what: str) -> None:
    """Checks that every path exists, reporting all missing ones (up to `MAX_LISTED_MISSING`).

    Args:
        paths: files that must exist.
        what: what the files are for, used in the message (e.g. "VOC2012 split 'train'").

    Raises:
        DataError: naming the missing files and how many there are.
    """
    missing = [p for p in paths if not os.path.isfile(p)]
    if not missing:
        return
    shown = "\n  ".join(missing[:MAX_LISTED_MISSING])
    more = len(missing) - MAX_LISTED_MISSING
    tail = f"\n  ... and {more} more" if more > 0 else ""
    raise DataError(f"{len(missing)} file(s) listed for {what} are missing:\n  {shown}{tail}")


def unique(ids: Iterable[str]) -> list[str]:
    """Returns `ids` without duplicates, keeping first occurrences in order."""
    return list(dict.fromkeys(ids))


def keeps_original_bytes(path: str) -> bool:
    """Whether tfds' `Image(encoding_format="jpeg")` can store the file's own bytes.

    True for RGB JPEGs (passed by path, so no second lossy encoding); anything else (grayscale
    or CMYK JPEG, a PNG under a .jpg name) is stored from the RGB array of `images.read_image`.
    """
    with Image.open(path) as im:
        return im.format == "JPEG" and im.mode == "RGB"


def encode_example(
    name: str,
    image_path: str,
    label_path: str,
    read_label: Callable[[str], np.ndarray],
) -> dict:
    """Validates one image/mask pair and returns the tfds feature dict.

    Args:
        name: the image id.
        image_path: path of the RGB image.
        label_path: path of the mask.
        read_label: reads and validates the mask, returning uint8 [H, W].

    Returns:
        {"image": path or uint8 array, "label": uint8 [H, W, 1], "name": name}.

    Raises:
        DataError: corrupt image or mask, labels outside the classes and the ignore label, or
            image and mask of different sizes; the message names the file(s).
    """
    image = images.read_image(image_path)
    label = read_label(label_path)
    images.check_pair(image, label, image_path, label_path)
    image_input = image_path if keeps_original_bytes(image_path) else image
    return {"image": image_input, "label": label[..., np.newaxis], "name": name}


def segmentation_features() -> tfds.features.FeaturesDict:
    """Returns the features shared by the VOC and SBD builders."""
    return tfds.features.FeaturesDict(
        {
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
            "label": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
            "name": tfds.features.Text(),
        }
    )


def resolve_data_dir(data_dir: str | None) -> str | None:
    """Returns `data_dir`, else `$TFDS_DATA_DIR` read now, else None (tfds' default).

    tfds reads `TFDS_DATA_DIR` once at import; reading it per call also honours a variable set
    after `import tensorflow_datasets`.
    """
    return data_dir if data_dir is not None else os.environ.get("TFDS_DATA_DIR") or None


def load_prepared(
    builder: tfds.core.DatasetBuilder, split: str, manual_dir: str | None
) -> tf.data.Dataset:
    """Prepares `builder` if needed and returns `split` as kfcn element dicts.

    Args:
        builder: a builder of `segmentation_features()`.
        split: the split to read.
        manual_dir: where the manually downloaded data lives; None for tfds' default
            `<data_dir>/downloads/manual`.

    Returns:
        A dataset of {"image": uint8 [H, W, 3], "label": uint8 [H, W], "name": string}.
    """
    # A no-op when the records already exist in data_dir.
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir)
    )
    ds = builder.as_dataset(split=split, shuffle_files=False)
    return ds.map(
        lambda ex: {
            "image": ex["image"],
            "label": tf.squeeze(ex["label"], axis=-1),
            "name": ex["name"],
        },
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )


# ---------------------------------------------------------------------------------------------
# VOC layout.
# ---------------------------------------------------------------------------------------------


def read_voc_label(path: str) -> np.ndarray:
    """Reads a VOC `SegmentationClass` palette PNG as indices in [0, 21) or 255."""
    return images.read_label(path, num_classes=NUM_CLASSES, ignore_label=IGNORE_LABEL)


def _is_devkit_year(path: str) -> bool:
    return os.path.isdir(os.path.join(path, "ImageSets", "Segmentation"))


def locate_voc2012(manual_dir: str, dl_manager: tfds.download.DownloadManager | None) -> str:
    """Finds the VOC2012 folder in `manual_dir`, extracting the original tar if needed.

    Accepted layouts: `<manual_dir>/VOCdevkit/VOC2012/`, `<manual_dir>/VOC2012/`, or
    `<manual_dir>/VOCtrainval_11-May-2012.tar` (extracted by tfds into `<data_dir>/downloads`).

    Args:
        manual_dir: tfds' manual directory.
        dl_manager: used to extract the tar; None to accept extracted folders only.

    Returns:
        The path of the `VOC2012` folder.

    Raises:
        DataError: none of the layouts is present.
    """
    manual_dir = os.fspath(manual_dir)
    for candidate in (
        os.path.join(manual_dir, "VOCdevkit", "VOC2012"),
        os.path.join(manual_dir, "VOC2012"),
    ):
        if _is_devkit_year(candidate):
            return candidate
    tar = os.path.join(manual_dir, VOC2012_TAR)
    if dl_manager is not None and os.path.isfile(tar):
        extracted = os.path.join(os.fspath(dl_manager.extract(tar)), "VOCdevkit", "VOC2012")
        if _is_devkit_year(extracted):
            return extracted
        raise DataError(f"{tar} does not contain VOCdevkit/VOC2012/ImageSets/Segmentation.")
    raise DataError(
        f"No PASCAL VOC 2012 data in manual_dir={manual_dir}: expected the extracted "
        f"{manual_dir}/VOCdevkit/VOC2012/ (with ImageSets/Segmentation, JPEGImages, "
        f"SegmentationClass) or the archive {tar}."
    )


def voc_examples(root: str, ids: Sequence[str]) -> list[Example]:
    """Returns (name, JPEG path, SegmentationClass PNG path) for ids of a VOC year folder."""
    return [
        (
            name,
            os.path.join(root, "JPEGImages", name + ".jpg"),
            os.path.join(root, "SegmentationClass", name + ".png"),
        )
        for name in ids
    ]


def all_paths(examples: Sequence[Example]) -> list[str]:
    """Returns every image and label path of `examples`."""
    return [p for _, image_path, label_path in examples for p in (image_path, label_path)]


def _voc2011_root(manual_dir: str) -> str | None:
    # The 2011 trainval tar unpacks to TrainVal/VOCdevkit/VOC2011.
    for candidate in (
        os.path.join(manual_dir, "VOCdevkit", "VOC2011"),
        os.path.join(manual_dir, "TrainVal", "VOCdevkit", "VOC2011"),
        os.path.join(manual_dir, "VOC2011"),
    ):
        if _is_devkit_year(candidate):
            return candidate
    return None


def _sbd_train_list(manual_dir: str) -> str:
    return os.path.join(manual_dir, "benchmark_RELEASE", "dataset", "train.txt")


def seg11valid_ids(manual_dir: str) -> list[str]:
    """Returns the ids of `seg11valid` (VOC2011 segval minus SBD train, Long et al. 2015).

    Looks, in order, for the authors' list `<manual_dir>/seg11valid.txt`, for
    `VOCdevkit/VOC2011/ImageSets/Segmentation/seg11valid.txt` (where the authors' data layer
    reads it), and else derives it from `VOCdevkit/VOC2011/ImageSets/Segmentation/val.txt` minus
    `benchmark_RELEASE/dataset/train.txt`, keeping the VOC order.

    Args:
        manual_dir: tfds' manual directory.

    Returns:
        The ids.

    Raises:
        DataError: neither the list nor both files to derive it are present (the message names
            the files), or the list is empty.
    """
    manual_dir = os.fspath(manual_dir)
    root2011 = _voc2011_root(manual_dir)
    lists = [os.path.join(manual_dir, SEG11VALID_LIST)]
    if root2011 is not None:
        lists.append(os.path.join(root2011, "ImageSets", "Segmentation", SEG11VALID_LIST))
    for path in lists:
        if os.path.isfile(path):
            return read_id_list(path)

    val2011 = os.path.join(
        root2011 or os.path.join(manual_dir, "VOCdevkit", "VOC2011"),
        "ImageSets",
        "Segmentation",
        "val.txt",
    )
    sbd_train = _sbd_train_list(manual_dir)
    if os.path.isfile(val2011) and os.path.isfile(sbd_train):
        excluded = set(read_id_list(sbd_train))
        ids = [i for i in unique(read_id_list(val2011)) if i not in excluded]
        if not ids:
            raise DataError(f"seg11valid derived from {val2011} minus {sbd_train} is empty.")
        return ids
    missing = [p for p in (val2011, sbd_train) if not os.path.isfile(p)]
    raise DataError(
        "Split 'seg11valid' needs either the FCN authors' list "
        f"{lists[0]} (data/pascal/seg11valid.txt of fcn.berkeleyvision.org) or both "
        f"{val2011} (VOC2011 segmentation val) and {sbd_train} (SBD train); missing: "
        + ", ".join(missing)
    )


class VocSegmentation(tfds.core.GeneratorBasedBuilder):
    """PASCAL VOC 2012 semantic segmentation (train/val) and the FCN `seg11valid` split."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "VOC2012 segmentation train/val and FCN seg11valid."}
    # tfds 4.9 resolves the default `code_path` through `importlib_resources`, which it only
    # installs on Python < 3.9; tfds just needs the builder's file (to look for checksums.tsv).
    code_path = epath.Path(__file__)
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(
            name="voc2012",
            description="VOC2012 segmentation: train (1464) and val (1449).",
        ),
        tfds.core.BuilderConfig(
            name="seg11valid",
            description="VOC2011 segmentation val minus SBD train (736), Long et al. 2015.",
        ),
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
    Download {VOC2012_TAR} from http://host.robots.ox.ac.uk/pascal/VOC/voc2012/ and place it, or
    its extracted VOCdevkit/ folder, in the manual directory (default
    <data_dir>/downloads/manual). For the `seg11valid` split also place there either
    {SEG11VALID_LIST} (data/pascal/seg11valid.txt of fcn.berkeleyvision.org) or both
    VOCdevkit/VOC2011/ImageSets/Segmentation/val.txt and benchmark_RELEASE/dataset/train.txt.
    """

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=("PASCAL VOC semantic segmentation; label 255 marks boundaries (ignored)."),
            features=segmentation_features(),
            homepage="http://host.robots.ox.ac.uk/pascal/VOC/",
            citation=_CITATION,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        manual_dir = os.fspath(dl_manager.manual_dir)
        splits: dict[str, list[Example]] = {}
        if self.builder_config.name == "voc2012":
            root2012 = locate_voc2012(manual_dir, dl_manager)
            for split in ("train", "val"):
                list_file = os.path.join(root2012, "ImageSets", "Segmentation", split + ".txt")
                ids = read_id_list(list_file)
                splits[split] = voc_examples(root2012, unique(ids))
        else:
            ids = seg11valid_ids(manual_dir)
            # VOC2012 holds every VOC2011 segmentation image with the same mask, so either
            # year's folder will do.
            root = _voc2011_root(manual_dir)
            if root is None or not os.path.isdir(os.path.join(root, "SegmentationClass")):
                root = locate_voc2012(manual_dir, dl_manager)
            splits["seg11valid"] = voc_examples(root, unique(ids))
        for split, examples in splits.items():
            require_files(all_paths(examples), f"VOC split {split!r}")
            logger.info("VOC split %r: %d examples.", split, len(examples))
        return {split: self._generate_examples(ex) for split, ex in splits.items()}

    def _generate_examples(self, examples: Sequence[Example]) -> Iterator[tuple[str, dict]]:
        for name, image_path, label_path in examples:
            yield name, encode_example(name, image_path, label_path, read_voc_label)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"`split` must be one of {SPLITS}. Received: split={split!r}")


def builder(split: str, data_dir: str | None = None) -> VocSegmentation:
    """Returns the tfds builder holding `split` ("train", "val" or "seg11valid")."""
    _check_split(split)
    config = "seg11valid" if split == "seg11valid" else "voc2012"
    return VocSegmentation(config=config, data_dir=resolve_data_dir(data_dir))


def load(split: str, data_dir: str | None = None, manual_dir: str | None = None) -> tf.data.Dataset:
    """Loads a PASCAL VOC segmentation split, preparing the tfds records on first use.

    Args:
        split: "train" (1464), "val" (1449) or "seg11valid" (736, Long et al. 2015).
        data_dir: tfds data directory; None for tfds' default (`TFDS_DATA_DIR` or
            ~/tensorflow_datasets).
        manual_dir: directory with `VOCdevkit/` or `VOCtrainval_11-May-2012.tar` (and for
            seg11valid the list or the files to derive it); None for `<data_dir>/downloads/manual`.

    Returns:
        A dataset of {"image": uint8 [H, W, 3], "label": uint8 [H, W] in [0, 21) or 255,
        "name": string}.

    Raises:
        ValueError: unknown split.
        DataError: missing, empty or corrupt input; the message names the file.
    """
    return load_prepared(builder(split, data_dir), split, manual_dir)
