"""Whole-image, sliding-window and multi-scale + flip inference, and dataset evaluation.

The FCN paper evaluates whole images at their native size in one forward pass
(fully convolutional nets take any input size; CVPR 2015 section 4) and scores
them with the four metrics of section 5 (`kfcn.metrics`). Two test-time
variants common in later work are provided as options:

- `predict_slide`: overlapping `crop_size` windows, for models trained on crops
  or images too large for memory. The windows' *logits* are averaged where they
  overlap (as mmsegmentation's slide inference does), so the result is a logits
  map like `predict_whole`'s and can be fed to the multi-scale mode.
- `predict_msflip`: the image resized by each scale (and mirrored), softmax
  probabilities resized back to the native size and averaged.

Predictions are reduced with `tf.argmax` (not `keras.ops.argmax`, which emits an
op TFLite cannot convert; kept consistent across the package).

Example:
    ```python
    model = kfcn.load_model("fcn8s.keras")
    dataset, info = kfcn.data.load_dataset("camvid", "val", data_dir="/data/camvid")
    results = kfcn.evaluation.evaluate(model, dataset, info, mode="whole")
    print(kfcn.evaluation.format_results(results))
    ```
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from kfcn import metrics
from kfcn.files import json_safe, write_text_atomically
from kfcn.layers import IMAGENET_MEAN_RGB
from kfcn.training.outputs import inference_outputs

__all__ = [
    "DEFAULT_SCALES",
    "MODES",
    "accumulate_confusion",
    "check_num_classes",
    "evaluate",
    "format_results",
    "result_tasks",
    "task_results",
    "predict",
    "predict_msflip",
    "predict_slide",
    "predict_whole",
    "traced",
    "write_results_json",
]

_LOG = logging.getLogger(__name__)

MODES = ("whole", "slide", "msflip")
DEFAULT_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
# Padding colour for slide windows: the ImageNet mean RGB the model itself pads with
# (kfcn.layers), so padded pixels are zero after the model's mean subtraction.
PAD_RGB = IMAGENET_MEAN_RGB


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, (int, np.integer)) else tuple(value)
    if len(pair) != 2 or any(int(v) < 1 for v in pair):
        raise ValueError(
            f"`{name}` must be a positive int or (height, width). Received: {name}={value!r}"
        )
    return int(pair[0]), int(pair[1])


def _image_batch(image: Any) -> Any:
    """[H, W, C] or [1, H, W, C], any numeric dtype -> float32 [1, H, W, C].

    C is 3 (RGB), 4 (RGB-D) or any other channel count the model takes; a dict
    of such images (the two streams {"rgb", "hha"}) gives a dict of batches.
    """
    if isinstance(image, Mapping):
        return {k: _image_batch(v) for k, v in image.items()}
    image = tf.convert_to_tensor(image)
    if image.shape.rank == 3:
        image = image[tf.newaxis]
    if image.shape.rank != 4 or image.shape[0] != 1:
        raise ValueError(
            f"`image` must be [H, W, C] or [1, H, W, C]. Received shape {tuple(image.shape)}"
        )
    return tf.cast(image, tf.float32)


def _single_input(batch: Any, mode: str) -> None:
    if isinstance(batch, Mapping):
        raise ValueError(
            f"mode={mode!r} takes one image tensor; a model with inputs {sorted(batch)} "
            "is evaluated on whole images (mode='whole')"
        )


def _model_classes(model: keras.Model) -> int | dict[str, int] | None:
    """The model's number of classes, or {task: classes} for a multi-task model."""
    try:
        outputs = model.output
    except (AttributeError, ValueError):
        return None
    outputs = inference_outputs(outputs)
    if isinstance(outputs, dict):
        return {k: int(v.shape[-1]) for k, v in outputs.items()}
    shape = getattr(outputs, "shape", None)
    return None if shape is None else shape[-1]


def _pack(outputs: Any) -> tuple[tf.Tensor, list[tuple[str, int]] | None]:
    """The inference outputs as one tensor: tasks' logits concatenated in key order.

    Returns (tensor, tasks): `tasks` lists (name, num_classes) in channel order,
    None for a single output.
    """
    outputs = inference_outputs(outputs)
    if not isinstance(outputs, dict):
        return outputs, None
    names = sorted(outputs)
    tasks = [(name, int(outputs[name].shape[-1])) for name in names]
    return tf.concat([tf.cast(outputs[name], tf.float32) for name in names], axis=-1), tasks


class _Traced:
    """`traced(model)`: one `tf.function` over the model; remembers its tasks."""

    def __init__(self, model: keras.Model) -> None:
        self.tasks: list[tuple[str, int]] | None = None

        def forward(images: tf.Tensor) -> tf.Tensor:
            packed, self.tasks = _pack(model(images, training=False))  # set while tracing
            return packed

        self._function = tf.function(forward, reduce_retracing=True)

    def __call__(self, images: tf.Tensor, training: bool = False) -> tf.Tensor:
        del training  # always inference
        return self._function(images)


def traced(model: keras.Model) -> Callable[..., tf.Tensor]:
    """Wraps `model` in one `tf.function` for repeated inference.

    Eager calls of a Keras model run op by op; on the 2-core CPU used for
    development an FCN-8s MobileNetV2 forward pass on a 360x480 image took about
    0.07 s traced against 0.24-0.45 s eager (other jobs shared the CPU).
    `reduce_retracing` makes the function generalise to unknown image sizes after
    the second distinct shape instead of tracing every size. The result can be
    passed as `model` to the `predict_*` functions (`evaluate` does this).

    Auxiliary outputs ("aux_*", training only) are dropped, as
    `kfcn.inference_model` does. A multi-task model's outputs come back as one
    tensor, the tasks' logits concatenated in key order; the wrapper's `tasks`
    attribute lists `(name, num_classes)` in that order once it has run.
    """
    return _Traced(model)


class _ReplicaForward:
    """Whole-image forward passes spread over a strategy's local replicas.

    Each call takes up to one image per local replica (sizes may differ) and runs
    them in one `strategy.run`, so the replicas' devices work at the same time on
    their own copies of the variables. A short group is padded with its last image,
    whose extra results are dropped.
    """

    def __init__(self, model: keras.Model, strategy: tf.distribute.Strategy) -> None:
        self.strategy = strategy
        self.size = len(strategy.extended.worker_devices)
        self.tasks: list[tuple[str, int]] | None = None

        def forward(batch: Any) -> tf.Tensor:
            logits = model(batch, training=False)
            if isinstance(logits, dict):
                self.tasks = _pack(logits)[1]  # set while tracing
            return _forward(model, batch, logits=logits)

        def run(per_replica: Any) -> Any:
            return strategy.run(forward, args=(per_replica,))

        self._run = tf.function(run, reduce_retracing=True)

    def __call__(self, images: Sequence[Any]) -> list[tf.Tensor]:
        batches = [_image_batch(image) for image in images]
        count = len(batches)
        if not 0 < count <= self.size:
            raise ValueError(f"Takes 1 to {self.size} images. Received {count}")
        batches += [batches[-1]] * (self.size - count)
        values = self.strategy.experimental_distribute_values_from_function(
            lambda context: batches[context.replica_id_in_sync_group % self.size]
        )
        results = self.strategy.experimental_local_results(self._run(values))
        return [logits[0] for logits in results[:count]]


def local_replicas(strategy: tf.distribute.Strategy | None) -> int:
    """Number of replicas `strategy` runs in this process (1 without a strategy)."""
    if strategy is None:
        return 1
    try:
        return len(strategy.extended.worker_devices)
    except RuntimeError:  # the default strategy has no device list: one device
        return 1


def _tasks_of(model: Any) -> list[tuple[str, int]] | None:
    return getattr(model, "tasks", None)


def _softmax(logits: tf.Tensor, tasks: list[tuple[str, int]] | None) -> tf.Tensor:
    """Softmax over each task's channels (over all channels for one task)."""
    if not tasks:
        return tf.nn.softmax(logits, axis=-1)
    parts = tf.split(logits, [n for _, n in tasks], axis=-1)
    return tf.concat([tf.nn.softmax(p, axis=-1) for p in parts], axis=-1)


def _forward(model: keras.Model, batch: tf.Tensor, logits: Any = None) -> tf.Tensor:
    if logits is None:
        logits = model(batch, training=False)
    if isinstance(logits, dict):
        logits, _ = _pack(logits)
    if isinstance(logits, (list, tuple)):
        raise ValueError(
            "`model` must return logits, or a dict of them keyed by task. "
            f"Received {type(logits).__name__}"
        )
    reference = next(iter(batch.values())) if isinstance(batch, Mapping) else batch
    if logits.shape.rank != 4 or tuple(logits.shape[1:3]) != tuple(reference.shape[1:3]):
        raise ValueError(
            "`model` must return logits [b, H, W, num_classes] at the input's size. "
            f"Input shape {tuple(reference.shape)}, output shape {tuple(logits.shape)}"
        )
    return tf.cast(logits, tf.float32)


def predict_whole(model: keras.Model, image: Any) -> tf.Tensor:
    """One forward pass on the whole image at its native size (the FCN paper's test mode).

    Args:
        model: Keras model mapping RGB 0..255 images [b, H, W, 3] to logits
            [b, H, W, C], or the callable returned by `traced(model)`.
        image: [H, W, 3] or [1, H, W, 3] image, values 0..255.

    Returns:
        float32 logits [H, W, C].
    """
    return _forward(model, _image_batch(image))[0]


def _window_starts(length: int, crop: int, stride: int) -> list[int]:
    """Window offsets every `stride` plus one flush with the end, so [0, length) is covered."""
    last = max(length - crop, 0)
    starts = list(range(0, last + 1, stride))
    if starts[-1] != last:
        starts.append(last)
    return starts


def predict_slide(
    model: keras.Model,
    image: Any,
    crop_size: int | Sequence[int],
    stride: int | Sequence[int] | None = None,
    num_classes: int | None = None,
    batch_size: int = 4,
) -> tf.Tensor:
    """Sliding-window inference with overlapping windows; logits averaged.

    The image is padded at the bottom/right with the ImageNet mean colour up to at
    least `crop_size`. Windows start every `stride` pixels, plus one window flush
    with the bottom/right edge, so every pixel is covered at least once. Each pixel's
    logits are the mean of the logits of the windows covering it (every covering
    window weighs 1; the count map divides). The padding is cropped away.

    Args:
        model: Keras model mapping RGB 0..255 images to logits [b, h, w, C]
            (or `traced(model)`).
        image: [H, W, 3] or [1, H, W, 3] image.
        crop_size: Window size, int or (height, width).
        stride: Window step, int or (height, width); default 2/3 of `crop_size`
            (rounded up), so neighbouring windows overlap by about a third.
        num_classes: C; checked against the model output (default: taken from it).
        batch_size: Windows per forward pass.

    Returns:
        float32 logits [H, W, C].
    """
    batch = _image_batch(image)
    _single_input(batch, "slide")

    def logits(windows: np.ndarray) -> np.ndarray:
        out = _forward(model, tf.constant(windows)).numpy()
        if num_classes is not None and out.shape[-1] != num_classes:
            raise ValueError(
                f"`model` outputs {out.shape[-1]} classes but num_classes={num_classes}"
            )
        return out

    return tf.constant(slide_scores(logits, batch[0].numpy(), crop_size, stride, batch_size))


def slide_scores(
    scores: Callable[[np.ndarray], np.ndarray],
    image: np.ndarray,
    crop_size: int | Sequence[int],
    stride: int | Sequence[int] | None = None,
    batch_size: int = 4,
) -> np.ndarray:
    """The sliding window of `predict_slide` over any `scores(windows)` function.

    The one implementation of the windows, padding and averaging, shared by
    `predict_slide` (Keras models) and `kfcn.predict` (SavedModel and TFLite).

    Args:
        scores: float32 [b, crop_h, crop_w, channels] -> float32 [b, crop_h, crop_w, C].
        image: [H, W, channels]: RGB 0..255 first (padded with the mean RGB), then
            any further channels such as depth (padded with 0).
        crop_size: Window size, int or (height, width).
        stride: Window step; default 2/3 of `crop_size` (rounded up).
        batch_size: Windows per `scores` call.

    Returns:
        float32 [H, W, C]: per pixel, the mean over the windows covering it.
    """
    crop_h, crop_w = _pair(crop_size, "crop_size")
    if stride is None:
        stride = (math.ceil(crop_h * 2 / 3), math.ceil(crop_w * 2 / 3))
    stride_h, stride_w = _pair(stride, "stride")
    if stride_h > crop_h or stride_w > crop_w:
        raise ValueError(
            "`stride` must not exceed `crop_size` (windows would skip pixels). "
            f"Received: stride={stride!r}, crop_size={crop_size!r}"
        )
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1. Received: batch_size={batch_size}")
    height, width = image.shape[:2]
    full_h, full_w = max(height, crop_h), max(width, crop_w)
    # The model's own padding: the mean RGB, 0 in other channels (e.g. depth).
    padded = np.zeros((full_h, full_w, image.shape[-1]), np.float32)
    padded[..., :3] = np.asarray(PAD_RGB, np.float32)[: image.shape[-1]]
    padded[:height, :width] = image
    boxes = [
        (y, x)
        for y in _window_starts(full_h, crop_h, stride_h)
        for x in _window_starts(full_w, crop_w, stride_w)
    ]
    total = None
    count = np.zeros((full_h, full_w, 1), np.float32)
    for first in range(0, len(boxes), batch_size):
        chunk = boxes[first : first + batch_size]
        out = scores(np.stack([padded[y : y + crop_h, x : x + crop_w] for y, x in chunk]))
        if total is None:
            total = np.zeros((full_h, full_w, out.shape[-1]), np.float32)
        for (y, x), window in zip(chunk, out, strict=True):
            total[y : y + crop_h, x : x + crop_w] += window
            count[y : y + crop_h, x : x + crop_w] += 1.0
    return (total / count)[:height, :width]


def predict_msflip(
    model: keras.Model,
    image: Any,
    scales: Sequence[float] = DEFAULT_SCALES,
    flip: bool = True,
    crop_size: int | Sequence[int] | None = None,
    stride: int | Sequence[int] | None = None,
) -> tf.Tensor:
    """Multi-scale (and horizontally mirrored) inference; probabilities averaged.

    For each scale s the image is resized (bilinear) to round(s * H) x round(s * W),
    predicted (whole, or sliding windows when `crop_size` is given), turned into
    softmax probabilities, resized (bilinear) back to H x W, and averaged over all
    scales, and over the mirrored image (its prediction mirrored back) if `flip`.

    Args:
        model: Keras model mapping RGB 0..255 images to logits (or `traced(model)`).
        image: [H, W, 3] or [1, H, W, 3] image.
        scales: Resize factors, e.g. (0.5, 0.75, 1.0, 1.25, 1.5, 1.75).
        flip: Also predict the left-right mirrored image.
        crop_size: If given, each scale is predicted with `predict_slide`.
        stride: Window stride for `predict_slide`.

    Returns:
        float32 probabilities [H, W, C] (sum to 1 over C).
    """
    scales = [float(s) for s in scales]
    if not scales or any(not s > 0 for s in scales):
        raise ValueError(f"`scales` must be positive numbers. Received: scales={scales!r}")
    batch = _image_batch(image)
    _single_input(batch, "msflip")
    height, width = int(batch.shape[1]), int(batch.shape[2])
    total = None
    views = 0
    for scale in scales:
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        scaled = batch if size == (height, width) else tf.image.resize(batch, size, "bilinear")
        for mirrored in (False, True) if flip else (False,):
            view = tf.reverse(scaled, axis=[2]) if mirrored else scaled
            if crop_size is None:
                logits = predict_whole(model, view)
            else:
                logits = predict_slide(model, view, crop_size, stride)
            probs = _softmax(logits, _tasks_of(model))
            if mirrored:
                probs = tf.reverse(probs, axis=[1])
            if size != (height, width):
                probs = tf.image.resize(probs, (height, width), "bilinear")
            total = probs if total is None else total + probs
            views += 1
    return total / views


def predict(
    model: keras.Model,
    image: Any,
    mode: str = "whole",
    *,
    crop_size: int | Sequence[int] | None = None,
    stride: int | Sequence[int] | None = None,
    scales: Sequence[float] = DEFAULT_SCALES,
    flip: bool = True,
) -> tf.Tensor:
    """Class scores [H, W, C] for one image with the given test mode.

    "whole" and "slide" return logits, "msflip" probabilities; either way
    `tf.argmax(..., axis=-1)` gives the predicted classes. In "msflip" mode a
    `crop_size` makes each scale use sliding windows.
    """
    if mode == "whole":
        return predict_whole(model, image)
    if mode == "slide":
        if crop_size is None:
            raise ValueError("mode='slide' needs `crop_size`. Received: crop_size=None")
        return predict_slide(model, image, crop_size, stride)
    if mode == "msflip":
        return predict_msflip(model, image, scales, flip, crop_size=crop_size, stride=stride)
    raise ValueError(f"`mode` must be one of {MODES}. Received: mode={mode!r}")


def check_num_classes(model: keras.Model, num_classes: int | Mapping[str, int] | None) -> None:
    """Raises ValueError if the model's classes (per task) differ from `num_classes`."""
    channels = _model_classes(model)
    if channels is None or num_classes is None:
        return
    if isinstance(channels, dict) != isinstance(num_classes, Mapping):
        raise ValueError(
            f"The model outputs {channels} classes but the dataset has "
            f"num_classes={num_classes}: one is multi-task and the other is not"
        )
    if channels != (dict(num_classes) if isinstance(num_classes, Mapping) else num_classes):
        raise ValueError(
            f"The model outputs {channels} classes but the dataset has "
            f"num_classes={num_classes}. Evaluate with a model trained for this dataset "
            "(or, for a folder dataset, pass its real number of classes)."
        )


def _unpack(element: Any) -> tuple[Any, Any, str]:
    if isinstance(element, dict):
        image, label, name = element["image"], element["label"], element.get("name", b"")
    else:  # (image, label[, name]) tuples, e.g. kfcn.data.pipeline.eval_pipeline
        image, label = element[0], element[1]
        name = element[2] if len(element) > 2 else b""

    def squeeze(value: Any) -> np.ndarray:
        value = np.asarray(value)
        return value[0] if value.ndim == 3 and value.shape[0] == 1 else value

    label = (
        {k: squeeze(v) for k, v in label.items()} if isinstance(label, Mapping) else squeeze(label)
    )
    name = np.asarray(name).ravel()
    name = name[0] if name.size else b""
    return image, label, name.decode() if isinstance(name, bytes) else str(name)


def _task_classes(
    tasks: list[tuple[str, int]] | None, num_classes: int | Mapping[str, int] | None
) -> dict[str, int] | int:
    """The classes the confusion matrices count: checked against the model's outputs."""
    if tasks is None:
        if isinstance(num_classes, Mapping):
            raise ValueError(
                f"The dataset has tasks {sorted(num_classes)} but the model has one output"
            )
        return num_classes
    model_classes = dict(tasks)
    if num_classes is not None and not isinstance(num_classes, Mapping):
        raise ValueError(
            f"The model has tasks {model_classes} but the dataset has one label "
            f"(num_classes={num_classes})"
        )
    if num_classes is not None and dict(num_classes) != model_classes:
        raise ValueError(
            f"The model outputs {model_classes} classes but the dataset has "
            f"num_classes={dict(num_classes)}"
        )
    return model_classes


def accumulate_confusion(
    model: keras.Model,
    dataset: Any,
    num_classes: int | Mapping[str, int] | None,
    ignore_label: int = 255,
    mode: str = "whole",
    *,
    crop_size: int | Sequence[int] | None = None,
    stride: int | Sequence[int] | None = None,
    scales: Sequence[float] = DEFAULT_SCALES,
    flip: bool = True,
    max_images: int | None = None,
    on_image: Callable[[int, str, Any, Any, Any], None] | None = None,
    strategy: tf.distribute.Strategy | None = None,
) -> tuple[np.ndarray | dict[str, np.ndarray], int]:
    """The evaluation loop: predicts each image and sums the confusion matrix.

    `evaluate` and the training loop's validation both run this loop (training
    then sums the workers' matrices). Auxiliary outputs ("aux_*") are dropped.
    With a `strategy` of several local replicas (e.g. MirroredStrategy over GPUs),
    "whole" mode predicts one image per replica at a time, all in one
    `strategy.run`; the matrix is the same as one device's.
    A multi-task model (dict outputs keyed by task, e.g. SIFT Flow's "sem" and
    "geo") is scored against dict labels with one matrix per task; its tasks'
    logits are predicted together (one forward pass, windows and scales shared).

    Args:
        model: Keras model mapping RGB 0..255 images to logits [b, H, W, C] or a
            dict of them (or `traced(model)`).
        dataset: Iterable of {"image", "label", "name"} dicts or of
            (image, label[, name]) tuples, one image each; a dict label
            `{task: [H, W]}` for a multi-task model.
        num_classes: C, or `{task: C}` for a multi-task model; None takes it
            from the model's outputs (a multi-task model's always are checked).
        ignore_label: Label value left out of the matrix.
        mode: "whole", "slide" or "msflip" (see `predict`).
        crop_size: Window size for "slide" (and optionally "msflip").
        stride: Window stride (default 2/3 of `crop_size`).
        scales: Scales for "msflip".
        flip: Mirror images in "msflip".
        max_images: Stop after this many images.
        on_image: Called after each image as
            `on_image(images_done, name, image, label, prediction)`, with the
            image as given, label and prediction int [H, W] (dicts of them
            for a multi-task model).
        strategy: Spreads "whole" mode over its local replicas (the model's
            variables must have been made in its scope); other modes, or one
            local replica, run image by image.

    Returns:
        (confusion int64 [C, C], rows = ground truth, or `{task: confusion}`;
        number of images).

    Raises:
        ValueError: bad `mode`, or model and dataset disagree on the number of classes.
    """
    if mode not in MODES:
        raise ValueError(f"`mode` must be one of {MODES}. Received: mode={mode!r}")
    if mode == "slide" and crop_size is None:
        raise ValueError("mode='slide' needs `crop_size`. Received: crop_size=None")
    if max_images is not None and max_images < 1:
        raise ValueError(f"`max_images` must be >= 1. Received: max_images={max_images}")
    classes_of_model = None
    replicated = None
    if mode == "whole" and local_replicas(strategy) > 1:
        if not isinstance(model, keras.Model):
            raise ValueError(
                "`strategy` needs the Keras model itself, not a wrapper. "
                f"Received: {type(model).__name__}"
            )
        replicated = _ReplicaForward(model, strategy)
    if isinstance(model, keras.Model):
        check_num_classes(model, num_classes)
        classes_of_model = _model_classes(model)
        model = traced(model)
    confusion: Any = None
    count = 0
    for element, class_scores in _predicted(
        dataset, model, replicated, max_images, mode, crop_size, stride, scales, flip
    ):
        image, label, name = element
        classes = _task_classes(_tasks_of(replicated or model), num_classes)
        if isinstance(classes, dict):
            parts = tf.split(class_scores, list(classes.values()), axis=-1)
            prediction = {
                task: tf.argmax(part, axis=-1, output_type=tf.int32).numpy()
                for task, part in zip(classes, parts, strict=True)
            }
            if not isinstance(label, Mapping) or set(label) != set(classes):
                received = sorted(label) if isinstance(label, Mapping) else "a tensor label"
                raise ValueError(
                    f"Image {name!r}: the model's tasks {sorted(classes)} need a dict label with "
                    f"those keys. Received: {received}"
                )
        else:
            if class_scores.shape[-1] != classes:
                raise ValueError(
                    f"The model outputs {class_scores.shape[-1]} classes but the dataset has "
                    f"num_classes={classes}"
                )
            prediction = tf.argmax(class_scores, axis=-1, output_type=tf.int32).numpy()
        if confusion is None:
            confusion = _empty_confusion(classes)
        for task, truth, predicted in _pairs(label, prediction):
            if truth.shape != predicted.shape:
                raise ValueError(
                    f"Image {name!r}: label shape {truth.shape} differs from the prediction "
                    f"shape {predicted.shape}" + (f" (task {task!r})" if task else "")
                )
            matrix = confusion[task] if task else confusion
            matrix += metrics.confusion_matrix(
                truth, predicted, matrix.shape[0], ignore_label=int(ignore_label)
            )
        count += 1
        if on_image is not None:
            on_image(count, name, image, label, prediction)
    if confusion is None:  # no images: the classes given, or the model's
        confusion = _empty_confusion(num_classes if num_classes is not None else classes_of_model)
    return confusion, count


def _predicted(
    dataset: Any,
    model: Any,
    replicated: _ReplicaForward | None,
    max_images: int | None,
    mode: str,
    crop_size: Any,
    stride: Any,
    scales: Sequence[float],
    flip: bool,
) -> Any:
    """Yields ((image, label, name), class scores) for each element of `dataset`."""
    group_size = replicated.size if replicated is not None else 1
    group: list[tuple[Any, Any, str]] = []
    count = 0

    def scored(group: list[tuple[Any, Any, str]]) -> list[tf.Tensor]:
        if replicated is not None:
            return replicated([image for image, _, _ in group])
        options = dict(crop_size=crop_size, stride=stride, scales=scales, flip=flip)
        return [predict(model, image, mode, **options) for image, _, _ in group]

    for element in dataset:
        if max_images is not None and count >= max_images:
            break
        group.append(_unpack(element))
        count += 1
        if len(group) == group_size:
            yield from zip(group, scored(group))
            group = []
    if group:
        yield from zip(group, scored(group))


def _empty_confusion(classes: int | Mapping[str, int] | None) -> np.ndarray | dict[str, np.ndarray]:
    if classes is None:
        raise ValueError("`num_classes` is needed when the dataset has no images")
    if isinstance(classes, Mapping):
        return {t: np.zeros((n, n), np.int64) for t, n in classes.items()}
    return np.zeros((classes, classes), np.int64)


def _pairs(label: Any, prediction: Any) -> list[tuple[str | None, np.ndarray, np.ndarray]]:
    if isinstance(prediction, dict):
        return [(task, np.asarray(label[task]), prediction[task]) for task in prediction]
    return [(None, np.asarray(label), prediction)]


def _each_image(
    progress: Callable[[int, str], None] | None,
    on_image: Callable[[int, str, Any, np.ndarray, np.ndarray], None] | None,
) -> Callable[[int, str, Any, np.ndarray, np.ndarray], None] | None:
    if progress is None:
        return on_image

    def both(count: int, name: str, image: Any, label: np.ndarray, prediction: np.ndarray):
        if on_image is not None:
            on_image(count, name, image, label, prediction)
        progress(count, name)

    return both


def evaluate(
    model: keras.Model,
    dataset: Any,
    info: Any,
    mode: str = "whole",
    *,
    crop_size: int | Sequence[int] | None = None,
    stride: int | Sequence[int] | None = None,
    scales: Sequence[float] = DEFAULT_SCALES,
    flip: bool = True,
    max_images: int | None = None,
    progress: Callable[[int, str], None] | None = None,
    on_image: Callable[[int, str, Any, np.ndarray, np.ndarray], None] | None = None,
) -> dict[str, Any]:
    """Evaluates a model on a dataset with the FCN metrics.

    Args:
        model: Keras model mapping RGB 0..255 images to logits [b, H, W, C].
        dataset: Iterable of {"image", "label", "name"} dicts (as from
            `kfcn.data.load_dataset`) or of (image, label[, name]) tuples, one image each.
        info: Object with `num_classes`, `ignore_label` and `class_names`
            (`kfcn.data.DatasetInfo`).
        mode: "whole", "slide" or "msflip" (see `predict`).
        crop_size: Window size for "slide" (and optionally "msflip").
        stride: Window stride (default 2/3 of `crop_size`).
        scales: Scales for "msflip".
        flip: Mirror images in "msflip".
        max_images: Stop after this many images.
        progress: Called as progress(images_done, name) after each image.
        on_image: Called after each image as
            `on_image(images_done, name, image, label, prediction)` (see
            `accumulate_confusion`), e.g. to keep per-image scores or examples.

    Returns:
        Dict with `pixel_accuracy`, `mean_accuracy`, `mean_iou`,
        `frequency_weighted_iou` (floats), `iou` and `accuracy` (dicts class name ->
        float, NaN where undefined, see `kfcn.metrics.scores`), `num_images`,
        `seconds`, `seconds_per_image`, `confusion_matrix` (list of lists, rows =
        ground truth) and the test settings (`mode`, `crop_size`, `stride`,
        `scales`, `flip`).

    Raises:
        ValueError: bad `mode`, or model and dataset disagree on the number of classes.
    """
    start = time.perf_counter()
    num_classes = info.num_classes
    num_classes = (
        {k: int(v) for k, v in num_classes.items()}
        if isinstance(num_classes, Mapping)
        else int(num_classes)
    )
    confusion, count = accumulate_confusion(
        model,
        dataset,
        num_classes,
        int(info.ignore_label),
        mode,
        crop_size=crop_size,
        stride=stride,
        scales=scales,
        flip=flip,
        max_images=max_images,
        on_image=_each_image(progress, on_image),
    )
    seconds = time.perf_counter() - start
    if count == 0:
        _LOG.warning("evaluate() saw no images; all scores are NaN")
    if isinstance(confusion, dict):
        names = info.class_names if isinstance(info.class_names, Mapping) else {}
        results: dict[str, Any] = {
            task: task_results(matrix, names.get(task)) for task, matrix in confusion.items()
        }
    else:
        results = task_results(confusion, info.class_names)
    results.update(
        {
            "num_images": count,
            "seconds": seconds,
            "seconds_per_image": seconds / count if count else math.nan,
            "mode": mode,
            "crop_size": None if crop_size is None else list(_pair(crop_size, "crop_size")),
            "stride": None if stride is None else list(_pair(stride, "stride")),
            "scales": [float(s) for s in scales] if mode == "msflip" else None,
            "flip": bool(flip) if mode == "msflip" else None,
        }
    )
    return results


#: mmsegmentation's names of three of the paper's metrics (its IoUMetric, in percent).
MMSEG_NAMES = (("aAcc", "pixel_accuracy"), ("mIoU", "mean_iou"), ("mAcc", "mean_accuracy"))


def task_results(confusion: np.ndarray, class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """The scores of one task's confusion matrix, under the paper's and mmseg's names.

    Args:
        confusion: int [C, C], rows = ground truth.
        class_names: C names (default "class_0", ...).

    Returns:
        `pixel_accuracy`, `mean_accuracy`, `mean_iou`, `frequency_weighted_iou`
        (fractions, Long et al. section 5); `aAcc`, `mIoU`, `mAcc` (the same
        three in percent rounded to 2 decimals, as mmsegmentation's IoUMetric
        reports them); `iou` and `accuracy` (class name -> fraction, NaN where
        undefined); `confusion_matrix` (nested lists).
    """
    confusion = np.asarray(confusion)
    scores = metrics.scores(confusion)
    names = (
        list(class_names)
        if class_names is not None
        else [f"class_{i}" for i in range(confusion.shape[0])]
    )
    results = {key: scores[key] for key, _ in _HEADLINE}
    for mmseg_name, key in MMSEG_NAMES:
        value = scores[key]
        results[mmseg_name] = value if math.isnan(value) else round(100 * value, 2)
    results["iou"] = dict(zip(names, scores["iou"], strict=True))
    results["accuracy"] = dict(zip(names, scores["accuracy"], strict=True))
    results["confusion_matrix"] = confusion.tolist()
    return results


def result_tasks(results: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """`{task: scores}` of `evaluate`'s results: {"": results} for a single task."""
    if "mean_iou" in results:
        return {"": results}
    return {k: v for k, v in results.items() if isinstance(v, Mapping) and "mean_iou" in v}


_HEADLINE = (
    ("pixel_accuracy", "pixel accuracy"),
    ("mean_accuracy", "mean accuracy"),
    ("mean_iou", "mean IU"),
    ("frequency_weighted_iou", "f.w. IU"),
)


def format_results(results: dict[str, Any]) -> str:
    """The four metrics, mmseg's aAcc/mIoU/mAcc and a per-class IU table as text (in percent).

    A multi-task result gets one block per task, headed by the task's name.
    """

    def pct(value: float) -> str:
        return "   n/a" if value is None or math.isnan(value) else f"{100 * value:6.2f}"

    lines: list[str] = []
    for task, scores in result_tasks(results).items():
        if task:
            lines += [f"task {task}:"] if not lines else ["", f"task {task}:"]
        lines += [f"{label:>16}: {pct(scores[key])}" for key, label in _HEADLINE]
        lines.append(
            f"{'mmseg':>16}: "
            + ", ".join(f"{name} {pct(scores[key]).strip()}" for name, key in MMSEG_NAMES)
        )
        width = max([len("class")] + [len(n) for n in scores["iou"]])
        lines += ["", f"{'class':<{width}}  IU (%)  acc (%)"]
        for name, iou in scores["iou"].items():
            lines.append(f"{name:<{width}}  {pct(iou)}  {pct(scores['accuracy'][name])}")
    scale = results.get("input_scale", 1.0)
    at = "" if scale == 1.0 else f", input_scale={scale:g}"
    lines.append(
        f"\n{results['num_images']} images in {results['seconds']:.1f} s "
        f"(mode={results['mode']}{at})"
    )
    return "\n".join(lines)


def write_results_json(results: dict[str, Any], path: str | os.PathLike) -> None:
    """Writes `evaluate`'s results as JSON (atomically), NaN (undefined scores) as null."""
    text = json.dumps(json_safe(results), indent=2, allow_nan=False) + "\n"
    write_text_atomically(text, path)
