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
        dst.set_weights(values)


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
        layer.set_weights(values)
        copied.append(layer.name)
    logger.info("Copied %d layers from %s: %s", len(copied), source.name, copied)
    return copied
