"""Writers of tiny real-format copies of PASCAL VOC, SBD and Cityscapes for the tfds tests.

Files are written the way the real datasets store them: RGB JPEGs, VOC palette PNGs (mode 'P'
with the VOC colour map), SBD `.mat` files holding the MATLAB struct `GTcls` with a
`Segmentation` field, list files with one id per line, Cityscapes zips with the
`leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png` layout.
"""

from __future__ import annotations

import os
import zipfile

import numpy as np
import scipy.io
import scipy.sparse
from PIL import Image

H, W = 20, 30


def voc_palette() -> list[int]:
    """The PASCAL VOC colour map (VOCdevkit's labelcolormap.m), flattened for PIL."""
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


def label_for(index: int, cls: int, boundary: bool = True, h: int = H, w: int = W) -> np.ndarray:
    """A mask: background left third, class `cls` elsewhere, an ignore (255) row if `boundary`."""
    label = np.zeros((h, w), np.uint8)
    label[:, w // 3 :] = cls
    label[h // 2, :] = 255 if boundary else cls
    label[0, 0] = index % 2  # makes masks differ between ids
    return label


def image_colour(index: int) -> tuple[int, int, int]:
    return (40 + 10 * (index % 10), 200 - 7 * (index % 20), 90)


def write_jpeg(path: str, colour: tuple[int, int, int], h: int = H, w: int = W) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (w, h), colour).save(path, format="JPEG", quality=95)


def write_palette_png(path: str, label: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    im = Image.fromarray(label, mode="P")
    im.putpalette(voc_palette())
    im.save(path, format="PNG")


def write_list(path: str, ids: list[str]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(i + "\n" for i in ids))


def make_voc(
    manual_dir: str, splits: dict[str, list[str]], year: str = "VOC2012"
) -> dict[str, np.ndarray]:
    """Writes `VOCdevkit/<year>` with one JPEG and one palette PNG per id and the split lists.

    Returns:
        id -> the label array written.
    """
    root = os.path.join(manual_dir, "VOCdevkit", year)
    labels = {}
    ids = sorted({i for v in splits.values() for i in v})
    for n, name in enumerate(ids):
        labels[name] = label_for(n, cls=1 + n % 20)
        write_jpeg(os.path.join(root, "JPEGImages", name + ".jpg"), image_colour(n))
        write_palette_png(os.path.join(root, "SegmentationClass", name + ".png"), labels[name])
    for split, split_ids in splits.items():
        write_list(os.path.join(root, "ImageSets", "Segmentation", split + ".txt"), split_ids)
    return labels


def write_sbd_mat(path: str, segmentation: np.ndarray) -> None:
    """Writes an SBD `cls/*.mat`: struct GTcls with Segmentation, Boundaries, CategoriesPresent.

    As in the real files, Boundaries is a 20x1 cell of sparse matrices (one per class).
    """
    os.makedirs(os.path.dirname(path), exist_ok=True)
    present = np.unique(segmentation[(segmentation > 0) & (segmentation < 255)])
    boundaries = np.empty((20, 1), dtype=object)
    for k in range(20):
        edge = np.zeros(segmentation.shape, np.uint8)
        edge[0, k % segmentation.shape[1]] = 1
        boundaries[k, 0] = scipy.sparse.csc_matrix(edge)
    gtcls = {
        "Segmentation": segmentation.astype(np.uint8),
        "Boundaries": boundaries,
        "CategoriesPresent": present.astype(np.uint8).reshape(-1, 1),
    }
    scipy.io.savemat(path, {"GTcls": gtcls}, do_compression=True)


def make_sbd(
    manual_dir: str, train: list[str], val: list[str], offset: int = 100
) -> dict[str, np.ndarray]:
    """Writes `benchmark_RELEASE/dataset` with img/*.jpg, cls/*.mat, train.txt and val.txt.

    SBD masks have no 255 boundary band; classes differ from the VOC fixture's by `offset`.

    Returns:
        id -> the segmentation array written.
    """
    root = os.path.join(manual_dir, "benchmark_RELEASE", "dataset")
    labels = {}
    for n, name in enumerate(sorted(set(train) | set(val))):
        labels[name] = label_for(n, cls=1 + (n + offset) % 20, boundary=False)
        write_jpeg(os.path.join(root, "img", name + ".jpg"), image_colour(n + offset))
        write_sbd_mat(os.path.join(root, "cls", name + ".mat"), labels[name])
    write_list(os.path.join(root, "train.txt"), train)
    write_list(os.path.join(root, "val.txt"), val)
    return labels


# Cityscapes images have a fixed size in tfds' builder (its features are 1024x2048).
CS_H, CS_W = 1024, 2048


def _png_bytes(array: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def make_cityscapes(
    manual_dir: str, frames: dict[str, list[tuple[str, np.ndarray]]]
) -> None:
    """Writes leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip.

    Args:
        manual_dir: where the zips go.
        frames: split ("train", "val", "test") -> [(image id "city_000000_000019", labelIds
            uint8 [1024, 2048])].
    """
    os.makedirs(manual_dir, exist_ok=True)
    left = zipfile.ZipFile(os.path.join(manual_dir, "leftImg8bit_trainvaltest.zip"), "w")
    fine = zipfile.ZipFile(os.path.join(manual_dir, "gtFine_trainvaltest.zip"), "w")
    with left, fine:
        for split, items in frames.items():
            for n, (image_id, label_ids) in enumerate(items):
                city = image_id.split("_")[0]
                image = np.zeros((CS_H, CS_W, 3), np.uint8)
                image[..., 0] = 30 * n
                image[: CS_H // 2, :, 1] = 128
                left.writestr(
                    f"leftImg8bit/{split}/{city}/{image_id}_leftImg8bit.png", _png_bytes(image)
                )
                fine.writestr(
                    f"gtFine/{split}/{city}/{image_id}_gtFine_labelIds.png",
                    _png_bytes(label_ids),
                )
