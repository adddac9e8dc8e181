"""Pictures: palettes, class-map colouring, overlays with a legend, and plots.

Palettes (`palette`), uint8 RGB rows indexed by class id:

- ``"voc"``: PASCAL VOC's 256-colour map (the devkit's bit-twiddled `labelcolormap`;
  background black, aeroplane (128, 0, 0), ..., 255 (224, 224, 192) for void).
- ``"camvid"``: the 11 SegNet CamVid classes' customary colours (Sky (128, 128, 128),
  ..., Bicyclist (0, 128, 192)) plus void (11) black.
- ``"cityscapes"``: the 19 train ids' colours from cityscapesScripts' `labels.py`
  (road (128, 64, 128), ..., bicycle (119, 11, 32)).
- ``"ade20k"``: the 150-class ADE20K (SceneParsing) palette that mmsegmentation uses.
- ``"pascal_context"``, ``"pascal_context59"``: mmsegmentation's PASCAL-Context palettes,
  the ADE20K palette's rows 0..59 (60 classes, background first) and 1..59 (59 classes).
- ``"nyud"``, ``"siftflow"``: NYUDv2's 40 classes and SIFT Flow's 33 semantic classes,
  which have no colours of their own: the VOC colour map's rows 1..40 / 1..33 (VOC's black
  background row skipped, since neither dataset has a background class).
- ``"siftflow_geo"``: SIFT Flow's 3 geometric classes: sky (70, 130, 180), horizontal
  (128, 64, 128), vertical (102, 102, 156) (Cityscapes' sky, road and wall colours).
- ``"generic"`` or a number of classes: distinct colours for any number of classes
  (hues spaced by the golden angle, cycling through three saturation/value levels).

Plots (confusion matrix, training curves, the paper's Figure 2 grid) use
matplotlib's object API on an Agg canvas (`matplotlib.figure.Figure`, never
`pyplot`), imported on first use: no global figure state, no display needed.
Overlays are drawn with Pillow (fast enough to run per image in `kfcn predict`).
Every file is written through `kfcn.files.atomic_output`.

Example:
    ```python
    from kfcn import visualize

    colours = visualize.palette("cityscapes")           # (19, 3) uint8
    picture = visualize.overlay(image, class_map, colours, class_names)
    visualize.plot_confusion_matrix(matrix, class_names, "confusion.png")
    visualize.training_curves("run/logs", "curves.png")
    ```
"""

from __future__ import annotations

import colorsys
import glob
import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from kfcn.files import atomic_output

logger = logging.getLogger(__name__)

PALETTES = (
    "voc",
    "camvid",
    "cityscapes",
    "ade20k",
    "pascal_context",
    "pascal_context59",
    "nyud",
    "siftflow",
    "siftflow_geo",
    "generic",
)

#: Colour of class ids outside the palette (e.g. the ignore label 255 with a short palette).
OUT_OF_PALETTE_RGB = (255, 255, 255)

# cityscapesScripts helpers/labels.py: the colour of each trainId 0..18.
_CITYSCAPES = (
    (128, 64, 128),  # road
    (244, 35, 232),  # sidewalk
    (70, 70, 70),  # building
    (102, 102, 156),  # wall
    (190, 153, 153),  # fence
    (153, 153, 153),  # pole
    (250, 170, 30),  # traffic light
    (220, 220, 0),  # traffic sign
    (107, 142, 35),  # vegetation
    (152, 251, 152),  # terrain
    (70, 130, 180),  # sky
    (220, 20, 60),  # person
    (255, 0, 0),  # rider
    (0, 0, 142),  # car
    (0, 0, 70),  # truck
    (0, 60, 100),  # bus
    (0, 80, 100),  # train
    (0, 0, 230),  # motorcycle
    (119, 11, 32),  # bicycle
)

# SegNet's CamVid colours (Sky, Building, Pole, Road, Pavement, Tree, SignSymbol,
# Fence, Car, Pedestrian, Bicyclist) and void (11) black.
_CAMVID = (
    (128, 128, 128),
    (128, 0, 0),
    (192, 192, 128),
    (128, 64, 128),
    (60, 40, 222),
    (128, 128, 0),
    (192, 128, 128),
    (64, 64, 128),
    (64, 0, 128),
    (64, 64, 0),
    (0, 128, 192),
    (0, 0, 0),
)

# ADE20K (150 classes, SceneParsing order) as in mmsegmentation's ADE20KDataset.
_ADE20K_FLAT = (
    "120,120,120 180,120,120 6,230,230 80,50,50 4,200,3 120,120,80 140,140,140 204,5,255 "
    "230,230,230 4,250,7 224,5,255 235,255,7 150,5,61 120,120,70 8,255,51 255,6,82 "
    "143,255,140 204,255,4 255,51,7 204,70,3 0,102,200 61,230,250 255,6,51 11,102,255 "
    "255,7,71 255,9,224 9,7,230 220,220,220 255,9,92 112,9,255 8,255,214 7,255,224 "
    "255,184,6 10,255,71 255,41,10 7,255,255 224,255,8 102,8,255 255,61,6 255,194,7 "
    "255,122,8 0,255,20 255,8,41 255,5,153 6,51,255 235,12,255 160,150,20 0,163,255 "
    "140,140,140 250,10,15 20,255,0 31,255,0 255,31,0 255,224,0 153,255,0 0,0,255 "
    "255,71,0 0,235,255 0,173,255 31,0,255 11,200,200 255,82,0 0,255,245 0,61,255 "
    "0,255,112 0,255,133 255,0,0 255,163,0 255,102,0 194,255,0 0,143,255 51,255,0 "
    "0,82,255 0,255,41 0,255,173 10,0,255 173,255,0 0,255,153 255,92,0 255,0,255 "
    "255,0,245 255,0,102 255,173,0 255,0,20 255,184,184 0,31,255 0,255,61 0,71,255 "
    "255,0,204 0,255,194 0,255,82 0,10,255 0,112,255 51,0,255 0,194,255 0,122,255 "
    "0,255,163 255,153,0 0,255,10 255,112,0 143,255,0 82,0,255 163,255,0 255,235,0 "
    "8,184,170 133,0,255 0,255,92 184,0,255 255,0,31 0,184,255 0,214,255 255,0,112 "
    "92,255,0 0,224,255 112,224,255 70,184,160 163,0,255 153,0,255 71,255,0 255,0,163 "
    "255,204,0 255,0,143 0,255,235 133,255,0 255,0,235 245,0,255 255,0,122 255,245,0 "
    "10,190,212 214,255,0 0,204,255 20,0,255 255,255,0 0,153,255 0,41,255 0,255,204 "
    "41,0,255 41,255,0 173,0,255 0,245,255 71,0,255 122,0,255 0,255,184 0,92,255 "
    "184,255,0 0,133,255 255,214,0 25,194,194 102,255,0 92,0,255"
)


def _voc_palette(count: int = 256) -> np.ndarray:
    """PASCAL VOC devkit's `labelcolormap`: bits of the id spread over R, G, B."""
    colours = np.zeros((count, 3), np.uint8)
    for index in range(count):
        red = green = blue = 0
        value = index
        for shift in range(7, -1, -1):
            red |= ((value >> 0) & 1) << shift
            green |= ((value >> 1) & 1) << shift
            blue |= ((value >> 2) & 1) << shift
            value >>= 3
        colours[index] = (red, green, blue)
    return colours


def generic_palette(num_classes: int) -> np.ndarray:
    """Distinct colours for any number of classes.

    Hue steps by the golden angle (each new colour falls in the largest gap of the
    hues so far); saturation/value cycle through three levels so that neighbouring
    hues also differ in brightness when there are many classes.

    Args:
        num_classes: Number of colours (>= 1).

    Returns:
        uint8 array (num_classes, 3).
    """
    if int(num_classes) < 1:
        raise ValueError(f"`num_classes` must be >= 1. Received: num_classes={num_classes}")
    levels = ((0.75, 0.95), (0.95, 0.7), (0.5, 0.85))
    rows = []
    for index in range(int(num_classes)):
        hue = (0.07 + index * 0.618033988749895) % 1.0
        saturation, value = levels[index % len(levels)]
        rows.append([round(255 * c) for c in colorsys.hsv_to_rgb(hue, saturation, value)])
    return np.asarray(rows, np.uint8)


def _named_palette(name: str) -> np.ndarray:
    if name == "voc":
        return _voc_palette(256)
    if name == "camvid":
        return np.asarray(_CAMVID, np.uint8)
    if name == "cityscapes":
        return np.asarray(_CITYSCAPES, np.uint8)
    if name == "ade20k":
        rows = [[int(v) for v in rgb.split(",")] for rgb in _ADE20K_FLAT.split()]
        return np.asarray(rows, np.uint8)
    if name in _APPENDED_PALETTES:
        return _APPENDED_PALETTES[name]()
    raise ValueError(f"Unknown palette. Expected one of {PALETTES}. Received: {name!r}")


def palette(name_or_num_classes: str | int, num_classes: int | None = None) -> np.ndarray:
    """A colour palette: row i is the RGB colour of class i.

    Args:
        name_or_num_classes: "voc", "camvid", "cityscapes", "ade20k", "pascal_context",
            "pascal_context59", "nyud", "siftflow", "siftflow_geo", "generic", or a number of
            classes (the generic palette of that length).
        num_classes: Length of the result. A named palette is cut to it, or extended
            with generic colours not already in it; "generic" needs it. Default: the
            named palette's own length (voc 256, camvid 12 with void, cityscapes 19,
            ade20k 150, pascal_context 60, pascal_context59 59, nyud 40, siftflow 33,
            siftflow_geo 3).

    Returns:
        uint8 array (N, 3).

    Raises:
        ValueError: For an unknown name or a number of classes below 1.

    Example:
        >>> palette("voc")[1].tolist()                     # aeroplane
        [128, 0, 0]
        >>> palette("cityscapes", 21).shape                # 19 official + 2 generic
        (21, 3)
    """
    if isinstance(name_or_num_classes, (int, np.integer)) and not isinstance(
        name_or_num_classes, bool
    ):
        if num_classes is not None and int(num_classes) != int(name_or_num_classes):
            raise ValueError(
                "Give the number of classes once: palette(N) or palette('generic', N). "
                f"Received: palette({name_or_num_classes}, num_classes={num_classes})"
            )
        return generic_palette(int(name_or_num_classes))
    name = str(name_or_num_classes).strip().lower()
    if name == "generic":
        if num_classes is None:
            raise ValueError("palette('generic') needs `num_classes`. Received: None")
        return generic_palette(int(num_classes))
    colours = _named_palette(name)
    if num_classes is None:
        return colours
    if int(num_classes) < 1:
        raise ValueError(f"`num_classes` must be >= 1. Received: num_classes={num_classes}")
    if num_classes <= len(colours):
        return colours[:num_classes].copy()
    used = {tuple(c) for c in colours.tolist()}
    extra = [c for c in generic_palette(2 * num_classes).tolist() if tuple(c) not in used]
    return np.concatenate([colours, np.asarray(extra[: num_classes - len(colours)], np.uint8)])


def _as_palette(colours: Any) -> np.ndarray:
    colours = np.asarray(colours)
    if colours.ndim != 2 or colours.shape[1] != 3 or len(colours) < 1:
        raise ValueError(
            f"`palette` must be an (N, 3) array of RGB rows. Received shape {colours.shape}"
        )
    return np.clip(colours, 0, 255).astype(np.uint8)


def colorize(class_map: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Colours a class map.

    Args:
        class_map: Integer array (H, W) of class ids.
        palette: (N, 3) RGB rows (e.g. from `palette`). Ids outside [0, N) (such as
            the ignore label 255 with a short palette) are drawn `OUT_OF_PALETTE_RGB`
            (white).

    Returns:
        uint8 RGB array (H, W, 3).
    """
    colours = _as_palette(palette)
    class_map = np.asarray(class_map)
    if class_map.ndim != 2:
        raise ValueError(f"`class_map` must be 2-D (H, W). Received shape {class_map.shape}")
    table = np.concatenate([colours, np.asarray([OUT_OF_PALETTE_RGB], np.uint8)])
    ids = class_map.astype(np.int64)
    ids = np.where((ids >= 0) & (ids < len(colours)), ids, len(colours))
    return table[ids]


def _as_rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    if image.ndim != 3 or image.shape[-1] not in (3, 4):
        raise ValueError(f"`image` must be (H, W, 3) RGB. Received shape {image.shape}")
    image = image[..., :3]
    if image.dtype != np.uint8:
        image = np.clip(np.round(image.astype(np.float32)), 0, 255).astype(np.uint8)
    return image


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow < 10.1 or no FreeType
        return ImageFont.load_default()


def legend_panel(
    entries: Sequence[tuple[str, Sequence[int]]], height: int, font_size: int | None = None
) -> np.ndarray:
    """A white panel listing (text, colour) entries as colour swatches with text.

    Entries fill columns from the top down; a new column starts when the next row
    would pass `height`. The panel is at least one row tall.

    Args:
        entries: (text, RGB colour) pairs, in display order.
        height: Height of the picture the panel goes beside.
        font_size: Text size in pixels; default scales with `height` (11 to 28).

    Returns:
        uint8 RGB array (max(height, one row), panel width, 3).
    """
    from PIL import Image, ImageDraw

    if font_size is None:
        font_size = int(np.clip(round(height / 36), 11, 28))
    font = _font(font_size)
    pad = max(2, font_size // 3)
    row = font_size + 2 * pad
    swatch = font_size
    rows_per_column = max(1, (height - pad) // row)
    columns = max(1, math.ceil(len(entries) / rows_per_column))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    widths = [probe.textbbox((0, 0), text, font=font)[2] for text, _ in entries] or [0]
    column_width = 2 * pad + swatch + pad + max(widths)
    panel_height = max(height, row + pad)
    panel = Image.new("RGB", (columns * column_width + pad, panel_height), (255, 255, 255))
    draw = ImageDraw.Draw(panel)
    for index, (text, colour) in enumerate(entries):
        column, line = divmod(index, rows_per_column)
        x = pad + column * column_width + pad
        y = pad + line * row
        rgb = tuple(int(c) for c in colour)
        draw.rectangle(
            [x, y + pad, x + swatch - 1, y + pad + swatch - 1], fill=rgb, outline=(0,) * 3
        )
        draw.text((x + swatch + pad, y + pad), text, fill=(0, 0, 0), font=font)
    return np.asarray(panel, np.uint8)


def overlay(
    image: np.ndarray,
    class_map: np.ndarray,
    palette: np.ndarray,
    class_names: Sequence[str] | None = None,
    alpha: float = 0.5,
    legend: bool = True,
) -> np.ndarray:
    """The image blended with its class colours, with a legend of the classes present.

    Each pixel is `(1 - alpha) * image + alpha * colour(class)`. With `legend`, a
    white panel is appended on the right: one row per class present in
    `class_map` (colour swatch, name, share of the pixels), largest share first,
    in as many columns as the image's height requires. The result is therefore
    wider than the image (by the panel's width; the image keeps its pixels at the
    top left), and taller only when the image is shorter than one legend row.

    Args:
        image: (H, W, 3) RGB image, uint8 or 0..255 floats (grayscale (H, W) allowed).
        class_map: (H, W) integer class ids.
        palette: (N, 3) RGB rows.
        class_names: Names of the N classes (default "class i").
        alpha: Weight of the class colour, in [0, 1].
        legend: Append the legend panel.

    Returns:
        uint8 RGB array (H', W', 3) with H' >= H and W' >= W (equal without legend).
    """
    image = _as_rgb(image)
    class_map = np.asarray(class_map)
    if class_map.shape != image.shape[:2]:
        raise ValueError(
            f"`class_map` shape {class_map.shape} differs from the image's {image.shape[:2]}"
        )
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"`alpha` must be in [0, 1]. Received: alpha={alpha}")
    colours = _as_palette(palette)
    colour_map = colorize(class_map, colours).astype(np.float32)
    blended = (1.0 - alpha) * image.astype(np.float32) + alpha * colour_map
    blended = np.clip(np.round(blended), 0, 255).astype(np.uint8)
    if not legend:
        return blended
    flat = class_map.astype(np.int64).ravel()
    if flat.min() >= 0:  # bincount: a sort-free count (a 2048x1024 map in ~10 ms)
        counts = np.bincount(flat)
        ids = np.flatnonzero(counts)
        counts = counts[ids]
    else:
        ids, counts = np.unique(flat, return_counts=True)
    order = np.argsort(-counts, kind="stable")
    total = max(int(class_map.size), 1)
    entries = []
    for index in order:
        cls, count = int(ids[index]), int(counts[index])
        if class_names is not None and 0 <= cls < len(class_names):
            name = str(class_names[cls])
        else:
            name = f"class {cls}"
        colour = colours[cls] if 0 <= cls < len(colours) else OUT_OF_PALETTE_RGB
        entries.append((f"{name} {100.0 * count / total:.1f}%", colour))
    panel = legend_panel(entries, image.shape[0])
    height = max(image.shape[0], panel.shape[0])
    out = np.full((height, image.shape[1] + panel.shape[1], 3), 255, np.uint8)
    out[: image.shape[0], : image.shape[1]] = blended
    out[: panel.shape[0], image.shape[1] :] = panel
    return out


def _figure(width: float, height: float):
    """A matplotlib Figure on its own Agg canvas (no pyplot, no global state)."""
    # The object API on an explicit Agg canvas: pyplot's current figure and the
    # process-wide backend are left untouched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def _save_png(figure, path: str | os.PathLike) -> None:
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_output(path, suffix=".png") as tmp:
        figure.savefig(tmp, format="png", bbox_inches="tight")


_NORMALIZE = ("true", "pred", "all", "none")


def plot_confusion_matrix(
    matrix: np.ndarray,
    class_names: Sequence[str] | None,
    path: str,
    normalize: str = "true",
) -> None:
    """Writes a confusion-matrix picture (PNG).

    Rows are ground-truth classes, columns predicted classes (the layout of
    `kfcn.metrics`' confusion matrix and the reference's `fast_hist`).

    Args:
        matrix: (C, C) counts, rows = ground truth, columns = prediction.
        class_names: C names (default "0".."C-1").
        path: The PNG file to write.
        normalize: "true" divides each row by its total (recall per class, the
            diagonal is each class's accuracy), "pred" each column (precision),
            "all" the whole matrix; "none" shows the counts.

    Raises:
        ValueError: For a non-square matrix, a wrong number of names or an unknown
            `normalize`.
    """
    matrix = np.asarray(matrix, np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"`matrix` must be square (C, C). Received shape {matrix.shape}")
    if normalize not in _NORMALIZE:
        raise ValueError(f"`normalize` must be one of {_NORMALIZE}. Received: {normalize!r}")
    count = matrix.shape[0]
    names = (
        [str(n) for n in class_names] if class_names is not None else list(map(str, range(count)))
    )
    if len(names) != count:
        raise ValueError(f"`class_names` has {len(names)} names for a {count}x{count} matrix")
    with np.errstate(invalid="ignore", divide="ignore"):
        if normalize == "true":
            shown = matrix / matrix.sum(axis=1, keepdims=True)
        elif normalize == "pred":
            shown = matrix / matrix.sum(axis=0, keepdims=True)
        elif normalize == "all":
            shown = matrix / matrix.sum()
        else:
            shown = matrix
    shown = np.nan_to_num(shown)
    side = float(np.clip(0.45 * count + 2.5, 4.0, 30.0))
    figure = _figure(side + 1.2, side)
    axes = figure.add_subplot()
    vmax = 1.0 if normalize != "none" else max(float(shown.max()), 1.0)
    picture = axes.imshow(shown, cmap="Blues", vmin=0.0, vmax=vmax, interpolation="nearest")
    figure.colorbar(picture, ax=axes, fraction=0.046, pad=0.04)
    axes.set_xticks(range(count), names, rotation=90, fontsize=8)
    axes.set_yticks(range(count), names, fontsize=8)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    titles = {
        "true": "rows sum to 1 (recall)",
        "pred": "columns sum to 1 (precision)",
        "all": "fraction of all pixels",
        "none": "pixel counts",
    }
    axes.set_title(f"Confusion matrix: {titles[normalize]}")
    if count <= 30:
        for row in range(count):
            for col in range(count):
                value = shown[row, col]
                text = f"{value:.2f}" if normalize != "none" else f"{int(value)}"
                colour = "white" if value > 0.6 * vmax else "black"
                axes.text(col, row, text, ha="center", va="center", fontsize=7, color=colour)
    _save_png(figure, path)


def read_scalars(logdir: str) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """Reads the scalars of every TensorBoard event file under `logdir`.

    Args:
        logdir: A directory of event files, or one whose subdirectories (runs) hold
            them, as kfcn's training writes `model_dir/logs/{train,validation}`.

    Returns:
        {run: {tag: [(step, value), ...] sorted by step}}; run is the event file's
        directory relative to `logdir` ("." for files directly in it). When a step
        was written twice (a resumed run), the last value wins.

    Raises:
        FileNotFoundError: If `logdir` holds no event files.
    """
    import tensorflow as tf
    from tensorflow.core.util import event_pb2

    files = sorted(glob.glob(os.path.join(logdir, "**", "events.out.tfevents.*"), recursive=True))
    if not files:
        raise FileNotFoundError(f"No TensorBoard event files under {logdir!r}")
    runs: dict[str, dict[str, dict[int, float]]] = {}
    for path in files:
        run = os.path.relpath(os.path.dirname(path), logdir)
        tags = runs.setdefault(run, {})
        try:
            # tf.data rather than tf.compat.v1.train.summary_iterator (deprecated, and
            # it logs a warning saying so).
            for record in tf.data.TFRecordDataset(path):
                event = event_pb2.Event.FromString(record.numpy())
                for value in event.summary.value:
                    if value.HasField("tensor"):
                        number = float(np.asarray(tf.make_ndarray(value.tensor)).reshape(-1)[0])
                    elif value.HasField("simple_value"):
                        number = float(value.simple_value)
                    else:
                        continue
                    tags.setdefault(value.tag, {})[int(event.step)] = number
        except tf.errors.DataLossError:  # a file still being written ends mid-record
            logger.warning("%s ends in a partial record; read what precedes it", path)
    return {
        run: {tag: sorted(points.items()) for tag, points in tags.items()}
        for run, tags in runs.items()
        if tags
    }


_LOSS_TAGS = ("loss", "l2")


def training_curves(logdir: str, path: str) -> None:
    """Plots the loss and validation metrics of a training run (PNG).

    Reads the event files kfcn's training loop writes (`model_dir/logs/train`:
    loss, l2, learning_rate, ...; `model_dir/logs/validation`: mean_iou,
    pixel_accuracy, mean_accuracy). Panels: loss (every run's `loss`, and `l2`
    if written), validation metrics (every tag of runs named "validation"/"val"
    or any tag ending in iou/accuracy), and the learning rate when present.

    Args:
        logdir: `model_dir/logs`, or any directory of event files (e.g. a folder of
            several model_dirs: each run's curves are labelled by its path).
        path: The PNG file to write.

    Raises:
        FileNotFoundError: If `logdir` holds no event files.
        ValueError: If they hold no loss or metric scalars.
    """
    runs = read_scalars(logdir)
    panels: dict[str, list[tuple[str, list[tuple[int, float]]]]] = {
        "loss": [],
        "validation metrics": [],
        "learning rate": [],
    }
    for run, tags in sorted(runs.items()):
        evaluation = os.path.basename(run) in ("validation", "val", "eval")
        for tag, points in sorted(tags.items()):
            # "fcn8s/logs/train" (several runs under one folder) -> "fcn8s/train/loss".
            parts = [p for p in run.replace(os.sep, "/").split("/") if p not in (".", "logs")]
            label = "/".join([*parts, tag])
            short = tag.split("/")[-1]
            if short in _LOSS_TAGS:
                panels["loss"].append((label, points))
            elif evaluation or short.endswith(("iou", "accuracy")):
                panels["validation metrics"].append((label, points))
            elif short == "learning_rate":
                panels["learning rate"].append((label, points))
    shown = [(title, series) for title, series in panels.items() if series]
    if not shown:
        raise ValueError(
            f"The event files under {logdir!r} hold no loss, learning-rate or metric scalars "
            f"(tags: {sorted({t for tags in runs.values() for t in tags})})"
        )
    figure = _figure(5.0 * len(shown), 3.8)
    for index, (title, series) in enumerate(shown):
        axes = figure.add_subplot(1, len(shown), index + 1)
        for label, points in series:
            steps, values = zip(*points, strict=True)
            axes.plot(steps, values, label=label, marker="o" if len(points) < 20 else None)
        axes.set_title(title)
        axes.set_xlabel("step")
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize=8)
        if title == "validation metrics":
            axes.set_ylim(0.0, 1.0)
    figure.tight_layout()
    _save_png(figure, path)


def figure_grid(rows: list[list[np.ndarray]], column_titles: list[str], path: str) -> None:
    """Writes a grid of pictures with column titles (PNG): the paper's Figure 2 layout.

    FCN paper (Long et al., CVPR 2015), Fig. 4: image | FCN-32s | FCN-16s | FCN-8s |
    ground truth, one example per row. Pass the class maps already coloured
    (`colorize`) or overlaid (`overlay(..., legend=False)`).

    Args:
        rows: One list of RGB images per row, each as long as `column_titles`;
            the images of a row share a height (widths and rows may differ).
        column_titles: Title above each column.
        path: The PNG file to write.

    Raises:
        ValueError: If a row's length differs from the number of titles or no rows.
    """
    if not rows:
        raise ValueError("`rows` is empty; give at least one row of images")
    columns = len(column_titles)
    for index, row in enumerate(rows):
        if len(row) != columns:
            raise ValueError(f"`rows[{index}]` has {len(row)} images for {columns} `column_titles`")
    images = [[_as_rgb(image) for image in row] for row in rows]
    aspect = float(np.mean([im.shape[1] / im.shape[0] for row in images for im in row]))
    # Cells of the images' mean aspect, gaps and the title strip in inches, so the
    # pictures fill their cells instead of floating in matplotlib's default margins.
    cell_h, gap, title = 2.4, 0.06, 0.35
    cell_w = cell_h * aspect
    width = columns * cell_w + (columns - 1) * gap
    height = len(rows) * cell_h + (len(rows) - 1) * gap + title
    figure = _figure(width, height)
    grid = figure.add_gridspec(
        len(rows),
        columns,
        left=0.0,
        right=1.0,
        bottom=0.0,
        top=1.0 - title / height,
        wspace=gap / cell_w,
        hspace=gap / cell_h,
    )
    for r, row in enumerate(images):
        for c, image in enumerate(row):
            axes = figure.add_subplot(grid[r, c])
            axes.imshow(image, interpolation="nearest")
            axes.set_axis_off()
            if r == 0:
                axes.set_title(column_titles[c], fontsize=11)
    _save_png(figure, path)


# NYUDv2 (40 classes) and SIFT Flow (33 semantic, 3 geometric): see the module docstring.
_SIFTFLOW_GEO = ((70, 130, 180), (128, 64, 128), (102, 102, 156))  # sky, horizontal, vertical
_APPENDED_PALETTES = {
    "nyud": lambda: _voc_palette(41)[1:],
    "siftflow": lambda: _voc_palette(34)[1:],
    "siftflow_geo": lambda: np.asarray(_SIFTFLOW_GEO, np.uint8),
    # mmsegmentation's PascalContextDataset / PascalContextDataset59 palettes.
    "pascal_context": lambda: _named_palette("ade20k")[:60],
    "pascal_context59": lambda: _named_palette("ade20k")[1:60],
}
