"""The classifiers FCNs are built from, and where their features are tapped.

One table, keyed by backbone name: the Keras Applications constructor, its
`preprocess_input` mode, and its feature taps keyed by stride (8, 16, 32, and 4
for FCN-4s), as keras-hub keys ``P2..P5``. Taps are explicit Keras Applications
layer names where those are stable, and otherwise found by graph position
(`kfcn.geometry.find_taps`), never from auto-generated names, which change when
a second model is built in the same process. Every tap's stride is checked when
a model is built.
"""

from __future__ import annotations

import dataclasses
import importlib

import keras

from kfcn import geometry
from kfcn.models.torch_weights import load_torch_state_dict  # noqa: F401 (re-exported)

#: The strides every FCN taps (pool3, pool4, pool5 of the paper).
STRIDES = (8, 16, 32)
#: The finer tap FCN-4s adds (pool2).
FINE_STRIDE = 4


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    """How to build one backbone: a Keras Applications classifier or one of kfcn's own.

    Attributes:
        constructor: Name of the constructor in `module` (a function with
            Keras Applications' arguments: `include_top`, `weights`,
            `input_shape`, `classes`).
        preprocessing: `kfcn.layers.Preprocess` mode ("none" when the
            application normalises its input itself).
        taps: Layer names keyed by stride, or None to find taps by graph
            position; a stride without a name (the stride-4 tap of some) is
            found by position too.
        fc_layers: Names of the classifier's fully connected layers that the FCN
            keeps as convolutions `fc6`, `fc7` (the paper's VGG surgery).
    """

    constructor: str
    preprocessing: str
    taps: dict[int, str] | None = None
    fc_layers: tuple[str, ...] = ()
    module: str = "keras.applications"


def constructor_of(spec: BackboneSpec):
    """The classifier constructor a spec names (Keras Applications' or kfcn's own)."""
    return getattr(importlib.import_module(spec.module), spec.constructor)


# Each tap is the full-width feature map a stage leaves at that stride, as the
# paper taps pool3 and pool4.
_VGG_TAPS = {4: "block2_pool", 8: "block3_pool", 16: "block4_pool", 32: "block5_pool"}
# The dense block's output, normalised and activated by its transition, before
# the transition's 1x1 convolution halves the channels.
_DENSENET_TAPS = {4: "pool2_relu", 8: "pool3_relu", 16: "pool4_relu", 32: "relu"}
# Inverted residuals (as MobileNetV2's row): the next stage's expansion, the
# last and widest map at the stride before its strided depthwise convolution.
_EFFICIENTNET_TAPS = {
    4: "block3a_expand_activation",
    8: "block4a_expand_activation",
    16: "block6a_expand_activation",
    32: "top_activation",
}
# EfficientNetV2's early blocks are fused: block3a's 3x3 expansion is the strided
# convolution, so its stride-4 tap is stage 2's output, found by position
# (block2b_add in B0, block2d_add in S: the name depends on the size).
_EFFICIENTNET_V2_TAPS = {s: n for s, n in _EFFICIENTNET_TAPS.items() if s != FINE_STRIDE}


def _resnet_taps(blocks3: int, blocks4: int) -> dict[int, str]:
    return {
        4: "conv2_block3_out",
        8: f"conv3_block{blocks3}_out",
        16: f"conv4_block{blocks4}_out",
        32: "conv5_block3_out",
    }


def _resnet_v2_taps(blocks3: int, blocks4: int) -> dict[int, str]:
    # ResNetV2 strides in the last block of a stack, so the stage's full-width
    # features at stride 8 (16) are that block's pre-activation (BN, ReLU) of its
    # input, before its 1x1 bottleneck narrows them and its 3x3 strides.
    return {
        4: "conv2_block3_preact_relu",
        8: f"conv3_block{blocks3}_preact_relu",
        16: f"conv4_block{blocks4}_preact_relu",
        32: "post_relu",
    }


BACKBONES: dict[str, BackboneSpec] = {
    "vgg16": BackboneSpec("VGG16", "caffe", _VGG_TAPS, ("fc1", "fc2")),
    "vgg19": BackboneSpec("VGG19", "caffe", _VGG_TAPS, ("fc1", "fc2")),
    "resnet50": BackboneSpec("ResNet50", "caffe", _resnet_taps(4, 6)),
    "resnet101": BackboneSpec("ResNet101", "caffe", _resnet_taps(4, 23)),
    "resnet152": BackboneSpec("ResNet152", "caffe", _resnet_taps(8, 36)),
    "resnet50v2": BackboneSpec("ResNet50V2", "tf", _resnet_v2_taps(4, 6)),
    "resnet101v2": BackboneSpec("ResNet101V2", "tf", _resnet_v2_taps(4, 23)),
    "resnet152v2": BackboneSpec("ResNet152V2", "tf", _resnet_v2_taps(8, 36)),
    "mobilenet": BackboneSpec(
        "MobileNet",
        "tf",
        {4: "conv_pw_3_relu", 8: "conv_pw_5_relu", 16: "conv_pw_11_relu", 32: "conv_pw_13_relu"},
    ),
    "mobilenetv2": BackboneSpec(
        "MobileNetV2",
        "tf",
        {
            4: "block_3_expand_relu",
            8: "block_6_expand_relu",
            16: "block_13_expand_relu",
            32: "out_relu",
        },
    ),
    # MobileNetV3's activations and ConvNeXt's residual sums have auto-generated
    # names: their taps (the same kinds of map as above) are found by position.
    "mobilenetv3small": BackboneSpec("MobileNetV3Small", "none"),
    "mobilenetv3large": BackboneSpec("MobileNetV3Large", "none"),
    **{
        f"efficientnetb{i}": BackboneSpec(f"EfficientNetB{i}", "none", _EFFICIENTNET_TAPS)
        for i in range(8)
    },
    **{
        f"efficientnetv2{v}": BackboneSpec(
            f"EfficientNetV2{v.upper()}", "none", _EFFICIENTNET_V2_TAPS
        )
        for v in ("b0", "b1", "b2", "b3", "s", "m", "l")
    },
    **{
        f"convnext{size.lower()}": BackboneSpec(f"ConvNeXt{size}", "none")
        for size in ("Tiny", "Small", "Base", "Large", "XLarge")
    },
    "densenet121": BackboneSpec("DenseNet121", "torch", _DENSENET_TAPS),
    "densenet169": BackboneSpec("DenseNet169", "torch", _DENSENET_TAPS),
    "densenet201": BackboneSpec("DenseNet201", "torch", _DENSENET_TAPS),
    "xception": BackboneSpec(
        "Xception",
        "tf",
        {
            4: "block3_sepconv2_bn",
            8: "block4_sepconv2_bn",
            16: "block13_sepconv2_bn",
            32: "block14_sepconv2_act",
        },
    ),
    # kfcn's own ResNets (torchvision's / mmseg's V1b and V1c, kfcn.models.resnet):
    # ImageNet mean and std on RGB ("torch" is mmseg's mean 123.675, 116.28, 103.53
    # and std 58.395, 57.12, 57.375 on 0..255), taps at the stage outputs.
    **{
        f"resnet{depth}{stem}": BackboneSpec(
            f"ResNet{depth}{stem.capitalize()}",
            "torch",
            {4: "layer1_out", 8: "layer2_out", 16: "layer3_out", 32: "layer4_out"},
            (),
            module="kfcn.models.resnet",
        )
        for stem in ("v1b", "v1c")
        for depth in (18, 34, 50, 101, 152)
    },
    # The paper's other nets (kfcn.models.alexnet / .googlenet), caffe preprocessing.
    # AlexNet without its classifier ends at fc7 (convolutions), so the FCN scores fc7.
    "alexnet": BackboneSpec(
        "AlexNet", "caffe", {8: "conv2", 16: "conv5", 32: "fc7"}, module="kfcn.models.alexnet"
    ),
    "googlenet": BackboneSpec(
        "GoogLeNet",
        "caffe",
        {8: "inception_3b_output", 16: "inception_4e_output", 32: "inception_5b_output"},
        module="kfcn.models.googlenet",
    ),
}


def get_spec(name: str) -> BackboneSpec:
    """Looks up a backbone by (case-insensitive) name.

    Raises:
        ValueError: If the name is not in `BACKBONES`.
    """
    key = name.lower().replace("_", "").replace("-", "") if isinstance(name, str) else name
    if key not in BACKBONES:
        raise ValueError(
            "`backbone` must be a keras.Model or one of "
            f"{sorted(BACKBONES)}. Received: backbone={name!r}"
        )
    return BACKBONES[key]


def build_trunk(spec: BackboneSpec, channels: int = 3) -> keras.Model:
    """The application without its classifier, for images of any size."""
    constructor = constructor_of(spec)
    return constructor(include_top=False, weights=None, input_shape=(None, None, channels))


class WeightsUnavailableError(OSError):
    """`weights="imagenet"` could not be downloaded (or read from Keras' cache).

    An `OSError`: the argument is fine, the machine cannot fetch the file. The
    message names `weights`, the classifier, what failed, and what to pass
    instead.
    """


def _download_failed(error: BaseException) -> bool:
    # Keras' `get_file` turns network errors into a bare `Exception("URL fetch
    # failure on ...")`; other socket errors and unreadable cached files are
    # OSErrors, and a truncated download fails its hash check with a ValueError.
    message = str(error)
    return (
        isinstance(error, OSError)
        or message.startswith("URL fetch failure")
        or "hash does not match" in message
    )


def build_classifier(spec: BackboneSpec, weights: str) -> keras.Model:
    """The application with its classifier, loaded with `weights`.

    Built exactly as `keras.applications.<constructor>(include_top=True,
    weights=weights)`, so the FCN computes what that classifier computes; for
    EfficientNet B0-B7 this graph differs with `weights` (see
    `kfcn.surgery.match_input_scaling`).

    Args:
        spec: The backbone.
        weights: "imagenet" (downloaded by Keras Applications, or found in its
            cache, `$KERAS_HOME/models`, by default `~/.keras/models`) or the
            path of a Keras Applications classifier weights file
            (include_top=True).

    Raises:
        WeightsUnavailableError: If `weights="imagenet"` cannot be downloaded.
        ValueError: If the weights file does not exist or does not fit.
    """
    constructor = constructor_of(spec)
    try:
        return constructor(include_top=True, weights=weights)
    except Exception as error:
        if weights == "imagenet" and _download_failed(error):
            cause = " ".join(str(error).split())
            raise WeightsUnavailableError(
                f"`weights='imagenet'`: the ImageNet weights of {spec.constructor} could not be "
                f"downloaded ({cause}). Pass weights=None (random initialisation) or the path "
                "of a local Keras Applications classifier weights file (include_top=True), or "
                "put the file Keras downloads into its cache ($KERAS_HOME/models, by default "
                "~/.keras/models)."
            ) from error
        if isinstance(error, (ValueError, OSError, KeyError, TypeError)):
            raise ValueError(
                f"`weights` could not be loaded into a {spec.constructor} classifier "
                f"(include_top=True). Received: weights={weights!r}. Cause: {error}"
            ) from error
        raise


def resolve_taps(
    model: keras.Model, names: dict[int, str] | None, strides: tuple[int, ...] = STRIDES
) -> dict[int, tuple]:
    """Finds the taps of `model` at `strides` and checks their strides.

    Args:
        model: A functional backbone taking images.
        names: Layer names keyed by stride, or None to find taps by position;
            a stride in `strides` that `names` lacks is found by position.
        strides: The strides wanted: `STRIDES`, with `FINE_STRIDE` for FCN-4s.

    Returns:
        A dict mapping stride to `(output_tensor, Geometry)`.

    Raises:
        ValueError: If a tap is missing or sits at another stride.
    """
    records = geometry.trace(model)
    unnamed = [s for s in strides if names is None or s not in names]
    taps = {}
    if unnamed:
        found = geometry.find_taps(model, unnamed, records)
        missing = [s for s in unnamed if s not in found]
        if missing:
            raise ValueError(
                f"`backbone` has no feature map at stride(s) {missing} that kfcn can tap "
                f"(found strides {sorted(found)}). Received: backbone={model.name!r}"
            )
        taps = {s: (tensor, geo) for s, (_, tensor, geo) in found.items()}
    by_name = {layer.name: (tensor, geo) for layer, tensor, geo in records}
    for stride in [s for s in strides if s not in unnamed]:
        name = names[stride]
        if name not in by_name:
            raise ValueError(
                f"`backbone` {model.name!r} has no layer {name!r} for its stride-{stride} tap."
            )
        tensor, geo = by_name[name]
        if not isinstance(geo, geometry.Geometry) or geo.stride != (stride, stride):
            raise ValueError(
                f"`backbone` {model.name!r}: tap {name!r} should have stride {stride}, "
                f"but its geometry is {geo}."
            )
        taps[stride] = (tensor, geo)
    return dict(sorted(taps.items()))
