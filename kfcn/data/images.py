"""Validating image and label readers shared by every kfcn dataset loader.

The readers are plain numpy/PIL functions: loaders call them in tfds generators, through
`tf.numpy_function`, or once per file when validating a dataset up front. Every problem with an
input file raises `DataError` (a `ValueError`) whose message names the file and says what is
wrong, so a broken dataset never turns into silently wrong training labels.

Conventions (the FCN paper's datasets, Long et al. CVPR 2015 / TPAMI 2017, all follow them):

* images are returned as uint8 [H, W, 3] RGB; grayscale, palette, RGBA, CMYK and 16-bit images
  are converted, and the first conversion of each kind is logged at WARNING naming the file;
* labels are single-channel class-index images returned as uint8 [H, W]; palette PNGs (VOC
  style) are read as indices, never through their colours; every value must be a class in
  [0, num_classes) or the ignore label (255 for VOC), optional void values are mapped to it.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

__all__ = [
    "DataError",
    "ImageHeader",
    "check_pair",
    "read_header",
    "read_image",
    "read_label",
]

# PIL modes whose pixels are 16-bit (or wider) integers.
_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
# Label modes that hold one integer per pixel.
_INDEX_MODES = ("P", "L", "1") + _WIDE_MODES

_warned_kinds: set[str] = set()
_warned_lock = threading.Lock()


class DataError(ValueError):
    """A dataset file is missing, unreadable or inconsistent.

    The message always names the file (or list file and line) and the problem.
    """


@dataclass(frozen=True)
class ImageHeader:
    """What an image file's header says, read without decoding its pixels.

    Attributes:
        path: the file.
        format: PIL format name, e.g. "PNG" or "JPEG".
        mode: PIL mode, e.g. "RGB", "L", "P", "RGBA", "I;16".
        width: pixels.
        height: pixels.
        bit_depth: bits per sample (8 or 16 for PNG; 8 for other formats, which PIL reads as 8 bit).
    """

    path: str
    format: str
    mode: str
    width: int
    height: int
    bit_depth: int

    @property
    def size(self) -> tuple[int, int]:
        """(height, width), the numpy order."""
        return (self.height, self.width)


def _warn_conversion(kind: str, path: str, detail: str) -> None:
    """Logs the first conversion of each kind at WARNING and later ones at DEBUG."""
    with _warned_lock:
        first = kind not in _warned_kinds
        _warned_kinds.add(kind)
    if first:
        logger.warning(
            "%s: %s (further %s conversions are logged at DEBUG level).", path, detail, kind
        )
    else:
        logger.debug("%s: %s.", path, detail)


def _png_bit_depth(path: str) -> int:
    """Reads the bit depth from a PNG's IHDR chunk (PIL hides 16-bit RGB by reducing it)."""
    with open(path, "rb") as f:
        head = f.read(26)
    if len(head) < 26 or head[12:16] != b"IHDR":
        raise DataError(f"{path}: not a valid PNG file (no IHDR chunk at the start)")
    return struct.unpack(">B", head[24:25])[0]


def _open(path: str | os.PathLike, what: str) -> Image.Image:
    """Opens an image lazily (header only), turning every failure into a DataError."""
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise DataError(f"{path}: cannot read {what} file: {e.strerror or e}") from e
    if size == 0:
        raise DataError(f"{path}: {what} file is empty (0 bytes)")
    try:
        return Image.open(path)
    except Exception as e:  # PIL raises many types for undecodable files.
        raise DataError(f"{path}: cannot decode {what} file: {e}") from e


def read_header(
    path: str | os.PathLike, *, verify: bool = True, what: str = "image"
) -> ImageHeader:
    """Reads an image's format, mode and size without decoding its pixels.

    Args:
        path: image or label file.
        verify: also check the file's integrity with `PIL.Image.verify` (for PNG this checks
            every chunk's CRC, which catches truncated and most corrupted files at the cost of
            reading the file once; it does not decompress pixels).
        what: "image" or "label", for the messages.

    Returns:
        The `ImageHeader`.

    Raises:
        DataError: the file is missing, empty, not an image, truncated or corrupt, or has 0 pixels.
    """
    path = os.fspath(path)
    im = _open(path, what)
    with im:
        fmt, mode, (width, height) = im.format or "", im.mode, im.size
        if width == 0 or height == 0:
            raise DataError(f"{path}: {what} has 0 pixels (size {width}x{height})")
        if verify:
            try:
                im.verify()
            except Exception as e:
                raise DataError(f"{path}: corrupt or truncated {what} file: {e}") from e
    if fmt == "PNG":
        bit_depth = _png_bit_depth(path)
        if verify:
            _check_png_end(path)
    elif mode in _WIDE_MODES:
        bit_depth = 16
    else:
        bit_depth = 8
    if fmt == "JPEG" and verify:
        _check_jpeg_end(path)
    return ImageHeader(path, fmt, mode, width, height, bit_depth)


def _check_png_end(path: str) -> None:
    """PIL's verify stops at the last image data chunk; a file cut after it lacks IEND."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() < 12:
            raise DataError(f"{path}: truncated PNG file")
        f.seek(-12, os.SEEK_END)
        tail = f.read(12)
    if tail[4:8] != b"IEND":
        raise DataError(f"{path}: truncated PNG file (no IEND chunk at the end)")


def _check_jpeg_end(path: str) -> None:
    """A JPEG cut short lacks its end-of-image marker (PIL's verify does not check JPEG data).

    Byte stuffing keeps 0xFFD9 out of the compressed data, so looking for the marker near the
    end tolerates the trailing bytes some cameras append after it.
    """
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(2, size - 1024))
        tail = f.read()
    if b"\xff\xd9" not in tail:
        raise DataError(f"{path}: truncated JPEG file (no end-of-image marker)")


def _load(im: Image.Image, path: str, what: str) -> None:
    try:
        im.load()
    except Exception as e:
        raise DataError(f"{path}: corrupt or truncated {what} file: {e}") from e
    if im.size[0] == 0 or im.size[1] == 0:
        raise DataError(f"{path}: {what} has 0 pixels (size {im.size[0]}x{im.size[1]})")


def _wide_to_uint8(array: np.ndarray) -> np.ndarray:
    # 65535 maps to 255 and 0 to 0; rounding keeps the scaling unbiased.
    return np.round(array.astype(np.float64) / 257.0).clip(0, 255).astype(np.uint8)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Reads an RGB image as uint8, converting other modes with a warning.

    Args:
        path: image file (any format PIL reads: PNG, JPEG, BMP, TIFF, ...).

    Returns:
        uint8 array [H, W, 3].

    Raises:
        DataError: missing, empty, corrupt or truncated file, or an image with 0 pixels.
    """
    path = os.fspath(path)
    im = _open(path, "image")
    with im:
        _load(im, path, "image")
        mode = im.mode
        if im.format == "PNG" and mode == "RGB" and _png_bit_depth(path) == 16:
            # PIL already reduced the 16-bit samples to 8 bit while decoding.
            _warn_conversion("16-bit", path, "16-bit RGB image converted to 8 bit")
        if mode == "RGB":
            array = np.asarray(im)
        elif mode in _WIDE_MODES:
            _warn_conversion(
                "16-bit", path, f"16-bit grayscale image (mode {mode}) scaled to 8-bit RGB"
            )
            gray = _wide_to_uint8(np.asarray(im))
            array = np.repeat(gray[:, :, None], 3, axis=2)
        elif mode == "F":
            raise DataError(f"{path}: floating-point images (mode F) are not supported")
        else:
            kind = {"L": "grayscale", "1": "grayscale", "LA": "grayscale", "P": "palette"}.get(
                mode, mode
            )
            _warn_conversion(kind, path, f"image mode {mode} converted to RGB")
            array = np.asarray(im.convert("RGB"))
    if array.ndim != 3 or array.shape[2] != 3:
        raise DataError(f"{path}: cannot convert image to RGB (got shape {array.shape})")
    return np.ascontiguousarray(array, dtype=np.uint8)


def _palette_to_index(
    rgb: np.ndarray, palette: Mapping[tuple[int, int, int], int], path: str
) -> np.ndarray:
    """Maps an RGB colour mask to class indices; unknown colours are an error."""
    codes = rgb[..., 0].astype(np.int64) << 16 | rgb[..., 1].astype(np.int64) << 8 | rgb[..., 2]
    keys = np.array([r << 16 | g << 8 | b for (r, g, b) in palette], dtype=np.int64)
    values = np.array(list(palette.values()), dtype=np.int64)
    order = np.argsort(keys)
    keys, values = keys[order], values[order]
    pos = np.clip(np.searchsorted(keys, codes), 0, len(keys) - 1)
    known = keys[pos] == codes
    if not known.all():
        bad = np.unique(codes[~known])
        colours = ", ".join(f"({c >> 16},{(c >> 8) & 255},{c & 255})" for c in bad[:10])
        more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise DataError(f"{path}: label colours (R,G,B) not in the palette: {colours}{more}")
    return values[pos]


def read_label(
    path: str | os.PathLike,
    num_classes: int,
    ignore_label: int,
    void_labels: Iterable[int] = (),
    palette: Mapping[tuple[int, int, int], int] | None = None,
) -> np.ndarray:
    """Reads a single-channel class-index label image and checks its values.

    Args:
        path: label file. Palette ('P') PNGs are read as their indices; 'L' as is; 16-bit
            single-channel masks are accepted when all values fit in 8 bits.
        num_classes: classes are 0..num_classes-1.
        ignore_label: the value that marks pixels excluded from loss and metrics (0..255).
        void_labels: values mapped to `ignore_label` (e.g. CamVid's 11, "Unlabelled").
        palette: optional map from RGB colour to class index (or to `ignore_label`), for datasets
            whose masks are colour images. Without it, an RGB mask is an error.

    Returns:
        uint8 array [H, W] whose values are in [0, num_classes) or equal `ignore_label`.

    Raises:
        DataError: unreadable file, a multi-channel mask without `palette`, or values that are
            neither classes nor the ignore label (the message lists them).
        ValueError: invalid `num_classes` or `ignore_label`.
    """
    path = os.fspath(path)
    _check_label_args(num_classes, ignore_label)
    void = sorted({int(v) for v in void_labels})
    im = _open(path, "label")
    with im:
        _load(im, path, "label")
        mode = im.mode
        if mode in _INDEX_MODES:
            values = np.asarray(im)
            if mode == "1":
                values = values.astype(np.uint8)
            elif mode == "L" and im.format == "PNG" and (depth := _png_bit_depth(path)) < 8:
                # PIL stretches 2- and 4-bit gray samples to 0..255; a label's sample is the
                # class index itself, so undo the stretch.
                values = values // (255 // (2**depth - 1))
        elif palette is not None and mode in ("RGB", "RGBA"):
            rgb = np.asarray(im)[..., :3]
            values = _palette_to_index(rgb, palette, path)
        else:
            raise DataError(
                f"{path}: label must be a single-channel index image; got mode {mode}"
                + (" (pass a colour palette to map RGB masks)" if mode in ("RGB", "RGBA") else "")
            )
    return _check_values(values, num_classes, ignore_label, void, path)


def _check_label_args(num_classes: int, ignore_label: int) -> None:
    if not 1 <= num_classes <= 256:
        raise ValueError(f"`num_classes` must be in 1..256. Received: num_classes={num_classes}")
    if not 0 <= ignore_label <= 255:
        raise ValueError(
            f"`ignore_label` must be in 0..255 (labels are uint8). Received: "
            f"ignore_label={ignore_label}"
        )


def _check_values(
    values: np.ndarray, num_classes: int, ignore_label: int, void: Sequence[int], path: str
) -> np.ndarray:
    values = np.asarray(values)
    if values.ndim != 2:
        raise DataError(f"{path}: label must be 2-D; got shape {values.shape}")
    if values.size == 0:
        raise DataError(f"{path}: label has 0 pixels (shape {values.shape})")
    if values.dtype == np.uint8:
        # A histogram of 256 bins is much cheaper than sorting for np.unique.
        present = np.flatnonzero(np.bincount(values.ravel(), minlength=256))
    else:
        present = np.unique(values)
    allowed = set(range(num_classes)) | {ignore_label} | set(void)
    bad = [int(v) for v in present if int(v) not in allowed]
    if bad:
        shown = ", ".join(str(v) for v in bad[:20]) + (" ..." if len(bad) > 20 else "")
        void_txt = f", void values {list(void)}" if void else ""
        raise DataError(
            f"{path}: label values {shown} are neither classes (0..{num_classes - 1}) nor the "
            f"ignore label {ignore_label}{void_txt}"
        )
    out = values.astype(np.uint8)
    if void:
        out[np.isin(values, void)] = ignore_label
    return out


def check_pair(
    image: np.ndarray,
    label: np.ndarray,
    image_path: str | os.PathLike,
    label_path: str | os.PathLike,
) -> None:
    """Checks that an image and its label have the same height and width.

    Args:
        image: [H, W, 3] array.
        label: [H, W] array.
        image_path: the image's file, for the message.
        label_path: the label's file, for the message.

    Raises:
        DataError: the sizes differ (the message names both files and sizes).
    """
    if tuple(image.shape[:2]) != tuple(label.shape[:2]):
        ih, iw = image.shape[:2]
        lh, lw = label.shape[:2]
        raise DataError(
            f"image {os.fspath(image_path)} ({iw}x{ih}) and label {os.fspath(label_path)} "
            f"({lw}x{lh}) have different sizes (width x height)"
        )
