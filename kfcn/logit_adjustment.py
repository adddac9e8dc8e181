"""Taking a training loss's class weights back out of a net's scores at test time.

A net trained with class weights w (`kfcn train --class_weighting
sqrt_median_frequency`) minimises a weighted cross-entropy, whose optimum is
softmax scores proportional to w_c * p(c | x): the weights raise the scores of
rare classes, which helps them learn but makes the net over-predict them (on
CamVid val the FCN-4s preset's mean class accuracy is 80 % against a mean IU of
66 %). Post-hoc logit adjustment (Menon et al., "Long-tail learning via logit
adjustment", ICLR 2021) adds -tau * log w_c to class c's logit: tau = 1 gives
back the unweighted posterior (the pixel-accuracy optimum), tau = 0 leaves the
net as trained, and a tau in between trades accuracy on rare classes for fewer
false positives, which is what IU rewards. The features stay those learned
with the weights.

`with_logit_adjustment(model, offsets)` appends a `kfcn.layers.LogitAdjustment`
("score_adjust") to a net; `class_weight_offsets(weights, tau)` computes the
offsets. A preset's card records tau and the weights (`recipes/make_preset.py
--logit_adjustment`).

Example:
    ```python
    from kfcn import losses
    from kfcn.logit_adjustment import class_weight_offsets, with_logit_adjustment
    weights = losses.median_frequency_weights(train_labels, 11, power=0.5)
    model = with_logit_adjustment(net, class_weight_offsets(weights, tau=0.5))
    ```
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

#: Name of the layer `with_logit_adjustment` appends.
LAYER_NAME = "score_adjust"


def class_weight_offsets(class_weights: Sequence[float], tau: float = 1.0) -> np.ndarray:
    """Logit offsets -tau * log(w) that take class weights w back out of a net's scores.

    Args:
        class_weights: The training loss's weight of each class, each >= 0. A
            class of weight 0 (absent from the training labels) gets offset 0.
        tau: How much of the weights to take out: 1 all (the unweighted
            posterior), 0 none; a finite number >= 0.

    Returns:
        float32 offsets, one per class.

    Raises:
        ValueError: If a weight is negative or not finite, or `tau` is not a
            finite number >= 0.
    """
    weights = np.asarray(class_weights, np.float64)
    if weights.ndim != 1 or not weights.size or not np.all(np.isfinite(weights)):
        raise ValueError(
            f"`class_weights` must be finite numbers, one per class. Received: {class_weights!r}"
        )
    if np.any(weights < 0):
        raise ValueError(f"`class_weights` must be >= 0. Received: {class_weights!r}")
    if not (np.isfinite(tau) and tau >= 0):
        raise ValueError(f"`tau` must be a finite number >= 0. Received: tau={tau!r}")
    logs = np.log(np.where(weights > 0, weights, 1.0))
    return (-float(tau) * logs).astype(np.float32)


def offsets_of(model: Any) -> np.ndarray | None:
    """The offsets `with_logit_adjustment` gave `model`, or None."""
    from kfcn.layers import LogitAdjustment

    for layer in model.layers:
        if isinstance(layer, LogitAdjustment) and layer.name == LAYER_NAME:
            return np.asarray(layer.offsets, np.float32)
    return None


def with_logit_adjustment(model: Any, offsets: Sequence[float] | None) -> Any:
    """`model` with `offsets` added to its logits (a last "score_adjust" layer).

    Args:
        model: A functional segmentation model with one logits output of one
            channel per class.
        offsets: One number per class (e.g. `class_weight_offsets`); None or all
            zeros gives the model without the layer.

    Returns:
        A new functional model with `model`'s layer names and a copy of its
        weights; an existing "score_adjust" layer is replaced. `class_info`, if
        set, is carried over.

    Raises:
        ValueError: If `model` has several outputs, `offsets` do not match its
            classes, or a layer of another kind is named "score_adjust".
    """
    import keras

    from kfcn.layers import LogitAdjustment
    from kfcn.surgery import copy_matching_layers

    if len(model.outputs) != 1:
        raise ValueError(
            f"`model` {model.name!r} must have one logits output; it has {len(model.outputs)}"
        )
    for layer in model.layers:
        if layer.name == LAYER_NAME and not isinstance(layer, LogitAdjustment):
            raise ValueError(
                f"`model` {model.name!r} has a {type(layer).__name__} named {LAYER_NAME!r}; "
                "with_logit_adjustment needs that name"
            )
    classes = model.outputs[0].shape[-1]
    if offsets is not None:
        offsets = [float(v) for v in offsets]
        if len(offsets) != classes:
            raise ValueError(
                f"`offsets` must have one value per class ({classes}). "
                f"Received {len(offsets)}: {offsets!r}"
            )
        if not any(offsets):
            offsets = None

    def call(layer, *args, **kwargs):
        if isinstance(layer, LogitAdjustment) and layer.name == LAYER_NAME:
            return args[0]  # the old adjustment is replaced
        return layer(*args, **kwargs)

    copy = keras.models.clone_model(model, call_function=call)
    outputs = copy.outputs[0]
    if offsets is not None:
        outputs = LogitAdjustment(offsets, name=LAYER_NAME)(outputs)
    result = keras.Model(copy.input, outputs, name=model.name)
    copy_matching_layers(model, result, "model")
    if getattr(model, "class_info", None) is not None:
        result.class_info = model.class_info
    return result
