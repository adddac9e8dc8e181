"""The training job behind `recipes/train_*.py`: flags, data, model, loop, final model.

A recipe script declares its hyperparameters as a dict at its top and calls
`define_flags(defaults)` and `main`; everything else happens here:

1. flags are checked (`TrainConfig.validate`), errors name the flag;
2. the CPU is split into `--cpu_replicas` logical devices (mirrored on CPU), the
   dtype policy is set (`--mixed_precision`: float16 on GPUs with loss scaling,
   bfloat16 on CPUs) and the strategy is created;
3. the data come from `kfcn.data.load_dataset` through `train_pipeline` (sharded
   by the strategy's input context) and `eval_pipeline`;
4. the model is `kfcn.build_fcn(variant, backbone, weights, init_from)`;
5. `kfcn.training.loop.train` trains, checkpointing and resuming;
6. the chief writes `model_dir/model.keras` atomically (float32 weights).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
from collections.abc import Callable
from typing import Any

from kfcn.training.schedules import SCHEDULES
from kfcn.training.strategy import STRATEGIES

logger = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "adam")
CLASS_WEIGHTINGS = ("none", "median_frequency")
VARIANTS = ("fcn32s", "fcn16s", "fcn8s")
FINAL_MODEL = "model.keras"
FLAGS_JSON = "flags.json"
#: Exit status when a peer worker died (the process leaves with os._exit).
PEER_FAILURE_EXIT_CODE = 4


class FlagError(ValueError):
    """A training setting (command-line flag) is invalid; the message names the flag."""


@dataclasses.dataclass
class TrainConfig:
    """Every setting of a training run (the recipes' flags, same names)."""

    model_dir: str
    dataset: str = "camvid"
    data_dir: str | None = None
    manual_dir: str | None = None
    train_split: str | None = None
    val_dataset: str | None = None
    val_split: str = "val"
    strategy: str = "one_device"
    cpu_replicas: int = 1
    backbone: str = "vgg16"
    variant: str = "fcn8s"
    weights: str | None = None
    init_from: str | None = None
    trainable_upsampling: bool = False
    dropout: float = 0.5
    bn_momentum: float | None = None
    batch_size: int = 8
    crop_size: str = "512x512"
    scale_range: str = "0.5,2.0"
    epochs: int = 50
    steps: int | None = None
    optimizer: str = "sgd"
    learning_rate: float = 1e-4
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "poly"
    class_weighting: str = "none"
    mixed_precision: bool = False
    eval_every: int = 0
    max_eval_images: int | None = None
    checkpoint_every: int = 0
    log_every: int = 10
    seed: int | None = None
    step_timeout: float | None = 1800.0
    collective_timeout: float | None = 600.0

    def resolved_train_split(self) -> str:
        """`train_split`, defaulting to SBD's "train_aug" and other datasets' "train"."""
        return self.train_split or ("train_aug" if self.dataset == "sbd" else "train")

    def crop_hw(self) -> tuple[int, int]:
        """`crop_size` ("HxW" or "N") as (height, width)."""
        return parse_crop_size(self.crop_size)

    def scale_minmax(self) -> tuple[float, float]:
        """`scale_range` ("min,max") as floats."""
        try:
            lo, hi = (float(v) for v in self.scale_range.split(","))
        except ValueError:
            lo = hi = math.nan
        if not 0 < lo <= hi:
            raise FlagError(
                "`--scale_range` must be 'min,max' with 0 < min <= max. Received: "
                f"--scale_range={self.scale_range!r}"
            )
        return lo, hi

    def validate(self) -> None:
        """Checks the settings that need no TensorFlow.

        Raises:
            ValueError: naming the offending flag and the received value.
        """

        def choice(flag: str, allowed: tuple[str, ...]) -> None:
            value = getattr(self, flag)
            if value not in allowed:
                raise FlagError(
                    f"`--{flag}` must be one of {', '.join(allowed)}. Received: --{flag}={value!r}"
                )

        choice("strategy", STRATEGIES)
        choice("variant", VARIANTS)
        choice("optimizer", OPTIMIZERS)
        choice("schedule", SCHEDULES)
        choice("class_weighting", CLASS_WEIGHTINGS)
        positive = ("batch_size", "cpu_replicas", "epochs", "log_every")
        for flag in positive:
            if getattr(self, flag) < 1:
                value = getattr(self, flag)
                raise FlagError(f"`--{flag}` must be >= 1. Received: --{flag}={value}")
        for flag in ("steps", "max_eval_images"):
            if getattr(self, flag) is not None and getattr(self, flag) < 1:
                value = getattr(self, flag)
                raise FlagError(f"`--{flag}` must be >= 1. Received: --{flag}={value}")
        for flag in ("eval_every", "checkpoint_every"):
            if getattr(self, flag) < 0:
                value = getattr(self, flag)
                raise FlagError(f"`--{flag}` must be >= 0. Received: --{flag}={value}")
        if not self.learning_rate > 0:
            raise FlagError(
                f"`--learning_rate` must be > 0. Received: --learning_rate={self.learning_rate}"
            )
        if self.weight_decay < 0:
            raise FlagError(
                f"`--weight_decay` must be >= 0. Received: --weight_decay={self.weight_decay}"
            )
        if self.bn_momentum is not None and not 0 <= self.bn_momentum < 1:
            raise FlagError(
                f"`--bn_momentum` must be in [0, 1). Received: --bn_momentum={self.bn_momentum}"
            )
        if not 0 <= self.momentum < 1:
            raise FlagError(f"`--momentum` must be in [0, 1). Received: --momentum={self.momentum}")
        if not self.model_dir:
            raise FlagError("`--model_dir` is required. Received: --model_dir=''")
        self.crop_hw()
        self.scale_minmax()
        if self.strategy != "mirrored" and self.cpu_replicas != 1:
            raise FlagError(
                "`--cpu_replicas` splits the CPU for --strategy=mirrored only. Received: "
                f"--cpu_replicas={self.cpu_replicas} with --strategy={self.strategy}"
            )
        if self.strategy == "mirrored" and self.batch_size % self.cpu_replicas:
            raise FlagError(
                f"`--batch_size` must be divisible by the {self.cpu_replicas} replicas. "
                f"Received: --batch_size={self.batch_size}"
            )


def parse_crop_size(text: str) -> tuple[int, int]:
    """Parses "HxW" (e.g. "360x480") or "N" (square) into (height, width).

    Raises:
        ValueError: naming `--crop_size` for anything else.
    """
    parts = str(text).lower().split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) == 1:
        values *= 2
    if len(values) != 2 or min(values) < 1:
        raise FlagError(
            "`--crop_size` must be HxW (e.g. 360x480) or N with positive integers. "
            f"Received: --crop_size={text!r}"
        )
    return values[0], values[1]


# --------------------------------------------------------------------------------------
# Flags


_HELP = {
    "model_dir": "Run directory: checkpoints/, logs/ (TensorBoard), flags.json, model.keras.",
    "dataset": "Dataset name for kfcn.data.load_dataset.",
    "data_dir": "Dataset root (CamVid folder, or TFDS data dir for voc/sbd).",
    "manual_dir": "Manually downloaded archives for the tfds datasets (voc, sbd).",
    "train_split": "Training split (default: train_aug for sbd, else train).",
    "val_dataset": "Validation dataset (default: --dataset).",
    "val_split": "Validation split.",
    "strategy": "Distribution strategy: " + "|".join(STRATEGIES) + ".",
    "cpu_replicas": "Logical CPU devices for --strategy=mirrored on a machine without GPUs.",
    "backbone": "Backbone name (kfcn.backbones), e.g. vgg16, resnet50, mobilenetv2.",
    "variant": "FCN variant: " + "|".join(VARIANTS) + ".",
    "weights": "Backbone weights: none, imagenet, or a Keras Applications weights file.",
    "init_from": "A .keras model whose same-named layers initialise this one (staged training).",
    "trainable_upsampling": "Learn the bilinear upsampling (the reference freezes it).",
    "dropout": "Dropout rate of the classifier.",
    "bn_momentum": "Moving-average momentum of every BatchNormalization layer (default: the "
    "backbone's, e.g. 0.999 for MobileNetV2: too slow for a short run from scratch).",
    "batch_size": "Global batch size (over all replicas and workers).",
    "crop_size": "Training crop HxW (e.g. 360x480) or N.",
    "scale_range": "Random rescaling range 'min,max' (1,1 disables).",
    "epochs": "Training epochs (ignored when --steps is given).",
    "steps": "Training steps (overrides --epochs).",
    "optimizer": "Optimizer: " + "|".join(OPTIMIZERS) + ".",
    "learning_rate": "Initial learning rate.",
    "momentum": "SGD momentum (sgd only).",
    "weight_decay": "L2 on kernels added to the loss (Caffe weight_decay); 0 disables.",
    "schedule": "Learning-rate schedule: poly (lr*(1-step/total)^0.9) or fixed.",
    "class_weighting": "Loss class weights: none or median_frequency (from the training labels).",
    "mixed_precision": "float16 (GPU, with loss scaling) or bfloat16 (CPU) compute.",
    "eval_every": "Validate every N steps (0: every epoch) and at the end.",
    "max_eval_images": "Validate on at most this many images during training (default all).",
    "checkpoint_every": "Checkpoint every N steps (0: every epoch) and at the end.",
    "log_every": "Log a progress line (loss, lr, images/s, ETA) every N steps.",
    "seed": "Seed of data shuffling and augmentation (default random).",
    "step_timeout": "Exit if no step completes for this many seconds (0 disables).",
    "collective_timeout": "Multi-worker all-reduce timeout in seconds (0: none).",
}


def define_flags(defaults: dict[str, Any], *, datasets: tuple[str, ...] | None = None) -> None:
    """Defines the training flags (absl) with a recipe's defaults.

    Args:
        defaults: flag name -> default value; keys must be `TrainConfig` fields.
        datasets: allowed values of `--dataset` (the recipe's datasets).

    Raises:
        ValueError: on a key that is not a training setting.
    """
    from absl import flags

    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(defaults) - set(fields))
    if unknown:
        raise ValueError(f"`defaults` has unknown training settings: {unknown}")
    values = {f.name: f.default for f in fields.values() if f.default is not dataclasses.MISSING}
    values["model_dir"] = None
    values.update(defaults)
    for name, field in fields.items():
        default = values.get(name)
        help_text = _HELP[name]
        kind = str(field.type)
        if name in ("dataset", "val_dataset") and datasets:
            flags.DEFINE_enum(name, default, list(datasets), help_text)
        elif name in ("strategy", "variant", "optimizer", "schedule", "class_weighting"):
            allowed = {
                "strategy": STRATEGIES,
                "variant": VARIANTS,
                "optimizer": OPTIMIZERS,
                "schedule": SCHEDULES,
                "class_weighting": CLASS_WEIGHTINGS,
            }[name]
            flags.DEFINE_enum(name, default, list(allowed), help_text)
        elif kind.startswith("bool"):
            flags.DEFINE_bool(name, default, help_text)
        elif kind.startswith("int"):
            flags.DEFINE_integer(name, default, help_text)
        elif kind.startswith("float"):
            flags.DEFINE_float(name, default, help_text)
        else:
            flags.DEFINE_string(name, default, help_text)
    flags.mark_flag_as_required("model_dir")


def config_from_flags() -> TrainConfig:
    """Builds a `TrainConfig` from the parsed absl flags."""
    from absl import flags

    values = {f.name: flags.FLAGS[f.name].value for f in dataclasses.fields(TrainConfig)}
    if isinstance(values["weights"], str) and values["weights"].lower() in ("", "none"):
        values["weights"] = None
    for name in ("step_timeout", "collective_timeout"):
        if values[name] is not None and values[name] <= 0:
            values[name] = None
    return TrainConfig(**values)


# --------------------------------------------------------------------------------------
# The job


ModelFn = Callable[[TrainConfig, int], Any]


def _mixed_policy(gpus: bool) -> str:
    return "mixed_float16" if gpus else "mixed_bfloat16"


def _build_model(config: TrainConfig, num_classes: int) -> Any:
    import kfcn

    return kfcn.build_fcn(
        config.variant,
        backbone=config.backbone,
        num_classes=num_classes,
        weights=config.weights,
        dropout=config.dropout,
        trainable_upsampling=config.trainable_upsampling,
        init_from=config.init_from,
    )


def set_batch_norm_momentum(model: Any, momentum: float) -> int:
    """Sets the moving-average momentum of every BatchNormalization layer in `model`.

    Keras Applications' MobileNetV2 uses 0.999: after the ~1,400 steps of a short
    run its moving variance is still about 25% its initial 1, so inference-mode
    outputs of a network trained from scratch are meaningless (one class everywhere).

    Returns:
        The number of layers changed.
    """
    import keras

    changed = 0
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = momentum
            changed += 1
    logger.info("Set the momentum of %d BatchNormalization layers to %g", changed, momentum)
    return changed


def _make_optimizer(config: TrainConfig, learning_rate: Any, loss_scaling: bool) -> Any:
    import keras

    if config.optimizer == "sgd":
        optimizer = keras.optimizers.SGD(learning_rate, momentum=config.momentum)
    else:
        optimizer = keras.optimizers.Adam(learning_rate)
    if loss_scaling:
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def _float32_copy(model: Any, config: TrainConfig, num_classes: int, model_fn: ModelFn) -> Any:
    """Rebuilds `model` in float32 (after mixed precision) with the same weights."""
    import keras

    keras.config.set_dtype_policy("float32")
    copy = model_fn(dataclasses.replace(config, weights=None, init_from=None), num_classes)
    copy.set_weights(model.get_weights())
    return copy


def run(config: TrainConfig, *, model_fn: ModelFn | None = None) -> dict[str, Any]:
    """Trains as configured; resumes from `config.model_dir` if it holds checkpoints.

    Args:
        config: the settings (see the recipes' flags).
        model_fn: `(config, num_classes) -> keras.Model`, built inside the
            strategy scope; defaults to `kfcn.build_fcn` with the config's
            variant, backbone, weights and init_from.

    Returns:
        A summary dict: steps, resume step, validation scores, images/s, paths.

    Raises:
        FlagError: on invalid settings (naming the flag).
        kfcn.training.loop.NonFiniteLossError: when the loss becomes NaN/inf.
        kfcn.training.loop.PeerFailureError: when a peer worker died.
    """
    config.validate()
    model_fn = model_fn or _build_model
    from kfcn.training import strategy as strategy_lib

    # Before any TensorFlow op: logical devices and collectives are fixed at start-up.
    if config.strategy == "mirrored":
        strategy_lib.configure_cpu_replicas(config.cpu_replicas)
    strategy = strategy_lib.create_strategy(
        config.strategy,
        cpu_replicas=config.cpu_replicas,
        collective_timeout=config.collective_timeout,
    )

    import keras
    import tensorflow as tf

    from kfcn import data as data_lib
    from kfcn.training import checkpoints, loop, schedules

    info = strategy_lib.worker_info(strategy)
    replicas = strategy.num_replicas_in_sync
    if config.batch_size % replicas:
        raise FlagError(
            f"`--batch_size` must be divisible by the number of replicas ({replicas}). "
            f"Received: --batch_size={config.batch_size}"
        )
    gpus = bool(tf.config.list_logical_devices("GPU"))
    loss_scaling = config.mixed_precision and gpus
    keras.config.set_dtype_policy(_mixed_policy(gpus) if config.mixed_precision else "float32")

    extra = {"manual_dir": config.manual_dir} if config.manual_dir else {}
    train_split = config.resolved_train_split()
    val_dataset = config.val_dataset or config.dataset
    train_data, data_info = data_lib.load_dataset(
        config.dataset, train_split, config.data_dir, **extra
    )
    num_examples = data_info.num_examples or int(train_data.reduce(0, lambda n, _: n + 1))
    steps_per_epoch = max(1, math.ceil(num_examples / config.batch_size))
    total_steps = config.steps or config.epochs * steps_per_epoch
    crop = config.crop_hw()
    scale_range = config.scale_minmax()
    seed = config.seed if config.seed is not None else random.SystemRandom().randrange(2**31)

    class_weights = None
    if config.class_weighting == "median_frequency":
        from kfcn import losses

        class_weights = losses.median_frequency_weights(
            train_data, data_info.num_classes, data_info.ignore_label
        )
        logger.info(
            "Median-frequency class weights: %s",
            ", ".join(f"{n} {w:.3f}" for n, w in zip(data_info.class_names, class_weights)),
        )

    resolved = dataclasses.asdict(config)
    resolved.update(
        seed=seed,
        num_replicas=replicas,
        num_workers=info.num_workers,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        num_train_examples=num_examples,
        num_classes=data_info.num_classes,
        ignore_label=data_info.ignore_label,
        dtype_policy=keras.config.dtype_policy().name,
        class_weights=None if class_weights is None else [float(w) for w in class_weights],
    )
    flags_path = os.path.join(config.model_dir, FLAGS_JSON)
    if info.is_chief:
        if os.path.exists(flags_path):
            with open(flags_path, encoding="utf-8") as f:
                previous = json.load(f)
            changed = {
                k: (previous.get(k), v)
                for k, v in resolved.items()
                if k != "seed" and previous.get(k) != v
            }
            if changed:
                logger.warning(
                    "Settings differ from the previous run (%s): %s", flags_path, changed
                )
            resolved["seed"] = seed = previous.get("seed", seed)
        checkpoints.write_json_atomically(resolved, flags_path)
    elif os.path.exists(flags_path):
        with open(flags_path, encoding="utf-8") as f:
            seed = json.load(f).get("seed", seed)
    logger.info(
        "Training %s %s on %s/%s: %d examples, %d steps/epoch, %d steps, global batch %d over "
        "%d replica(s) (%s), dtype policy %s",
        config.variant,
        config.backbone,
        config.dataset,
        train_split,
        num_examples,
        steps_per_epoch,
        total_steps,
        config.batch_size,
        replicas,
        config.strategy,
        keras.config.dtype_policy().name,
    )

    def train_dataset_fn(context: tf.distribute.InputContext, start_step: int) -> tf.data.Dataset:
        dataset, _ = data_lib.load_dataset(config.dataset, train_split, config.data_dir, **extra)
        # Reseeded by the resume step so that a resumed run does not replay the
        # batches it already trained on (the file-reading pipeline is not checkpointable).
        return data_lib.train_pipeline(
            dataset,
            global_batch_size=config.batch_size,
            crop_size=crop,
            scale_range=scale_range,
            ignore_label=data_info.ignore_label,
            input_context=context,
            seed=seed + start_step,
        )

    def eval_dataset_fn(num_shards: int, index: int) -> tf.data.Dataset:
        dataset, _ = data_lib.load_dataset(val_dataset, config.val_split, config.data_dir, **extra)
        if config.max_eval_images:
            dataset = dataset.take(config.max_eval_images)
        if num_shards > 1:
            dataset = dataset.shard(num_shards, index)
        return data_lib.eval_pipeline(dataset)

    with strategy.scope():
        model = model_fn(config, data_info.num_classes)
        if config.bn_momentum is not None:
            set_batch_norm_momentum(model, config.bn_momentum)
        learning_rate = schedules.learning_rate_schedule(
            config.schedule, config.learning_rate, total_steps
        )
        optimizer = _make_optimizer(config, learning_rate, loss_scaling)

    loop_config = loop.LoopConfig(
        total_steps=total_steps,
        steps_per_epoch=steps_per_epoch,
        global_batch_size=config.batch_size,
        checkpoint_every=config.checkpoint_every or steps_per_epoch,
        eval_every=config.eval_every or steps_per_epoch,
        log_every=config.log_every,
        weight_decay=config.weight_decay,
        step_timeout=config.step_timeout,
    )
    result = loop.train(
        strategy=strategy,
        model=model,
        optimizer=optimizer,
        train_dataset_fn=train_dataset_fn,
        config=loop_config,
        model_dir=config.model_dir,
        num_classes=data_info.num_classes,
        ignore_label=data_info.ignore_label,
        class_weights=class_weights,
        eval_dataset_fn=eval_dataset_fn,
    )

    model_path = os.path.join(config.model_dir, FINAL_MODEL)
    if info.is_chief:
        final = model
        if config.mixed_precision:
            final = _float32_copy(model, config, data_info.num_classes, model_fn)
        checkpoints.save_model_atomically(final, model_path)
        logger.info("Wrote %s", model_path)
    summary = {
        "start_step": result.start_step,
        "final_step": result.final_step,
        "checkpoint": result.checkpoint,
        "model": model_path,
        "images_per_second": result.images_per_second,
        "validation": None
        if result.metrics is None
        else {k: v for k, v in result.metrics.items() if k != "confusion"},
    }
    if info.is_chief:
        checkpoints.write_json_atomically(summary, os.path.join(config.model_dir, "result.json"))
    return summary


def main(argv: list[str], *, model_fn: ModelFn | None = None) -> None:
    """absl entry point of the recipes: runs `run(config_from_flags(), model_fn=model_fn)`.

    Exits non-zero with a logged message on a non-finite loss (status 1) or a
    dead peer worker (status `PEER_FAILURE_EXIT_CODE`, via `os._exit` because
    TensorFlow's aborted collective threads can block a normal interpreter exit).
    """
    import sys

    from absl import logging as absl_logging

    from kfcn.data import images as data_images
    from kfcn.training import checkpoints, loop

    if len(argv) > 1:
        raise ValueError(f"Unexpected positional arguments: {argv[1:]}")
    absl_logging.set_verbosity(absl_logging.INFO)
    try:
        config = config_from_flags()
        summary = run(config, model_fn=model_fn)
    except (FlagError, data_images.DataError, checkpoints.CheckpointMismatchError) as e:
        absl_logging.error("%s", e)
        sys.exit(2)
    except loop.NonFiniteLossError as e:
        absl_logging.error("%s", e)
        sys.exit(1)
    except loop.PeerFailureError as e:
        absl_logging.error("%s", e)
        absl_logging.flush()
        sys.stderr.flush()
        os._exit(PEER_FAILURE_EXIT_CODE)
    absl_logging.info("Done: %s", json.dumps(summary, default=str))
