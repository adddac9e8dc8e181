"""A procedurally generated segmentation dataset where FCN's skips matter.

Each image is a scene of textured materials, one class per material:

| index | class | what it looks like | why it is there |
|---|---|---|---|
| 0 | ground | brown, mottled (low-frequency noise) | large background |
| 1 | water | blue with wavy ripples, a band with a wavy shore | a long curved boundary |
| 2 | stripes | purple/pink diagonal stripes, large ellipses and polygons | large objects |
| 3 | checks | green checkerboard, large ellipses and polygons | large objects |
| 4 | wire | red curves 2-4 px wide, 2-4 per image | thin structures |
| 5 | bead | yellow shaded discs of radius 2.5-4.5 px, 10-24 per image | small objects |

Wires and beads are thinner and smaller than one stride-32 cell (a 128-pixel image
gives FCN-32s a 4x4 score map), so FCN-32s cannot place them and FCN-16s/8s, whose
skips bring in stride-16 and stride-8 features, can: the paper's Figure 2 effect
(Long, Shelhamer, Darrell, CVPR 2015, section 4.2).

Every image is drawn from its own random stream `numpy.random.default_rng((seed,
split, index))`, so a dataset is a pure function of its seed and the splits never
share a stream. `write_folder_dataset` writes the splits in the list-file layout
that `kfcn.data.load_dataset("folder", ...)` reads.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "CLASS_NAMES",
    "NUM_CLASSES",
    "PALETTE",
    "SPLITS",
    "Sample",
    "generate",
    "generate_split",
    "write_folder_dataset",
]

CLASS_NAMES = ("ground", "water", "stripes", "checks", "wire", "bead")
NUM_CLASSES = len(CLASS_NAMES)
GROUND, WATER, STRIPES, CHECKS, WIRE, BEAD = range(NUM_CLASSES)
#: Colours of the class maps (RGB), close to each material's own colour.
PALETTE = (
    (140, 100, 60),
    (40, 110, 200),
    (170, 60, 170),
    (40, 160, 60),
    (230, 40, 30),
    (250, 220, 40),
)
#: Split name -> stream id; the id, not the name's order, keeps splits disjoint.
SPLITS = {"train": 0, "val": 1}

_WIRE_WIDTHS = (2, 3, 4)
_BEAD_RADII = (2.5, 4.5)
# Objects per image: [low, high) of shapes, wires and beads.
_SHAPES = (1, 4)
_WIRES = (2, 5)
_BEADS = (10, 25)


@dataclass(frozen=True)
class Sample:
    """One generated image and its label.

    Attributes:
        image: uint8 [H, W, 3] RGB.
        label: uint8 [H, W] class indices in [0, NUM_CLASSES).
        name: "<split>_<index>", unique in a dataset.
    """

    image: np.ndarray
    label: np.ndarray
    name: str


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Noise in [-1, 1] that varies over `size / cells` pixels (bilinear upsampling)."""
    grid = rng.uniform(-1, 1, (cells + 1, cells + 1)).astype(np.float32)
    small = Image.fromarray(grid)
    return np.asarray(small.resize((size, size), Image.BILINEAR), np.float32)


def _textures(rng: np.random.Generator, size: int) -> np.ndarray:
    """One full-size texture per class, float32 [NUM_CLASSES, size, size, 3]."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    out = np.empty((NUM_CLASSES, size, size, 3), np.float32)

    base = np.array(PALETTE[GROUND], np.float32) + rng.uniform(-20, 20, 3)
    out[GROUND] = base + 35 * _smooth_noise(rng, size, 8)[..., None]

    phase, freq = rng.uniform(0, 2 * np.pi), rng.uniform(0.25, 0.45)
    ripple = np.sin(freq * y + 2.0 * np.sin(0.15 * x + phase))
    out[WATER] = np.array(PALETTE[WATER], np.float32) + 30 * ripple[..., None]

    angle, period = rng.uniform(0, np.pi), rng.uniform(5, 8)
    band = np.cos(angle) * x + np.sin(angle) * y
    on = (np.mod(band + rng.uniform(0, period), period) < period / 2)[..., None]
    out[STRIPES] = np.where(on, (120, 40, 140), (230, 150, 220))

    cell = rng.integers(4, 7)
    shift = rng.integers(0, cell, 2)
    checker = (((x + shift[0]) // cell + (y + shift[1]) // cell) % 2)[..., None]
    out[CHECKS] = np.where(checker > 0, (30, 110, 40), (120, 210, 90))

    out[WIRE] = np.array(PALETTE[WIRE], np.float32) + rng.uniform(-25, 25, 3)
    out[BEAD] = np.array(PALETTE[BEAD], np.float32) + rng.uniform(-20, 10, 3)
    # Beads are shaded (bright centre), so they are not flat colour blobs.
    return out


def _draw_shape(draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: int, cls: int):
    cx, cy = rng.uniform(0.1 * size, 0.9 * size, 2)
    radius = rng.uniform(0.12, 0.25) * size
    if rng.random() < 0.5:
        aspect = rng.uniform(0.5, 1.0)
        box = [cx - radius, cy - radius * aspect, cx + radius, cy + radius * aspect]
        draw.ellipse(box, fill=cls)
    else:
        corners = rng.integers(3, 7)
        angles = np.sort(rng.uniform(0, 2 * np.pi, corners))
        radii = radius * rng.uniform(0.6, 1.0, corners)
        points = [(cx + r * np.cos(a), cy + r * np.sin(a)) for a, r in zip(angles, radii)]
        draw.polygon(points, fill=cls)


def _draw_wire(draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: int):
    """A smooth curve across much of the image: a quadratic Bezier through a random bend."""
    p0, p1, p2 = rng.uniform(-0.1 * size, 1.1 * size, (3, 2))
    t = np.linspace(0, 1, 40)[:, None]
    curve = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
    width = int(rng.choice(_WIRE_WIDTHS))
    draw.line([tuple(p) for p in curve], fill=WIRE, width=width, joint="curve")


def generate(seed: int, split: str, index: int, size: int = 128) -> Sample:
    """Draws one image and its label.

    Args:
        seed: The dataset's seed.
        split: A key of `SPLITS` ("train" or "val").
        index: The image's index in its split.
        size: Height and width in pixels.

    Returns:
        The `Sample`, a pure function of (seed, split, index, size).

    Raises:
        ValueError: If `split` is unknown or `size` < 32.
    """
    if split not in SPLITS:
        raise ValueError(f"`split` must be one of {', '.join(SPLITS)}. Received: split={split!r}")
    if size < 32:
        raise ValueError(f"`size` must be >= 32. Received: size={size}")
    rng = np.random.default_rng((seed, SPLITS[split], index))
    label_image = Image.new("L", (size, size), GROUND)
    draw = ImageDraw.Draw(label_image)

    # A band of water with a wavy shore along one edge, in most images.
    if rng.random() < 0.7:
        x = np.arange(size + 1, dtype=np.float32)
        shore = size * rng.uniform(0.2, 0.45) + size * 0.06 * np.sin(
            x * rng.uniform(0.04, 0.1) + rng.uniform(0, 2 * np.pi)
        )
        edge = [(float(v), float(s)) for v, s in zip(x, shore)]
        polygon = [(0.0, 0.0), (float(size), 0.0)] + edge[::-1]
        if rng.random() < 0.5:  # water at the bottom instead
            polygon = [(0.0, float(size)), (float(size), float(size))] + [
                (v, size - s) for v, s in edge[::-1]
            ]
        draw.polygon(polygon, fill=WATER)
    for _ in range(rng.integers(*_SHAPES)):
        _draw_shape(draw, rng, size, int(rng.choice((STRIPES, CHECKS))))
    for _ in range(rng.integers(*_WIRES)):
        _draw_wire(draw, rng, size)
    label = np.array(label_image, np.uint8)

    # Beads: small shaded discs, drawn into label and image alike.
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    shading = np.zeros((size, size), np.float32)
    for _ in range(rng.integers(*_BEADS)):
        cx, cy = rng.uniform(4, size - 4, 2)
        radius = rng.uniform(*_BEAD_RADII)
        distance = np.hypot(x - cx, y - cy)
        inside = distance <= radius
        label[inside] = BEAD
        shading[inside] = 1 - distance[inside] / radius

    textures = _textures(rng, size)
    image = np.take_along_axis(textures, label[None, :, :, None].astype(np.intp), axis=0)[0]
    image[label == BEAD] += 40 * shading[label == BEAD][:, None] - 20
    image *= rng.uniform(0.85, 1.15)  # global brightness
    image += rng.normal(0, 6, image.shape).astype(np.float32)  # sensor noise
    image = np.clip(image, 0, 255).astype(np.uint8)
    return Sample(image=image, label=label, name=f"{split}_{index:04d}")


def generate_split(seed: int, split: str, count: int, size: int = 128) -> list[Sample]:
    """`count` samples of one split (`generate` for indices 0..count-1)."""
    return [generate(seed, split, index, size) for index in range(count)]


def _palette_bytes() -> list[int]:
    flat = [channel for colour in PALETTE for channel in colour]
    return flat + [0] * (768 - len(flat))


def write_folder_dataset(
    directory: str | os.PathLike,
    sizes: dict[str, int],
    seed: int = 0,
    image_size: int = 128,
) -> dict[str, str]:
    """Generates the splits and writes them in kfcn's `folder` layout.

    Layout: `directory/images/<name>.png` (RGB), `directory/labels/<name>.png`
    (indexed PNG: pixel values are class indices, the palette is `PALETTE` so the
    file also looks right in an image viewer) and one list file per split,
    `directory/<split>.txt`, of `images/<name>.png labels/<name>.png` lines: what
    `kfcn.data.load_dataset("folder", split, data_dir=directory, num_classes=6)`
    reads.

    Args:
        directory: Where to write (created if needed).
        sizes: Split name -> number of images, e.g. {"train": 400, "val": 80}.
        seed: The dataset's seed.
        image_size: Height and width of the images.

    Returns:
        Split name -> path of its list file.

    Raises:
        ValueError: On an unknown split or a count < 1.
    """
    directory = os.fspath(directory)
    for folder in ("images", "labels"):
        os.makedirs(os.path.join(directory, folder), exist_ok=True)
    lists = {}
    for split, count in sizes.items():
        if count < 1:
            raise ValueError(f"`sizes` must hold counts >= 1. Received: {split}={count}")
        lines = []
        for sample in generate_split(seed, split, count, image_size):
            image_path = f"images/{sample.name}.png"
            label_path = f"labels/{sample.name}.png"
            Image.fromarray(sample.image).save(os.path.join(directory, image_path))
            label = Image.frombytes("P", sample.label.shape[::-1], sample.label.tobytes())
            label.putpalette(_palette_bytes())
            label.save(os.path.join(directory, label_path))
            lines.append(f"{image_path} {label_path}\n")
        lists[split] = os.path.join(directory, f"{split}.txt")
        with open(lists[split], "w", encoding="utf-8") as f:
            f.writelines(lines)
    return lists


def class_fractions(samples: Sequence[Sample]) -> np.ndarray:
    """Fraction of all pixels of `samples` in each class, float64 [NUM_CLASSES]."""
    counts = np.zeros(NUM_CLASSES, np.int64)
    for sample in samples:
        counts += np.bincount(sample.label.ravel(), minlength=NUM_CLASSES)
    return counts / max(counts.sum(), 1)
