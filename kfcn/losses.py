"""Per-pixel softmax cross-entropy for segmentation, and class-balancing weights.

FCN (Long, Shelhamer, Darrell, CVPR 2015, section 4) trains with a per-pixel
multinomial logistic loss (Caffe `SoftmaxWithLoss`) that skips the ignore
label, summed over the pixels of an image, with "unnormalized" loss, batch 1,
learning rate 1e-10 (FCN-32s; the authors' repository uses 1e-12 for FCN-16s
and 1e-14 for FCN-8s) and momentum 0.99.

Summed loss versus mean loss. With plain SGD (and with momentum, whose velocity
is linear in the gradients) the update is -lr * grad. For one image with
N valid pixels, grad(sum loss) = N * grad(mean loss), so summing with learning
rate eta gives exactly the updates of averaging with learning rate eta * N for
that image. N varies from image to image (image size, ignored pixels), so the
correspondence is exact per image, not a single constant: for a 500x500 VOC
image with all pixels labelled, 1e-10 * 250,000 = 2.5e-5. Weight decay is not
scaled by N, so with the same weight-decay coefficient the two set-ups differ in
how strong decay is relative to the data term. Adaptive optimizers (Adam etc.)
are invariant to the scale of the loss up to epsilon, so for them `"sum"` and
`"mean"` differ only through that epsilon and the per-batch variation of N.

Batch 1 with momentum 0.99. The TPAMI version (Shelhamer, Long, Darrell, 2017)
trains "online" (batch 1) with high momentum and argues this stands in for a
larger batch: with momentum mu the step is a geometrically weighted sum of the
past gradients, sum_k mu^k g_{t-k}, whose weights sum to 1 / (1 - mu) = 100 for
mu = 0.99 (10 for 0.9). This is a heuristic, not an identity: the past gradients
were taken at past weights, and the total step size also grows with 1 / (1 - mu).
The authors' repository reports that its "trained online with high momentum"
VOC models gain about 5 mean-IU points over the original (batch 20, momentum 0.9)
models; that figure mixes this change with others and is not reproduced here.

`pixel_cross_entropy` returns (loss_sum, weight_sum) so that a custom
distributed training loop can divide by the weight summed over all replicas
(the GLOBAL valid-pixel weight), giving the same loss as one big batch;
`SegmentationCrossEntropy` is the `keras.losses.Loss` for `model.fit`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, NamedTuple

import keras
import numpy as np
import tensorflow as tf

__all__ = [
    "ClassCounts",
    "SegmentationCrossEntropy",
    "count_class_pixels",
    "median_frequency_weights",
    "pixel_cross_entropy",
]

_LOG = logging.getLogger(__name__)
_REDUCTION_MODES = ("mean", "sum")


def _class_weight_tensor(class_weights: Any, num_classes: int | None) -> tf.Tensor | None:
    if class_weights is None:
        return None
    weights = tf.reshape(tf.cast(tf.convert_to_tensor(class_weights), tf.float32), [-1])
    if num_classes is not None and weights.shape[0] is not None and weights.shape[0] != num_classes:
        raise ValueError(
            f"`class_weights` must have one entry per class ({num_classes}, the last axis of "
            f"`logits`). Received {weights.shape[0]} weights"
        )
    return weights


def pixel_cross_entropy(
    labels: Any,
    logits: Any,
    *,
    ignore_label: int = 255,
    class_weights: Any = None,
    sample_weight: Any = None,
) -> tuple[tf.Tensor, tf.Tensor]:
    """Summed per-pixel softmax cross-entropy and the summed pixel weights.

    The loss of pixel p with label y_p is w_{y_p} * (-log softmax(logits_p)[y_p]),
    computed in float32 whatever the dtype of `logits` (float16 / bfloat16 under
    mixed precision). Pixels labelled `ignore_label`, or with a label outside
    [0, num_classes), get weight 0; their label is replaced by 0 before any
    lookup, so the ignore value never indexes the weight table.

    In a custom distributed loop, divide `loss_sum` by the `weight_sum` summed over
    all replicas (e.g. `strategy.reduce(SUM, ...)` of a first pass, or
    `tf.distribute.get_replica_context().all_reduce`) to get the mean over the global
    batch; in a single-device loop, `loss_sum / weight_sum` is the mean over
    valid pixels and `loss_sum` alone is the reference's summed ("unnormalized")
    loss (see the module docstring for the learning-rate correspondence).

    Args:
        labels: Integer labels [b, h, w] (or [b, h, w, 1]).
        logits: Logits [b, h, w, num_classes].
        ignore_label: Label value to skip.
        class_weights: Optional per-class weights, length num_classes (e.g. from
            `median_frequency_weights`).
        sample_weight: Optional extra weights broadcastable to [b, h, w]
            (e.g. per-image weights of shape [b]).

    Returns:
        (loss_sum, weight_sum): float32 scalars. `weight_sum` is the number of valid
        pixels when no weights are given, else the sum of their weights.

    Raises:
        ValueError: if the shapes of `labels` and `logits` do not match or
            `class_weights` has the wrong length.
    """
    logits = tf.cast(tf.convert_to_tensor(logits), tf.float32)
    labels = tf.convert_to_tensor(labels)
    if labels.shape.rank == logits.shape.rank and labels.shape[-1] == 1:
        labels = tf.squeeze(labels, axis=-1)
    if labels.shape.rank is not None and logits.shape.rank is not None:
        if logits.shape.rank != labels.shape.rank + 1 or not labels.shape.is_compatible_with(
            logits.shape[:-1]
        ):
            raise ValueError(
                "`logits` must be [b, h, w, num_classes] and `labels` [b, h, w]. Received: "
                f"labels.shape={labels.shape}, logits.shape={logits.shape}"
            )
    num_classes = logits.shape[-1]
    labels = tf.cast(labels, tf.int32)
    n = num_classes if num_classes is not None else tf.shape(logits)[-1]
    valid = (labels >= 0) & (labels < n) & (labels != ignore_label)
    safe_labels = tf.where(valid, labels, 0)
    pixel_loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=safe_labels, logits=logits)
    weights = tf.cast(valid, tf.float32)
    table = _class_weight_tensor(class_weights, num_classes)
    if table is not None:
        weights = weights * tf.gather(table, safe_labels)
    if sample_weight is not None:
        sample_weight = tf.cast(tf.convert_to_tensor(sample_weight), tf.float32)
        rank = weights.shape.rank
        while sample_weight.shape.rank is not None and sample_weight.shape.rank < rank:
            sample_weight = sample_weight[..., tf.newaxis]
        weights = weights * sample_weight
    # tf.where keeps a NaN/inf loss at an ignored pixel from leaking through 0 * inf.
    loss_sum = tf.reduce_sum(tf.where(weights > 0, pixel_loss * weights, 0.0))
    return loss_sum, tf.reduce_sum(weights)


@keras.saving.register_keras_serializable(package="kfcn")
class SegmentationCrossEntropy(keras.losses.Loss):
    """Per-pixel softmax cross-entropy skipping `ignore_label` (a `keras.losses.Loss`).

    `reduction_mode="mean"` divides by the summed pixel weights of the batch (the
    number of valid pixels without weights); `"sum"` returns the summed loss, like
    the reference Caffe recipe ("normalize: false"). Under `model.fit` with a
    distribution strategy Keras divides each replica's value by the number of
    replicas, so "mean" becomes the average of per-replica means; use
    `pixel_cross_entropy` in a custom loop to normalise by the global pixel count.

    Args:
        ignore_label: Label value to skip.
        class_weights: Optional list of num_classes per-class weights.
        reduction_mode: "mean" or "sum".
        name: Loss name.

    Example:
        ```python
        loss = SegmentationCrossEntropy(ignore_label=255)
        value = loss(labels, logits)  # labels [b, h, w] int, logits [b, h, w, c]
        ```
    """

    def __init__(
        self,
        ignore_label: int = 255,
        class_weights: Any = None,
        reduction_mode: str = "mean",
        name: str = "segmentation_cross_entropy",
        **kwargs: Any,
    ) -> None:
        # The reduction over pixels is done here (it needs the valid-pixel count), so
        # Keras' own reduction is switched off.
        kwargs.pop("reduction", None)
        super().__init__(name=name, reduction="none", **kwargs)
        if reduction_mode not in _REDUCTION_MODES:
            raise ValueError(
                f"`reduction_mode` must be one of {_REDUCTION_MODES}. "
                f"Received: reduction_mode={reduction_mode!r}"
            )
        self.ignore_label = int(ignore_label)
        self.class_weights = (
            None
            if class_weights is None
            else [float(w) for w in np.asarray(class_weights, dtype=np.float64).ravel()]
        )
        self.reduction_mode = reduction_mode

    def _reduce(self, y_true: Any, y_pred: Any, sample_weight: Any) -> tf.Tensor:
        loss_sum, weight_sum = pixel_cross_entropy(
            y_true,
            y_pred,
            ignore_label=self.ignore_label,
            class_weights=self.class_weights,
            sample_weight=sample_weight,
        )
        if self.reduction_mode == "sum":
            return loss_sum
        return tf.math.divide_no_nan(loss_sum, weight_sum)

    def call(self, y_true: Any, y_pred: Any) -> tf.Tensor:
        return self._reduce(y_true, y_pred, None)

    def __call__(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> tf.Tensor:
        # Overridden because keras.losses.Loss.__call__ casts the integer labels to
        # the float dtype and reduces per-sample values; here the value is already a
        # scalar and sample weights must act per pixel.
        with tf.name_scope(self.name):
            return self._reduce(y_true, y_pred, sample_weight)

    def get_config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "ignore_label": self.ignore_label,
            "class_weights": self.class_weights,
            "reduction_mode": self.reduction_mode,
        }


class ClassCounts(NamedTuple):
    """Pixel statistics for class balancing.

    Attributes:
        class_pixels: int64 [n]; pixels labelled c over the dataset.
        image_pixels: int64 [n]; summed labelled (non-ignored) pixels of the images
            in which class c occurs.
        num_images: number of label maps counted.
    """

    class_pixels: np.ndarray
    image_pixels: np.ndarray
    num_images: int


def _accumulate(
    label: np.ndarray,
    num_classes: int,
    ignore_label: int,
    class_pixels: np.ndarray,
    image_pixels: np.ndarray,
) -> None:
    label = np.asarray(label).astype(np.int64).ravel()
    keep = (label >= 0) & (label < num_classes) & (label != ignore_label)
    counts = np.bincount(label[keep], minlength=num_classes)
    class_pixels += counts
    image_pixels[counts > 0] += int(keep.sum())


def _label_iter(source: Any) -> Iterable[np.ndarray]:
    if isinstance(source, tf.data.Dataset):
        for element in source.as_numpy_iterator():
            yield element["label"] if isinstance(element, dict) else element
    else:
        yield from source


def count_class_pixels(labels: Any, num_classes: int, ignore_label: int = 255) -> ClassCounts:
    """Counts class pixels and per-class totals of the images containing each class.

    Args:
        labels: A `tf.data.Dataset` of the element dicts of `kfcn.data.load_dataset`
            ({"image", "label", "name"}; only "label" is read) or of label tensors,
            or any iterable of integer label arrays.
        num_classes: Number of classes.
        ignore_label: Label value not counted (labels outside [0, num_classes) are
            not counted either).

    Returns:
        A `ClassCounts`. "Image pixels" are the labelled pixels of an image: ignored
        pixels count for no class and are left out of the image total as well.
    """
    if num_classes < 1:
        raise ValueError(f"`num_classes` must be >= 1. Received: num_classes={num_classes}")
    class_pixels = np.zeros(num_classes, np.int64)
    image_pixels = np.zeros(num_classes, np.int64)
    num_images = 0
    for label in _label_iter(labels):
        _accumulate(label, num_classes, ignore_label, class_pixels, image_pixels)
        num_images += 1
    return ClassCounts(class_pixels, image_pixels, num_images)


def median_frequency_weights(
    labels_or_counts: Any, num_classes: int, ignore_label: int = 255, power: float = 1.0
) -> np.ndarray:
    """Median frequency balancing weights (Eigen & Fergus, ICCV 2015).

    freq(c) = (pixels of class c) / (total labelled pixels of the images where c is
    present); weight(c) = (median over present classes of freq / freq(c)) ** power.
    Classes that never occur get weight 0 and a logged warning. `power=0.5` (the
    square root) halves the log-ratio between classes: rare classes still gain, but
    are not over-predicted as with the full weights (on CamVid val, Pedestrian 86 %
    accuracy but 17 % IU).

    Args:
        labels_or_counts: A `ClassCounts` (from `count_class_pixels`), or anything
            `count_class_pixels` accepts (a tf.data dataset of element dicts, or an
            iterable of label arrays).
        num_classes: Number of classes.
        ignore_label: Label value not counted.
        power: Exponent applied to each weight; 1 is Eigen & Fergus's balancing,
            0.5 its square root.

    Returns:
        float32 array [num_classes].
    """
    if not power > 0:
        raise ValueError(f"`power` must be positive. Received: power={power!r}")
    if isinstance(labels_or_counts, ClassCounts):
        counts = labels_or_counts
        if len(counts.class_pixels) != num_classes or len(counts.image_pixels) != num_classes:
            raise ValueError(
                f"`labels_or_counts` has counts for {len(counts.class_pixels)} classes; "
                f"expected num_classes={num_classes}"
            )
    else:
        counts = count_class_pixels(labels_or_counts, num_classes, ignore_label)
    class_pixels = np.asarray(counts.class_pixels, np.float64)
    image_pixels = np.asarray(counts.image_pixels, np.float64)
    present = class_pixels > 0
    if not present.any():
        raise ValueError("`labels_or_counts` holds no labelled pixel; cannot compute weights")
    if not present.all():
        _LOG.warning(
            "Classes %s never occur in the labels; their median-frequency weight is 0",
            np.flatnonzero(~present).tolist(),
        )
    freq = np.zeros(num_classes)
    freq[present] = class_pixels[present] / image_pixels[present]
    weights = np.zeros(num_classes)
    weights[present] = (np.median(freq[present]) / freq[present]) ** power
    return weights.astype(np.float32)
