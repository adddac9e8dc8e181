"""GoogLeNet (Inception v1) as the BVLC caffe model defines it.

Szegedy et al., "Going Deeper with Convolutions", CVPR 2015, table 1, in the
layout of BVLC's `bvlc_googlenet` that the FCN paper adapts (Long, Shelhamer,
Darrell, TPAMI 2017, table 1: "FCN-GoogLeNet", final average pooling and
classifiers discarded)::

    conv1/7x7_s2 64 -> pool1/3x3_s2 -> pool1/norm1 -> conv2/3x3_reduce 64
    -> conv2/3x3 192 -> conv2/norm2 -> pool2/3x3_s2          (stride 8)
    -> inception_3a, 3b -> pool3/3x3_s2                        (stride 16)
    -> inception_4a .. 4e -> pool4/3x3_s2                      (stride 32)
    -> inception_5a, 5b [-> pool5/7x7_s1 -> dropout 0.4 -> loss3/classifier]

Each inception module concatenates a 1x1 branch, 1x1 -> 3x3, 1x1 -> 5x5 and a
3x3/1 max pool -> 1x1 (`pool_proj`). Layer names are caffe's with "/" as "_"
(`inception_3a_3x3_reduce`, `inception_4e_output`), so `load_caffe_npy` loads a
numpy dump of the caffe weights by name. The auxiliary classifiers (loss1,
loss2), used only in training, are left out.

Caffe pads conv1 by 3 on each side (an explicit `conv1_pad` here; Keras' "same"
would pad 2 and 3) and pools with ceil rounding, which is Keras' "same" pooling
on the even sizes every pool sees at 224x224 and in kfcn's FCNs (inputs padded
to a multiple of 32). kfcn's FCNs tap inception_3b (stride 8), inception_4e
(stride 16) and inception_5b (stride 32).
"""

from __future__ import annotations

import os

import keras

from kfcn.layers import LocalResponseNormalization
from kfcn.models.alexnet import (
    check_input_shape,
    check_pooling,
    check_weights,
    classifier_or_pooling,
    load_weights,
)

#: The classifier's input size: inception_5b is then 7x7.
IMAGE_SIZE = 224

#: Branch widths per module (Szegedy et al., table 1): 1x1, 3x3 reduce, 3x3,
#: 5x5 reduce, 5x5, pool proj.
INCEPTION = {
    "3a": (64, 96, 128, 16, 32, 32),
    "3b": (128, 128, 192, 32, 96, 64),
    "4a": (192, 96, 208, 16, 48, 64),
    "4b": (160, 112, 224, 24, 64, 64),
    "4c": (128, 128, 256, 24, 64, 64),
    "4d": (112, 144, 288, 32, 64, 64),
    "4e": (256, 160, 320, 32, 128, 128),
    "5a": (256, 160, 320, 32, 128, 128),
    "5b": (384, 192, 384, 48, 128, 128),
}


def _conv(x, filters, kernel, name, strides=1, padding="same"):
    return keras.layers.Conv2D(
        filters, kernel, strides=strides, padding=padding, activation="relu", name=name
    )(x)


def inception(x, module: str):
    """The inception module `module` ("3a" .. "5b") on `x`; caffe's layer names."""
    width_1x1, reduce_3x3, width_3x3, reduce_5x5, width_5x5, pool_proj = INCEPTION[module]
    prefix = f"inception_{module}"
    branches = [
        _conv(x, width_1x1, 1, f"{prefix}_1x1"),
        _conv(_conv(x, reduce_3x3, 1, f"{prefix}_3x3_reduce"), width_3x3, 3, f"{prefix}_3x3"),
        _conv(_conv(x, reduce_5x5, 1, f"{prefix}_5x5_reduce"), width_5x5, 5, f"{prefix}_5x5"),
        _conv(
            keras.layers.MaxPooling2D(3, strides=1, padding="same", name=f"{prefix}_pool")(x),
            pool_proj,
            1,
            f"{prefix}_pool_proj",
        ),
    ]
    return keras.layers.Concatenate(name=f"{prefix}_output")(branches)


def _pool(x, name):
    return keras.layers.MaxPooling2D(3, strides=2, padding="same", name=name)(x)


def GoogLeNet(  # noqa: N802 - Keras Applications' constructor naming
    include_top: bool = True,
    weights: str | os.PathLike | None = None,
    input_shape: tuple | None = None,
    pooling: str | None = None,
    classes: int = 1000,
    classifier_activation: str | None = "softmax",
    name: str = "googlenet",
) -> keras.Model:
    """GoogLeNet (BVLC's Inception v1), with Keras Applications' arguments.

    Args:
        include_top: Include the classifier (7x7 average pooling, dropout 0.4,
            `loss3_classifier`, `predictions`); the input is then 224x224.
            Without it the model ends at inception_5b and takes any size.
        weights: None (random), the path of a numpy dump of the caffe weights
            (`.npy`, see `kfcn.models.alexnet.load_caffe_npy`) or of a Keras
            weights file of this model.
        input_shape: `(224, 224, 3)` with the classifier (the default), any
            `(height, width, 3)` without.
        pooling: Without the classifier: None, "avg" or "max" global pooling.
        classes: Classes of the classifier.
        classifier_activation: Activation of `predictions` (None: logits).
        name: Model name.

    Returns:
        A functional `keras.Model` taking caffe-preprocessed images (BGR, ImageNet
        mean subtracted, 0..255 scale).

    Raises:
        ValueError: If an argument is invalid; the message names it.

    Example:
        >>> GoogLeNet(include_top=False).get_layer("inception_4e_output").output.shape
        (None, None, None, 832)
    """
    shape = check_input_shape(input_shape, include_top, IMAGE_SIZE)
    check_pooling(pooling)
    check_weights(weights, "GoogLeNet")
    images = keras.Input(shape=shape, name="input")

    x = keras.layers.ZeroPadding2D(3, name="conv1_pad")(images)
    x = _conv(x, 64, 7, "conv1_7x7_s2", strides=2, padding="valid")
    x = _pool(x, "pool1_3x3_s2")
    x = LocalResponseNormalization(name="pool1_norm1")(x)
    x = _conv(x, 64, 1, "conv2_3x3_reduce")
    x = _conv(x, 192, 3, "conv2_3x3")
    x = LocalResponseNormalization(name="conv2_norm2")(x)
    x = _pool(x, "pool2_3x3_s2")
    x = inception(inception(x, "3a"), "3b")
    x = _pool(x, "pool3_3x3_s2")
    for module in ("4a", "4b", "4c", "4d", "4e"):
        x = inception(x, module)
    x = _pool(x, "pool4_3x3_s2")
    x = inception(inception(x, "5a"), "5b")

    def top(x):
        x = keras.layers.AveragePooling2D(7, strides=1, name="pool5_7x7_s1")(x)
        x = keras.layers.Dropout(0.4, name="pool5_drop_7x7_s1")(x)
        x = keras.layers.Flatten(name="flatten")(x)
        return keras.layers.Dense(classes, name="loss3_classifier")(x)

    outputs = classifier_or_pooling(x, include_top, pooling, classifier_activation, top)
    model = keras.Model(images, outputs, name=name)
    load_weights(model, weights)
    return model
