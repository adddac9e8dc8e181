"""Per-layer precision under mixed precision: the depthwise convolutions kept in float32.

Under `mixed_bfloat16` on a CPU with bfloat16 units, FCN-8s MobileNetV2's
pointwise convolutions get faster, but oneDNN's bfloat16 depthwise convolutions
and their ReLU6 get slower (their input gradient about 3x), so the whole
training step gains nothing (`python -m bench.op_profile --model
fcn8s:mobilenetv2 --mode train`, README's Benchmarks). `float32_depthwise`
keeps each `DepthwiseConv2D`, with the batch norm and activation named after
it, in float32 while every other layer computes in bfloat16; Keras casts at the
borders. `kfcn train --mixed_precision --float32_depthwise` trains so.

Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018.
"""

from __future__ import annotations

from typing import Any


def float32_depthwise(model: Any) -> Any:
    """A copy of `model` whose depthwise convolutions compute in float32.

    Each `DepthwiseConv2D` and the layers named after it (MobileNetV2's
    `*_depthwise_BN` and `*_depthwise_relu`) get the float32 policy; every other
    layer keeps its own (e.g. `mixed_bfloat16`). The weights are copied; the
    layer classes (kfcn's fused batch norm included) and names are kept.

    Args:
        model: A functional Keras model.

    Returns:
        A new functional model.

    Raises:
        ValueError: If `model` has no depthwise convolution.
    """
    import keras

    names = [
        layer.name for layer in model.layers if isinstance(layer, keras.layers.DepthwiseConv2D)
    ]
    if not names:
        raise ValueError(
            f"`model` {model.name!r} has no DepthwiseConv2D layer to keep in float32 "
            "(float32_depthwise is for MobileNet-like backbones)"
        )

    def clone(layer: Any) -> Any:
        config = layer.get_config()
        if any(layer.name == n or layer.name.startswith(n + "_") for n in names):
            config["dtype"] = "float32"
        return layer.__class__.from_config(config)

    copy = keras.models.clone_model(model, clone_function=clone)
    copy.set_weights(model.get_weights())
    if getattr(model, "class_info", None) is not None:
        copy.class_info = model.class_info
    return copy
