"""The FCN decode head of mmsegmentation and torchvision, as functional Keras layers.

mmsegmentation's `mmseg/models/decode_heads/fcn_head.py` (`FCNHead`) and
torchvision's `segmentation.fcn.FCNHead`: on the backbone's last feature map,

    x -> convs_0 .. convs_{n-1} (3x3 conv-BN-ReLU, `channels` wide, dilated)
      -> conv_cat([x, convs]) (3x3 conv-BN-ReLU, when `concat_input`)
      -> dropout (channel dropout, `nn.Dropout2d`) -> conv_seg (1x1, with bias)

Every convolution before a BatchNorm has no bias (mmcv's `ConvModule` with a
norm layer). Layer names are mmseg's module paths with "." replaced by "_"
(`decode_head_convs_0_conv`, `decode_head_convs_0_bn`, `decode_head_conv_cat_conv`,
`decode_head_conv_seg`, `auxiliary_head_convs_0_conv`, ...), so an mmseg state
dict maps onto the layers by the same rule as the torchvision backbones
(`kfcn.backbones.load_torch_state_dict`).
"""

from __future__ import annotations

import keras

# PyTorch's BatchNorm2d defaults: momentum 0.1 (Keras counts the other way: 0.9) and eps 1e-5.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def _conv_initializer():
    # mmcv's ConvModule.init_weights: kaiming_init(conv, nonlinearity="relu"),
    # a normal distribution with fan-out mode.
    return keras.initializers.VarianceScaling(
        2.0, mode="fan_out", distribution="untruncated_normal"
    )


def conv_module(
    x,
    channels: int,
    *,
    kernel_size: int = 3,
    dilation: int = 1,
    name: str,
    sync_batchnorm: bool = False,
):
    """mmcv's `ConvModule`: conv (no bias) -> BatchNorm -> ReLU, "same" padding.

    Args:
        x: A 4-D feature map (channels last).
        channels: Output channels.
        kernel_size: Convolution kernel size.
        dilation: Convolution dilation; the padding `(k // 2) * dilation` keeps the size.
        name: The module's name; the layers are `{name}_conv`, `{name}_bn`, `{name}_activate`.
        sync_batchnorm: Synchronise BatchNorm statistics across replicas.

    Returns:
        The output feature map.
    """
    x = keras.layers.Conv2D(
        channels,
        kernel_size,
        padding="same",
        dilation_rate=dilation,
        use_bias=False,
        kernel_initializer=_conv_initializer(),
        name=f"{name}_conv",
    )(x)
    x = keras.layers.BatchNormalization(
        momentum=BN_MOMENTUM,
        epsilon=BN_EPSILON,
        synchronized=sync_batchnorm,
        name=f"{name}_bn",
    )(x)
    return keras.layers.ReLU(name=f"{name}_activate")(x)


def _check_positive(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be an integer >= 1. Received: {name}={value!r}")


def fcn_head(
    x,
    num_classes: int,
    *,
    channels: int = 512,
    num_convs: int = 2,
    kernel_size: int = 3,
    concat_input: bool = True,
    dilation: int = 1,
    dropout: float = 0.1,
    name: str = "decode_head",
    sync_batchnorm: bool = False,
):
    """FCNHead (mmsegmentation `FCNHead`, torchvision `FCNHead`), on a feature map.

    With `num_convs=2, concat_input=True` this is mmseg's decode head of the FCN
    model zoo; with `num_convs=1, concat_input=False` its auxiliary head; with
    `dilation=6` the head of FCN-D6. As in mmseg, `conv_cat` is not dilated, and
    `num_convs=0` passes the input straight on (it must then have `channels`
    channels).

    Args:
        x: The backbone's feature map (channels last).
        num_classes: Number of classes (conv_seg's filters).
        channels: Width of the head's convolutions (mmseg's `channels`).
        num_convs: Number of 3x3 conv-BN-ReLU modules, >= 0.
        kernel_size: Kernel size of the head's convolutions.
        concat_input: Concatenate the input with the last conv's output and fuse
            them with one more conv-BN-ReLU (`conv_cat`).
        dilation: Dilation of the `convs` (mmseg's `dilation`).
        dropout: Channel dropout rate before the classifier (`nn.Dropout2d`), in [0, 1).
        name: Prefix of the layer names ("decode_head" or "auxiliary_head").
        sync_batchnorm: Synchronise BatchNorm statistics across replicas.

    Returns:
        The logits at the feature map's resolution, `(batch, h, w, num_classes)`.

    Raises:
        ValueError: If an argument is invalid; the message names it.
    """
    _check_positive(num_classes, "num_classes")
    _check_positive(channels, "channels")
    _check_positive(kernel_size, "kernel_size")
    _check_positive(dilation, "dilation")
    if isinstance(num_convs, bool) or not isinstance(num_convs, int) or num_convs < 0:
        raise ValueError(f"`num_convs` must be an integer >= 0. Received: num_convs={num_convs!r}")
    if num_convs == 0 and x.shape[-1] != channels:
        raise ValueError(
            "`num_convs`=0 passes the input on, so it needs `channels` equal to the input's "
            f"{x.shape[-1]} channels. Received: channels={channels}"
        )
    if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"`dropout` must be in [0, 1). Received: dropout={dropout!r}")

    inputs = x
    for i in range(num_convs):
        x = conv_module(
            x,
            channels,
            kernel_size=kernel_size,
            dilation=dilation,
            name=f"{name}_convs_{i}",
            sync_batchnorm=sync_batchnorm,
        )
    if concat_input:
        x = keras.layers.Concatenate(name=f"{name}_cat")([inputs, x])
        x = conv_module(
            x,
            channels,
            kernel_size=kernel_size,
            name=f"{name}_conv_cat",
            sync_batchnorm=sync_batchnorm,
        )
    if dropout:
        x = keras.layers.SpatialDropout2D(dropout, name=f"{name}_dropout")(x)
    # BaseDecodeHead.init_weights: normal_init(conv_seg, mean=0, std=0.01).
    return keras.layers.Conv2D(
        num_classes,
        1,
        kernel_initializer=keras.initializers.RandomNormal(stddev=0.01),
        bias_initializer="zeros",
        name=f"{name}_conv_seg",
    )(x)
