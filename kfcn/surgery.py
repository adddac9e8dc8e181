"""Weight surgery: moving classifier weights into FCNs, and FCNs into FCNs.

The reference's `surgery.transplant` copies a classifier's parameters into the
FCN, reshaping the fully connected `fc6`/`fc7` into convolutions; staged
training initialises FCN-16s from FCN-32s and FCN-8s from FCN-16s by copying
every layer of the same name (Long, Shelhamer, Darrell, TPAMI 2017, section 4.1).
"""

from __future__ import annotations

import logging

import keras
import numpy as np

logger = logging.getLogger(__name__)


def _weighted_layers(model: keras.Model) -> list:
    return [layer for layer in model.layers if layer.weights]


def _set_weights(layer, values) -> None:
    layer.set_weights(values)
    # An adapted `Normalization` computes with tensors taken from its variables
    # when it was built or loaded; without this it keeps its old mean/variance.
    finalize = getattr(layer, "finalize_state", None)
    if finalize is not None:
        finalize()


def transplant_trunk(classifier: keras.Model, trunk_layers: list, what: str = "weights") -> None:
    """Copies a classifier's convolutional trunk into the same-built trunk layers.

    Layers are matched in build order (both come from the same Keras
    Applications constructor), not by name, since some applications use
    auto-generated names; every pair's weight shapes are checked.

    Args:
        classifier: The Keras Applications classifier holding the weights.
        trunk_layers: The FCN's trunk layers with weights, in build order.
        what: The argument name for error messages.

    Raises:
        ValueError: If the trunks do not correspond.
    """
    source = _weighted_layers(classifier)
    if len(source) < len(trunk_layers):
        raise ValueError(
            f"`{what}`: the classifier has {len(source)} layers with weights, fewer than "
            f"the {len(trunk_layers)} of the FCN trunk."
        )
    for src, dst in zip(source, trunk_layers):
        values = src.get_weights()
        shapes = [w.shape for w in values]
        expected = [tuple(w.shape) for w in dst.weights]
        if shapes != expected:
            raise ValueError(
                f"`{what}`: classifier layer {src.name!r} with weight shapes {shapes} does "
                f"not fit FCN layer {dst.name!r} with {expected}."
            )
        _set_weights(dst, values)


def _input_stem(model: keras.Model) -> list:
    """The weightless or normalising layers between the image and the first convolution."""
    stem = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        if not isinstance(layer, (keras.layers.Rescaling, keras.layers.Normalization)):
            break
        stem.append(layer)
    return stem


def match_input_scaling(classifier: keras.Model, trunk: keras.Model, what: str = "weights"):
    """Makes `trunk` scale its input as `classifier` does, after `transplant_trunk`.

    Keras' EfficientNet B0-B7 built with `weights="imagenet"` rescale the
    normalised image once more, by ``1 / sqrt(stddev)`` per channel (the
    original implementation divided by the variance; keras-team/keras
    tensorflow#49930), and built otherwise do not. The rescaling has no weights,
    so copying weights cannot carry it over: this folds it into the trunk's
    `Normalization`, ``((x - m) / sqrt(v)) * s == (x - m) / sqrt(v / s**2)``.

    Args:
        classifier: The Keras Applications classifier the weights came from.
        trunk: The FCN trunk built from the same constructor.
        what: The argument name for error messages.

    Raises:
        ValueError: If the two input stems differ in another way.
    """
    source, target = _input_stem(classifier), _input_stem(trunk)
    kinds = [type(layer).__name__ for layer in source]
    if kinds == [type(layer).__name__ for layer in target]:
        return
    extra = source[len(target)] if len(source) == len(target) + 1 else None
    if (
        kinds[: len(target)] == [type(layer).__name__ for layer in target]
        and isinstance(extra, keras.layers.Rescaling)
        and not np.any(extra.offset)
        and target
        and isinstance(target[-1], keras.layers.Normalization)
        and target[-1].weights
    ):
        scale = np.asarray(extra.scale, np.float32)
        mean, variance, *rest = target[-1].get_weights()
        _set_weights(target[-1], [mean, variance / scale**2, *rest])
        logger.info("Folded %s's input rescaling into %s.", classifier.name, target[-1].name)
        return
    raise ValueError(
        f"`{what}`: the {classifier.name} classifier scales its input with {kinds}, the FCN "
        f"trunk with {[type(layer).__name__ for layer in target]}; kfcn cannot match them."
    )


def dense_to_conv(dense: keras.layers.Dense, conv: keras.layers.Conv2D) -> None:
    """Transplants a Dense layer into the equivalent convolution.

    A Dense layer over a flattened ``h x w x c`` map (Keras flattens channels
    last, row-major) is a ``h x w`` convolution with ``c`` input channels: its
    kernel is the Dense kernel reshaped to ``(h, w, c, units)``.

    Raises:
        ValueError: If the sizes do not agree.
    """
    kernel, bias = dense.get_weights()
    shape = tuple(conv.kernel.shape)
    if int(np.prod(shape[:3])) != kernel.shape[0] or shape[3] != kernel.shape[1]:
        raise ValueError(
            f"Dense layer {dense.name!r} with kernel {kernel.shape} does not fit "
            f"convolution {conv.name!r} with kernel {shape}."
        )
    conv.set_weights([kernel.reshape(shape), bias])


def copy_matching_layers(source: keras.Model, target: keras.Model, what: str = "init_from") -> list:
    """Copies the weights of every same-named layer from `source` into `target`.

    Args:
        source: The trained model (e.g. FCN-32s).
        target: The model to initialise (e.g. FCN-16s).
        what: The argument name for error messages.

    Returns:
        The names of the layers copied.

    Raises:
        ValueError: If a same-named layer has weights of other shapes.
    """
    by_name = {layer.name: layer for layer in source.layers if layer.weights}
    copied = []
    for layer in target.layers:
        src = by_name.get(layer.name)
        if src is None or not layer.weights:
            continue
        values = src.get_weights()
        expected = [tuple(w.shape) for w in layer.weights]
        if [v.shape for v in values] != expected:
            raise ValueError(
                f"`{what}`: layer {layer.name!r} has weight shapes "
                f"{[v.shape for v in values]} in the source model but {expected} here."
            )
        _set_weights(layer, values)
        copied.append(layer.name)
    logger.info("Copied %d layers from %s: %s", len(copied), source.name, copied)
    return copied
