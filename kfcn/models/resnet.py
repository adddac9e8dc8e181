"""ResNet V1b and V1c, 18 to 152 layers, as torchvision and mmsegmentation define them.

He et al., "Deep Residual Learning for Image Recognition", CVPR 2016; the
"pytorch" style (stride on the 3x3 convolution of the bottleneck, ResNet V1b)
and the deep stem of He et al., "Bag of Tricks for Image Classification with
Convolutional Neural Networks", CVPR 2019 (ResNet V1c); output strides 8 and 16
by dilated later stages as Yu and Koltun (2016) and mmsegmentation's
`ResNetV1c(strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4), contract_dilation=True)`.

Keras Applications has no ResNet-18/34 and no deep stem. These networks are
built layer for layer as `torchvision.models.resnet` and mmseg's
`mmseg/models/backbones/resnet.py`, so their checkpoints convert by name
(`kfcn.backbones.load_torch_state_dict`):

- convolutions have no bias and are followed by BatchNormalization with torch's
  epsilon 1e-5 and momentum 0.1 (Keras momentum 0.9);
- strided convolutions and the max pool pad explicitly (`ZeroPadding2D`,
  `<name>_pad`) by torch's symmetric padding, so every output equals torch's for
  every input size, odd ones included (Keras' "same" would pad the bottom/right
  only); stride-1 convolutions use "same", which is torch's padding there;
- layer names are the torch module names with "." replaced by "_" (`conv1`,
  `bn1`, `stem_0` .. `stem_7`, `layer1_0_conv1`, `layer1_0_bn1`,
  `layer1_0_downsample_0`, `layer1_0_downsample_1`, `fc`), plus names for the
  parts torch reuses or leaves anonymous: `layer1_0_relu1`, `layer1_0_relu2`,
  `layer1_0_add`, `layer1_0_out` (the block's output ReLU) and `layer1_out` ..
  `layer4_out` (each stage's output, an Identity: the feature taps).

The stem (V1b, torchvision's ResNet and mmseg's `ResNet`)::

    conv1_pad, conv1 (7x7/2, 64), bn1, relu, maxpool_pad, maxpool (3x3/2)

The deep stem (V1c, mmseg's `ResNetV1c`)::

    stem_0_pad, stem_0 (3x3/2, 32), stem_1, stem_2 (ReLU),
    stem_3 (3x3, 32), stem_4, stem_5, stem_6 (3x3, 64), stem_7, stem_8,
    maxpool_pad, maxpool (3x3/2)

then `layer1` .. `layer4` (64, 128, 256, 512 planes; BasicBlock x1 or Bottleneck
x4 expansion) and, with `include_top`, `avgpool` and `fc`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import keras

#: Blocks per stage, as torchvision's and mmseg's `arch_settings`.
DEPTHS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
_EXPANSION = {"basic": 1, "bottleneck": 4}

#: Per-stage strides and dilations for each output stride (mmseg's FCN configs:
#: D8 `strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4)`; D16 `(1, 2, 2, 1), (1, 1, 1, 2)`).
OUTPUT_STRIDES = {
    8: ((1, 2, 1, 1), (1, 1, 2, 4)),
    16: ((1, 2, 2, 1), (1, 1, 1, 2)),
    32: ((1, 2, 2, 2), (1, 1, 1, 1)),
}

# torch's default BatchNorm2d: eps 1e-5, running stats updated with momentum 0.1.
_BN_EPSILON = 1e-5
_BN_MOMENTUM = 0.9
# torchvision's and mmseg's initialisation: kaiming_normal_(mode="fan_out", nonlinearity="relu").
_CONV_INIT = keras.initializers.VarianceScaling(2.0, "fan_out", "untruncated_normal")


class _Builder:
    """Creates the layers of one network, named as torch names its modules."""

    def __init__(self, sync_batchnorm: bool, zero_init_residual: bool):
        self.sync_batchnorm = sync_batchnorm
        self.zero_init_residual = zero_init_residual

    def conv(self, x, filters: int, kernel: int, name: str, stride: int = 1, dilation: int = 1):
        """A bias-free convolution with torch's padding `dilation * (kernel - 1) // 2`."""
        if stride == 1:
            padding = "same"
        else:
            pad = dilation * (kernel - 1) // 2
            if pad:
                x = keras.layers.ZeroPadding2D(pad, name=f"{name}_pad")(x)
            padding = "valid"
        return keras.layers.Conv2D(
            filters,
            kernel,
            strides=stride,
            dilation_rate=dilation,
            padding=padding,
            use_bias=False,
            kernel_initializer=_CONV_INIT,
            name=name,
        )(x)

    def bn(self, x, name: str, zero_gamma: bool = False):
        return keras.layers.BatchNormalization(
            epsilon=_BN_EPSILON,
            momentum=_BN_MOMENTUM,
            gamma_initializer="zeros" if zero_gamma else "ones",
            synchronized=self.sync_batchnorm,
            name=name,
        )(x)

    @staticmethod
    def relu(x, name: str):
        return keras.layers.ReLU(name=name)(x)

    def basic_block(self, x, planes: int, stride: int, dilation: int, downsample: bool, name: str):
        """torchvision's / mmseg's BasicBlock: 3x3 (stride, dilation), 3x3, residual add."""
        shortcut = x
        y = self.conv(x, planes, 3, f"{name}_conv1", stride, dilation)
        y = self.relu(self.bn(y, f"{name}_bn1"), f"{name}_relu1")
        # mmseg dilates only the first 3x3 of a BasicBlock (its conv2 has
        # padding=1, dilation=1); torchvision's BasicBlock refuses dilation.
        y = self.conv(y, planes, 3, f"{name}_conv2")
        y = self.bn(y, f"{name}_bn2", zero_gamma=self.zero_init_residual)
        if downsample:
            shortcut = self._downsample(x, planes, stride, name)
        y = keras.layers.Add(name=f"{name}_add")([y, shortcut])
        return self.relu(y, f"{name}_out")

    def bottleneck(self, x, planes: int, stride: int, dilation: int, downsample: bool, name: str):
        """The "pytorch"-style Bottleneck: 1x1, 3x3 (stride, dilation), 1x1 (x4), residual add."""
        shortcut = x
        y = self.conv(x, planes, 1, f"{name}_conv1")
        y = self.relu(self.bn(y, f"{name}_bn1"), f"{name}_relu1")
        y = self.conv(y, planes, 3, f"{name}_conv2", stride, dilation)
        y = self.relu(self.bn(y, f"{name}_bn2"), f"{name}_relu2")
        y = self.conv(y, planes * 4, 1, f"{name}_conv3")
        y = self.bn(y, f"{name}_bn3", zero_gamma=self.zero_init_residual)
        if downsample:
            shortcut = self._downsample(x, planes * 4, stride, name)
        y = keras.layers.Add(name=f"{name}_add")([y, shortcut])
        return self.relu(y, f"{name}_out")

    def _downsample(self, x, filters: int, stride: int, name: str):
        # A 1x1 convolution needs no padding: at stride 2 it samples the even
        # rows and columns, as torch's does.
        y = self.conv(x, filters, 1, f"{name}_downsample_0", stride)
        return self.bn(y, f"{name}_downsample_1")


def _check_arguments(depth, output_stride, multi_grid, include_top, pooling, weights, blocks):
    if depth not in DEPTHS:
        raise ValueError(f"`depth` must be one of {sorted(DEPTHS)}. Received: depth={depth!r}")
    if output_stride not in OUTPUT_STRIDES:
        raise ValueError(
            f"`output_stride` must be one of {sorted(OUTPUT_STRIDES)} (use kfcn.dilate for "
            f"other strides). Received: output_stride={output_stride!r}"
        )
    if multi_grid is not None and len(multi_grid) != blocks[-1]:
        raise ValueError(
            f"`multi_grid` must give one dilation per block of layer4 ({blocks[-1]} blocks). "
            f"Received: multi_grid={multi_grid!r}"
        )
    if pooling not in (None, "avg", "max"):
        raise ValueError(f"`pooling` must be None, 'avg' or 'max'. Received: pooling={pooling!r}")
    if weights == "imagenet":
        raise ValueError(
            "`weights='imagenet'`: kfcn's own ResNets have no downloadable Keras weights. "
            "Convert a torchvision or mmsegmentation checkpoint instead: save its state dict "
            "as .npz (`np.savez(path, **{k: v.numpy() for k, v in state_dict.items()})`) and "
            "pass that path as `weights`, or call "
            "`kfcn.backbones.load_torch_state_dict(model, path)`. Received: weights='imagenet'"
        )
    if weights is not None and not (
        isinstance(weights, (str, os.PathLike)) and os.path.isfile(weights)
    ):
        raise ValueError(
            "`weights` must be None or the path of an existing Keras weights file "
            f"(.weights.h5) or torch state dict (.npz). Received: weights={weights!r}"
        )


def resnet(
    depth: int,
    stem: str = "v1c",
    include_top: bool = True,
    weights: str | os.PathLike | None = None,
    input_tensor=None,
    input_shape: tuple | None = None,
    pooling: str | None = None,
    classes: int = 1000,
    classifier_activation: str | None = "softmax",
    output_stride: int = 32,
    contract_dilation: bool = True,
    multi_grid: Sequence[int] | None = None,
    sync_batchnorm: bool = False,
    zero_init_residual: bool = False,
    name: str | None = None,
) -> keras.Model:
    """Builds a ResNet V1b or V1c; see the module docstring for its layers.

    Args:
        depth: 18, 34, 50, 101 or 152.
        stem: "v1b" (7x7/2 convolution, torchvision's ResNet and mmseg's
            `ResNet`) or "v1c" (three 3x3 convolutions 32-32-64, mmseg's
            `ResNetV1c`).
        include_top: Whether to add global average pooling and the classifier
            `fc` (as Keras Applications).
        weights: None (random initialisation as torchvision), the path of a
            Keras weights file of this network (a classifier's file also fits
            `include_top=False` and any `output_stride`: dilation changes no
            weight), or the path of a torchvision / mmseg state dict saved as
            .npz (loaded with `kfcn.backbones.load_torch_state_dict`, strict;
            `fc` skipped without `include_top`). "imagenet" is refused with
            the conversion recipe: no Keras download exists.
        input_tensor: Optional Keras tensor to use as the image input.
        input_shape: Input shape; default `(None, None, 3)`, any size (the
            classifier pools globally, as torchvision's adaptive pooling).
        pooling: With `include_top=False`: None (the stride-`output_stride`
            map), "avg" or "max" (global pooling).
        classes: Number of classes of `fc`.
        classifier_activation: Activation of `fc` (Keras Applications'
            "softmax"; None for torch's logits).
        output_stride: 32, 16 or 8. Below 32 the last stages keep stride 1 and
            dilate their 3x3 convolutions instead, as mmseg's dilated ResNets
            (D8: strides (1, 2, 1, 1), dilations (1, 1, 2, 4)).
        contract_dilation: The first block of a dilated stage uses half the
            stage's dilation (mmseg's `contract_dilation`, which its FCN
            configs set).
        multi_grid: Optional dilation of each block of layer4 (mmseg's
            `multi_grid`, taken as the blocks' rates).
        sync_batchnorm: BatchNormalization synchronised across replicas
            (mmseg's SyncBN).
        zero_init_residual: Zero-initialise the last BatchNorm scale of each
            block (mmseg's default without pretrained weights; torchvision's
            default is False).
        name: Model name; default `resnet{depth}_{stem}`.

    Returns:
        A functional `keras.Model`.

    Raises:
        ValueError: If an argument is out of range, or `weights` is "imagenet"
            or not an existing file.
    """
    if stem not in ("v1b", "v1c"):
        raise ValueError(f"`stem` must be 'v1b' or 'v1c'. Received: stem={stem!r}")
    kind, blocks = DEPTHS.get(depth, (None, ()))
    _check_arguments(depth, output_stride, multi_grid, include_top, pooling, weights, blocks)
    strides, dilations = OUTPUT_STRIDES[output_stride]
    build = _Builder(sync_batchnorm, zero_init_residual)

    if input_tensor is not None:
        images = input_tensor
    else:
        images = keras.Input(shape=input_shape or (None, None, 3), name="images")

    if stem == "v1b":
        x = build.conv(images, 64, 7, "conv1", stride=2)
        x = build.relu(build.bn(x, "bn1"), "relu")
    else:
        x = build.conv(images, 32, 3, "stem_0", stride=2)
        x = build.relu(build.bn(x, "stem_1"), "stem_2")
        x = build.conv(x, 32, 3, "stem_3")
        x = build.relu(build.bn(x, "stem_4"), "stem_5")
        x = build.conv(x, 64, 3, "stem_6")
        x = build.relu(build.bn(x, "stem_7"), "stem_8")
    # Zero padding is torch's -inf padding here: the pool follows a ReLU.
    x = keras.layers.ZeroPadding2D(1, name="maxpool_pad")(x)
    x = keras.layers.MaxPooling2D(3, strides=2, name="maxpool")(x)

    block_fn = build.basic_block if kind == "basic" else build.bottleneck
    expansion = _EXPANSION[kind]
    channels = 64
    for stage, (count, stride, dilation) in enumerate(zip(blocks, strides, dilations), 1):
        planes = 64 * 2 ** (stage - 1)
        if stage == 4 and multi_grid is not None:
            rates = list(multi_grid)
        else:
            first = dilation // 2 if contract_dilation and dilation > 1 else dilation
            rates = [first] + [dilation] * (count - 1)
        for index, rate in enumerate(rates):
            block_stride = stride if index == 0 else 1
            downsample = index == 0 and (stride != 1 or channels != planes * expansion)
            x = block_fn(x, planes, block_stride, rate, downsample, f"layer{stage}_{index}")
            channels = planes * expansion
        x = keras.layers.Identity(name=f"layer{stage}_out")(x)

    if include_top:
        x = keras.layers.GlobalAveragePooling2D(name="avgpool")(x)
        x = keras.layers.Dense(classes, activation=classifier_activation, name="fc")(x)
    elif pooling == "avg":
        x = keras.layers.GlobalAveragePooling2D(name="avgpool")(x)
    elif pooling == "max":
        x = keras.layers.GlobalMaxPooling2D(name="maxpool_global")(x)

    if input_tensor is not None:
        inputs = keras.utils.get_source_inputs(input_tensor)
    else:
        inputs = images
    model = keras.Model(inputs, x, name=name or f"resnet{depth}_{stem}")

    if weights is not None:
        if str(weights).endswith(".npz"):
            from kfcn.models.torch_weights import load_torch_state_dict

            load_torch_state_dict(model, weights)
        else:
            model.load_weights(weights)
    return model


def _constructor(depth: int, stem: str):
    def constructor(
        include_top: bool = True,
        weights: str | os.PathLike | None = None,
        input_tensor=None,
        input_shape: tuple | None = None,
        pooling: str | None = None,
        classes: int = 1000,
        classifier_activation: str | None = "softmax",
        output_stride: int = 32,
        contract_dilation: bool = True,
        multi_grid: Sequence[int] | None = None,
        sync_batchnorm: bool = False,
        zero_init_residual: bool = False,
        name: str | None = None,
    ) -> keras.Model:
        return resnet(
            depth,
            stem,
            include_top=include_top,
            weights=weights,
            input_tensor=input_tensor,
            input_shape=input_shape,
            pooling=pooling,
            classes=classes,
            classifier_activation=classifier_activation,
            output_stride=output_stride,
            contract_dilation=contract_dilation,
            multi_grid=multi_grid,
            sync_batchnorm=sync_batchnorm,
            zero_init_residual=zero_init_residual,
            name=name,
        )

    variant = "V1b (7x7 stem, torchvision's ResNet)" if stem == "v1b" else "V1c (deep stem)"
    constructor.__name__ = constructor.__qualname__ = f"ResNet{depth}{stem.capitalize()}"
    constructor.__doc__ = (
        f"ResNet-{depth} {variant}: `resnet({depth}, {stem!r}, ...)`.\n\n"
        "Keras Applications' arguments (`include_top`, `weights`, `input_tensor`,\n"
        "`input_shape`, `pooling`, `classes`, `classifier_activation`) plus\n"
        "`output_stride`, `contract_dilation`, `multi_grid`, `sync_batchnorm`,\n"
        "`zero_init_residual`, `name`; see `kfcn.models.resnet.resnet`.\n"
    )
    return constructor


ResNet18V1b = _constructor(18, "v1b")
ResNet34V1b = _constructor(34, "v1b")
ResNet50V1b = _constructor(50, "v1b")
ResNet101V1b = _constructor(101, "v1b")
ResNet152V1b = _constructor(152, "v1b")
ResNet18V1c = _constructor(18, "v1c")
ResNet34V1c = _constructor(34, "v1c")
ResNet50V1c = _constructor(50, "v1c")
ResNet101V1c = _constructor(101, "v1c")
ResNet152V1c = _constructor(152, "v1c")

#: Table name -> constructor, for `kfcn.backbones`.
CONSTRUCTORS = {
    f"resnet{depth}_{stem}": globals()[f"ResNet{depth}{stem.capitalize()}"]
    for stem in ("v1b", "v1c")
    for depth in DEPTHS
}
