"""Segment image files, folders or globs with a kfcn model.

    kfcn predict --model fcn8s.keras --output_dir out photos/ extra/*.jpg

MODEL is a .keras file, a SavedModel directory (kfcn export saved_model) or a
.tflite file (kfcn export tflite). For each input image NAME.ext, writes into
--output_dir:

  NAME.png          class map: indexed (mode "P") PNG of the input's size, its
                    palette the classes' colours (pixel value = class id)
  NAME_overlay.jpg  the image blended with the class colours, legend at the right
  NAME_probs.npy    with --probabilities: float16 softmax [H, W, num_classes]
  summary.json      every image's class pixel fractions, class names, palette

Class names and colours come from the model (kfcn training stores them) or
--palette, else class_0.. and a generic palette. Images of one size are batched
(--batch_size). --tile HxW predicts in overlapping windows for images too large
for memory (logits averaged where windows overlap; a SavedModel's probabilities).
A .tflite file has a fixed input size: other sizes are covered by windows of that
size (padded with the ImageNet mean colour where the image is smaller), never
resized. A folder is searched recursively and its subfolders are kept in the
output names; when two inputs would get the same name (a/x.jpg, b/x.jpg), the
later gets "_2" (x_2.png) with a warning. An image that cannot be decoded is
skipped; the others are written and the command then fails (exit 1) naming the
skipped files. --scales and --flip (a .keras model or preset) average the
probabilities of several resized and mirrored passes, as `kfcn evaluate --mode
msflip` scores them. A multi-task model (SIFT Flow's sem and geo heads) is segmented
for one task per run, --task (default: its first).
"""

from __future__ import annotations

import argparse
import os
import sys

from kfcn.cli.args import (
    add_bool,
    add_input_scale,
    apply_input_scale,
    model_path,
    scales_type,
    size_type,
)
from kfcn.cli.errors import CommandError, UsageError

HELP = "Segment image files, folders or globs."

PALETTE_CHOICES = ("voc", "camvid", "cityscapes", "ade20k", "generic")
_MAX_NAMED_FAILURES = 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `kfcn predict`."""
    parser.add_argument(
        "inputs", nargs="+", metavar="INPUT", help="Image files, folders (recursive) or globs."
    )
    parser.add_argument(
        "--model",
        required=True,
        type=model_path("model"),
        help="A .keras file, a SavedModel directory (or a TF Serving model directory: its "
        "latest version) or a .tflite file, written by kfcn; or a preset name "
        "(kfcn.list_presets(), e.g. camvid_fcn8s_mobilenetv2).",
    )
    add_input_scale(parser)
    parser.add_argument(
        "--output_dir", required=True, help="Where the results go (created if missing)."
    )
    parser.add_argument(
        "--batch_size",
        type=int,
        default=4,
        help="Images of one size per forward pass; windows per pass with --tile (default: 4).",
    )
    parser.add_argument(
        "--tile",
        type=size_type("tile"),
        default=None,
        metavar="HxW",
        help="Predict in overlapping HxW windows, for images too large for memory; where "
        "windows overlap, logits are averaged (a SavedModel's probabilities). A .tflite file "
        "takes only its own input size.",
    )
    parser.add_argument(
        "--tile_stride",
        type=size_type("tile_stride"),
        default=None,
        metavar="HxW",
        help="Step between windows (default: 2/3 of the window).",
    )
    parser.add_argument(
        "--scales",
        type=scales_type("scales"),
        default=None,
        metavar="S,S,...",
        help="Test-time scales (a .keras model or preset): predict each image resized by "
        "each factor and average the probabilities, as `kfcn evaluate --mode msflip` "
        "(e.g. 0.75,1.0,1.25,1.5,1.75; default: one pass at the native size).",
    )
    add_bool(
        parser,
        "flip",
        False,
        "Test-time mirroring (a .keras model or preset): also predict each image mirrored "
        "(at each of --scales) and average",
    )
    add_bool(parser, "probabilities", False, "Also write NAME_probs.npy (float16 softmax)")
    parser.add_argument(
        "--task",
        default=None,
        help="For a multi-task model (SIFT Flow's sem and geo), the task to segment for "
        "(default: its first task).",
    )
    parser.add_argument(
        "--palette",
        choices=PALETTE_CHOICES,
        default=None,
        help="Colours to use instead of the model's (default: the model's, else generic).",
    )
    parser.add_argument(
        "--alpha",
        type=float,
        default=0.5,
        help="Weight of the class colours in the overlay, 0..1 (default: 0.5).",
    )
    add_bool(parser, "legend", True, "Draw a legend of the classes present beside the overlay")


def _check(args: argparse.Namespace) -> None:
    if args.batch_size < 1:
        raise UsageError(f"--batch_size must be >= 1. Received: --batch_size={args.batch_size}")
    if not 0.0 <= args.alpha <= 1.0:
        raise UsageError(f"--alpha must be in [0, 1]. Received: --alpha={args.alpha}")
    if args.tile_stride is not None:
        if args.tile is None:
            raise UsageError("--tile_stride needs --tile")
        if args.tile_stride[0] > args.tile[0] or args.tile_stride[1] > args.tile[1]:
            raise UsageError(
                "--tile_stride must not exceed --tile (windows would skip pixels). Received: "
                f"--tile_stride={args.tile_stride[0]}x{args.tile_stride[1]}, "
                f"--tile={args.tile[0]}x{args.tile[1]}"
            )
    if not os.path.exists(args.model):
        raise UsageError(f"--model {args.model!r} does not exist.")
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise UsageError(f"--output_dir {args.output_dir!r} exists and is not a directory.")


def run(args: argparse.Namespace) -> int:
    """Runs `kfcn predict`; returns 0, or raises for the dispatcher's one-line error."""
    _check(args)
    apply_input_scale(args)
    from kfcn import predict  # TensorFlow and PIL load here, not at --help

    try:
        images = predict.find_images(args.inputs, exclude_dir=args.output_dir)
    except predict.InputError as error:
        raise UsageError(str(error)) from error
    try:
        predictor = predict.load_predictor(args.model, task=args.task)
        predict.check_tile(predictor, args.tile)
        predict.check_scales(predictor, args.scales, args.flip)
    except predict.ModelError as error:
        raise CommandError(str(error)) from error
    except ValueError as error:  # a --tile or --scales the model cannot take
        raise UsageError(str(error)) from error

    from tqdm import tqdm

    # disable=None: a bar on a terminal only, so logs and pipes stay clean.
    with tqdm(total=len(images), unit="image", file=sys.stderr, disable=None) as bar:
        try:
            summary = predict.predict_to_directory(
                predictor,
                images,
                args.output_dir,
                batch_size=args.batch_size,
                tile=args.tile,
                stride=args.tile_stride,
                scales=args.scales,
                flip=args.flip,
                probabilities=args.probabilities,
                palette_name=args.palette,
                alpha=args.alpha,
                legend=args.legend,
                on_image=lambda _: bar.update(1),
            )
        except predict.ModelError as error:
            raise CommandError(str(error)) from error
    done, failed = len(summary["images"]), summary["failed"]
    print(
        f"kfcn predict: {done} of {len(images)} images -> {args.output_dir} "
        f"(NAME.png class maps, NAME_overlay.jpg, summary.json; classes from "
        f"{summary['class_info_source']})"
    )
    if failed:
        named = "; ".join(f["error"] for f in failed[:_MAX_NAMED_FAILURES])
        more = len(failed) - _MAX_NAMED_FAILURES
        raise CommandError(
            f"{len(failed)} of {len(images)} images could not be segmented and were skipped "
            f"(the others were written): {named}" + (f"; and {more} more" if more > 0 else "")
        )
    return 0
