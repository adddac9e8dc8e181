"""Train an FCN (Long, Shelhamer, Darrell) on a dataset; resumes from --model_dir.

Every setting is a flag; `--config FILE` (YAML or JSON, keys = flag names) sets
them from a file and flags override it. Each run writes the complete settings it
used to MODEL_DIR/config.yaml, so `kfcn train --config RUN/config.yaml
--model_dir NEW` repeats a run. Rerunning the same command resumes from the last
checkpoint; a run that already reached its steps says so and exits 0.

MODEL_DIR receives config.yaml, checkpoints/, logs/ (TensorBoard: loss, learning
rate, validation scores and prediction overlays), model.keras (with the
dataset's class names and palette), result.json and training_curves.png.

examples:
  kfcn train --dataset camvid --data_dir /data/camvid --model_dir runs/camvid \\
      --backbone mobilenetv2 --weights none --crop_size 256x256 --epochs 25
  kfcn train --dataset folder --list_file roads/train.txt --val_list_file roads/val.txt \\
      --num_classes 3 --class_names background,road,car --model_dir runs/roads
  kfcn train --config runs/roads/config.yaml --model_dir runs/roads_again
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from typing import Any

from kfcn import VARIANTS
from kfcn.cli.args import (
    add_bool,
    existing_path,
    mapping_type,
    model_path,
    names_type,
    parse_with_config,
    range_type,
    scales_type,
    size_type,
)
from kfcn.cli.errors import UsageError
from kfcn.data import DATASETS
from kfcn.training.config import (
    CLASS_WEIGHTINGS,
    DILATED_VARIANTS,
    MODALITIES,
    OPTIMIZERS,
    PHOTOMETRIC,
    VAL_MODES,
    TrainConfig,
)
from kfcn.training.outputs import LOSS_REDUCTIONS
from kfcn.training.schedules import SCHEDULES
from kfcn.training.strategy import STRATEGIES

HELP = "Train an FCN; resumes from --model_dir."

#: Exit status when a peer worker died (the process leaves with os._exit).
PEER_FAILURE_EXIT_CODE = 4

# Required settings (model_dir) have no default: None, so the "is required" check fires.
_DEFAULTS = {
    f.name: None if f.default is dataclasses.MISSING else f.default
    for f in dataclasses.fields(TrainConfig)
}
# As typed on the command line (argparse parses string defaults with the flag's type).
_DEFAULTS.update(
    crop_size="x".join(map(str, _DEFAULTS["crop_size"])),
    scale_range=",".join(map(str, _DEFAULTS["scale_range"])),
)
_NONE_WORDS = ("", "none", "null")


def _weights(text: str) -> str | None:
    if text.strip().lower() in _NONE_WORDS:
        return None
    if text != "imagenet" and not os.path.isfile(text):
        raise UsageError(
            f"--weights must be none, imagenet or an existing Keras Applications weights "
            f"file. Received: --weights={text!r}"
        )
    return text


def _optional_text(text: str) -> str | None:
    return None if text.strip().lower() in _NONE_WORDS else text


def _optional_float(text: str) -> float | None:
    return None if str(text).strip().lower() in _NONE_WORDS else float(text)


def _optional_size(flag: str) -> Any:
    parse = size_type(flag)

    def optional(text: Any) -> tuple[int, int] | None:
        if isinstance(text, str) and text.strip().lower() in _NONE_WORDS:
            return None
        return parse(text)

    optional.__name__ = "size"
    optional.accepts_sequence = True
    return optional


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds one flag per `kfcn.training.TrainConfig` field, help beside the default."""

    def flag(name: str, help: str, **kwargs: Any) -> None:
        # Help that explains its own default ("default: <data_dir>/...") keeps it.
        kwargs.setdefault("default", _DEFAULTS.get(name))
        kwargs.setdefault("metavar", _METAVARS.get(kwargs.get("type"), "X"))
        if "choices" in kwargs:
            kwargs.pop("metavar")
        text = help if "default" in help else f"{help} (default: %(default)s)"
        parser.add_argument(f"--{name}", help=text, **kwargs)

    parser.add_argument(
        "--config",
        metavar="FILE",
        type=existing_path("config"),
        help="YAML or JSON file of settings (keys = flag names, e.g. a run's config.yaml); "
        "flags given as well override it.",
    )
    # Where the data and the run are.
    flag(
        "model_dir",
        "Run directory, required: config.yaml, checkpoints/, logs/, model.keras, result.json.",
        metavar="DIR",
    )
    flag("dataset", "Training dataset (any name kfcn.data.load_dataset knows).", choices=DATASETS)
    flag(
        "data_dir",
        "Dataset root: the camvid or folder root holding <split>.txt, or the "
        "tfds data directory of voc, sbd, cityscapes (default: their own default).",
        metavar="DIR",
    )
    flag(
        "manual_dir",
        "voc, sbd, cityscapes: folder of the manually downloaded archives "
        "(default: <data_dir>/downloads/manual).",
        metavar="DIR",
    )
    flag(
        "list_file",
        "folder: training list of 'image mask' lines (default: <data_dir>/<train_split>.txt).",
        type=existing_path("list_file"),
        metavar="FILE",
    )
    flag(
        "val_list_file",
        "folder: validation list (default: <data_dir>/<val_split>.txt; "
        "without either, no validation).",
        type=existing_path("val_list_file"),
        metavar="FILE",
    )
    flag("num_classes", "folder: number of classes (required with folder).", type=int)
    flag("ignore_label", "folder: mask value left out of loss and scores (default: 255).", type=int)
    flag(
        "class_names",
        "folder: comma-separated class names in index order (default: class_0,...).",
        type=names_type("class_names"),
        metavar="A,B,...",
    )
    flag("train_split", "Training split (default: train_aug for sbd, else train).", metavar="SPLIT")
    flag("val_dataset", "Validation dataset (default: --dataset).", choices=DATASETS)
    flag(
        "val_split",
        "Validation split; none skips validation.",
        type=_optional_text,
        metavar="SPLIT",
    )
    # The network and its start.
    flag("strategy", "Distribution strategy.", choices=STRATEGIES)
    flag("cpu_replicas", "Logical CPU devices for --strategy mirrored without GPUs.", type=int)
    flag(
        "backbone", "Backbone (kfcn.backbones), e.g. vgg16, resnet50, mobilenetv2.", metavar="NAME"
    )
    flag(
        "variant",
        "FCN variant: the paper's skip nets (fcn4s: FCN-8s with a pool2 skip), or "
        "mmsegmentation's dilated nets "
        "(fcn_d8, fcn_d16: output stride 8, 16; fcn_d6: stride 16, dilation-6 head; "
        "with --backbone resnet50_v1c etc.).",
        choices=(*VARIANTS, *DILATED_VARIANTS),
    )
    flag("head_channels", "Dilated nets: channels of the FCNHead's convs.", type=int)
    flag("num_convs", "Dilated nets: 3x3 conv layers of the FCNHead.", type=int)
    add_bool(
        parser,
        "concat_input",
        True,
        "Dilated nets: concatenate the head's input with its convs' output",
    )
    add_bool(parser, "aux_head", False, "Dilated nets: train an auxiliary FCNHead (stride-8 stage)")
    flag("aux_channels", "Dilated nets: channels of the auxiliary head.", type=int)
    add_bool(parser, "sync_batchnorm", True, "Dilated nets: BatchNorm synchronised over replicas")
    flag(
        "modality",
        "Skip nets: input modality (NYUDv2): rgb, rgbd (early fusion), hha, rgb+hha "
        "(two streams, late fusion).",
        choices=MODALITIES,
    )
    flag(
        "heads",
        "Skip nets: one head per task, name:classes pairs (SIFT Flow sem:33,geo:3; "
        "default: the dataset's tasks when it has several).",
        type=mapping_type("heads", int),
        metavar="TASK:N,...",
    )
    flag(
        "weights",
        "Backbone weights: none, imagenet (downloaded once) or a Keras "
        "Applications classifier weights file.",
        type=_weights,
        metavar="W",
    )
    flag(
        "init_from",
        "A .keras model (or a preset name, e.g. camvid_fcn8s_mobilenetv2) whose "
        "same-named layers initialise this one (staged training: 32s, then 16s, then 8s).",
        type=model_path("init_from"),
        metavar="FILE",
    )
    add_bool(parser, "trainable_upsampling", False, "Learn the bilinear upsampling")
    flag("dropout", "Dropout rate of the classifier.", type=float)
    flag(
        "bn_momentum",
        "Momentum of every BatchNormalization layer (default: the backbone's; "
        "0.9 suits short runs from scratch).",
        type=float,
    )
    # Optimisation.
    flag("batch_size", "Global batch size (over all replicas and workers).", type=int)
    flag("crop_size", "Training crop HxW or N.", type=size_type("crop_size"), metavar="HxW")
    flag(
        "scale_range",
        "Random rescaling min,max (1,1 disables).",
        type=range_type("scale_range"),
        metavar="MIN,MAX",
    )
    flag("epochs", "Training epochs, when --steps is not given.", type=int)
    flag("steps", "Training steps (overrides --epochs).", type=int)
    flag(
        "time_budget",
        "Minutes of training wall clock, validations included: the run ends where its pace "
        "projects the budget to run out and poly decays to that step; --steps/--epochs "
        "still cap it.",
        type=float,
        metavar="MINUTES",
    )
    flag("optimizer", "Optimizer.", choices=OPTIMIZERS)
    flag("learning_rate", "Initial learning rate.", type=float)
    flag("momentum", "SGD momentum.", type=float)
    flag("weight_decay", "L2 on kernels added to the loss (Caffe's weight_decay).", type=float)
    flag(
        "ema_momentum",
        "Exponential moving average of the weights with this momentum, e.g. 0.998: "
        "validation, best.weights.h5 and model.keras use the average (0: off).",
        type=float,
    )
    flag(
        "schedule",
        "poly: lr*(1-step/steps)^0.9; fixed: the paper's constant rate.",
        choices=SCHEDULES,
    )
    flag("min_learning_rate", "poly ends at this rate (mmseg: 1e-4).", type=float)
    flag("poly_power", "Exponent of poly.", type=float)
    flag(
        "class_weighting",
        "Loss class weights from the training labels: median_frequency (Eigen & Fergus) "
        "or sqrt_median_frequency (their square roots, milder on rare classes).",
        choices=CLASS_WEIGHTINGS,
    )
    flag(
        "loss_reduction",
        "mean: each output's loss over the global batch's valid pixels; sum: unnormalised, "
        "as the paper's solvers (normalize: false).",
        choices=LOSS_REDUCTIONS,
    )
    flag(
        "aux_loss_weight",
        "Loss weight of the auxiliary head (mmseg 0.4; torchvision 0.5).",
        type=float,
    )
    flag(
        "task_loss_weights",
        "Loss weight of each task, name:weight pairs, e.g. sem:1,geo:1 (default: 1 each).",
        type=mapping_type("task_loss_weights", float),
        metavar="TASK:W,...",
    )
    add_bool(parser, "flip", True, "Random horizontal mirroring of training crops")
    flag(
        "photometric",
        "Colour augmentation of RGB: jitter (brightness, contrast, saturation, hue) or "
        "mmseg (its PhotoMetricDistortion).",
        choices=PHOTOMETRIC,
    )
    flag(
        "cat_max_ratio",
        "Redraw a training crop (up to 10 times) while one class covers more than this "
        "fraction (mmseg: 0.75; default: off).",
        type=_optional_float,
    )
    add_bool(
        parser,
        "mixed_precision",
        False,
        "float16 (GPU) or bfloat16 (CPU) compute; model.keras stays float32",
    )
    add_bool(
        parser,
        "float32_depthwise",
        False,
        "With --mixed_precision: depthwise convolutions, their batch norm and activation "
        "in float32 (MobileNetV2 on CPU: faster than all-bfloat16)",
    )
    add_bool(
        parser,
        "jit_compile",
        False,
        "Compile the train step with XLA (one replica; measure first: slower for "
        "MobileNetV2 on CPU)",
    )
    # Bookkeeping.
    flag("eval_every", "Validate every N steps (0: every epoch) and at the end.", type=int)
    flag("max_eval_images", "Validate on at most N images (default: all).", type=int)
    flag(
        "val_mode",
        "Validation on whole images, slide windows or msflip (--val_scales, --val_flip).",
        choices=VAL_MODES,
    )
    flag(
        "val_crop_size",
        "slide: window HxW (mmseg Cityscapes 769x769: 769).",
        type=_optional_size("val_crop_size"),
        metavar="HxW",
    )
    flag(
        "val_stride",
        "slide: window stride HxW (mmseg: 513; default: 2/3 of the window).",
        type=_optional_size("val_stride"),
        metavar="HxW",
    )
    flag(
        "val_scales",
        "msflip: resize factors, e.g. 1.0 (flip alone) or 0.75,1.0,1.25.",
        type=scales_type("val_scales"),
        metavar="S,...",
    )
    add_bool(parser, "val_flip", True, "msflip: also predict the mirrored images")
    flag(
        "input_scale",
        "Validate and save the net run at this multiple of the input's size "
        "(kfcn.with_input_scale), e.g. 1.25; checkpoints hold the plain net.",
        type=float,
        metavar="S",
    )
    flag(
        "logit_adjustment",
        "Validate and save the net with TAU of the class weights taken back out of its "
        "scores (-TAU*log w, kfcn.with_logit_adjustment), e.g. 0.5; needs --class_weighting.",
        type=float,
        metavar="TAU",
    )
    flag(
        "selection_metric",
        "Validation score that picks best.weights.h5: mean_iou (the tasks' mean), or "
        "TASK/SCORE, e.g. sem/mean_iou.",
        metavar="SCORE",
    )
    flag("num_overlays", "Prediction overlays written to TensorBoard per validation.", type=int)
    flag("checkpoint_every", "Checkpoint every N steps (0: every epoch) and at the end.", type=int)
    flag("log_every", "Log a progress line (loss, lr, images/s, ETA) every N steps.", type=int)
    flag(
        "seed",
        "Seed of initialisation, shuffling and augmentation (default: drawn once, "
        "recorded in config.yaml).",
        type=int,
    )
    flag("step_timeout", "Exit if no step finishes for this many seconds (0 disables).", type=float)
    flag("collective_timeout", "Multi-worker all-reduce timeout in seconds (0: none).", type=float)


_METAVARS = {int: "N", float: "X", None: "TEXT"}


def parse_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Flags over `--config FILE` over the (preset's) defaults."""
    return parse_with_config(parser, argv)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The `TrainConfig` of parsed flags.

    Raises:
        UsageError: naming the flag of an invalid setting.
    """
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    if not values["model_dir"]:
        raise UsageError("--model_dir is required (the run directory).")
    for name in ("step_timeout", "collective_timeout"):
        if values[name] is not None and values[name] <= 0:
            values[name] = None
    try:
        config = TrainConfig(**values)
        config.validate()
    except ValueError as error:
        from kfcn.cli import _flag_spelling, build_parser

        raise UsageError(_flag_spelling(str(error), build_parser("train"))) from error
    return config


def run(args: argparse.Namespace, *, model_fn: Any = None) -> int:
    """Trains (or resumes, or reports a complete run); prints where the model went.

    Args:
        args: parsed flags.
        model_fn: `(config, num_classes) -> keras.Model` in place of `kfcn.build_fcn`
            (tests use a tiny model).
    """
    config = config_from_args(args)
    from kfcn import training
    from kfcn.training import loop

    try:
        result = training.fit(config, model_fn=model_fn)
    except loop.PeerFailureError as error:
        # TensorFlow's aborted collective threads can block a normal exit.
        print(f"kfcn train: error: {' '.join(str(error).split())}", file=sys.stderr)
        logging.shutdown()
        sys.stderr.flush()
        os._exit(PEER_FAILURE_EXIT_CODE)
    budget = result.time_budget
    if result.already_complete:
        end = f"step {result.final_step} of {result.total_steps}"
        further = "Raise --steps or --epochs to train further"
        if budget and budget["ended_by"] == "time_budget":
            end = (
                f"its time budget of {budget['minutes']:g} minutes ended it at step "
                f"{budget['last_step']}"
            )
            further = (
                f"To train further, start a new --model_dir with --init_from {result.model_path}"
            )
        print(
            f"{config.model_dir} is already complete: {end}; nothing to train. {further}. "
            f"Model: {result.model_path}"
        )
        return 0
    scores = result.validation
    summary = f"Trained steps {result.start_step}-{result.final_step} of {result.total_steps}"
    if budget:
        summary += (
            f" ({budget['spent_minutes']:.1f} of the {budget['minutes']:g}-minute time budget"
            f"{', which ended the run' if budget['ended_by'] == 'time_budget' else ''})"
        )
    if scores:
        tasks = (
            {"": scores}
            if "mean_iou" in scores
            else {k: v for k, v in scores.items() if isinstance(v, dict)}
        )
        shown = ", ".join(f"{t} {v['mean_iou']:.4f}".strip() for t, v in tasks.items())
        summary += f"; validation mean IU {shown} ({scores['num_images']} images)"
    if result.best:
        summary += (
            f"; best {result.best['metric']} {result.best['value']:.4f} at step "
            f"{result.best['step']} ({result.best['weights']})"
        )
    print(f"{summary}. Model: {result.model_path}")
    _training_curves(result)
    return 0


def _training_curves(result: Any) -> None:
    """Writes MODEL_DIR/training_curves.png from the TensorBoard logs (chief only)."""
    from kfcn import visualize

    logs = os.path.join(result.model_dir, "logs")
    if not (result.is_chief and os.path.isdir(logs)):
        return
    path = os.path.join(result.model_dir, "training_curves.png")
    try:
        visualize.training_curves(logs, path)
    except (OSError, ValueError) as error:  # a picture must not fail a finished run
        logging.getLogger(__name__).warning("No training curves: %s", error)
        return
    print(f"Training curves: {path}")
