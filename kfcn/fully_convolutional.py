"""Turning a classifier into a fully convolutional network.

Long, Shelhamer, Darrell, "Fully Convolutional Networks for Semantic
Segmentation" (CVPR 2015 / TPAMI 2017), section 3.1 and figure 2: fully
connected layers are convolutions whose kernels cover their entire input
region, so a classifier recast as convolutions takes inputs of any size and
outputs a spatial map of class scores (the "tabby cat heatmap").
"""

from __future__ import annotations

import keras
import numpy as np

from kfcn import geometry, surgery
from kfcn.layers import FullyConnectedConv2D

# The paper's names for VGG's convolutionalized fully connected layers.
_FC_NAMES = {"fc1": "fc6", "fc2": "fc7"}
_POOLINGS = {
    keras.layers.GlobalAveragePooling2D: keras.layers.AveragePooling2D,
    keras.layers.GlobalMaxPooling2D: keras.layers.MaxPooling2D,
}
# Layers that act on the last (channel) axis alone and run unchanged on maps.
_POINTWISE = (
    keras.layers.Activation,
    keras.layers.Dropout,
    keras.layers.LayerNormalization,
    keras.layers.BatchNormalization,
    keras.layers.Rescaling,
    keras.layers.ReLU,
    keras.layers.Softmax,
)
# Head layers that run unchanged on maps: per-channel layers, merges and 1x1
# convolutions (MobileNet's conv_preds, MobileNetV3's hard-swish head).
_MAP_SAFE = (
    *_POINTWISE,
    keras.layers.Conv2D,
    keras.layers.Add,
    keras.layers.Multiply,
    keras.layers.Subtract,
    keras.layers.Concatenate,
)


class _Identity:
    """Stands in for a layer the convolutional net does without."""

    def __call__(self, x, *args, **kwargs):
        return x


def _flattened_map(tensor) -> tuple[int, int] | None:
    """The (rows, cols) of the map a Flatten made `tensor` from, if any."""
    while True:
        layer = tensor._keras_history.operation
        if isinstance(layer, keras.layers.Flatten):
            rows, cols = layer.input.shape[1:3] if len(layer.input.shape) == 4 else (1, 1)
            return (rows, cols)
        if not isinstance(layer, _POINTWISE):
            return None
        tensor = layer.input


def _replacements(classifier: keras.Model, pooling: str) -> tuple[dict, tuple]:
    """Maps each head layer to its convolutional stand-in; returns the native map size."""
    records = geometry.trace(classifier)
    # The head starts where the image plane ends for good (squeeze-excite blocks
    # pool globally too, but their output multiplies back into the map).
    spatial = [i for i, (_, _, geo) in enumerate(records) if isinstance(geo, geometry.Geometry)]
    flat = [spatial[-1] + 1] if spatial and spatial[-1] + 1 < len(records) else []
    if not flat or not isinstance(records[flat[0]][0], (keras.layers.Flatten, *_POOLINGS)):
        raise ValueError(
            "`classifier` must end in Flatten or global pooling followed by dense layers "
            f"(a Keras Applications model with include_top=True). Received: {classifier.name!r}"
        )
    native = tuple(records[flat[0]][0].input.shape[1:3])
    if None in native:
        raise ValueError(
            "`classifier` must have a fixed input size: the size of its feature map at that "
            f"input sets the convolutions' kernels. Received input shape {classifier.input_shape}"
        )
    replacements = {}
    for layer, _, _ in records[flat[0] :]:
        if isinstance(layer, (keras.layers.Flatten, keras.layers.Reshape)):
            replacements[layer] = _Identity()  # the map stays a map
        elif isinstance(layer, tuple(_POOLINGS)):
            pool = _POOLINGS[type(layer)]
            replacements[layer] = (
                pool(pool_size=native, strides=1, padding="valid", name=layer.name)
                if pooling == "window"
                else _Identity()
            )
        elif isinstance(layer, keras.layers.Dense):
            conv = FullyConnectedConv2D(
                layer.units,
                _flattened_map(layer.input) or (1, 1),
                padding="valid",
                activation=layer.activation,
                name=_FC_NAMES.get(layer.name, layer.name),
            )
            conv.build((None, None, None, layer.input.shape[-1] // int(np.prod(conv.kernel_size))))
            surgery.dense_to_conv(layer, conv)
            replacements[layer] = conv
        elif isinstance(layer, keras.layers.Layer) and not isinstance(layer, _MAP_SAFE):
            # Bare ops (x + 3.0 in MobileNetV3's hard sigmoid) are elementwise.
            raise ValueError(
                f"`classifier` layer {layer.name!r} ({type(layer).__name__}) in the head cannot "
                "be convolutionalized."
            )
    return replacements, native


def convolutionalize(classifier: keras.Model, pooling: str = "window") -> keras.Model:
    """Recasts a classifier's fully connected layers as convolutions.

    Dense layers over a flattened ``h x w`` map become ``h x w`` convolutions
    with the transplanted weights (VGG: `fc1` -> 7x7 `fc6`, `fc2` -> 1x1
    `fc7`, `predictions` -> 1x1); dense layers after global pooling become 1x1
    convolutions. Global pooling over the native feature map is an average
    (or max) over a window of that size, so with ``pooling="window"`` it becomes
    that pooling with stride 1: at the native input size the output has a
    single position equal to the classifier's output, and larger inputs give a
    map of the classifier applied to every window. ``pooling="none"`` drops it,
    scoring every feature position alone.

    Args:
        classifier: A Keras Applications classifier (include_top=True) or any
            functional model that flattens or globally pools a feature map and
            then applies dense layers. Its input size must be fixed.
        pooling: "window" or "none", for classifiers with global pooling.

    Returns:
        A `keras.Model` taking images of any size (at least the native size
        when the head flattens) and returning class scores per position,
        `(batch, rows, cols, classes)`. It shares the trunk layers (and their
        weights) with `classifier`; the head layers are new convolutions.

    Raises:
        ValueError: If `classifier` has no such head or no fixed input size.

    Example:
        >>> vgg = keras.applications.VGG16(weights=None)
        >>> heatmap = kfcn.convolutionalize(vgg)(np.zeros((1, 384, 512, 3)))
        >>> heatmap.shape
        TensorShape([1, 6, 10, 1000])
    """
    if pooling not in ("window", "none"):
        raise ValueError(f"`pooling` must be 'window' or 'none'. Received: pooling={pooling!r}")
    if not isinstance(classifier, keras.Model):
        raise ValueError(f"`classifier` must be a keras.Model. Received: {classifier!r}")
    replacements, _ = _replacements(classifier, pooling)
    channels = classifier.inputs[0].shape[-1]
    images = keras.Input(shape=(None, None, channels), name="images")
    # Re-run the classifier's graph on a size-free input, trunk layers as they
    # are (shared) and head layers through their stand-ins.
    scores = classifier._run_through_graph(  # noqa: SLF001 - Keras has no public graph walk
        images, operation_fn=lambda layer: replacements.get(layer, layer)
    )
    return keras.Model(images, scores, name=f"{classifier.name}_convolutionalized")
