"""Where each feature of a Keras model sits on the input image.

The FCN paper (Long, Shelhamer, Darrell, TPAMI 2017, section 4.2 and the
reference's `crop` layer) aligns every score map with the input by knowing, for
each layer, its *stride* and *offset*: feature index ``j`` of a layer is centred
on input pixel ``offset + stride * j``. The reference computes these by walking
the Caffe net (`coord_map.py`); this module does the same for Keras functional
models, so skips and the final output can be cropped exactly for any backbone,
and feature taps can be checked (and found) by stride rather than by name.

The walk assumes what `kfcn` guarantees: the input is padded to a multiple of the
largest stride, so every "same"-padded strided layer sees a size divisible by its
stride and pads ``max(k - s, 0) // 2`` on the top/left, as TensorFlow does.
"""

from __future__ import annotations

import dataclasses

import keras

from kfcn.layers import AlignCrop, PadToMultiple, Preprocess, Scale


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Stride and offset of a feature map on the input image.

    Attributes:
        stride: Input pixels between neighbouring features, per axis (rows, cols).
        offset: Input pixel on which feature 0 is centred, per axis.
    """

    stride: tuple[int, int]
    offset: tuple[float, float]

    def then(self, stride: tuple[int, int], offset: tuple[float, float]) -> Geometry:
        """Composes a layer with local `stride` and `offset` (in its input's units)."""
        return Geometry(
            stride=(self.stride[0] * stride[0], self.stride[1] * stride[1]),
            offset=(
                self.offset[0] + self.stride[0] * offset[0],
                self.offset[1] + self.stride[1] * offset[1],
            ),
        )


# Markers for tensors without a position on the image.
BROADCAST = "broadcast"  # e.g. globally pooled vectors in squeeze-excite blocks
UNKNOWN = "unknown"  # spatial, but the layer rearranges space (Flatten, Reshape, ...)

IDENTITY = Geometry(stride=(1, 1), offset=(0.0, 0.0))

_GLOBAL_POOLING = (
    keras.layers.GlobalAveragePooling2D,
    keras.layers.GlobalMaxPooling2D,
)
_SPACE_CHANGING = (
    keras.layers.Flatten,
    keras.layers.Reshape,
    keras.layers.UpSampling2D,
    keras.layers.Resizing,
    keras.layers.Permute,
    keras.layers.Conv2DTranspose,
    AlignCrop,
)
_SPACE_PRESERVING = (Preprocess, Scale)


def _pair(value) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    return (int(value[0]), int(value[1]))


def _window_layer(layer) -> tuple[tuple[int, int], tuple[int, int], str] | None:
    """(effective kernel, strides, padding) of a convolution or pooling layer."""
    if isinstance(layer, keras.layers.Conv2DTranspose):
        return None
    kernel = getattr(layer, "kernel_size", None) or getattr(layer, "pool_size", None)
    strides = getattr(layer, "strides", None)
    padding = getattr(layer, "padding", None)
    if kernel is None or strides is None or padding not in ("same", "valid"):
        return None
    kernel = _pair(kernel)
    if len(kernel) != 2:
        return None
    dilation = _pair(getattr(layer, "dilation_rate", 1) or 1)
    effective = tuple(d * (k - 1) + 1 for k, d in zip(kernel, dilation))
    return effective, _pair(strides), padding


def _layer_geometry(layer, inputs: list) -> object:
    """The geometry of `layer`'s output given its inputs' geometries."""
    spatial = [g for g in inputs if isinstance(g, Geometry)]
    if not spatial:
        return UNKNOWN if UNKNOWN in inputs else BROADCAST
    if isinstance(layer, _GLOBAL_POOLING):
        return BROADCAST
    if isinstance(layer, _SPACE_CHANGING) or UNKNOWN in inputs:
        return UNKNOWN
    if any(g.stride != spatial[0].stride for g in spatial[1:]):
        return UNKNOWN  # a merge of maps at different strides has no single position
    # Maps merged at one stride but different offsets (Xception adds a 1x1
    # strided shortcut to a max-pooled path, half a stride apart) take the first
    # input's position: Keras applications pass the main path first.
    geometry = spatial[0]
    if isinstance(layer, _SPACE_PRESERVING):
        return geometry
    if isinstance(layer, PadToMultiple):  # bottom/right padding keeps offsets
        top, left = layer.before
        return geometry.then((1, 1), (-top, -left))
    if isinstance(layer, keras.layers.ZeroPadding2D):
        (top, _), (left, _) = layer.padding
        return geometry.then((1, 1), (-top, -left))
    if isinstance(layer, keras.layers.Cropping2D):
        (top, _), (left, _) = layer.cropping
        return geometry.then((1, 1), (top, left))
    window = _window_layer(layer)
    if window is not None:
        kernel, strides, padding = window
        local = []
        for k, s in zip(kernel, strides):
            pad_before = max(k - s, 0) // 2 if padding == "same" else 0
            local.append((k - 1) / 2 - pad_before)
        return geometry.then(strides, tuple(local))
    return geometry


def _functional_of(layer):
    """The functional graph of a nested model (Sequential keeps one inside)."""
    if not isinstance(layer, keras.Model):
        return None
    if hasattr(layer, "_nodes_by_depth"):
        return layer
    inner = getattr(layer, "_functional", None)
    return inner if inner is not None and hasattr(inner, "_nodes_by_depth") else None


def trace(model: keras.Model, input_geometry: Geometry = IDENTITY) -> list[tuple]:
    """Walks a functional model and returns each layer output's geometry.

    Nested models (functional or Sequential) are walked through, but only the
    model's own layers are listed: only their outputs are tensors of `model`.

    Args:
        model: A Keras functional model with one image input.
        input_geometry: Geometry of the model's input on the image.

    Returns:
        A list of `(layer, output_tensor, geometry)` in topological order, where
        geometry is a `Geometry`, `BROADCAST` or `UNKNOWN`.
    """
    records: list[tuple] = []

    def walk(function, inputs, top_level=True):
        geometries = {}
        for tensor, geometry in zip(function.inputs, inputs):
            geometries[id(tensor)] = geometry
        by_depth = function._nodes_by_depth  # noqa: SLF001 - Keras has no public walk
        for depth in sorted(by_depth, reverse=True):
            for node in by_depth[depth]:
                if not node.operation or node.is_input:
                    continue
                ins = [geometries.get(id(t), UNKNOWN) for t in node.input_tensors]
                layer = node.operation
                inner = _functional_of(layer)
                if inner is not None:
                    outs = walk(inner, ins, top_level=False)
                else:
                    outs = [_layer_geometry(layer, ins)] * len(node.outputs)
                for tensor, geometry in zip(node.outputs, outs):
                    geometries[id(tensor)] = geometry
                    if top_level:
                        records.append((layer, tensor, geometry))
        return [geometries.get(id(t), UNKNOWN) for t in function.outputs]

    walk(model, [input_geometry] * len(model.inputs))
    return records


def find_taps(
    model: keras.Model, strides=(8, 16, 32), records: list[tuple] | None = None
) -> dict[int, tuple]:
    """Finds the feature tap of each stride by graph position.

    The tap of stride ``s`` is the last layer output (in topological order) that
    is a 4-D map at stride ``s`` and not a padding layer: the output of the stage
    that works at that stride, as feature pyramids use (keras-hub's ``P3/P4/P5``),
    or for inverted residuals the next block's expansion of it. A block that
    narrows its input before it strides (ResNetV2's 1x1 bottleneck) makes the
    narrowed map the last one; such backbones need explicit tap names.

    Args:
        model: A Keras functional model taking an image.
        strides: The strides wanted.
        records: `trace(model)`, when the caller has it already.

    Returns:
        A dict mapping each stride found to `(layer, output_tensor, geometry)`.
    """
    taps = {}
    for layer, tensor, geometry in records if records is not None else trace(model):
        if not isinstance(geometry, Geometry) or len(tensor.shape) != 4:
            continue
        if isinstance(layer, (keras.layers.ZeroPadding2D, PadToMultiple)):
            continue
        if geometry.stride[0] == geometry.stride[1] and geometry.stride[0] in strides:
            taps[geometry.stride[0]] = (layer, tensor, geometry)
    return taps
