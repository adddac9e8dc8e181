"""Evaluate a model on a dataset split with the FCN paper's metrics.

Prints pixel accuracy, mean accuracy, mean IU and frequency-weighted IU (Long et
al., CVPR 2015, section 5) and a per-class IU table. --output_json writes them
with the confusion matrix. --output_dir also gets results.json, per_image.json
(each image's mean IU and pixel accuracy), confusion_matrix.png and overlays of
the --num_examples worst and best images (ground truth | prediction), ranked by
--rank_by. Class names and colours come from the model when it carries them,
else from the dataset.

examples:
  kfcn evaluate --model runs/camvid/model.keras --dataset camvid --data_dir /data/camvid \\
      --split val --output_dir eval_camvid
  kfcn evaluate --model m.keras --dataset camvid --data_dir D --mode slide --crop_size 256
  kfcn evaluate --model m.keras --dataset camvid --data_dir D --mode msflip \\
      --scales 0.75,1.0,1.25
  kfcn evaluate --model m.keras --dataset folder --list_file roads/val.txt --num_classes 3 \\
      --class_names background,road,car --output_json roads_val.json
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import os
import sys
from typing import Any

from kfcn.cli.args import (
    add_bool,
    add_input_scale,
    apply_input_scale,
    existing_path,
    model_path,
    names_type,
    scales_type,
    size_type,
)
from kfcn.cli.errors import CommandError, UsageError
from kfcn.data import DATASETS
from kfcn.training.config import MODALITIES

HELP = "Evaluate a model on a dataset split (the paper's metrics)."
MODES = ("whole", "slide", "msflip")
DEFAULT_SCALES = "0.5,0.75,1.0,1.25,1.5,1.75"
RANK_BY = ("mean_iou", "pixel_accuracy")
_RANK_LABELS = {"mean_iou": "mean IU", "pixel_accuracy": "pixel accuracy"}


def add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    """The dataset flags `kfcn train` has too (same names and meanings)."""
    data = parser.add_argument_group("data", "Datasets: " + ", ".join(DATASETS) + ".")
    data.add_argument(
        "--dataset", required=True, choices=DATASETS, help="Dataset (kfcn.data.load_dataset)."
    )
    data.add_argument(
        "--data_dir",
        metavar="DIR",
        help="Dataset root: the CamVid or folder root (holding <split>.txt), or the tfds data "
        "directory for voc, sbd, cityscapes.",
    )
    data.add_argument("--split", default="val", help="Split to evaluate (default: %(default)s).")
    data.add_argument(
        "--modality",
        choices=MODALITIES,
        default="rgb",
        help="nyud: the images the model takes: rgb, hha, rgbd, rgb+hha (default: %(default)s).",
    )
    data.add_argument(
        "--manual_dir",
        metavar="DIR",
        help="Folder of the manually downloaded archives of voc, sbd, cityscapes.",
    )
    data.add_argument(
        "--list_file",
        metavar="FILE",
        type=existing_path("list_file"),
        help="folder: list of 'image mask' lines (default <data_dir>/<split>.txt).",
    )
    data.add_argument(
        "--num_classes", type=int, help="folder: number of classes (required for folder)."
    )
    data.add_argument(
        "--ignore_label",
        type=int,
        default=255,
        help="folder: mask value left out of the scores (default: %(default)s).",
    )
    data.add_argument(
        "--class_names",
        type=names_type("class_names"),
        metavar="A,B,...",
        help="folder: comma-separated class names, in index order.",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `kfcn evaluate`."""
    parser.add_argument(
        "--model",
        required=True,
        type=model_path("model"),
        help="The model (.keras) to evaluate, or a preset name (e.g. camvid_fcn8s_mobilenetv2).",
    )
    add_input_scale(parser)
    add_dataset_arguments(parser)
    test = parser.add_argument_group("test mode")
    test.add_argument(
        "--mode",
        choices=MODES,
        default="whole",
        help="whole: one pass at native size (the paper's); slide: overlapping windows; "
        "msflip: several scales and mirrored (default: %(default)s).",
    )
    test.add_argument(
        "--crop_size",
        type=size_type("crop_size"),
        metavar="HxW",
        help="Window size for slide (required there), optional for msflip.",
    )
    test.add_argument(
        "--stride",
        type=size_type("stride"),
        metavar="HxW",
        help="Window stride (default: 2/3 of --crop_size).",
    )
    test.add_argument(
        "--scales",
        type=scales_type("scales"),
        default=scales_type("scales")(DEFAULT_SCALES),
        metavar="S,S,...",
        help=f"msflip: resize factors (default: {DEFAULT_SCALES}).",
    )
    add_bool(test, "flip", True, "msflip: also predict mirrored images")
    # recipes/evaluate.py spelled it --no-flip (argparse's BooleanOptionalAction).
    test.add_argument("--no-flip", dest="flip", action="store_false", help=argparse.SUPPRESS)
    test.add_argument("--max_images", type=int, help="Evaluate only the first N images.")
    out = parser.add_argument_group("output")
    out.add_argument("--output_json", metavar="FILE", help="Write the scores as JSON here.")
    out.add_argument(
        "--output_dir",
        metavar="DIR",
        help="Write results.json, per_image.json, confusion_matrix.png and example overlays.",
    )
    out.add_argument(
        "--num_examples",
        type=int,
        default=3,
        help="Worst and best images drawn into --output_dir, each (default: %(default)s).",
    )
    out.add_argument(
        "--rank_by",
        choices=RANK_BY,
        default="mean_iou",
        help="Per-image score that ranks the examples (default: %(default)s).",
    )


def _check_args(args: argparse.Namespace) -> None:
    from kfcn.cli.export import check_model_path

    check_model_path(args.model)
    if args.mode == "slide" and args.crop_size is None:
        raise UsageError("--mode slide needs --crop_size (e.g. --crop_size 512x512).")
    if args.dataset == "folder" and args.num_classes is None:
        raise UsageError("--dataset folder needs --num_classes.")
    if args.num_classes is not None and args.num_classes < 1:
        raise UsageError(f"--num_classes must be >= 1. Received: --num_classes={args.num_classes}")
    if args.max_images is not None and args.max_images < 1:
        raise UsageError(f"--max_images must be >= 1. Received: --max_images={args.max_images}")
    if args.num_examples < 0:
        raise UsageError(
            f"--num_examples must be >= 0. Received: --num_examples={args.num_examples}"
        )
    if args.dataset == "folder" and args.list_file is None and args.data_dir is None:
        raise UsageError("--dataset folder needs --list_file or --data_dir (holding <split>.txt).")
    if args.stride is not None and args.crop_size is None:
        raise UsageError("--stride is for sliding windows: give --crop_size too.")
    if args.stride is not None and (
        args.stride[0] > args.crop_size[0] or args.stride[1] > args.crop_size[1]
    ):
        raise UsageError(
            "--stride must not exceed --crop_size (windows would skip pixels). Received: "
            f"--stride={args.stride[0]}x{args.stride[1]}, "
            f"--crop_size={args.crop_size[0]}x{args.crop_size[1]}"
        )


def load_inference_model(path: str) -> Any:
    """Loads `--model` as it predicts: auxiliary outputs dropped (`kfcn.inference_model`).

    Accepts a skip or dilated FCN, with or without an auxiliary head, an RGB-D or
    RGB-HHA model, a multi-task model, or any one-input, one-output segmentation
    model of the same contract.

    Raises:
        UsageError: `path` does not exist.
        CommandError: it is not a segmentation model.
    """
    from kfcn.cli.export import load_model_flag

    try:  # one RGB input and one logits output: the common case, with its checks
        return load_model_flag(path, require_kfcn=False)
    except CommandError as error:
        first = error
    # An auxiliary head, several tasks or inputs: the file loaded, the contract differs.
    import kfcn
    from kfcn.export.artifacts import check_segmentation_model
    from kfcn.export.model_io import describe

    try:
        model = kfcn.load_model(path, compile=False)
    except Exception:  # noqa: BLE001 - not a Keras file at all: the first message says so
        raise first from None
    try:
        model = kfcn.inference_model(model)
        one_rgb = (
            len(model.inputs) == 1
            and len(model.outputs) == 1
            and tuple(model.inputs[0].shape)[-1:] == (3,)
        )
        if one_rgb:
            check_segmentation_model(model, source=f"`model` {path!r}", require_kfcn=False)
        else:
            describe(model, source=f"`model` {path!r}")
    except ValueError as error:
        raise CommandError(f"--model: {error}") from error
    return model


def load_dataset_flags(args: argparse.Namespace) -> tuple[Any, Any]:
    """`kfcn.data.load_dataset` with the dataset flags.

    Raises:
        CommandError: the data are missing (not downloaded) or unreadable.
    """
    from kfcn import data

    kwargs: dict[str, Any] = {}
    if args.dataset == "folder":
        kwargs = {"num_classes": args.num_classes, "ignore_label": args.ignore_label}
        if args.list_file:
            kwargs["list_file"] = args.list_file
        if args.class_names:
            kwargs["class_names"] = list(args.class_names)
    elif args.manual_dir and args.dataset != "camvid":
        kwargs["manual_dir"] = args.manual_dir
    if args.dataset == "nyud":
        kwargs["modality"] = getattr(args, "modality", "rgb")
    where = f"--dataset {args.dataset} --split {args.split}"
    if args.data_dir:
        where += f" --data_dir {args.data_dir}"
    try:
        return data.load_dataset(args.dataset, args.split, args.data_dir, **kwargs)
    except (ValueError, OSError) as error:
        hint = (
            "" if "download" in str(error) else " (is the dataset downloaded and --data_dir right?)"
        )
        raise CommandError(f"{where}: {error}{hint}") from error
    except AssertionError as error:  # tfds' "manual download required" check
        raise CommandError(f"{where}: {error}") from error


class ExampleKeeper:
    """Keeps the `count` worst and best images by a per-image score, streaming.

    Memory holds at most 2 * count images, whatever the dataset's size.
    """

    def __init__(self, num_classes: int, ignore_label: int, count: int, rank_by: str):
        self.num_classes = num_classes
        self.ignore_label = ignore_label
        self.count = count
        self.rank_by = rank_by
        self.per_image: list[dict[str, Any]] = []
        self._worst: list[tuple] = []  # max-heap on score via negation
        self._best: list[tuple] = []  # min-heap on score

    def __call__(self, index: int, name: str, image: Any, label: Any, prediction: Any) -> None:
        import numpy as np

        from kfcn import metrics

        label = np.asarray(label)
        confusion = metrics.confusion_matrix(
            label, prediction, self.num_classes, ignore_label=self.ignore_label
        )
        scores = metrics.scores(confusion)
        record = {
            "index": index,
            "name": name,
            "mean_iou": _finite(scores["mean_iou"]),
            "pixel_accuracy": _finite(scores["pixel_accuracy"]),
        }
        self.per_image.append(record)
        score = record[self.rank_by]
        if score is None or self.count == 0:
            return
        item = (np.asarray(image).astype(np.uint8), label, np.asarray(prediction), record)
        heapq.heappush(self._worst, (-score, -index, item))
        if len(self._worst) > self.count:
            heapq.heappop(self._worst)
        heapq.heappush(self._best, (score, index, item))
        if len(self._best) > self.count:
            heapq.heappop(self._best)

    def worst(self) -> list[tuple]:
        """(image, label, prediction, record), worst first."""
        return [entry[2] for entry in sorted(self._worst, key=lambda e: (-e[0], -e[1]))]

    def best(self) -> list[tuple]:
        """(image, label, prediction, record), best first."""
        return [entry[2] for entry in sorted(self._best, key=lambda e: (-e[0], e[1]))]


def _finite(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def _class_info(args: argparse.Namespace, info: Any) -> Any:
    """Names and colours: --class_names, else the model's, else the dataset's."""
    from kfcn import metadata

    carried = metadata.read_class_info(args.model)
    if args.class_names is None and carried is not None:
        if carried.num_classes == info.num_classes:
            return carried
    return metadata.class_info_for_dataset(
        args.dataset, info.num_classes, info.class_names, ignore_label=info.ignore_label
    )


def _safe_name(name: str) -> str:
    base = os.path.splitext(os.path.basename(name))[0] or "image"
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in base)[:80]


def write_example(
    path: str, image: Any, label: Any, prediction: Any, class_info: Any, title: str = ""
) -> None:
    """Ground truth | prediction overlays side by side (the prediction with a legend).

    `title` is written in a white strip above the two pictures.
    """
    import numpy as np
    from PIL import Image, ImageDraw

    from kfcn import visualize
    from kfcn.files import atomic_output

    colours = np.asarray(class_info.palette, np.uint8)
    truth = visualize.overlay(image, label, colours, class_info.names, legend=False)
    predicted = visualize.overlay(image, prediction, colours, class_info.names)
    gap, strip = 8, 16 if title else 0
    width = truth.shape[1] + gap + predicted.shape[1]
    if title:
        width = max(width, int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(title)) + 4)
    height = strip + max(truth.shape[0], predicted.shape[0])
    canvas = np.full((height, width, 3), 255, np.uint8)
    canvas[strip : strip + truth.shape[0], : truth.shape[1]] = truth
    left = truth.shape[1] + gap
    canvas[strip : strip + predicted.shape[0], left : left + predicted.shape[1]] = predicted
    picture = Image.fromarray(canvas)
    if title:
        ImageDraw.Draw(picture).text((2, 2), title, fill=(0, 0, 0))
    with atomic_output(path, suffix=".png") as tmp:
        picture.save(tmp, format="PNG")


def _write_output_dir(
    directory: str, results: dict[str, Any], keeper: ExampleKeeper, class_info: Any
) -> list[str]:
    from kfcn import evaluation, visualize
    from kfcn.files import write_text_atomically

    os.makedirs(directory, exist_ok=True)
    written = [os.path.join(directory, "results.json")]
    evaluation.write_results_json(results, written[0])
    per_image = os.path.join(directory, "per_image.json")
    write_text_atomically(json.dumps(keeper.per_image, indent=2) + "\n", per_image)
    written.append(per_image)
    confusion = os.path.join(directory, "confusion_matrix.png")
    tasks = evaluation.result_tasks(results)
    if "" in tasks:
        visualize.plot_confusion_matrix(results["confusion_matrix"], class_info.names, confusion)
        written.append(confusion)
    for task, scores in tasks.items():
        if task:
            path = os.path.join(directory, f"confusion_matrix_{task}.png")
            visualize.plot_confusion_matrix(scores["confusion_matrix"], list(scores["iou"]), path)
            written.append(path)
    for name in os.listdir(directory):  # examples of an earlier run would mislead
        if name.endswith(".png") and name.startswith(("worst_", "best_")):
            os.remove(os.path.join(directory, name))
    for kind, entries in (("worst", keeper.worst()), ("best", keeper.best())):
        for rank, (image, label, prediction, record) in enumerate(entries, 1):
            path = os.path.join(directory, f"{kind}_{rank}_{_safe_name(record['name'])}.png")
            score = record[keeper.rank_by]
            title = (
                f"{record['name']}: ground truth | prediction "
                f"({_RANK_LABELS[keeper.rank_by]} {100 * score:.1f}%)"
            )
            write_example(path, image, label, prediction, class_info, title)
            written.append(path)
    return written


def run(args: argparse.Namespace) -> int:
    """Evaluates `--model` on the dataset split; prints and writes the scores."""
    _check_args(args)
    apply_input_scale(args)
    model = load_inference_model(args.model)
    dataset, info = load_dataset_flags(args)

    import dataclasses

    from tqdm import tqdm

    from kfcn import evaluation
    from kfcn.input_scale import input_scale_of

    try:
        evaluation.check_num_classes(model, info.num_classes)
    except ValueError as error:
        raise CommandError(f"--model {args.model} and --dataset {args.dataset}: {error}") from error
    multi_task = isinstance(info.num_classes, dict)
    # Names and colours per image are for one task; a multi-task run writes its scores only.
    class_info = None if multi_task else _class_info(args, info)
    if dataclasses.is_dataclass(info) and class_info is not None:
        info = dataclasses.replace(info, class_names=tuple(class_info.names))
    keeper = ExampleKeeper(
        info.num_classes,
        info.ignore_label,
        args.num_examples if args.output_dir and not multi_task else 0,
        args.rank_by,
    )
    total = info.num_examples
    if args.max_images is not None:
        total = min(total, args.max_images) if total else args.max_images
    with tqdm(total=total, unit="image", file=sys.stderr, disable=None) as bar:

        def on_image(index: int, name: str, image: Any, label: Any, prediction: Any) -> None:
            if not multi_task:
                keeper(index, name, image, label, prediction)
            bar.update(1)

        results = evaluation.evaluate(
            model,
            dataset,
            info,
            mode=args.mode,
            crop_size=args.crop_size,
            stride=args.stride,
            scales=args.scales,
            flip=args.flip,
            max_images=args.max_images,
            on_image=on_image,
        )
    results["model"] = os.path.abspath(args.model)
    results["input_scale"] = input_scale_of(model)
    results["dataset"] = args.dataset
    results["split"] = args.split
    print(evaluation.format_results(results))
    if args.output_json:
        evaluation.write_results_json(results, args.output_json)
        print(f"wrote {args.output_json}")
    if args.output_dir:
        for path in _write_output_dir(args.output_dir, results, keeper, class_info):
            print(f"wrote {path}")
    return 0
