"""FCN-32s, FCN-16s and FCN-8s builders.

Long, Shelhamer, Darrell, "Fully Convolutional Networks for Semantic
Segmentation", CVPR 2015 / TPAMI 2017, and the reference Caffe nets
voc-fcn32s, voc-fcn16s, voc-fcn8s and voc-fcn8s-atonce.

The network, as the paper draws it::

    images -> pad -> preprocess -> trunk (conv1_1 .. pool5)
    pool5 -> fc6 -> drop6 -> fc7 -> drop7 -> score_fr                  (stride 32)
    FCN-32s: score_fr -> upscore (x32) -> score
    FCN-16s: score_fr -> upscore2 (x2) -+-> fuse_pool4 -> upscore16 (x16) -> score
             pool4 -> score_pool4 ------'
    FCN-8s:  fuse_pool4 -> upscore_pool4 (x2) -+-> fuse_pool3 -> upscore8 (x8) -> score
             pool3 -> score_pool3 -------------'

Backbones without fully connected layers (ResNet, MobileNet, ...) go straight
from their last feature map to `score_fr`, as the paper does for GoogLeNet.
"""

from __future__ import annotations

import logging
import os

import keras

from kfcn import VARIANTS, backbones, geometry, surgery
from kfcn.bilinear import BilinearInitializer
from kfcn.layers import AlignCrop, FullyConnectedConv2D, PadToMultiple, Preprocess, Scale

logger = logging.getLogger(__name__)

# Skip strides each variant fuses, coarse to fine, and its final upsampling.
_SKIPS = {"fcn32s": (), "fcn16s": (16,), "fcn8s": (16, 8)}
# Layer names of the reference nets, keyed by the stride each one produces.
_SCORE_NAMES = {16: "score_pool4", 8: "score_pool3"}
_FUSE_NAMES = {16: "fuse_pool4", 8: "fuse_pool3"}
_UPSCORE_NAMES = {16: "upscore2", 8: "upscore_pool4"}
_FINAL_UPSCORE = {"fcn32s": "upscore", "fcn16s": "upscore16", "fcn8s": "upscore8"}
# voc-fcn8s-atonce scales pool4 and pool3 before scoring them.
_AT_ONCE_SCALES = {16: 0.01, 8: 0.0001}


def _upsampling(factor: int, offset_in: float, stride_out: int, offset_out: float):
    """Kernel size and crop offset that align an upsampled map with a target.

    A Conv2DTranspose with stride ``r`` and kernel ``k`` puts output ``y`` on
    input coordinate ``(y - c) / r``, ``c`` the bilinear centre (``r - 0.5`` for
    ``k = 2r`` as the reference uses, ``r - 1`` for ``k = 2r - 1``). Cropping at
    ``o`` aligns it with a target of stride ``s`` and offset ``a`` when
    ``o = c + (a - offset_in) / s`` is an integer; one of the two kernels makes
    it so for every backbone whose offsets are whole or half pixels.
    """
    shift = (offset_out - offset_in) / stride_out
    for kernel, center in ((2 * factor, factor - 0.5), (2 * factor - 1, factor - 1.0)):
        crop = center + shift
        if abs(crop - round(crop)) < 1e-6:
            return kernel, int(round(crop))
    raise ValueError(
        f"Cannot align a x{factor} upsampling of a map at offset {offset_in} with a map of "
        f"stride {stride_out} at offset {offset_out}: the backbone's features are not on a "
        "whole or half pixel grid."
    )


def _align(factor, source: geometry.Geometry, stride_out: int, offset_out):
    """Per-axis `_upsampling`, checking both axes agree on the kernel size."""
    rows = _upsampling(factor, source.offset[0], stride_out, offset_out[0])
    cols = _upsampling(factor, source.offset[1], stride_out, offset_out[1])
    if rows[0] != cols[0]:
        raise ValueError(f"Backbone rows and columns need different kernels: {rows}, {cols}.")
    return rows[0], (rows[1], cols[1])


def _top_left_padding(source: geometry.Geometry) -> tuple[int, int]:
    """Rows and columns to pad above and left of the image so no output pixel is padding.

    The final upsampling's first output lies ``c`` pixels before the first
    feature (``c`` its bilinear centre). A backbone whose first feature lies
    further inside the image than that (Xception's unpadded convolutions put it
    at pixel 33 at stride 32) would leave the first rows and columns of the
    output before the upsampled map; padding the input by that many pixels
    moves every feature outward by as much.
    """
    _, crop = _align(source.stride[0], source, 1, (0.0, 0.0))
    return (max(0, -crop[0]), max(0, -crop[1]))


def _check_arguments(variant, num_classes, input_shape, dropout, weights, backbone):
    if variant not in VARIANTS:
        raise ValueError(f"`variant` must be one of {VARIANTS}. Received: variant={variant!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(
            f"`num_classes` must be an integer >= 1. Received: num_classes={num_classes!r}"
        )
    shape = tuple(input_shape) if isinstance(input_shape, (tuple, list)) else None
    if shape is None or len(shape) != 3 or shape[2] != 3:
        raise ValueError(
            "`input_shape` must be (height, width, 3) for RGB images (height and width may be "
            f"None). Received: input_shape={input_shape!r}"
        )
    for size in shape[:2]:
        if size is not None and (not isinstance(size, int) or size < 1):
            raise ValueError(
                "`input_shape` sizes must be None or positive integers. "
                f"Received: input_shape={shape}"
            )
    if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"`dropout` must be in [0, 1). Received: dropout={dropout!r}")
    if weights is not None and not isinstance(weights, (str, os.PathLike)):
        raise ValueError(
            "`weights` must be None, 'imagenet' or the path of a classifier weights file. "
            f"Received: weights={weights!r}"
        )
    if weights is not None and weights != "imagenet" and not os.path.isfile(weights):
        raise ValueError(f"`weights` file does not exist. Received: weights={weights!r}")
    if isinstance(backbone, keras.Model) and weights is not None:
        raise ValueError(
            "`weights` applies to named backbones; load weights into your keras.Model before "
            f"passing it. Received: weights={weights!r}"
        )
    return shape


def _trunk(backbone, weights):
    """Builds the trunk and returns (trunk model, taps, spec, classifier or None)."""
    if isinstance(backbone, keras.Model):
        spec = backbones.BackboneSpec(constructor="", preprocessing="none")
        return backbone, backbones.resolve_taps(backbone, None), spec, None
    if not isinstance(backbone, str):
        raise ValueError(
            f"`backbone` must be a name or a keras.Model. Received: backbone={backbone!r}"
        )
    spec = backbones.get_spec(backbone)
    trunk = backbones.build_trunk(spec)
    classifier = None
    if weights is not None:
        classifier = backbones.build_classifier(spec, weights)
        weighted = [layer for layer in trunk.layers if layer.weights]
        surgery.transplant_trunk(classifier, weighted)
        surgery.match_input_scaling(classifier, trunk)
    return trunk, backbones.resolve_taps(trunk, spec.taps), spec, classifier


def _upscore(num_classes, kernel, factor, name, trainable):
    return keras.layers.Conv2DTranspose(
        num_classes,
        kernel,
        strides=factor,
        padding="valid",
        use_bias=False,
        kernel_initializer=BilinearInitializer(),
        trainable=trainable,
        name=name,
    )


def _score(num_classes, name):
    # The paper zero-initialises the class scoring layers: a fresh skip changes
    # nothing until it learns (section 4.2).
    return keras.layers.Conv2D(
        num_classes, 1, kernel_initializer="zeros", bias_initializer="zeros", name=name
    )


def build_fcn(
    variant: str = "fcn8s",
    *,
    backbone: str | keras.Model = "vgg16",
    num_classes: int = 21,
    weights: str | os.PathLike | None = None,
    input_shape: tuple = (None, None, 3),
    dropout: float = 0.5,
    trainable_upsampling: bool = False,
    at_once: bool = False,
    init_from: keras.Model | str | os.PathLike | None = None,
    name: str | None = None,
) -> keras.Model:
    """Builds an FCN-32s, FCN-16s or FCN-8s (Long, Shelhamer, Darrell, 2015).

    Args:
        variant: "fcn32s", "fcn16s" or "fcn8s".
        backbone: A name from `kfcn.backbones.BACKBONES` (e.g. "vgg16",
            "resnet50", "mobilenetv2") or a `keras.Model` taking images, whose
            stride-8/16/32 features are found by graph position. A given model
            must normalise its own input (it receives 0..255 RGB).
        num_classes: Number of classes, >= 1.
        weights: None (random), "imagenet", or the path of a Keras Applications
            classifier weights file (include_top=True). The trunk is copied from
            the classifier, and for VGG its fc1/fc2 are transplanted into the
            convolutions fc6/fc7, as the authors' surgery does. The trunk then
            computes what `keras.applications.<Backbone>(weights=weights)`
            computes. Keras builds EfficientNet B0-B7 differently for the two:
            with "imagenet" it rescales the normalised input once more, with a
            file it does not, so a file needs weights trained at that scale; to
            use the ImageNet file offline, put it in Keras' cache
            (`~/.keras/models`) and pass "imagenet".
        input_shape: `(height, width, 3)`; height and width may be None.
        dropout: Dropout rate after fc6 and fc7 (VGG) or before score_fr.
        trainable_upsampling: Learn the bilinear-initialised upsampling
            (the reference freezes it).
        at_once: Scale pool4 by 0.01 and pool3 by 0.0001 before scoring them,
            as the all-at-once model (voc-fcn8s-atonce) does.
        init_from: A model, or the path of a `.keras` file, whose same-named
            layers initialise this one (staged training 32s -> 16s -> 8s).
        name: Model name; defaults to `"{variant}_{backbone}"`.

    Returns:
        A `keras.Model` taking RGB images with values 0..255 (uint8 or float)
        of any height and width and returning float32 logits of shape
        `(batch, height, width, num_classes)`, the input's height and width.

    Raises:
        ValueError: If an argument is invalid; the message names it.
        kfcn.backbones.WeightsUnavailableError: An `OSError`, if
            `weights="imagenet"` cannot be downloaded; the message says what to
            pass instead.

    Example:
        >>> model = kfcn.build_fcn("fcn8s", backbone="vgg16", num_classes=21)
        >>> model.get_layer("upscore8").kernel.shape
        (16, 16, 21, 21)
    """
    shape = _check_arguments(variant, num_classes, input_shape, dropout, weights, backbone)
    trunk, taps, spec, classifier = _trunk(backbone, weights)
    strides = sorted(taps)
    # Feature positions on the padded image; the image itself starts at `before`.
    where = {s: taps[s][1] for s in strides}
    before = _top_left_padding(where[min(_SKIPS[variant], default=32)])

    images = keras.Input(shape=shape, name="images")
    x = PadToMultiple(max(backbones.STRIDES), before=before, name="pad")(images)
    x = Preprocess(spec.preprocessing, name="preprocess")(x)
    # Inline the trunk (call its graph layer by layer) so its layers, like the
    # head's, are layers of the returned model itself, found by get_layer.
    features = keras.Model(trunk.inputs[0], [taps[s][0] for s in strides], name="taps")
    tapped = dict(zip(strides, features.call(x)))

    x = tapped[32]
    if spec.fc_layers:
        fc6 = FullyConnectedConv2D(4096, 7, padding="same", activation="relu", name="fc6")
        x = keras.layers.Dropout(dropout, name="drop6")(fc6(x))
        fc7 = keras.layers.Conv2D(4096, 1, activation="relu", name="fc7")
        x = keras.layers.Dropout(dropout, name="drop7")(fc7(x))
        if classifier is not None:
            surgery.dense_to_conv(classifier.get_layer(spec.fc_layers[0]), fc6)
            surgery.dense_to_conv(classifier.get_layer(spec.fc_layers[1]), fc7)
    else:
        x = keras.layers.Dropout(dropout, name="drop")(x)
    score = _score(num_classes, "score_fr")(x)
    score_where = where[32]

    for stride in _SKIPS[variant]:
        feature = tapped[stride]
        if at_once:
            feature = Scale(_AT_ONCE_SCALES[stride], name=f"scale_pool{4 if stride == 16 else 3}")(
                feature
            )
        skip = _score(num_classes, _SCORE_NAMES[stride])(feature)
        kernel, offset = _align(2, score_where, stride, where[stride].offset)
        up = _upscore(num_classes, kernel, 2, _UPSCORE_NAMES[stride], trainable_upsampling)
        up = AlignCrop(offset, name=f"{_UPSCORE_NAMES[stride]}c")([up(score), skip])
        score = keras.layers.Add(name=_FUSE_NAMES[stride])([up, skip])
        score_where = where[stride]

    factor = score_where.stride[0]
    kernel, offset = _align(factor, score_where, 1, tuple(float(b) for b in before))
    up = _upscore(num_classes, kernel, factor, _FINAL_UPSCORE[variant], trainable_upsampling)
    logits = AlignCrop(offset, dtype="float32", name="score")([up(score), images])

    backbone_name = backbone if isinstance(backbone, str) else backbone.name
    model = keras.Model(images, logits, name=name or f"{variant}_{backbone_name}")
    if init_from is not None:
        source = init_from
        if isinstance(init_from, (str, os.PathLike)):
            if not os.path.isfile(init_from):
                raise ValueError(
                    f"`init_from` file does not exist. Received: init_from={init_from!r}"
                )
            source = load_model(init_from, compile=False)
        if not isinstance(source, keras.Model):
            raise ValueError(
                "`init_from` must be a keras.Model or a .keras path. "
                f"Received: init_from={init_from!r}"
            )
        surgery.copy_matching_layers(source, model, what="init_from")
    return model


def build_fcn32s(**kwargs) -> keras.Model:
    """FCN-32s: `build_fcn(variant="fcn32s", ...)`; see `build_fcn`."""
    return build_fcn("fcn32s", **kwargs)


def build_fcn16s(**kwargs) -> keras.Model:
    """FCN-16s: `build_fcn(variant="fcn16s", ...)`; see `build_fcn`."""
    return build_fcn("fcn16s", **kwargs)


def build_fcn8s(**kwargs) -> keras.Model:
    """FCN-8s: `build_fcn(variant="fcn8s", ...)`; see `build_fcn`."""
    return build_fcn("fcn8s", **kwargs)


def load_model(
    path: str | os.PathLike, compile: bool = True, safe_mode: bool = True
) -> keras.Model:
    """Loads a `.keras` file saved from a kfcn model.

    `keras.saving.load_model` with kfcn's registered layers, losses and metrics
    available (a model compiled for training carries its loss and metrics).

    Raises:
        ValueError: If `path` does not exist.
    """
    import kfcn.losses  # noqa: F401 - registers SegmentationCrossEntropy
    import kfcn.metrics  # noqa: F401 - registers ConfusionMatrixMetric

    if not os.path.exists(path):
        raise ValueError(f"`path` does not exist. Received: path={str(path)!r}")
    return keras.saving.load_model(path, compile=compile, safe_mode=safe_mode)
