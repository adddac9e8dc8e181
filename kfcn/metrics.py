"""Segmentation scores from a confusion matrix (FCN paper, section 5).

Long, Shelhamer and Darrell, "Fully Convolutional Networks for Semantic
Segmentation", CVPR 2015, section 5 ("Metrics"). With n_ij the number of pixels
of class i predicted to belong to class j, t_i = sum_j n_ij the number of pixels
of class i and n_cl the number of classes:

- pixel accuracy: sum_i n_ii / sum_i t_i
- mean accuracy: (1/n_cl) sum_i n_ii / t_i
- mean IU: (1/n_cl) sum_i n_ii / (t_i + sum_j n_ji - n_ii)
- frequency weighted IU: (sum_k t_k)^-1 sum_i t_i n_ii / (t_i + sum_j n_ji - n_ii)

The confusion matrix is accumulated with a bincount as in the authors'
`score.fast_hist` (rows = ground truth, columns = prediction). As in the
authors' `score.py` (`np.nanmean`), a class absent from both the ground truth
and the predictions has an undefined IU and is left out of the means; a class
absent from the ground truth has an undefined accuracy and is left out of the
mean accuracy.

Two entry points:

- `confusion_matrix` + `scores`: numpy, for offline evaluation.
- `ConfusionMatrixMetric`: a streaming `keras.metrics.Metric` accumulating the
  same matrix with TensorFlow ops; correct under `tf.distribute` strategies
  because its counts are an on-read SUM-aggregated variable.
"""

from __future__ import annotations

import math
from typing import Any

import keras
import numpy as np
import tensorflow as tf

__all__ = ["ConfusionMatrixMetric", "confusion_matrix", "scores"]


def _check_num_classes(num_classes: Any) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)):
        raise ValueError(
            f"`num_classes` must be an integer >= 1. Received: num_classes={num_classes!r}"
        )
    if num_classes < 1:
        raise ValueError(f"`num_classes` must be >= 1. Received: num_classes={num_classes}")
    return int(num_classes)


def confusion_matrix(
    labels: Any,
    predictions: Any,
    num_classes: int,
    ignore_label: int = 255,
) -> np.ndarray:
    """Counts ground truth / prediction pairs, like the authors' `fast_hist`.

    Args:
        labels: Integer ground-truth class ids, any shape.
        predictions: Integer predicted class ids, same shape as `labels`.
        num_classes: Number of classes n.
        ignore_label: Label value whose pixels are not counted. Pixels whose label is
            outside [0, num_classes) are dropped too (so a void label equal to
            `num_classes`, as in CamVid, is ignored as well).

    Returns:
        int64 array [n, n]; entry [i, j] counts pixels of true class i predicted as j.

    Raises:
        ValueError: if the shapes differ, `num_classes` < 1, or a prediction is
            outside [0, num_classes).
    """
    n = _check_num_classes(num_classes)
    labels = np.asarray(labels)
    predictions = np.asarray(predictions)
    if labels.shape != predictions.shape:
        raise ValueError(
            "`labels` and `predictions` must have the same shape. Received: "
            f"labels.shape={labels.shape}, predictions.shape={predictions.shape}"
        )
    for arg, values in (("labels", labels), ("predictions", predictions)):
        if values.size and not np.issubdtype(values.dtype, np.integer):
            raise ValueError(
                f"`{arg}` must hold integer class ids. Received: {arg}.dtype={values.dtype}"
            )
    labels = labels.astype(np.int64).ravel()
    predictions = predictions.astype(np.int64).ravel()
    bad = (predictions < 0) | (predictions >= n)
    if bad.any():
        raise ValueError(
            f"`predictions` must be class ids in [0, {n}). Received values "
            f"{np.unique(predictions[bad])[:10].tolist()} (num_classes={n})"
        )
    keep = (labels >= 0) & (labels < n) & (labels != ignore_label)
    return (
        np.bincount(n * labels[keep] + predictions[keep], minlength=n * n)
        .reshape(n, n)
        .astype(np.int64)
    )


def _nanmean(values: np.ndarray) -> float:
    # np.nanmean warns on an all-NaN input; an empty evaluation is not an error here.
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else math.nan


def scores(confusion: Any) -> dict[str, Any]:
    """The four FCN metrics and per-class scores from a confusion matrix.

    Follows FCN (CVPR 2015) section 5; see the module docstring for the formulas.

    Args:
        confusion: Square array [n, n] of counts, rows = ground truth,
            columns = prediction (as returned by `confusion_matrix`).

    Returns:
        A dict with float values `pixel_accuracy`, `mean_accuracy`, `mean_iou`,
        `frequency_weighted_iou`, and lists of n floats `iou` and `accuracy`
        (per class; NaN where undefined: IU of a class absent from both ground
        truth and prediction, accuracy of a class absent from the ground truth).
        The scalar metrics are NaN when the matrix holds no pixel.

    Raises:
        ValueError: if `confusion` is not a square 2-D matrix or has negative entries.
    """
    hist = np.asarray(confusion, dtype=np.float64)
    if hist.ndim != 2 or hist.shape[0] != hist.shape[1] or hist.shape[0] == 0:
        raise ValueError(f"`confusion` must be a square [n, n] matrix. Received shape {hist.shape}")
    if (hist < 0).any():
        raise ValueError("`confusion` must hold non-negative counts. Received negative entries")
    true_positives = np.diag(hist)
    gt_pixels = hist.sum(axis=1)  # t_i
    predicted_pixels = hist.sum(axis=0)  # sum_j n_ji
    union = gt_pixels + predicted_pixels - true_positives
    total = gt_pixels.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, true_positives / union, math.nan)
        accuracy = np.where(gt_pixels > 0, true_positives / gt_pixels, math.nan)
    if total > 0:
        pixel_accuracy = float(true_positives.sum() / total)
        present = gt_pixels > 0  # t_i > 0 implies union > 0, so iou is defined there
        fw_iou = float((gt_pixels[present] * iou[present]).sum() / total)
    else:
        pixel_accuracy = fw_iou = math.nan
    return {
        "pixel_accuracy": pixel_accuracy,
        "mean_accuracy": _nanmean(accuracy),
        "mean_iou": _nanmean(iou),
        "frequency_weighted_iou": fw_iou,
        "iou": [float(v) for v in iou],
        "accuracy": [float(v) for v in accuracy],
    }


@keras.saving.register_keras_serializable(package="kfcn")
class ConfusionMatrixMetric(keras.metrics.Metric):
    """Streaming confusion matrix; `result()` is the mean IU.

    Counts are kept in a float64 variable (exact up to 2**53 pixels) created
    with Keras' on-read SUM aggregation, so under `tf.distribute` strategies
    every replica accumulates its own pixels and reading the metric sums them.

    Args:
        num_classes: Number of classes n.
        ignore_label: Label whose pixels are not counted; labels outside
            [0, num_classes) are dropped as well.
        name: Metric name (the key in Keras logs).
        dtype: Dtype of `result()` (default float32).

    `result()` is 0.0 before any pixel was counted (as `keras.metrics.MeanIoU`),
    whereas `scores()` then reports NaN.

    `update_state(y_true, y_pred, sample_weight=None)`:
        y_true: integer labels [b, h, w] (or [b, h, w, 1]).
        y_pred: logits or probabilities [b, h, w, num_classes] (reduced with
            `tf.argmax`), or integer class ids with the shape of `y_true`.
        sample_weight: optional weights broadcastable to [b, h, w].

    Example:
        ```python
        metric = kfcn.metrics.ConfusionMatrixMetric(21)
        model.compile(optimizer="sgd", loss=kfcn.losses.SegmentationCrossEntropy(),
                      metrics=[metric])
        model.evaluate(val_batches)
        metric.scores()  # dict from kfcn.metrics.scores
        ```
    """

    def __init__(
        self,
        num_classes: int,
        ignore_label: int = 255,
        name: str = "mean_iou",
        dtype: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(name=name, dtype=dtype or "float32", **kwargs)
        self.num_classes = _check_num_classes(num_classes)
        self.ignore_label = int(ignore_label)
        self.confusion = self.add_variable(
            shape=(self.num_classes, self.num_classes),
            initializer="zeros",
            dtype="float64",
            name="confusion",
        )

    def update_state(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> None:
        n = self.num_classes
        y_true = tf.convert_to_tensor(y_true)
        y_pred = tf.convert_to_tensor(y_pred)
        if y_true.shape.rank == 4 and y_true.shape[-1] == 1:  # [b, h, w, 1] labels
            y_true = tf.squeeze(y_true, axis=-1)
        if y_pred.shape.rank == y_true.shape.rank + 1:
            if y_pred.shape[-1] is not None and y_pred.shape[-1] != n:
                raise ValueError(
                    f"`y_pred` has {y_pred.shape[-1]} channels but the metric has "
                    f"num_classes={n}. Received: y_pred.shape={y_pred.shape}"
                )
            predictions = tf.argmax(y_pred, axis=-1, output_type=tf.int32)
        elif y_pred.shape.rank == y_true.shape.rank:
            if y_pred.dtype.is_floating:
                raise ValueError(
                    "`y_pred` with the rank of `y_true` must hold integer class ids. "
                    f"Received: y_pred.dtype={y_pred.dtype.name}"
                )
            predictions = tf.cast(y_pred, tf.int32)
            tf.debugging.assert_non_negative(predictions, message="`y_pred` class ids must be >= 0")
            tf.debugging.assert_less(
                predictions, n, message=f"`y_pred` class ids must be < num_classes={n}"
            )
        else:
            raise ValueError(
                "`y_pred` must be logits [b, h, w, num_classes] or class ids with the "
                f"shape of `y_true`. Received: y_true.shape={y_true.shape}, "
                f"y_pred.shape={y_pred.shape}"
            )
        labels = tf.cast(y_true, tf.int32)
        valid = (labels >= 0) & (labels < n) & (labels != self.ignore_label)
        weights = tf.cast(valid, tf.float64)
        if sample_weight is not None:
            sample_weight = tf.cast(sample_weight, tf.float64)
            while sample_weight.shape.rank is not None and (
                sample_weight.shape.rank < weights.shape.rank
            ):
                sample_weight = sample_weight[..., tf.newaxis]
            weights = weights * sample_weight
        # Ignored pixels get index 0 with weight 0; segment ids stay in range.
        cells = tf.where(valid, labels * n + predictions, 0)
        counts = tf.math.unsorted_segment_sum(
            tf.reshape(weights, [-1]), tf.reshape(cells, [-1]), n * n
        )
        self.confusion.assign_add(tf.reshape(counts, (n, n)))

    def result(self) -> Any:
        """Mean IU over classes present in ground truth or prediction (0.0 if none)."""
        hist = tf.convert_to_tensor(self.confusion)
        true_positives = tf.linalg.diag_part(hist)
        union = tf.reduce_sum(hist, 0) + tf.reduce_sum(hist, 1) - true_positives
        present = union > 0
        iou = tf.math.divide_no_nan(true_positives, union)
        mean = tf.math.divide_no_nan(
            tf.reduce_sum(tf.where(present, iou, 0.0)),
            tf.reduce_sum(tf.cast(present, tf.float64)),
        )
        return tf.cast(mean, self.dtype)

    def reset_state(self) -> None:
        self.confusion.assign(tf.zeros_like(self.confusion))

    def confusion_matrix(self) -> np.ndarray:
        """The accumulated confusion matrix, numpy float64 [n, n] (rows = ground truth).

        Counts are whole numbers unless fractional `sample_weight`s were given. Call it
        outside `strategy.run` so the replicas' counts are summed.
        """
        return np.asarray(keras.ops.convert_to_numpy(self.confusion), dtype=np.float64)

    def scores(self) -> dict[str, Any]:
        """`kfcn.metrics.scores` of the accumulated confusion matrix."""
        return _scores(self.confusion_matrix())

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({"num_classes": self.num_classes, "ignore_label": self.ignore_label})
        return config


# The metric has a `scores` method; this alias keeps the module function unambiguous.
_scores = scores
