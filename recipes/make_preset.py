"""Packs a finished `kfcn train` run as a shipped preset (`kfcn.presets`).

Scores the run's model on the validation split as it will ship (weights rounded
to the preset's float16 storage), on whole images, with test-time flip and with
several scales and flip (`--msflip_scales`), optionally at one other scale with
flip (`--single_scale`); with `--input_scale S` the preset runs its net at S
times the input's size (`kfcn.with_input_scale`, the plain net's figures kept
under validation.native), and with `--logit_adjustment TAU` it takes TAU of the
run's class weights back out of the scores (`kfcn.logit_adjustment`, the weights
recomputed from the run's training split); a run trained with `kfcn train
--input_scale S --logit_adjustment TAU` gives both by default. It measures the
argmax agreement of the stored weights with the float32 model on every validation pixel, and writes
`kfcn/preset_files/<name>/` with the model card: the training command, data,
steps, wall clock, machine and these scores.

    python recipes/make_preset.py --run_dir /work/runs/camvid_mnv2_60 \
        --name camvid_fcn8s_mobilenetv2 --data_dir ../shared/data/camvid \
        --train_command "kfcn train ..." --wall_clock_minutes 55.2 --use_best

The validation split chooses the checkpoint (`--use_best`: the run's
best.weights.h5) and is reported; it is never trained on.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import numpy as np

# bench/ (the benchmark scripts) names the machine the same way for every figure.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import cpu_model  # noqa: E402


def _scores(results: dict) -> dict:
    keys = ("mean_iou", "pixel_accuracy", "mean_accuracy", "frequency_weighted_iou")
    out = {key: round(float(results[key]), 6) for key in keys}
    out["iou"] = {name: round(float(v), 6) for name, v in results["iou"].items()}
    return out


def _run_config(run_dir: str) -> dict:
    """The run's settings (its config.yaml)."""
    import yaml

    with open(os.path.join(run_dir, "config.yaml"), encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def _class_weight_adjustment(args: argparse.Namespace, config: dict) -> dict:
    """The card's logit_adjustment: tau, the run's class weights and their offsets."""
    from kfcn import losses
    from kfcn.data import load_dataset
    from kfcn.logit_adjustment import class_weight_offsets
    from kfcn.training.config import CLASS_WEIGHT_POWERS

    weighting = config.get("class_weighting", "none")
    if weighting not in CLASS_WEIGHT_POWERS:
        sys.exit(f"--logit_adjustment: the run trained with class_weighting={weighting!r}")
    split = config.get("train_split") or "train"
    train, info = load_dataset(config["dataset"], split, data_dir=args.data_dir)
    weights = losses.median_frequency_weights(
        train, info.num_classes, info.ignore_label, power=CLASS_WEIGHT_POWERS[weighting]
    )
    offsets = class_weight_offsets(weights, args.logit_adjustment)
    return {
        "tau": args.logit_adjustment,
        "class_weighting": f"{weighting}, from the {split} split",
        "class_weights": [round(float(w), 6) for w in weights],
        "offsets": [round(float(v), 6) for v in offsets],
    }


def _settle_test_time(args: argparse.Namespace, config: dict) -> None:
    """--input_scale and --logit_adjustment, defaulting to the run's own settings."""
    if args.input_scale is None:
        args.input_scale = float(config.get("input_scale") or 1.0)
    if args.logit_adjustment is None and config.get("logit_adjustment"):
        args.logit_adjustment = float(config["logit_adjustment"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run_dir", required=True, help="A finished kfcn train run directory.")
    parser.add_argument("--name", required=True, help="Preset name, e.g. camvid_fcn8s_mobilenetv2.")
    parser.add_argument("--data_dir", required=True, help="Root of the validation dataset.")
    parser.add_argument("--dataset", default="camvid", help="Dataset name (load_dataset).")
    parser.add_argument("--split", default="val", help="Validation split.")
    parser.add_argument("--use_best", action="store_true", help="Ship best.weights.h5.")
    parser.add_argument("--train_command", required=True, help="The command that trained it.")
    parser.add_argument("--wall_clock_minutes", type=float, required=True)
    parser.add_argument(
        "--msflip_scales",
        default="0.75,1.0,1.25,1.5,1.75",
        help="Scales of the card's multi-scale + flip figure (kfcn evaluate --mode msflip).",
    )
    parser.add_argument(
        "--single_scale",
        type=float,
        default=None,
        help="Also score one test scale with flip (the card's scale_flip figure, "
        "kfcn evaluate --mode msflip --scales S), e.g. 1.25.",
    )
    parser.add_argument(
        "--input_scale",
        type=float,
        default=None,
        help="The preset runs its net at this multiple of the input's size "
        "(kfcn.with_input_scale); the card's figures are measured so, the plain net's "
        "under validation.native. Default: the run's --input_scale (1.0 if none).",
    )
    parser.add_argument(
        "--logit_adjustment",
        type=float,
        default=None,
        metavar="TAU",
        help="Append kfcn.logit_adjustment's score_adjust layer: -TAU * log(w) for the class "
        "weights w the run trained with (recomputed from its training split), recorded in "
        "the card. Default: the run's --logit_adjustment (none if 0).",
    )
    parser.add_argument("--description", default="")
    parser.add_argument("--architecture", default="")
    parser.add_argument(
        "--output_dir", default=None, help="Default: kfcn/preset_files/<name> of this checkout."
    )
    args = parser.parse_args(argv)

    import kfcn
    from kfcn import evaluation, presets
    from kfcn.data import load_dataset
    from kfcn.input_scale import with_input_scale
    from kfcn.logit_adjustment import with_logit_adjustment
    from kfcn.metadata import read_class_info

    config = _run_config(args.run_dir)
    _settle_test_time(args, config)
    model_path = os.path.join(args.run_dir, "model.keras")
    # The plain net (a run with test-time settings saved it wrapped): best.weights.h5
    # holds the plain net's weights, and the settings are applied again below.
    model = kfcn.load_model(model_path, compile=False)
    model = with_logit_adjustment(with_input_scale(model, 1.0), None)
    info_classes = read_class_info(model_path)
    if info_classes is None:
        sys.exit(f"{model_path} carries no class names; save it with kfcn.metadata.save_model")
    with open(os.path.join(args.run_dir, "result.json"), encoding="utf-8") as handle:
        result = json.load(handle)
    step = result["final_step"]
    if args.use_best:
        model.load_weights(os.path.join(args.run_dir, "best.weights.h5"))
        step = result["best"]["step"]

    adjustment = None
    if args.logit_adjustment is not None:
        adjustment = _class_weight_adjustment(args, config)
        model = with_logit_adjustment(model, adjustment["offsets"])
        print(f"logit adjustment tau {args.logit_adjustment}: offsets {adjustment['offsets']}")

    # The shipped weights: float16-rounded where stored so, as from_preset loads them.
    stored = presets.storage_arrays(model)
    dataset, info = load_dataset(args.dataset, args.split, data_dir=args.data_dir)
    # One pass with the float32 weights keeps their class maps; the pass that scores
    # the stored weights compares against them as it goes.
    reference: list[np.ndarray] = []
    evaluation.evaluate(
        model, dataset, info, mode="whole", on_image=lambda *a: reference.append(np.asarray(a[4]))
    )
    for variable in model.weights:
        variable.assign(stored[variable.path].astype(np.float32))
    agree = total = 0

    def compare(index: int, name: str, image, label, prediction) -> None:
        nonlocal agree, total
        agree += int((np.asarray(prediction) == reference[index - 1]).sum())
        total += reference[index - 1].size

    whole = evaluation.evaluate(model, dataset, info, mode="whole", on_image=compare)
    flip = evaluation.evaluate(model, dataset, info, mode="msflip", scales=(1.0,), flip=True)
    print(f"float16 storage argmax agreement {agree / total:.6f} over {total} pixels")
    native = None
    shipped = model
    if args.input_scale != 1.0:
        # The card's figures are what `kfcn evaluate --model NAME` gives: the net at
        # its input scale; the plain net's are kept under "native".
        native = {"whole": whole, "flip": flip}
        print(f"native: whole mean IU {whole['mean_iou']:.4f}; flip {flip['mean_iou']:.4f}")
        shipped = with_input_scale(model, args.input_scale)
        whole = evaluation.evaluate(shipped, dataset, info, mode="whole")
        flip = evaluation.evaluate(shipped, dataset, info, mode="msflip", scales=(1.0,), flip=True)
    scales = tuple(float(s) for s in args.msflip_scales.split(","))
    msflip = evaluation.evaluate(shipped, dataset, info, mode="msflip", scales=scales, flip=True)
    single = None
    if args.single_scale is not None:
        single = evaluation.evaluate(
            shipped, dataset, info, mode="msflip", scales=(args.single_scale,), flip=True
        )
        print(f"{args.single_scale}x with flip mean IU {single['mean_iou']:.4f}")
    print(
        f"whole mean IU {whole['mean_iou']:.4f}; flip {flip['mean_iou']:.4f}; "
        f"msflip {args.msflip_scales} {msflip['mean_iou']:.4f}"
    )

    def command(extra: str = "") -> str:
        return (
            f"kfcn evaluate --model {args.name} --dataset {args.dataset} --data_dir DATA "
            f"--split {args.split}{extra}"
        )

    card = {
        "name": args.name,
        "description": args.description,
        "architecture": args.architecture,
        "class_info": info_classes.to_dict(),
        "input": "RGB images, uint8 values 0..255 (float accepted), any height and width",
        "training": {
            "command": args.train_command,
            "data": f"{args.dataset} train split only ({result['run']['num_train_examples']} "
            "images), random initialisation (no pretrained weights)",
            "steps": int(result["final_step"]),
            "checkpoint_step": int(step),
            "selection": "best validation mean IU" if args.use_best else "final step",
            "wall_clock_minutes": args.wall_clock_minutes,
            "images_per_second": result.get("images_per_second"),
            "machine": f"{cpu_model()}, {os.cpu_count()} cores, no GPU",
            "tensorflow": __import__("tensorflow").__version__,
            "keras": __import__("keras").__version__,
            # The day the run finished (its result.json), not the day it was packed.
            "date": datetime.date.fromtimestamp(
                os.path.getmtime(os.path.join(args.run_dir, "result.json"))
            ).isoformat(),
        },
        "validation": {
            "data": f"{args.dataset} {args.split} split ({whole['num_images']} images, "
            "native size), used to select the checkpoint, never trained on",
            "command": command(),
            "whole": _scores(whole),
            "flip": {"command": command(" --mode msflip --scales 1.0"), **_scores(flip)},
            "msflip": {
                "command": command(f" --mode msflip --scales {args.msflip_scales}"),
                **_scores(msflip),
            },
            "mean_iou": round(float(whole["mean_iou"]), 6),
        },
        "weights": {
            "storage": f"float16 for arrays of >= {presets.FLOAT16_MIN_SIZE} values, "
            "float32 otherwise; computed in float32",
            "float16_argmax_agreement": round(agree / total, 6),
        },
    }
    if single is not None:
        card["validation"]["scale_flip"] = {
            "command": command(f" --mode msflip --scales {args.single_scale:g}"),
            **_scores(single),
        }
    if adjustment is not None:
        card["logit_adjustment"] = adjustment
    if native is not None:
        card["input_scale"] = args.input_scale
        card["validation"]["native"] = {
            "command": command(" --input_scale 1.0"),
            "whole": _scores(native["whole"]),
            "flip": {
                "command": command(" --input_scale 1.0 --mode msflip --scales 1.0"),
                **_scores(native["flip"]),
            },
        }
    folder = args.output_dir or os.path.join(presets.PRESET_DIR, args.name)
    card = presets.write_preset(model, card, folder)
    size = presets.folder_bytes(folder)
    print(f"wrote {folder} ({size / 1e6:.2f} MB, {card['weights']['parameters']} parameters)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
