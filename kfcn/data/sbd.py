"""The Semantic Boundaries Dataset (SBD) and the `train_aug` set as a tfds builder.

SBD (Hariharan et al., "Semantic Contours from Inverse Detectors", ICCV 2011) annotates 11,355
PASCAL images with the 20 VOC classes. Long et al. (FCN, CVPR 2015, Sec. 4.3) train on SBD train
and validate on `seg11valid` (see `kfcn.data.voc`). The builder reads the extracted
`benchmark_RELEASE/dataset` (or the original `benchmark.tgz`) from tfds' manual directory:

- `train` (8498) and `val` (2857): `img/<id>.jpg` with `cls/<id>.mat`, whose MATLAB struct
  `GTcls.Segmentation` holds the class-index mask (0 background, 1..20 classes; SBD has no 255
  boundary band).
- `train_aug` (10,582): the common "augmented VOC" set (used by DeepLab and most later work):
  SBD train + SBD val + VOC2012 seg train, minus VOC2012 seg val, deduplicated. It needs SBD and
  the VOC2012 devkit in the same manual directory. Where an image is in VOC2012 seg train its
  VOC image and `SegmentationClass` mask are used (finer, with 255 boundaries), else SBD's; this
  is the choice behind the widely used `SegmentationClassAug` masks.

Example:
    >>> from kfcn.data import sbd
    >>> ds = sbd.load("train_aug", data_dir="/data/tfds", manual_dir="/data/manual")
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from etils import epath

from kfcn.data import voc
from kfcn.data.images import DataError

NUM_CLASSES = voc.NUM_CLASSES
IGNORE_LABEL = voc.IGNORE_LABEL
CLASS_NAMES = voc.CLASS_NAMES
SPLITS = ("train", "val", "train_aug")
NUM_EXAMPLES = {"train": 8498, "val": 2857, "train_aug": 10582}

SBD_TGZ = "benchmark.tgz"

_CITATION = """\
@inproceedings{hariharan2011semantic,
  title={Semantic Contours from Inverse Detectors},
  author={Hariharan, Bharath and Arbel{\\'a}ez, Pablo and Bourdev, Lubomir and Maji, Subhransu
          and Malik, Jitendra},
  booktitle={International Conference on Computer Vision (ICCV)},
  year={2011}
}
"""


def read_sbd_label(path: str) -> np.ndarray:
    """Reads the class mask of an SBD `cls/*.mat` file (`GTcls.Segmentation`).

    Args:
        path: the .mat file.

    Returns:
        uint8 [H, W] with values in [0, 21) or 255.

    Raises:
        DataError: unreadable file, no `GTcls.Segmentation` field, a mask that is not 2-D, or
            values that are neither classes nor 255 (the message names the file).
    """
    import scipy.io  # Only the SBD reader needs scipy.

    try:
        mat = scipy.io.loadmat(path)
    except Exception as e:  # scipy raises several types for bad files.
        raise DataError(f"{path}: cannot read SBD .mat file: {e}") from e
    try:
        seg = mat["GTcls"]["Segmentation"]
        # MATLAB structs load as (1, 1) record arrays whose fields are (1, 1) object arrays.
        while seg.dtype == object:
            seg = seg.item()
    except (KeyError, ValueError, IndexError) as e:
        raise DataError(
            f"{path}: expected a MATLAB struct GTcls with field Segmentation (SBD cls/ layout)"
        ) from e
    seg = np.asarray(seg)
    if seg.ndim != 2 or seg.size == 0:
        raise DataError(f"{path}: GTcls.Segmentation must be a 2-D mask; got shape {seg.shape}")
    if not np.issubdtype(seg.dtype, np.number) or np.any(seg != np.round(seg)):
        raise DataError(f"{path}: GTcls.Segmentation must hold integers; got dtype {seg.dtype}")
    values = np.unique(seg)
    bad = [v for v in values if not (0 <= v < NUM_CLASSES or v == IGNORE_LABEL)]
    if bad:
        shown = ", ".join(str(int(v)) for v in bad[:20])
        raise DataError(
            f"{path}: label values {shown} are neither classes (0..{NUM_CLASSES - 1}) nor the "
            f"ignore label {IGNORE_LABEL}"
        )
    return seg.astype(np.uint8)


def _read_label(path: str) -> np.ndarray:
    if path.endswith(".mat"):
        return read_sbd_label(path)
    return voc.read_voc_label(path)


def locate_sbd(manual_dir: str, dl_manager: tfds.download.DownloadManager | None) -> str:
    """Finds SBD's `dataset` folder in `manual_dir`, extracting `benchmark.tgz` if needed.

    Accepted layouts: `<manual_dir>/benchmark_RELEASE/dataset/` or `<manual_dir>/benchmark.tgz`.

    Raises:
        DataError: neither is present.
    """
    manual_dir = os.fspath(manual_dir)
    folder = os.path.join(manual_dir, "benchmark_RELEASE", "dataset")
    if os.path.isdir(os.path.join(folder, "cls")):
        return folder
    tgz = os.path.join(manual_dir, SBD_TGZ)
    if dl_manager is not None and os.path.isfile(tgz):
        extracted = os.path.join(os.fspath(dl_manager.extract(tgz)), "benchmark_RELEASE", "dataset")
        if os.path.isdir(os.path.join(extracted, "cls")):
            return extracted
        raise DataError(f"{tgz} does not contain benchmark_RELEASE/dataset/cls.")
    raise DataError(
        f"No SBD data in manual_dir={manual_dir}: expected the extracted {folder}/ (with img/, "
        f"cls/, train.txt, val.txt) or the archive {tgz}."
    )


def sbd_examples(root: str, ids: Sequence[str]) -> list[voc.Example]:
    """Returns (name, img/<id>.jpg, cls/<id>.mat) for SBD ids."""
    return [
        (name, os.path.join(root, "img", name + ".jpg"), os.path.join(root, "cls", name + ".mat"))
        for name in ids
    ]


def train_aug_examples(sbd_root: str, voc_root: str) -> list[voc.Example]:
    """The 10,582-image `train_aug` set: SBD train + val + VOC12 seg train - VOC12 seg val.

    Images in VOC2012 seg train take their VOC image and mask, the rest SBD's.
    """
    sbd_train = voc.read_id_list(os.path.join(sbd_root, "train.txt"))
    sbd_val = voc.read_id_list(os.path.join(sbd_root, "val.txt"))
    seg_dir = os.path.join(voc_root, "ImageSets", "Segmentation")
    voc_train = voc.read_id_list(os.path.join(seg_dir, "train.txt"))
    voc_val = set(voc.read_id_list(os.path.join(seg_dir, "val.txt")))
    in_voc = set(voc_train)
    ids = [i for i in voc.unique(sbd_train + sbd_val + voc_train) if i not in voc_val]
    examples = []
    for name in ids:
        if name in in_voc:
            examples += voc.voc_examples(voc_root, [name])
        else:
            examples += sbd_examples(sbd_root, [name])
    return examples


class SbdSegmentation(tfds.core.GeneratorBasedBuilder):
    """SBD class segmentation (train/val) and the SBD+VOC `train_aug` set."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "SBD train/val and train_aug."}
    # See VocSegmentation.code_path: avoids tfds' undeclared `importlib_resources` import.
    code_path = epath.Path(__file__)
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name="sbd", description="SBD train (8498) and val (2857)."),
        tfds.core.BuilderConfig(
            name="train_aug",
            description="SBD train+val + VOC2012 seg train - VOC2012 seg val (10582).",
        ),
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
    Download {SBD_TGZ} from
    http://home.bharathh.info/pubs/codes/SBD/download.html and place it, or its extracted
    benchmark_RELEASE/ folder, in the manual directory (default <data_dir>/downloads/manual).
    The `train_aug` split also needs PASCAL VOC 2012 there ({voc.VOC2012_TAR} or VOCdevkit/).
    """

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="SBD class segmentation masks for PASCAL images (21 classes).",
            features=voc.segmentation_features(),
            homepage="http://home.bharathh.info/pubs/codes/SBD/download.html",
            citation=_CITATION,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        manual_dir = os.fspath(dl_manager.manual_dir)
        sbd_root = locate_sbd(manual_dir, dl_manager)
        splits: dict[str, list[voc.Example]] = {}
        if self.builder_config.name == "sbd":
            for split in ("train", "val"):
                ids = voc.read_id_list(os.path.join(sbd_root, split + ".txt"))
                splits[split] = sbd_examples(sbd_root, voc.unique(ids))
        else:
            voc_root = voc.locate_voc2012(manual_dir, dl_manager)
            splits["train_aug"] = train_aug_examples(sbd_root, voc_root)
        for split, examples in splits.items():
            voc.require_files(voc.all_paths(examples), f"SBD split {split!r}")
        return {split: self._generate_examples(ex) for split, ex in splits.items()}

    def _generate_examples(self, examples: Sequence[voc.Example]) -> Iterator[tuple[str, dict]]:
        for name, image_path, label_path in examples:
            yield name, voc.encode_example(name, image_path, label_path, _read_label)


def builder(split: str, data_dir: str | None = None) -> SbdSegmentation:
    """Returns the tfds builder holding `split` ("train", "val" or "train_aug")."""
    if split not in SPLITS:
        raise ValueError(f"`split` must be one of {SPLITS}. Received: split={split!r}")
    config = "train_aug" if split == "train_aug" else "sbd"
    return SbdSegmentation(config=config, data_dir=voc.resolve_data_dir(data_dir))


def load(split: str, data_dir: str | None = None, manual_dir: str | None = None) -> tf.data.Dataset:
    """Loads an SBD split, preparing the tfds records on first use.

    Args:
        split: "train" (8498), "val" (2857) or "train_aug" (10582; needs VOC2012 as well).
        data_dir: tfds data directory; None for tfds' default (`TFDS_DATA_DIR` or
            ~/tensorflow_datasets).
        manual_dir: directory with `benchmark_RELEASE/` or `benchmark.tgz` (and for train_aug
            `VOCdevkit/` or the VOC2012 tar); None for `<data_dir>/downloads/manual`.

    Returns:
        A dataset of {"image": uint8 [H, W, 3], "label": uint8 [H, W] in [0, 21) or 255,
        "name": string}.

    Raises:
        ValueError: unknown split.
        DataError: missing, empty or corrupt input; the message names the file.
    """
    return voc.load_prepared(builder(split, data_dir), split, manual_dir)
