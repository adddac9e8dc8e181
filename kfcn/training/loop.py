"""The custom training loop shared by every distribution strategy.

One `tf.function` train step runs the model on each replica via `strategy.run`,
applies the gradients with the Keras optimizer (which all-reduces them with a
SUM across replicas and workers) and reduces the loss with `strategy.reduce`.

Loss normalization: each replica's summed per-pixel cross-entropy is divided by
the number of valid (non-ignored, class-weighted) pixels of the GLOBAL batch,
all-reduced across replicas, so the summed gradients equal those of one device
training on the whole global batch.

Weight decay is the reference's Caffe `weight_decay` (coupled L2 on the kernels,
biases and normalization parameters excluded, FCN's prototxts set
`decay_mult: 0` on biases): the loop adds `0.5 * weight_decay * sum(kernel**2)`
to the loss, so the gradient gains `weight_decay * kernel`. It is not the
optimizer's decoupled `weight_decay` argument.

Weight averaging (`LoopConfig.ema_momentum`, `kfcn.training.averaging`):
validation, `best.weights.h5` and the returned model hold the average of the
trainable weights; checkpoints keep both, so a resumed run continues the same
average.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from tensorflow.core.framework import summary_pb2

from kfcn import evaluation, files, metrics
from kfcn.training import outputs as outputs_lib
from kfcn.training.averaging import WeightAverage
from kfcn.training.checkpoints import TrainingCheckpoint
from kfcn.training.strategy import WorkerInfo, worker_info
from kfcn.training.time_budget import TimeBudget

logger = logging.getLogger(__name__)

#: Exit status of a process stopped by the watchdog (no progress, e.g. a dead peer).
WATCHDOG_EXIT_CODE = 3

LossFn = Callable[..., tuple[tf.Tensor, tf.Tensor]]
TrainDatasetFn = Callable[[tf.distribute.InputContext, int], tf.data.Dataset]
EvalDatasetFn = Callable[[int, int], tf.data.Dataset]
OverlayFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


class NonFiniteLossError(FloatingPointError):
    """The loss (or its gradient) became NaN or infinite; the run stopped before saving."""


class PeerFailureError(RuntimeError):
    """A collective operation failed because another worker died or timed out."""


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """Step counts and intervals of a training run.

    Attributes:
        total_steps: number of optimizer steps of the whole run.
        steps_per_epoch: steps per pass over the training set (for logging epochs).
        global_batch_size: images per step over all replicas (for images/s).
        checkpoint_every: save a checkpoint every this many steps (and at the end).
        eval_every: validate every this many steps (and at the end); 0 disables.
        log_every: log a progress line and summaries every this many steps.
        weight_decay: L2 coefficient on the kernels (Caffe's `weight_decay`).
        step_timeout: seconds without progress after which the watchdog ends
            the process with `WATCHDOG_EXIT_CODE`; None disables it.
        aux_loss_weight: loss weight of each "aux_*" output (mmseg 0.4,
            torchvision 0.5); see `kfcn.training.outputs`.
        task_loss_weights: loss weight of each main output by name (default 1).
        loss_reduction: "mean" (each output over the global batch's valid
            pixels) or "sum" (unnormalised, the FCN reference solvers).
        selection_metric: the validation score that picks the best model
            (`kfcn.training.outputs.selection_value`): "mean_iou" (for several
            tasks the mean of their mean IU) or e.g. "sem/mean_iou".
        val_mode: "whole", "slide" or "msflip" validation (`kfcn.evaluation.predict`).
        val_crop_size: window of "slide" (and of "msflip" if set).
        val_stride: stride of "slide" (default 2/3 of the window).
        val_scales: resize factors of "msflip".
        val_flip: whether "msflip" also predicts the mirrored images.
        jit_compile: compile the train step with XLA (see `make_train_step`).
        ema_momentum: keep an exponential moving average of the trainable weights
            with this momentum (`kfcn.training.averaging`; 0 disables): validation,
            `best.weights.h5` and the returned model use it.
        time_budget: seconds of the loop's wall clock the run may take
            (`kfcn.training.time_budget`): it ends at the step the budget
            projects, at most `total_steps`; None: at `total_steps`.
    """

    total_steps: int
    steps_per_epoch: int
    global_batch_size: int
    checkpoint_every: int
    eval_every: int = 0
    log_every: int = 10
    weight_decay: float = 0.0
    step_timeout: float | None = None
    aux_loss_weight: float = 0.4
    task_loss_weights: dict[str, float] | None = None
    loss_reduction: str = "mean"
    selection_metric: str = "mean_iou"
    val_mode: str = "whole"
    val_crop_size: tuple[int, int] | None = None
    val_stride: tuple[int, int] | None = None
    val_scales: tuple[float, ...] = (1.0,)
    val_flip: bool = True
    jit_compile: bool = False
    ema_momentum: float = 0.0
    time_budget: float | None = None

    def __post_init__(self) -> None:
        for name in (
            "total_steps",
            "steps_per_epoch",
            "global_batch_size",
            "checkpoint_every",
            "log_every",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1. Received: {name}={getattr(self, name)}")
        if self.eval_every < 0:
            raise ValueError(f"`eval_every` must be >= 0. Received: eval_every={self.eval_every}")
        if self.weight_decay < 0:
            raise ValueError(
                f"`weight_decay` must be >= 0. Received: weight_decay={self.weight_decay}"
            )
        if not 0 <= self.ema_momentum < 1:
            raise ValueError(
                f"`ema_momentum` must be in [0, 1). Received: ema_momentum={self.ema_momentum}"
            )
        if self.time_budget is not None and not (
            math.isfinite(self.time_budget) and self.time_budget > 0
        ):
            raise ValueError(
                f"`time_budget` must be > 0 seconds. Received: time_budget={self.time_budget}"
            )


@dataclasses.dataclass
class TrainResult:
    """What a call to `train` did.

    Attributes:
        start_step: the step training resumed from (0 for a fresh run).
        final_step: the step reached.
        checkpoint: the chief's latest checkpoint path prefix.
        metrics: the last validation scores (see `validate`), or None.
        images_per_second: mean training throughput after the first logging window
            (which includes tracing), or over the whole run if it was the only one.
        best: the best validation so far (`{"step", "metric", "value", "weights"}`,
            see `BestModel`), or None.
        time_budget: with `LoopConfig.time_budget`, `{"minutes", "spent_minutes",
            "last_step", "ended_by"}` ("time_budget" or "steps"); else None.
    """

    start_step: int
    final_step: int
    checkpoint: str | None
    metrics: dict[str, Any] | None
    images_per_second: float | None
    best: dict[str, Any] | None = None
    time_budget: dict[str, Any] | None = None


def _default_loss_fn() -> LossFn:
    from kfcn.losses import pixel_cross_entropy

    return pixel_cross_entropy


def _is_kernel(variable: Any) -> bool:
    # Keras names weights by role: "kernel", "depthwise_kernel", "pointwise_kernel".
    return variable.name.endswith("kernel")


def _half_sum_of_squares(variables: list[Any]) -> tf.Tensor:
    # tf.nn.l2_loss is one pass over each kernel and its gradient one product,
    # where reduce_sum(square(v)) materialises v^2 first (VGG16's fc6 alone is
    # 103 M values).
    return tf.add_n([tf.nn.l2_loss(tf.cast(v.value, tf.float32)) for v in variables])


def _build_optimizer(
    strategy: tf.distribute.Strategy, model: keras.Model, optimizer: keras.optimizers.Optimizer
) -> None:
    # Slot variables must exist before a checkpoint is restored and before the
    # step is traced: created inside the first tf.function call, they make TF wrap
    # the step in an initialization cond that fails under MirroredStrategy.
    if not optimizer.built:
        with strategy.scope():
            optimizer.build(model.trainable_variables)


def make_train_step(
    strategy: tf.distribute.Strategy,
    model: keras.Model,
    optimizer: keras.optimizers.Optimizer,
    *,
    ignore_label: int = 255,
    class_weights: Any = None,
    weight_decay: float = 0.0,
    loss_fn: LossFn | None = None,
    aux_loss_weight: float = 0.4,
    task_loss_weights: dict[str, float] | None = None,
    loss_reduction: str = "mean",
    jit_compile: bool = False,
    weight_average: WeightAverage | None = None,
) -> Callable[[Any], tuple[Any, ...]]:
    """Builds the distributed train step.

    The loss is `sum_k w_k * L_k` over the model's outputs k (see
    `kfcn.training.outputs`): `L_k` is output k's summed cross-entropy divided
    by its valid-pixel weight over the GLOBAL batch ("mean"), or not divided
    ("sum": Caffe's `normalize: false`, the FCN reference solvers); `w_k` is 1
    (or `task_loss_weights[k]`) for a main output and `aux_loss_weight` for
    an "aux_*" output.

    Args:
        strategy: the strategy whose scope created `model` and `optimizer`.
        model: maps images to logits [b, h, w, num_classes], or to a dict of
            them (task outputs and "aux_*" outputs).
        optimizer: a Keras optimizer, possibly a `LossScaleOptimizer` (float16).
        ignore_label: label value excluded from the loss.
        class_weights: optional per-class loss weights [num_classes], applied to
            every output (single-task models).
        weight_decay: L2 coefficient on kernels (see the module docstring).
        loss_fn: `(labels, logits, *, ignore_label, class_weights) -> (loss_sum,
            weight_sum)`; defaults to `kfcn.losses.pixel_cross_entropy`.
        aux_loss_weight: weight of each auxiliary output's loss (mmseg 0.4,
            torchvision 0.5).
        task_loss_weights: weight of each main output's loss by name (default 1).
        loss_reduction: "mean" (per output, over the global batch's valid pixels)
            or "sum" (unnormalised).
        jit_compile: compile each replica's forward, backward and update with
            XLA (one device only: XLA cannot compile the cross-replica sum).

    Returns:
        A `tf.function` taking an iterator over the distributed dataset and
        returning `(loss, l2, grad_norm, output_losses)`: the global weighted
        data loss of the step, the weight-decay term, the sum over replicas of
        the gradient norms (0 under loss scaling), float32 scalars identical on
        every worker, and `{output name: its unweighted loss L_k}`.
    """
    if loss_reduction not in outputs_lib.LOSS_REDUCTIONS:
        raise ValueError(
            f"`loss_reduction` must be one of {', '.join(outputs_lib.LOSS_REDUCTIONS)}. "
            f"Received: loss_reduction={loss_reduction!r}"
        )
    loss_fn = loss_fn or _default_loss_fn()
    _build_optimizer(strategy, model, optimizer)
    weights = None if class_weights is None else tf.constant(class_weights, tf.float32)
    kernels = [v for v in model.trainable_variables if _is_kernel(v)]
    num_replicas = strategy.num_replicas_in_sync
    loss_scaling = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)

    def replica_step(images: Any, labels: Any) -> tuple[Any, ...]:
        context = tf.distribute.get_replica_context()
        with tf.GradientTape() as tape:
            outputs = model(images, training=True)
            if not isinstance(outputs, dict):
                outputs = {outputs_lib.LOGITS_KEY: outputs}
            pairs = outputs_lib.loss_weights(
                sorted(outputs),
                sorted(labels) if isinstance(labels, dict) else None,
                aux_loss_weight=aux_loss_weight,
                task_loss_weights=task_loss_weights,
            )
            sums, pixel_weights = [], []
            for name, (key, _) in pairs.items():
                loss_sum, weight_sum = loss_fn(
                    labels if key is None else labels[key],
                    tf.cast(outputs[name], tf.float32),
                    ignore_label=ignore_label,
                    class_weights=weights,
                )
                sums.append(loss_sum)
                pixel_weights.append(weight_sum)
            if loss_reduction == "mean":
                # One all-reduce for every output's valid-pixel weight.
                global_weights = context.all_reduce(
                    tf.distribute.ReduceOp.SUM, tf.stack(pixel_weights)
                )
                per_output = tf.stack(sums) / tf.maximum(global_weights, 1e-12)
            else:
                per_output = tf.stack(sums)
            output_weights = tf.constant([w for _, w in pairs.values()], tf.float32)
            data_loss = tf.reduce_sum(output_weights * per_output)
            if weight_decay and kernels:
                # Divided by the replica count because the optimizer sums the
                # replicas' gradients: the decay must be counted once.
                l2 = weight_decay * _half_sum_of_squares(kernels) / num_replicas
            else:
                l2 = tf.constant(0.0)
            loss = data_loss + l2
            scaled = optimizer.scale_loss(loss) if loss_scaling else loss
        grads = tape.gradient(scaled, model.trainable_variables)
        if loss_scaling:
            # Overflowing float16 gradients are normal: the optimizer skips the
            # step and lowers the scale, so they must not stop training.
            grad_norm = tf.constant(0.0)
        else:
            # A finite loss can still give NaN gradients (e.g. NaN inputs behind a
            # ReLU); they would poison the weights before the loss shows it.
            grad_norm = tf.linalg.global_norm([g for g in grads if g is not None])
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        output_losses = {name: per_output[i] for i, name in enumerate(pairs)}
        return data_loss, l2, grad_norm, output_losses

    if jit_compile:
        if num_replicas > 1:
            raise ValueError(
                "`jit_compile` needs one replica: XLA cannot compile the cross-replica sum. "
                f"Received: jit_compile=True with {num_replicas} replicas"
            )
        replica_step = tf.function(replica_step, jit_compile=True)

    @tf.function
    def train_step(iterator: Any) -> tuple[Any, ...]:
        images, labels = next(iterator)
        data_loss, l2, grad_norm, output_losses = strategy.run(replica_step, args=(images, labels))
        if weight_average is not None:
            weight_average.update()

        def total(value: Any) -> tf.Tensor:
            return strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None)

        return (
            total(data_loss),
            total(l2),
            total(grad_norm),
            {name: total(value) for name, value in output_losses.items()},
        )

    return train_step


def _sum_over_workers(strategy: tf.distribute.Strategy, info: WorkerInfo, array: np.ndarray):
    """All-reduces a host array over workers (collective: call on all workers)."""
    if info.num_workers == 1:
        return array
    value = tf.constant(array, tf.float64)
    local_replicas = len(strategy.extended.worker_devices)

    def per_replica(context: tf.distribute.ValueContext) -> tf.Tensor:
        # One contribution per worker: its first local replica carries the value.
        first = context.replica_id_in_sync_group % local_replicas == 0
        return value if first else tf.zeros_like(value)

    values = strategy.experimental_distribute_values_from_function(per_replica)
    return strategy.reduce(tf.distribute.ReduceOp.SUM, values, axis=None).numpy()


def validate(
    model: keras.Model,
    dataset: tf.data.Dataset,
    *,
    num_classes: int | dict[str, int] | None,
    ignore_label: int = 255,
    strategy: tf.distribute.Strategy | None = None,
    heartbeat: Callable[[], None] | None = None,
    on_image: Callable[[int, str, Any, Any, Any], None] | None = None,
    mode: str = "whole",
    crop_size: tuple[int, int] | None = None,
    stride: tuple[int, int] | None = None,
    scales: Sequence[float] = (1.0,),
    flip: bool = True,
) -> dict[str, Any]:
    """Scores `model` on `dataset` (the local shard under multi-worker training).

    Runs `kfcn.evaluation.accumulate_confusion`, the evaluation loop of
    `kfcn evaluate`, on whole images (one image per local replica at a time),
    then sums the workers' matrices (all tasks' matrices in one all-reduce).
    Auxiliary outputs are not scored.

    Args:
        model: the segmentation model.
        dataset: yields `(images [1, H, W, 3], labels [1, H, W], ...)` as
            `kfcn.data.pipeline.eval_pipeline` does (dict labels for a
            multi-task model).
        num_classes: number of classes, or `{task: classes}`; None takes them
            from the model's outputs.
        ignore_label: label value left out of the scores.
        strategy: the training strategy. Its local replicas share the images of
            "whole" mode; under multi-worker training the workers' confusion
            matrices are summed, so every worker returns the scores of the whole set.
        heartbeat: called after every image (keeps the watchdog quiet).
        on_image: also called after every image, see `accumulate_confusion`.
        mode: "whole" images, "slide" windows of `crop_size` every `stride`, or
            "msflip": the softmax averaged over `scales` (and mirrored if `flip`).
        crop_size: the window of "slide".
        stride: the window stride of "slide".
        scales: the resize factors of "msflip".
        flip: whether "msflip" also predicts the mirrored images.

    Returns:
        For one task, the dict of `kfcn.metrics.scores` plus "confusion" (nested
        lists); for several, `{task: that dict}`; either way with "num_images".
    """

    def after_image(*args: Any) -> None:
        if heartbeat is not None:
            heartbeat()
        if on_image is not None:
            on_image(*args)

    confusion, num_images = evaluation.accumulate_confusion(
        model,
        dataset,
        num_classes,
        ignore_label,
        mode,
        crop_size=crop_size,
        stride=stride,
        scales=scales,
        flip=flip,
        on_image=after_image,
        strategy=strategy,
    )
    matrices = confusion if isinstance(confusion, dict) else {"": confusion}
    if strategy is not None:
        info = worker_info(strategy)
        flat = [matrices[t].ravel() for t in sorted(matrices)] + [[num_images]]
        summed = _sum_over_workers(strategy, info, np.concatenate(flat).astype(np.float64))
        offset = 0
        for task in sorted(matrices):
            size = matrices[task].size
            matrices[task] = (
                np.rint(summed[offset : offset + size])
                .astype(np.int64)
                .reshape(matrices[task].shape)
            )
            offset += size
        num_images = int(round(summed[-1]))

    def task_scores(matrix: np.ndarray) -> dict[str, Any]:
        scores = metrics.scores(matrix)
        scores["confusion"] = matrix.tolist()
        return scores

    if isinstance(confusion, dict):
        result: dict[str, Any] = {task: task_scores(m) for task, m in matrices.items()}
    else:
        result = task_scores(matrices[""])
    result["num_images"] = num_images
    return result


class BestModel:
    """The best validation so far: `model_dir/best.json` and `best.weights.h5` (chief).

    mmsegmentation's `save_best` keeps the checkpoint of the best score; here the
    model's weights at the best validation are written beside the checkpoints
    (`model.load_weights(".../best.weights.h5")` restores them into the same
    architecture), and best.json says which step and score. A resumed run reads
    best.json, so "best" spans the whole run.
    """

    JSON = "best.json"
    WEIGHTS = "best.weights.h5"

    def __init__(self, model_dir: str, metric: str, is_chief: bool) -> None:
        self.metric = metric
        self.is_chief = is_chief
        self.json_path = os.path.join(model_dir, self.JSON)
        self.weights_path = os.path.join(model_dir, self.WEIGHTS)
        self.record: dict[str, Any] | None = None
        if os.path.exists(self.json_path):
            with open(self.json_path, encoding="utf-8") as f:
                record = json.load(f)
            if record.get("metric") == metric:
                self.record = record

    def update(self, model: keras.Model, scores: dict[str, Any], step: int) -> bool:
        """Keeps `model`'s weights if `scores` beat the best; returns whether they did."""
        value = outputs_lib.selection_value(scores, self.metric)
        if not outputs_lib.is_better(value, None if self.record is None else self.record["value"]):
            return False
        self.record = {
            "step": step,
            "metric": self.metric,
            "value": value,
            "weights": self.weights_path,
        }
        if self.is_chief:
            partial = self.weights_path[: -len(".weights.h5")] + ".partial.weights.h5"
            model.save_weights(partial)
            os.replace(partial, self.weights_path)
            files.write_json_atomically(self.record, self.json_path)
        return True


class _Watchdog:
    """Ends the process when training makes no progress for `timeout` seconds.

    A worker whose peer died can block inside a collective; neither Python
    exceptions nor signals reach it there, so the watchdog calls `os._exit`.
    """

    def __init__(self, timeout: float | None, describe: Callable[[], str]) -> None:
        self._timeout = timeout
        self._describe = describe
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> _Watchdog:
        if self._timeout:
            self._thread = threading.Thread(target=self._watch, daemon=True, name="kfcn-watchdog")
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()

    def beat(self) -> None:
        self._last = time.monotonic()

    def _watch(self) -> None:
        while not self._stop.wait(min(5.0, self._timeout)):
            idle = time.monotonic() - self._last
            if idle > self._timeout:
                logger.error(
                    "No training progress for %.0f s (step_timeout=%g) %s; a peer worker has "
                    "probably died. Exiting with status %d; rerun every worker with the same "
                    "command to resume from the last checkpoint.",
                    idle,
                    self._timeout,
                    self._describe(),
                    WATCHDOG_EXIT_CODE,
                )
                for handler in logging.getLogger().handlers:
                    handler.flush()
                os._exit(WATCHDOG_EXIT_CODE)


def _scalar(name: str, value: float, step: int) -> None:
    """Writes a TensorBoard scalar without needing the `tensorboard` package.

    `tf.summary.scalar` lives in `tensorboard`; `tf.summary.write` with the
    scalars plugin's metadata writes the same event that TensorBoard plots.
    """
    metadata = summary_pb2.SummaryMetadata()
    metadata.plugin_data.plugin_name = "scalars"
    tf.summary.write(name, tf.constant(value, tf.float32), step=step, metadata=metadata)


def _image(name: str, rgb: np.ndarray, step: int, description: str = "") -> None:
    """Writes an RGB uint8 picture as a TensorBoard image (the images plugin's format)."""
    metadata = summary_pb2.SummaryMetadata()
    metadata.plugin_data.plugin_name = "images"
    metadata.summary_description = description
    height, width = rgb.shape[:2]
    tensor = tf.stack([tf.as_string(width), tf.as_string(height), tf.io.encode_png(rgb)])
    tf.summary.write(name, tensor, step=step, metadata=metadata)


_COLLECTIVE_ERRORS = (
    tf.errors.UnavailableError,
    tf.errors.DeadlineExceededError,
    tf.errors.CancelledError,
    tf.errors.AbortedError,
)


@contextlib.contextmanager
def _collective_failures(info: WorkerInfo, step: int, last_saved: str | None) -> Iterator[None]:
    """Turns the errors of aborted collectives into one clear `PeerFailureError`."""
    try:
        yield
    except _COLLECTIVE_ERRORS as e:
        if info.num_workers == 1:
            raise
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        # TF's first line is often just "Graph execution error:"; the cause is further down.
        causes = [
            line for line in lines if re.search(r"abort|refused|timed? ?out|deadline", line, re.I)
        ]
        first_line = (causes or lines or [""])[0][:300]
        raise PeerFailureError(
            f"Training stopped at step {step}: a collective operation failed, a peer worker "
            f"has probably died ({type(e).__name__}: {first_line}). Rerun every worker with "
            f"the same command to resume from {last_saved}."
        ) from e


def _format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def train(
    *,
    strategy: tf.distribute.Strategy,
    model: keras.Model,
    optimizer: keras.optimizers.Optimizer,
    train_dataset_fn: TrainDatasetFn,
    config: LoopConfig,
    model_dir: str,
    num_classes: int,
    ignore_label: int = 255,
    class_weights: Any = None,
    eval_dataset_fn: EvalDatasetFn | None = None,
    loss_fn: LossFn | None = None,
    overlay_fn: OverlayFn | None = None,
    num_overlays: int = 3,
    eval_model: keras.Model | None = None,
    horizon: tf.Variable | None = None,
) -> TrainResult:
    """Trains `model`, resuming from the latest checkpoint in `model_dir`.

    Call it on every worker with the same arguments. The chief writes the
    checkpoints (`model_dir/checkpoints`) and TensorBoard summaries
    (`model_dir/logs/{train,validation}`: loss, l2, learning_rate, images/s,
    validation mean IoU and pixel accuracy).

    Args:
        strategy: the distribution strategy; `model` and `optimizer` must have
            been created in its scope.
        model: the model to train.
        optimizer: the Keras optimizer (its iteration count drives the schedule).
        train_dataset_fn: `(input_context, start_step) -> dataset` yielding
            per-replica batches `(images, labels)` forever, sharded by the
            input context; `start_step` lets it reseed after a resume.
        config: step counts and intervals.
        model_dir: the run's directory.
        num_classes: number of classes (for validation).
        ignore_label: label value excluded from loss and scores.
        class_weights: optional per-class loss weights.
        eval_dataset_fn: `(num_shards, shard_index) -> dataset` of validation
            images (see `validate`), or None to skip validation.
        loss_fn: see `make_train_step`.
        overlay_fn: `(image uint8 [H, W, 3], prediction [H, W]) -> RGB uint8`; at
            each validation the chief writes the overlays of its first
            `num_overlays` images to TensorBoard (`logs/validation`, images tab).
        num_overlays: see `overlay_fn`.
        eval_model: the model validation scores, built on `model`'s layers
            (`kfcn.training.test_time.TestTime.view`); default `model`. The best
            validation still saves `model`'s weights.
        horizon: with `config.time_budget`, the scalar variable the learning-rate
            schedule reads as its last step (`kfcn.training.time_budget`); the
            loop sets it to the projected last step and checkpoints it. Made
            here when None (a schedule that does not decay).

    Returns:
        A `TrainResult`. With `config.ema_momentum`, `model` then holds the
        weight average.

    Raises:
        NonFiniteLossError: when the loss, the L2 term or the gradient norm
            becomes NaN or infinite; nothing is saved after the last good step.
        PeerFailureError: when a collective fails because a worker died.
    """
    info = worker_info(strategy)
    _build_optimizer(strategy, model, optimizer)
    step_var = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
    trackables: dict[str, Any] = {"model": model, "optimizer": optimizer, "step": step_var}
    if config.time_budget is not None:
        if horizon is None:
            horizon = tf.Variable(config.total_steps, dtype=tf.float64, trainable=False)
        spent_var = tf.Variable(0.0, dtype=tf.float64, trainable=False, name="time_spent")
        trackables.update(horizon=horizon, time_spent=spent_var)
    average = None
    if config.ema_momentum:
        with strategy.scope():
            average = WeightAverage(model, config.ema_momentum)
        trackables["weight_average"] = average
    checkpoint = TrainingCheckpoint(
        model_dir, is_chief=info.is_chief, task_id=info.worker_index, **trackables
    )
    restored = checkpoint.restore()
    start_step = int(step_var.numpy())
    # The run ends at end_step: total_steps, or where its time budget projects.
    end_step, budget = config.total_steps, None
    if config.time_budget is not None:
        budget = TimeBudget(config.time_budget, config.total_steps, spent=float(spent_var.numpy()))
        if restored:
            end_step = max(start_step, min(config.total_steps, round(float(horizon.numpy()))))
        horizon.assign(end_step)
    if restored and start_step >= end_step:
        logger.info(
            "The run in %s is already at step %d of %d: nothing to train (checkpoint %s)",
            model_dir,
            start_step,
            end_step,
            restored,
        )
    elif restored:
        logger.info(
            "Resuming from step %d (%d epochs done) of %d, checkpoint %s",
            start_step,
            start_step // config.steps_per_epoch,
            config.total_steps,
            restored,
        )
    else:
        logger.info("Starting a fresh run of %d steps in %s", config.total_steps, model_dir)
    if budget is not None:
        logger.info(
            "Time budget: %.1f minutes (%.1f spent): the run ends where the pace projects, "
            "at most at step %d",
            budget.seconds / 60,
            budget.spent() / 60,
            config.total_steps,
        )

    train_step = make_train_step(
        strategy,
        model,
        optimizer,
        ignore_label=ignore_label,
        class_weights=class_weights,
        weight_decay=config.weight_decay,
        loss_fn=loss_fn,
        aux_loss_weight=config.aux_loss_weight,
        task_loss_weights=config.task_loss_weights,
        loss_reduction=config.loss_reduction,
        jit_compile=config.jit_compile,
        weight_average=average,
    )
    best = BestModel(model_dir, config.selection_metric, info.is_chief)
    distributed = strategy.distribute_datasets_from_function(
        lambda context: train_dataset_fn(context, start_step)
    )
    iterator = iter(distributed)

    if info.is_chief:
        train_writer = tf.summary.create_file_writer(os.path.join(model_dir, "logs", "train"))
        eval_writer = tf.summary.create_file_writer(os.path.join(model_dir, "logs", "validation"))
    else:
        train_writer = eval_writer = tf.summary.create_noop_writer()

    step = start_step
    last_scores: dict[str, Any] | None = None
    window_start, window_steps = time.monotonic(), 0
    measured_time, measured_steps, first_window = 0.0, 0, True
    first_time, first_steps = 0.0, 0
    last_saved = checkpoint.latest
    # Seconds the last validation and checkpoint took: the budget keeps them back.
    eval_seconds = save_seconds = 0.0

    def project_end(current: int) -> int:
        """The budget's last step at `step` (collective: every worker, same step)."""
        # Every worker must project the same step: average what each one measured.
        measured = np.array([*budget.measure(step), eval_seconds + save_seconds], np.float64)
        spent, pace, reserve = _sum_over_workers(strategy, info, measured) / info.num_workers
        last = budget.last_step(step, spent, pace, reserve, current)
        if last != current:
            horizon.assign(last)
        return last

    def run_eval() -> dict[str, Any]:
        with average.swapped_in() if average else contextlib.nullcontext():
            return evaluate_and_record()

    def evaluate_and_record() -> dict[str, Any]:
        overlays: list[tuple[str, np.ndarray]] = []

        def keep_overlay(index: int, name: str, image: Any, label: Any, prediction: Any) -> None:
            if index <= num_overlays:
                # RGB-HHA inputs show their "rgb" stream, RGB-D its first three channels,
                # a multi-task model its first task.
                if isinstance(image, dict):
                    image = image.get("rgb", next(iter(image.values())))
                if isinstance(prediction, dict):
                    prediction = prediction[sorted(prediction)[0]]
                rgb = np.clip(np.asarray(image)[0][..., :3], 0, 255).astype(np.uint8)
                overlays.append((name or str(index), overlay_fn(rgb, prediction)))

        scores = validate(
            model if eval_model is None else eval_model,
            eval_dataset_fn(info.num_workers, info.worker_index),
            num_classes=num_classes,
            ignore_label=ignore_label,
            strategy=strategy,
            heartbeat=watchdog.beat,
            on_image=keep_overlay if overlay_fn is not None and info.is_chief else None,
            mode=config.val_mode,
            crop_size=config.val_crop_size,
            stride=config.val_stride,
            scales=config.val_scales,
            flip=config.val_flip,
        )
        for task, task_scores in _task_scores(scores).items():
            logger.info(
                "validation step %d%s: mean IoU %.4f, pixel accuracy %.4f, mean accuracy %.4f "
                "(%d images)",
                step,
                f" {task}" if task else "",
                task_scores["mean_iou"],
                task_scores["pixel_accuracy"],
                task_scores["mean_accuracy"],
                scores["num_images"],
            )
        improved = best.update(model, scores, step)
        if improved:
            logger.info(
                "Best %s so far: %.4f at step %d (%s)",
                best.metric,
                best.record["value"],
                step,
                best.weights_path,
            )
        with eval_writer.as_default():
            for task, task_scores in _task_scores(scores).items():
                prefix = f"{task}/" if task else ""
                for key in ("mean_iou", "pixel_accuracy", "mean_accuracy"):
                    _scalar(f"{prefix}{key}", task_scores[key], step)
            if best.record is not None:
                _scalar(f"best_{best.metric}", best.record["value"], step)
            for index, (name, picture) in enumerate(overlays):
                _image(f"prediction_{index}", picture, step, description=name)
        eval_writer.flush()
        return scores

    # Step results stay on the device until the next log, checkpoint or validation:
    # no host synchronisation per step (`pending` holds at most one interval).
    pending: list[tuple[Any, ...]] = []

    def settle() -> tuple[float, float, float, dict[str, Any]]:
        """Reads the pending steps' results; raises at the first non-finite one."""
        first = step - len(pending) + 1
        values = (0.0, 0.0, 0.0, {})
        for offset, (loss_t, l2_t, norm_t, losses_t) in enumerate(pending):
            values = (float(loss_t), float(l2_t), float(norm_t), losses_t)
            if not all(math.isfinite(v) for v in values[:3]):
                raise NonFiniteLossError(
                    f"Loss is {values[0]} (l2 {values[1]}, gradient norm {values[2]}) at step "
                    f"{first + offset}: training stopped without saving. The last good "
                    f"checkpoint is {last_saved}. Lower `learning_rate` or check the input data."
                )
        pending.clear()
        return values

    with _Watchdog(config.step_timeout, lambda: f"at step {step}") as watchdog:
        while step < end_step:
            with _collective_failures(info, step, last_saved):
                pending.append(train_step(iterator))
            step += 1
            window_steps += 1
            watchdog.beat()
            if budget is not None and step % config.log_every == 0:
                with _collective_failures(info, step, last_saved):
                    end_step = project_end(end_step)
            saving = step % config.checkpoint_every == 0 or step == end_step
            validating = eval_dataset_fn is not None and (
                (config.eval_every and step % config.eval_every == 0) or step == end_step
            )
            if step % config.log_every == 0 or saving or validating:
                with _collective_failures(info, step, last_saved):
                    loss, l2, grad_norm, output_losses = settle()
            if step % config.log_every == 0 or step == end_step:
                elapsed = time.monotonic() - window_start
                rate = window_steps * config.global_batch_size / max(elapsed, 1e-9)
                seconds_per_step = elapsed / window_steps
                if first_window:
                    first_time, first_steps = elapsed, window_steps
                else:
                    measured_time += elapsed
                    measured_steps += window_steps
                first_window = False
                lr = float(keras.ops.convert_to_numpy(optimizer.learning_rate))
                logger.info(
                    "step %d/%d epoch %d/%d: loss %.4f l2 %.4f lr %.3g, %.2f images/s, ETA %s%s",
                    step,
                    end_step,
                    (step - 1) // config.steps_per_epoch + 1,
                    math.ceil(end_step / config.steps_per_epoch),
                    loss,
                    l2,
                    lr,
                    rate,
                    _format_eta(
                        seconds_per_step * (end_step - step)
                        if budget is None
                        else max(budget.seconds - budget.spent(), 0.0)
                    ),
                    ""
                    if budget is None
                    else f" (time budget: {budget.spent() / 60:.1f} of {budget.seconds / 60:.1f} "
                    "minutes)",
                )
                with train_writer.as_default():
                    _scalar("loss", loss, step)
                    if len(output_losses) > 1:  # each output's unweighted loss
                        for name, value in output_losses.items():
                            _scalar(f"loss_{name}", float(value), step)
                    _scalar("l2", l2, step)
                    _scalar("gradient_norm", grad_norm, step)
                    _scalar("learning_rate", lr, step)
                    _scalar("images_per_second", rate, step)
                train_writer.flush()
                window_start, window_steps = time.monotonic(), 0
            pause_start = time.monotonic()
            clock = time.monotonic if budget is None else budget.now
            if saving:
                save_start = clock()
                step_var.assign(step)
                if budget is not None:
                    spent_var.assign(budget.spent())
                with _collective_failures(info, step, last_saved):
                    saved = checkpoint.save(step)
                last_saved = saved or checkpoint.latest
                save_seconds = clock() - save_start
                watchdog.beat()
            if validating:
                eval_start = clock()
                with _collective_failures(info, step, last_saved):
                    last_scores = run_eval()
                eval_seconds = clock() - eval_start
                watchdog.beat()
            # Saving and validating are not training: keep them out of images/s.
            window_start += time.monotonic() - pause_start
        if eval_dataset_fn is not None and last_scores is None and step == start_step:
            # Already complete: score the restored model so the caller gets scores.
            last_scores = run_eval()

    if average is not None:
        # The caller saves the model: give it the average (the checkpoints on disk
        # keep the trained weights beside it).
        average.assign_to_model()
    if measured_steps:
        images_per_second = measured_steps * config.global_batch_size / measured_time
    elif first_time:
        images_per_second = first_steps * config.global_batch_size / first_time
    else:
        images_per_second = None
    budget_record = None
    if budget is not None:
        budget_record = {
            "minutes": budget.seconds / 60,
            "spent_minutes": budget.spent() / 60,
            "last_step": step,
            "ended_by": "steps" if step >= config.total_steps else "time_budget",
        }
    return TrainResult(
        start_step,
        step,
        checkpoint.latest,
        last_scores,
        images_per_second,
        best.record,
        budget_record,
    )


def _task_scores(scores: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """`{task: scores}` of `validate`'s result ({"": scores} for one task)."""
    if "mean_iou" in scores:
        return {"": scores}
    return {k: v for k, v in scores.items() if isinstance(v, dict)}
