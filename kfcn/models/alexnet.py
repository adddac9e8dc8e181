"""AlexNet as the FCN paper uses it (CaffeNet), and the classic numpy weight dumps.

Krizhevsky, Sutskever, Hinton, "ImageNet Classification with Deep Convolutional
Neural Networks", NIPS 2012, in the layout of the BVLC CaffeNet reference model
that the FCN paper adapts (Long, Shelhamer, Darrell, TPAMI 2017, table 1; the
reference net voc-fcn-alexnet): max pooling before each LRN, conv2, conv4 and
conv5 in two groups (the two GPUs of the original)::

    conv1 11x11/4 96 -> pool1 3/2 -> norm1 -> conv2 5x5 256 g2 -> pool2 3/2 -> norm2
    -> conv3 3x3 384 -> conv4 3x3 384 g2 -> conv5 3x3 256 g2 -> pool5 3/2
    -> fc6 6x6 4096 -> drop6 -> fc7 1x1 4096 [-> drop7 -> fc8 1x1 classes]

The fully connected layers are convolutions from the start (fc6 covers the 6x6
pool5 map of a 227x227 image, as the Dense layer it stands for), so the model
with `include_top=False` is the paper's "decapitated" net: everything but the
classifier fc8, for inputs of any size. kfcn's FCNs build on that
(`kfcn.build_fcn(backbone="alexnet")`, taps conv2 / conv5 / fc7 at strides 8 /
16 / 32); there is no second FCN definition.

Layers are named as in caffe (`conv1`, `norm1`, `fc6`, ...; ReLUs are the
convolutions' activations, as Keras Applications do), so weights load by name
from the numpy dumps of the Caffe-to-TensorFlow conversions (`bvlc_alexnet.npy`,
http://www.cs.toronto.edu/~guerzhoy/tf_alexnet/): `load_caffe_npy`.
"""

from __future__ import annotations

import logging
import os

import keras
import numpy as np

from kfcn.layers import FullyConnectedConv2D, GroupedConv2D, LocalResponseNormalization

logger = logging.getLogger(__name__)

#: The classifier's input size (caffe's `crop_size`): pool5 is then 6x6.
IMAGE_SIZE = 227


def load_caffe_npy(model: keras.Model, path: str | os.PathLike) -> list[str]:
    """Loads a Caffe-to-TensorFlow numpy weight dump into `model`, by layer name.

    The dump is what the widely shared conversions (ethereon's caffe-tensorflow,
    Guerzhoy's `bvlc_alexnet.npy`) write with `np.save`: a dict mapping each
    caffe layer name to `[kernel, bias]` (or to `{"weights": kernel, "biases":
    bias}`), kernels HWIO. Grouped layers hold the kernel of each group side by
    side on the output axis (AlexNet's conv2: `(5, 5, 48, 256)`), as Keras'
    `groups` does. A fully connected layer's kernel is `(inputs, units)`, its
    inputs flattened row-major over (height, width, channels); it is reshaped
    to the convolution standing for it (`(9216, 4096)` to `(6, 6, 256, 4096)`).
    Caffe's "/" in names is "_" here (`inception_3a/1x1` -> `inception_3a_1x1`).

    The file is a pickle (`allow_pickle=True`): load only files you trust.

    Args:
        model: The model to fill (every layer with weights must be in the file).
        path: The `.npy` file.

    Returns:
        The names of the layers loaded. Entries the model lacks (fc8 without the
        classifier, GoogLeNet's auxiliary classifiers) are skipped and logged.

    Raises:
        ValueError: If the file is not such a dict, a layer of `model` is missing
            from it, or a weight's size does not fit; the message names `weights`.
    """
    data = np.load(path, encoding="latin1", allow_pickle=True)
    if isinstance(data, np.ndarray) and data.shape == () and isinstance(data.item(), dict):
        data = data.item()
    if not isinstance(data, dict):
        raise ValueError(
            "`weights` must be a numpy dump of a dict (layer name -> [kernel, bias]). "
            f"Received: weights={str(path)!r} holding {type(data).__name__}"
        )
    entries = {str(key).replace("/", "_"): value for key, value in data.items()}
    # Every array is checked before any is set: a file that does not fit leaves
    # `model` as it was.
    assignments = []
    for layer in model.layers:
        if not layer.weights:
            continue
        if layer.name not in entries:
            raise ValueError(
                f"`weights` file has no entry for layer {layer.name!r} (it has "
                f"{sorted(entries)}). Received: weights={str(path)!r}"
            )
        value = entries.pop(layer.name)
        if isinstance(value, dict):
            value = [value["weights"], value["biases"]]
        if len(value) != len(layer.weights):
            raise ValueError(
                f"`weights` entry {layer.name!r} has {len(value)} arrays, layer "
                f"{layer.name!r} needs {len(layer.weights)}. Received: weights={str(path)!r}"
            )
        values = []
        for array, variable in zip(value, layer.weights):
            array = np.asarray(array, np.float32)
            shape = tuple(variable.shape)
            if array.shape != shape and array.size == int(np.prod(shape)) and array.ndim == 2:
                array = array.reshape(shape)  # a Dense kernel for a convolution
            if array.shape != shape:
                raise ValueError(
                    f"`weights` entry {layer.name!r} has shape {array.shape}, layer "
                    f"{layer.name!r} needs {shape}. Received: weights={str(path)!r}"
                )
            values.append(array)
        assignments.append((layer, values))
    for layer, values in assignments:
        layer.set_weights(values)
    if entries:
        logger.info("Skipped the weights file's entries %s lacks: %s", model.name, sorted(entries))
    return [layer.name for layer, _ in assignments]


def check_weights(weights: str | os.PathLike | None, what: str) -> None:
    """`weights` must be None or an existing file (checked before building)."""
    if weights is None:
        return
    if weights == "imagenet":
        raise ValueError(
            f"`weights='imagenet'`: Keras has no {what} weights to download. Pass the path of "
            "a numpy dump of the caffe weights (e.g. bvlc_alexnet.npy from "
            "http://www.cs.toronto.edu/~guerzhoy/tf_alexnet/) or of a Keras weights file. "
            f"Received: weights={weights!r}"
        )
    if not isinstance(weights, (str, os.PathLike)) or not os.path.isfile(weights):
        raise ValueError(
            f"`weights` must be None or the path of a weights file. Received: weights={weights!r}"
        )


def load_weights(model: keras.Model, weights: str | os.PathLike | None) -> None:
    """Loads `weights` (None, a `.npy` dump or a Keras weights file) into `model`."""
    if weights is None:
        return
    if str(weights).endswith(".npy"):
        load_caffe_npy(model, weights)
    else:
        model.load_weights(weights)


def check_input_shape(input_shape, include_top: bool, size: int) -> tuple:
    """The input shape: (size, size, 3) by default with the classifier, else any size."""
    if input_shape is None:
        return (size, size, 3) if include_top else (None, None, 3)
    shape = tuple(input_shape)
    # Other channel counts (RGB-D's 4) build too, as Keras Applications allow without weights.
    if len(shape) != 3 or not isinstance(shape[2], int) or shape[2] < 1:
        raise ValueError(
            "`input_shape` must be (height, width, channels). "
            f"Received: input_shape={input_shape!r}"
        )
    if include_top and shape[:2] != (size, size):
        raise ValueError(
            f"`input_shape` must be ({size}, {size}, 3) with include_top=True (the classifier "
            f"covers the final map of that size). Received: input_shape={input_shape!r}"
        )
    return shape


def check_pooling(pooling) -> None:
    if pooling not in (None, "avg", "max"):
        raise ValueError(f"`pooling` must be None, 'avg' or 'max'. Received: pooling={pooling!r}")


def classifier_or_pooling(x, include_top, pooling, classifier_activation, top):
    """Keras Applications' ending: `top(x)` with the classifier, else optional pooling."""
    if include_top:
        x = top(x)
        return keras.layers.Activation(classifier_activation or "linear", name="predictions")(x)
    if pooling == "avg":
        return keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    if pooling == "max":
        return keras.layers.GlobalMaxPooling2D(name="max_pool")(x)
    return x


def AlexNet(  # noqa: N802 - Keras Applications' constructor naming
    include_top: bool = True,
    weights: str | os.PathLike | None = None,
    input_shape: tuple | None = None,
    pooling: str | None = None,
    classes: int = 1000,
    classifier_activation: str | None = "softmax",
    padding: str | None = None,
    name: str = "alexnet",
) -> keras.Model:
    """AlexNet (the CaffeNet layout), with Keras Applications' arguments.

    Args:
        include_top: Include the classifier (drop7, fc8 as a 1x1 convolution,
            flatten, `predictions`); the input is then 227x227. Without it the
            model ends at fc7, the paper's decapitated net, and takes any size.
        weights: None (random), the path of a numpy dump of the caffe weights
            (`.npy`, see `load_caffe_npy`; `bvlc_alexnet.npy` was trained with
            LRN before pooling, the CaffeNet order used here swaps them, as
            `bvlc_reference_caffenet` has them), or of a Keras weights file of
            this model.
        input_shape: `(227, 227, 3)` with the classifier (the default), any
            `(height, width, 3)` without.
        pooling: Without the classifier: None, "avg" or "max" global pooling.
        classes: Classes of fc8.
        classifier_activation: Activation of `predictions` (None: logits).
        padding: "valid" is caffe's: conv1, the pools and fc6 unpadded (pool5
            6x6 and fc6 1x1 at 227x227). "same" keeps the features on kfcn's
            grid: an input of 32n pixels gives exactly n fc7 positions, so
            `kfcn.build_fcn`'s alignment and any-size output hold (caffe's
            unpadded layers would lose two positions, which the reference makes
            up for by padding the image by 100). None: "valid" with the
            classifier, "same" without. The weights are the same for both.
        name: Model name.

    Returns:
        A functional `keras.Model` taking caffe-preprocessed images (BGR, ImageNet
        mean subtracted, 0..255 scale).

    Raises:
        ValueError: If an argument is invalid; the message names it.

    Example:
        >>> model = AlexNet()
        >>> model.get_layer("conv2").kernel.shape
        (5, 5, 48, 256)
    """
    if padding is None:
        padding = "valid" if include_top else "same"
    if padding not in ("valid", "same"):
        raise ValueError(f"`padding` must be 'valid' or 'same'. Received: padding={padding!r}")
    shape = check_input_shape(input_shape, include_top, IMAGE_SIZE)
    check_pooling(pooling)
    check_weights(weights, "AlexNet")
    images = keras.Input(shape=shape, name="input")

    x = keras.layers.Conv2D(96, 11, strides=4, padding=padding, activation="relu", name="conv1")(
        images
    )
    x = keras.layers.MaxPooling2D(3, strides=2, padding=padding, name="pool1")(x)
    x = LocalResponseNormalization(name="norm1")(x)
    x = GroupedConv2D(256, 5, padding="same", groups=2, activation="relu", name="conv2")(x)
    x = keras.layers.MaxPooling2D(3, strides=2, padding=padding, name="pool2")(x)
    x = LocalResponseNormalization(name="norm2")(x)
    x = keras.layers.Conv2D(384, 3, padding="same", activation="relu", name="conv3")(x)
    x = GroupedConv2D(384, 3, padding="same", groups=2, activation="relu", name="conv4")(x)
    x = GroupedConv2D(256, 3, padding="same", groups=2, activation="relu", name="conv5")(x)
    x = keras.layers.MaxPooling2D(3, strides=2, padding=padding, name="pool5")(x)
    x = FullyConnectedConv2D(4096, 6, padding=padding, activation="relu", name="fc6")(x)
    x = keras.layers.Dropout(0.5, name="drop6")(x)
    x = FullyConnectedConv2D(4096, 1, activation="relu", name="fc7")(x)

    def top(x):
        x = keras.layers.Dropout(0.5, name="drop7")(x)
        x = keras.layers.Conv2D(classes, 1, name="fc8")(x)
        return keras.layers.Flatten(name="flatten")(x)

    outputs = classifier_or_pooling(x, include_top, pooling, classifier_activation, top)
    model = keras.Model(images, outputs, name=name)
    load_weights(model, weights)
    return model
