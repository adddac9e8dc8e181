"""`fit(config)`: a whole training run, as the stages it goes through.

1. strategy and precision policy (`kfcn.training.strategy`);
2. inputs: the dataset, steps, class weights and the tf.data pipelines (`kfcn.data`);
3. model and optimizer, in the strategy's scope (`kfcn.build_fcn`);
4. the loop, which checkpoints, validates and resumes (`kfcn.training.loop`);
5. the final model and results in the run directory (`kfcn.training.run_dir`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from typing import Any

from kfcn.training.config import CLASS_WEIGHT_POWERS, TrainConfig
from kfcn.training.run_dir import FitResult, RunDirectory

logger = logging.getLogger(__name__)

#: `(config, num_classes) -> keras.Model`, called in the strategy's scope.
ModelFn = Callable[[TrainConfig, int], Any]


def fit(config: TrainConfig, *, model_fn: ModelFn | None = None) -> FitResult:
    """Trains as configured; resumes from `config.model_dir` if it holds checkpoints.

    Call it on every worker with the same config under multi-worker training.

    Args:
        config: the settings.
        model_fn: builds the model; default `kfcn.build_fcn` with the config's
            variant, backbone, weights and init_from.

    Returns:
        A `FitResult` (also written to `model_dir/result.json`).

    Raises:
        ValueError: on invalid settings (naming the setting), bad data
            (`kfcn.data.DataError`) or a dataset not downloaded yet
            (`kfcn.data.DatasetNotReadyError`).
        kfcn.training.checkpoints.CheckpointMismatchError: when model_dir holds
            checkpoints of another model.
        kfcn.training.loop.NonFiniteLossError: when the loss becomes NaN/inf.
        kfcn.training.loop.PeerFailureError: when a peer worker died.

    Example:
        ```python
        config = kfcn.training.TrainConfig("runs/roads", dataset="folder",
                                           list_file="roads/train.txt", num_classes=4,
                                           backbone="mobilenetv2", crop_size=(256, 256))
        result = kfcn.training.fit(config)
        model = kfcn.load_model(result.model_path)
        ```
    """
    config.validate()
    # 1. Strategy and precision policy (before any other TensorFlow op).
    strategy, loss_scaling = _strategy_and_precision(config)
    from kfcn.training import loop
    from kfcn.training.strategy import worker_info

    worker = worker_info(strategy)
    run = RunDirectory(config.model_dir, is_chief=worker.is_chief)
    config = run.settle_seed(config)
    # 2. Inputs, and whether an earlier run already did the work.
    inputs = Inputs(config, strategy.num_replicas_in_sync)
    run_facts = inputs.facts(strategy, worker.num_workers)
    if run.is_complete(inputs.total_steps):
        return _already_complete(run, inputs.total_steps, run_facts)
    # 3. Model and optimizer; the settings are recorded once they are known to work.
    model, optimizer, horizon = _model_and_optimizer(
        config, strategy, inputs, loss_scaling, model_fn
    )
    with strategy.scope():  # the view makes no variable; its layers are the model's
        eval_model = inputs.test_time.view(model)
    run.record_settings(config)
    # 4. The loop: checkpoints, validation, resume.
    trained = loop.train(
        strategy=strategy,
        model=model,
        optimizer=optimizer,
        train_dataset_fn=inputs.train_dataset,
        config=inputs.loop_config(),
        model_dir=config.model_dir,
        num_classes=inputs.info.num_classes,
        ignore_label=inputs.info.ignore_label,
        class_weights=inputs.class_weights,
        eval_dataset_fn=inputs.eval_dataset if config.has_validation else None,
        overlay_fn=None if inputs.class_info is None else _overlay_fn(inputs.class_info),
        num_overlays=config.num_overlays,
        eval_model=eval_model,
        horizon=horizon,
    )

    # 5. The final model (float32, as validated, with class names and palette) and results.
    if config.mixed_precision:
        model = _float32_copy(model, config, inputs.info.num_classes, model_fn)
    run.save_model(inputs.test_time.apply(model), inputs.class_info)
    result = FitResult(
        model_dir=config.model_dir,
        model_path=run.model_path,
        start_step=trained.start_step,
        final_step=trained.final_step,
        total_steps=inputs.total_steps,
        validation=_without_confusion(trained.metrics),
        best=trained.best,
        images_per_second=trained.images_per_second,
        run=run_facts,
        time_budget=trained.time_budget,
        is_chief=run.is_chief,
    )
    run.write_result(result)
    return result


# --------------------------------------------------------------------------------------
# 1. Strategy and precision policy


def _strategy_and_precision(config: TrainConfig) -> tuple[Any, bool]:
    """Creates the strategy and sets the dtype policy; returns (strategy, loss_scaling)."""
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

    replicas = strategy.num_replicas_in_sync
    if config.batch_size % replicas:
        raise ValueError(
            f"`batch_size` must be divisible by the number of replicas ({replicas}). "
            f"Received: batch_size={config.batch_size}"
        )
    gpus = bool(tf.config.list_logical_devices("GPU"))
    policy = ("mixed_float16" if gpus else "mixed_bfloat16") if config.mixed_precision else None
    keras.config.set_dtype_policy(policy or "float32")
    return strategy, bool(config.mixed_precision and gpus)


# --------------------------------------------------------------------------------------
# 2. Inputs


class Inputs:
    """The training and validation data of a run, and the step counts they imply.

    Args:
        config: the settings (with the seed settled).
        num_replicas: replicas in sync (for the log line).
    """

    def __init__(self, config: TrainConfig, num_replicas: int) -> None:
        from kfcn import data

        self.config = config
        self.num_replicas = num_replicas
        train, self.info = data.load_dataset(
            config.dataset, config.resolved_train_split, config.data_dir, **config.dataset_kwargs()
        )
        self.num_examples = self.info.num_examples or int(train.reduce(0, lambda n, _: n + 1))
        self.steps_per_epoch = max(1, math.ceil(self.num_examples / config.batch_size))
        self.total_steps = config.steps or config.epochs * self.steps_per_epoch
        self.class_weights = None
        if config.class_weighting != "none" and isinstance(self.info.num_classes, dict):
            raise ValueError(
                f"`class_weighting` needs one task; {config.dataset} has several "
                f"({self.info.num_classes}). Received: class_weighting={config.class_weighting!r}"
            )
        if config.class_weighting != "none":
            from kfcn import losses

            self.class_weights = losses.median_frequency_weights(
                train,
                self.info.num_classes,
                self.info.ignore_label,
                power=CLASS_WEIGHT_POWERS[config.class_weighting],
            )
            logger.info(
                "Class weights (%s): %s",
                config.class_weighting,
                ", ".join(
                    f"{n} {w:.3f}" for n, w in zip(self.info.class_names, self.class_weights)
                ),
            )
        from kfcn.training.test_time import TestTime

        self.test_time = TestTime.from_settings(
            config.input_scale, config.logit_adjustment, self.class_weights
        )
        # Class names and palette are stored for one task; a multi-task model keeps none.
        multi_task = isinstance(self.info.num_classes, dict)
        self.class_info = None if multi_task else _class_info(config.dataset, self.info)
        if config.has_validation:
            self.eval_dataset(1, 0)  # checks the validation files now, not after training
        else:
            logger.info("No validation: no val_split, or no validation list for the folder")
        logger.info(
            "Training %s %s on %s/%s: %d examples, %d steps/epoch, %d steps, global batch %d "
            "over %d replica(s) (%s), dtype policy %s",
            config.variant,
            config.backbone,
            config.dataset,
            config.resolved_train_split,
            self.num_examples,
            self.steps_per_epoch,
            self.total_steps,
            config.batch_size,
            num_replicas,
            config.strategy,
            _policy_name(),
        )

    def train_dataset(self, context: Any, start_step: int) -> Any:
        """The training batches of one input pipeline (see `loop.TrainDatasetFn`)."""
        from kfcn import data

        config = self.config
        dataset, _ = data.load_dataset(
            config.dataset, config.resolved_train_split, config.data_dir, **config.dataset_kwargs()
        )
        # Reseeded by the resume step so that a resumed run does not replay the
        # batches it already trained on (the file-reading pipeline is not checkpointable).
        options: dict[str, Any] = {}
        if config.cat_max_ratio is not None:  # mmseg's crop option (kfcn.data.pipeline)
            options["cat_max_ratio"] = config.cat_max_ratio
        return data.train_pipeline(
            dataset,
            global_batch_size=config.batch_size,
            crop_size=config.crop_size,
            scale_range=config.scale_range,
            flip=config.flip,
            photometric=config.photometric,
            ignore_label=self.info.ignore_label,
            input_context=context,
            seed=config.seed + start_step,
            **options,
        )

    def eval_dataset(self, num_shards: int, index: int) -> Any:
        """This worker's shard of the validation images (see `loop.EvalDatasetFn`)."""
        from kfcn import data

        config = self.config
        dataset, _ = data.load_dataset(
            config.resolved_val_dataset,
            config.val_split,
            config.data_dir,
            **config.dataset_kwargs(validation=True),
        )
        if config.max_eval_images:
            dataset = dataset.take(config.max_eval_images)
        if num_shards > 1:
            dataset = dataset.shard(num_shards, index)
        return data.eval_pipeline(dataset)

    def loop_config(self) -> Any:
        """The loop's step counts and intervals."""
        from kfcn.training import loop

        config = self.config
        return loop.LoopConfig(
            total_steps=self.total_steps,
            steps_per_epoch=self.steps_per_epoch,
            global_batch_size=config.batch_size,
            checkpoint_every=config.checkpoint_every or self.steps_per_epoch,
            eval_every=config.eval_every or self.steps_per_epoch,
            log_every=config.log_every,
            weight_decay=config.weight_decay,
            step_timeout=config.step_timeout,
            aux_loss_weight=config.aux_loss_weight,
            task_loss_weights=config.task_loss_weights,
            loss_reduction=config.loss_reduction,
            selection_metric=config.selection_metric,
            val_mode=config.val_mode,
            val_crop_size=config.val_crop_size,
            val_stride=config.val_stride,
            val_scales=config.val_scales,
            val_flip=config.val_flip,
            jit_compile=config.jit_compile,
            ema_momentum=config.ema_momentum,
            time_budget=None if config.time_budget is None else 60.0 * config.time_budget,
        )

    def facts(self, strategy: Any, num_workers: int) -> dict[str, Any]:
        """What the settings resolved to, for result.json."""
        weights = self.class_weights
        return {
            "seed": self.config.seed,
            "num_replicas": strategy.num_replicas_in_sync,
            "num_workers": num_workers,
            "num_train_examples": self.num_examples,
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
            "num_classes": self.info.num_classes,
            "ignore_label": self.info.ignore_label,
            "class_names": {k: list(v) for k, v in self.info.class_names.items()}
            if isinstance(self.info.class_names, dict)
            else list(self.info.class_names),
            "dtype_policy": _policy_name(),
            "class_weights": None if weights is None else [float(w) for w in weights],
            "test_time": self.test_time.to_dict(),
        }


def _policy_name() -> str:
    import keras

    return keras.config.dtype_policy().name


def _class_info(dataset: str, info: Any) -> Any:
    """The class names and palette stored with the model (`kfcn.metadata.ClassInfo`)."""
    from kfcn import metadata

    return metadata.class_info_for_dataset(
        dataset, info.num_classes, info.class_names, ignore_label=info.ignore_label
    )


def _overlay_fn(class_info: Any) -> Callable[[Any, Any], Any]:
    """`(image, prediction) -> RGB overlay with a legend`, for TensorBoard."""
    from kfcn import visualize

    def overlay(image: Any, prediction: Any) -> Any:
        return visualize.overlay(image, prediction, class_info.palette, class_info.names)

    return overlay


# --------------------------------------------------------------------------------------
# 3. Model and optimizer


def build_model(config: TrainConfig, num_classes: Any) -> Any:
    """The default `model_fn`: `kfcn.build_fcn` or `kfcn.build_dilated_fcn` as configured.

    Args:
        config: the settings (`variant` picks the builder).
        num_classes: the dataset's classes, or `{task: classes}` for a
            multi-task dataset (then the model's `heads`, unless `config.heads`
            names them).
    """
    import kfcn
    from kfcn.training.config import DILATED_VARIANTS

    if config.is_dilated:
        output_stride, head_dilation = DILATED_VARIANTS[config.variant]
        return kfcn.build_dilated_fcn(
            backbone=config.backbone,
            num_classes=num_classes,
            output_stride=output_stride,
            head_channels=config.head_channels,
            num_convs=config.num_convs,
            concat_input=config.concat_input,
            head_dilation=head_dilation,
            dropout=config.dropout,
            aux_head=config.aux_head,
            aux_channels=config.aux_channels,
            weights=config.weights,
            sync_batchnorm=config.sync_batchnorm,
        )
    # Passed only when set, so the skip nets' builder is called as before otherwise.
    options: dict[str, Any] = {}
    if config.modality != "rgb":
        options["modality"] = config.modality
    heads = config.heads or (dict(num_classes) if isinstance(num_classes, dict) else None)
    if heads:
        options["heads"] = heads  # the builder takes the classes per task from it
    else:
        options["num_classes"] = num_classes
    return kfcn.build_fcn(
        config.variant,
        backbone=config.backbone,
        weights=config.weights,
        dropout=config.dropout,
        trainable_upsampling=config.trainable_upsampling,
        init_from=config.init_from,
        **options,
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


def _model_and_optimizer(
    config: TrainConfig,
    strategy: Any,
    inputs: Inputs,
    loss_scaling: bool,
    model_fn: ModelFn | None,
) -> tuple[Any, Any, Any]:
    """The model, its optimizer and, with a time budget, the schedule's horizon variable."""
    import keras
    import tensorflow as tf

    from kfcn.training import schedules
    from kfcn.training.sgd import SGD

    # The run's seed initialises the weights too, so that config.yaml repeats the run.
    keras.utils.set_random_seed(config.seed)
    with strategy.scope():
        model = (model_fn or build_model)(config, inputs.info.num_classes)
        if config.float32_depthwise:
            from kfcn.precision import float32_depthwise

            model = float32_depthwise(model)
            kept = sum(layer.compute_dtype == "float32" for layer in model.layers)
            logger.info(
                "float32_depthwise: %d of %d layers compute in float32", kept, len(model.layers)
            )
        if config.bn_momentum is not None:
            set_batch_norm_momentum(model, config.bn_momentum)
        # A budgeted run's last step is decided while it trains: the loop moves it.
        horizon = None
        if config.time_budget is not None:
            horizon = tf.Variable(inputs.total_steps, dtype=tf.float64, trainable=False)
        learning_rate = schedules.learning_rate_schedule(
            config.schedule,
            config.learning_rate,
            inputs.total_steps,
            power=config.poly_power,
            end_learning_rate=config.min_learning_rate,
            horizon=horizon,
        )
        if config.optimizer == "sgd":
            optimizer = SGD(learning_rate, momentum=config.momentum)
        else:
            optimizer = keras.optimizers.Adam(learning_rate)
        if loss_scaling:
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return model, optimizer, horizon


# --------------------------------------------------------------------------------------
# 5. Final model and results


def _float32_copy(model: Any, config: TrainConfig, num_classes: int, model_fn: ModelFn | None):
    """Rebuilds `model` in float32 (after mixed precision) with the same weights."""
    import keras

    keras.config.set_dtype_policy("float32")
    plain = dataclasses.replace(config, weights=None, init_from=None)
    copy = (model_fn or build_model)(plain, num_classes)
    copy.set_weights(model.get_weights())
    return copy


def _without_confusion(scores: dict[str, Any] | None) -> dict[str, Any] | None:
    """Validation scores for result.json: the confusion matrices left out (per task too)."""
    if scores is None:
        return None
    return {
        k: _without_confusion(v) if isinstance(v, dict) else v
        for k, v in scores.items()
        if k != "confusion"
    }


def _recorded_best(model_dir: str) -> dict[str, Any] | None:
    """The best validation an earlier run recorded (`loop.BestModel`'s best.json), or None."""
    import json
    import os

    from kfcn.training.loop import BestModel

    path = os.path.join(model_dir, BestModel.JSON)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _already_complete(run: RunDirectory, total_steps: int, facts: dict[str, Any]) -> FitResult:
    step = run.checkpoint_step()
    logger.info(
        "The run in %s is already complete: step %d of %d, %s written; nothing to train",
        run.path,
        step,
        total_steps,
        run.model_path,
    )
    return FitResult(
        model_dir=run.path,
        model_path=run.model_path,
        start_step=step,
        final_step=step,
        total_steps=total_steps,
        already_complete=True,
        best=_recorded_best(run.path),
        run=facts,
        time_budget=run.recorded_budget(),
        is_chief=run.is_chief,
    )
