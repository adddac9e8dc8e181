"""The main job on an embedded default: build an FCN-8s and segment an image.

    python -m kfcn.demo [--backbone vgg16] [--image PATH] [--output fcn8s_demo.png]

Without `--image`, a generated street-like scene (sky, buildings, road, a car)
is segmented. Without trained weights the classes are those of a fresh network
(the paper zero-initialises the scoring layers, so use `--weights` with a
trained `.keras` file for a meaningful map); the demo shows the whole path:
any-size input in, a per-pixel class map of exactly that size out.
"""

from __future__ import annotations

import argparse
import logging
import os
import time

import numpy as np


def voc_palette(num_classes: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map: class index bits spread over R, G and B."""
    palette = np.zeros((num_classes, 3), np.uint8)
    for index in range(num_classes):
        c, r, g, b = index, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= ((c >> 0) & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette[index] = (r, g, b)
    return palette


def generated_scene(height: int = 375, width: int = 500, seed: int = 0) -> np.ndarray:
    """A synthetic RGB street scene, uint8 (height, width, 3)."""
    rng = np.random.default_rng(seed)
    image = np.zeros((height, width, 3), np.float32)
    rows = np.arange(height)[:, None]
    image[:] = (135, 180, 235)  # sky
    image[rows[:, 0] > height * 0.35] = (150, 120, 100)  # buildings
    image[rows[:, 0] > height * 0.65] = (90, 90, 95)  # road
    top, left = int(height * 0.55), int(width * 0.3)
    image[top : top + height // 6, left : left + width // 4] = (200, 30, 40)  # a car
    image += rng.normal(0, 6, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Segment an image with an FCN-8s.")
    parser.add_argument("--backbone", default="vgg16")
    parser.add_argument("--weights", default=None, help="a trained kfcn .keras model")
    parser.add_argument("--image", default=None, help="an RGB image (default: generated)")
    parser.add_argument("--output", default="fcn8s_demo.png")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from PIL import Image

    import kfcn

    if args.image:
        from kfcn.data.images import read_image

        image = read_image(args.image)
    else:
        image = generated_scene()
    start = time.perf_counter()
    if args.weights:
        model = kfcn.load_model(args.weights, compile=False)
    else:
        model = kfcn.build_fcn8s(backbone=args.backbone)
    built = time.perf_counter() - start
    start = time.perf_counter()
    logits = model.predict(image[None], verbose=0)[0]
    seconds = time.perf_counter() - start
    classes = logits.argmax(-1)
    colours = voc_palette()[classes % 256]
    Image.fromarray(np.concatenate([image, colours], axis=1)).save(args.output)
    counts = np.bincount(classes.ravel(), minlength=logits.shape[-1])
    print(f"model: {model.name}, {model.count_params():,} parameters (built in {built:.1f} s)")
    print(f"input {image.shape[0]}x{image.shape[1]} -> logits {tuple(logits.shape)} "
          f"in {seconds:.2f} s")
    print(f"pixels per class: { {i: int(c) for i, c in enumerate(counts) if c} }")
    print(f"wrote {args.output} (image | class map)")


if __name__ == "__main__":
    main()
