"""Evaluates a saved kfcn model on a segmentation dataset (FCN metrics, section 5).

Prints pixel accuracy, mean accuracy, mean IU and frequency-weighted IU, a
per-class IU table, and writes everything (with the confusion matrix) as JSON.

Examples:
    python recipes/evaluate.py --model fcn8s.keras --dataset camvid \\
        --data_dir /work/shared/data/camvid --split val --output_json camvid_val.json
    python recipes/evaluate.py --model fcn8s.keras --dataset camvid --data_dir D \\
        --mode slide --crop_size 256 --stride 170 --output_json slide.json
    python recipes/evaluate.py --model fcn8s.keras --dataset camvid --data_dir D \\
        --mode msflip --scales 0.75,1.0,1.25 --output_json msflip.json
    python recipes/evaluate.py --model m.keras --dataset folder --data_dir D \\
        --list_file D/val.txt --num_classes 2 --ignore_label 255 --output_json f.json
"""

from __future__ import annotations

import argparse
import os
import sys
import zipfile

DATASETS = ("camvid", "voc", "sbd", "cityscapes", "folder")
MODES = ("whole", "slide", "msflip")
DEFAULT_SCALES = "0.5,0.75,1.0,1.25,1.5,1.75"


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected int or int,int; got {text!r}") from e
    if len(values) not in (1, 2) or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive int or int,int; got {text!r}")
    return values if len(values) == 2 else values * 2


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers; got {text!r}") from e
    if any(not v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"scales must be positive; got {text!r}")
    return values


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="saved model (.keras)")
    p.add_argument("--dataset", required=True, choices=DATASETS)
    p.add_argument("--data_dir", help="dataset root (for folder: where list paths start)")
    p.add_argument("--split", default="val")
    p.add_argument("--output_json", required=True, help="where to write the scores")
    p.add_argument("--mode", default="whole", choices=MODES)
    p.add_argument("--crop_size", type=_ints, help="slide window: N or H,W")
    p.add_argument("--stride", type=_ints, help="slide stride: N or H,W (default 2/3 crop)")
    p.add_argument("--scales", type=_floats, default=_floats(DEFAULT_SCALES), help="msflip")
    p.add_argument(
        "--flip",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="msflip: also predict mirrored images (default on; --no-flip to disable)",
    )
    p.add_argument("--list_file", help="folder: list file of 'image label' lines")
    p.add_argument("--num_classes", type=int, help="folder: number of classes")
    p.add_argument("--ignore_label", type=int, default=255, help="folder: ignored label")
    p.add_argument("--class_names", help="folder: comma-separated class names")
    p.add_argument("--manual_dir", help="voc/sbd/cityscapes: manually downloaded archives")
    p.add_argument("--max_images", type=int, help="evaluate only the first N images")
    return p


def _load_model(parser: argparse.ArgumentParser, path: str):
    if not os.path.exists(path):
        parser.error(f"--model: no such file: {path!r}")
    if os.path.isdir(path) or not path.endswith(".keras") or not zipfile.is_zipfile(path):
        parser.error(f"--model: {path!r} is not a Keras model file (a .keras zip archive)")
    import kfcn

    try:
        return kfcn.load_model(path, compile=False)
    except Exception as e:  # any load failure is reported against the flag
        parser.error(f"--model: cannot load {path!r} as a Keras model: {type(e).__name__}: {e}")


def _progress(total: int | None):
    def report(done: int, name: str) -> None:
        of = f"/{total}" if total else ""
        print(f"\r[{done}{of}] {name[:60]:<60}", end="", file=sys.stderr, flush=True)

    return report


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.mode == "slide" and args.crop_size is None:
        parser.error("--crop_size is required with --mode slide")
    if args.dataset == "folder" and args.num_classes is None:
        parser.error("--num_classes is required with --dataset folder")
    if args.max_images is not None and args.max_images < 1:
        parser.error(f"--max_images must be >= 1; got {args.max_images}")

    model = _load_model(parser, args.model)

    from kfcn import data, evaluation

    kwargs = {}
    if args.dataset == "folder":
        kwargs = {
            "num_classes": args.num_classes,
            "ignore_label": args.ignore_label,
            "list_file": args.list_file,
        }
        if args.class_names:
            kwargs["class_names"] = [n.strip() for n in args.class_names.split(",")]
    elif args.manual_dir and args.dataset != "camvid":
        kwargs["manual_dir"] = args.manual_dir
    try:
        dataset, info = data.load_dataset(args.dataset, args.split, args.data_dir, **kwargs)
    except (ValueError, OSError) as e:
        print(f"error: --dataset {args.dataset} --data_dir {args.data_dir}: {e}", file=sys.stderr)
        return 1
    try:
        evaluation.check_num_classes(model, info.num_classes)
    except ValueError as e:
        print(f"error: --model {args.model} and --dataset {args.dataset}: {e}", file=sys.stderr)
        return 1

    total = info.num_examples
    if args.max_images is not None:
        total = min(total, args.max_images) if total else args.max_images
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
        progress=_progress(total),
    )
    print(file=sys.stderr)
    results["model"] = os.path.abspath(args.model)
    results["dataset"] = args.dataset
    results["split"] = args.split
    print(evaluation.format_results(results))
    evaluation.write_results_json(results, args.output_json)
    print(f"wrote {args.output_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
