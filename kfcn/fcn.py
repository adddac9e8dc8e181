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
    FCN-4s:  fuse_pool3 -> upscore_pool3 (x2) -+-> fuse_pool2 -> upscore4 (x4) -> score
             pool2 -> score_pool2 -------------'

FCN-4s is one step past the paper, which stops at FCN-8s (Sec. 4.2, "diminishing
returns" on VOC's large objects): the same zero-initialised skip from pool2, for
thin classes (poles, signs) that a stride-8 map cannot resolve.

Backbones without fully connected layers (ResNet, MobileNet, ...) go straight
from their last feature map to `score_fr`, as the paper does for GoogLeNet.

NYUDv2 and SIFT Flow (TPAMI 2017 section 5; nyud-fcn32s-*, siftflow-fcn*s)::

    rgbd:    images (RGB, depth) -> pad -> RGBDPreprocess (log depth) -> trunk with a
             4-channel conv1_1 -> ... as above
    rgb+hha: rgb -> rgb_pad -> ... -> rgb_score_fr -+-> score_fused (mean) -> upscore ...
             hha -> hha_pad -> ... -> hha_score_fr -'
    heads:   one trunk and fc7; per task score_fr_sem -> upscore2_sem -> ... -> score_sem
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re

import keras

from kfcn import VARIANTS, backbones, geometry, surgery
from kfcn import modality as modality_lib
from kfcn.batch_norm import fuse_batch_norm
from kfcn.bilinear import BilinearInitializer
from kfcn.conv_gradients import use_matmul_gradients
from kfcn.layers import AlignCrop, FullyConnectedConv2D, PadToMultiple, Preprocess, Scale
from kfcn.modality import MODALITIES

logger = logging.getLogger(__name__)

# Skip strides each variant fuses, coarse to fine, and its final upsampling.
_SKIPS = {"fcn32s": (), "fcn16s": (16,), "fcn8s": (16, 8), "fcn4s": (16, 8, 4)}
# Layer names of the reference nets, keyed by the stride each one produces.
_SCORE_NAMES = {16: "score_pool4", 8: "score_pool3", 4: "score_pool2"}
_FUSE_NAMES = {16: "fuse_pool4", 8: "fuse_pool3", 4: "fuse_pool2"}
_UPSCORE_NAMES = {16: "upscore2", 8: "upscore_pool4", 4: "upscore_pool3"}
_FINAL_UPSCORE = {
    "fcn32s": "upscore", "fcn16s": "upscore16", "fcn8s": "upscore8", "fcn4s": "upscore4"
}  # fmt: skip
# voc-fcn8s-atonce scales pool4 and pool3 before scoring them.
_AT_ONCE_SCALES = {16: 0.01, 8: 0.0001}
_TASK_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


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


def _check_arguments(variant, num_classes, input_shape, dropout, weights, backbone, modality):
    if variant not in VARIANTS:
        raise ValueError(f"`variant` must be one of {VARIANTS}. Received: variant={variant!r}")
    if modality not in MODALITIES:
        raise ValueError(f"`modality` must be one of {MODALITIES}. Received: modality={modality!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(
            f"`num_classes` must be an integer >= 1. Received: num_classes={num_classes!r}"
        )
    channels = 4 if modality == "rgbd" else 3
    if input_shape is None:
        input_shape = (None, None, channels)
    shape = tuple(input_shape) if isinstance(input_shape, (tuple, list)) else None
    if shape is None or len(shape) != 3 or shape[2] != channels:
        what = {
            "rgb": "RGB images",
            "hha": "HHA images",
            "rgbd": "RGB-D images (RGB, then depth)",
            "rgb+hha": "each stream (RGB and HHA)",
        }[modality]
        raise ValueError(
            f"`input_shape` must be (height, width, {channels}) for {what} with "
            f"modality={modality!r} (height and width may be None). "
            f"Received: input_shape={input_shape!r}"
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
    if (
        modality == "rgbd"
        and isinstance(backbone, keras.Model)
        and tuple(backbone.inputs[0].shape)[-1:] != (4,)
    ):
        raise ValueError(
            "`modality`='rgbd' widens a named backbone's first convolution to 4 channels; "
            "pass a backbone name or a keras.Model taking 4 channels. Received: "
            f"backbone={backbone.name!r} with input shape {tuple(backbone.inputs[0].shape)}"
        )
    return shape


def _check_heads(heads, num_classes) -> dict:
    """The tasks and their class counts: `{None: num_classes}` for one task."""
    if heads is None:
        return {None: 21 if num_classes is None else num_classes}
    if num_classes is not None:
        raise ValueError(
            "Pass either `num_classes` (one task) or `heads` (classes per task), not both: "
            f"with `heads` the class counts come from it. Received: num_classes={num_classes!r}, "
            f"heads={heads!r}"
        )
    if not isinstance(heads, dict) or not heads:
        raise ValueError(
            "`heads` must be a non-empty dict of task name -> number of classes, e.g. "
            f"{{'sem': 33, 'geo': 3}}. Received: heads={heads!r}"
        )
    for task, classes in heads.items():
        if not isinstance(task, str) or not _TASK_NAME.match(task) or task.startswith("aux"):
            raise ValueError(
                "`heads` keys must be lowercase names (letters, digits, '_'; starting with a "
                f"letter, not 'aux', which marks auxiliary outputs). Received: task={task!r}"
            )
        if isinstance(classes, bool) or not isinstance(classes, int) or classes < 1:
            raise ValueError(
                f"`heads` values must be integers >= 1. Received: heads[{task!r}]={classes!r}"
            )
    return dict(heads)


def _renamed(model: keras.Model, prefix: str) -> keras.Model:
    """A copy of a functional model whose layers are named `prefix + name`, same weights.

    Rebuilt from its config (not renamed in place), so the copy's variables carry
    the new names too. Two streams of one backbone need this: a model's layer names
    must be unique.
    """
    config = model.get_config()

    def rename(value):
        if isinstance(value, dict):
            out = {k: rename(v) for k, v in value.items()}
            if "keras_history" in out:
                history = list(out["keras_history"])
                out["keras_history"] = [prefix + history[0], *history[1:]]
            return out
        if isinstance(value, (list, tuple)):
            return [rename(v) for v in value]
        return value

    def node_ref(ref):
        if ref and isinstance(ref[0], str):
            return [prefix + ref[0], *ref[1:]]
        return [node_ref(r) for r in ref]

    for layer in config["layers"]:
        layer["name"] = prefix + layer["name"]
        layer["config"]["name"] = layer["name"]
        layer["inbound_nodes"] = rename(layer["inbound_nodes"])
    config["input_layers"] = node_ref(config["input_layers"])
    config["output_layers"] = node_ref(config["output_layers"])
    config["name"] = prefix + config["name"]
    copy = model.__class__.from_config(config)
    copy.set_weights(model.get_weights())
    return copy


def _widen_trunk(rgb_trunk: keras.Model, spec) -> keras.Model:
    """The 4-channel (RGB-D) trunk: `rgb_trunk`'s weights, the first kernel widened.

    The depth input channel of the first convolution is initialised as the reference
    (`kfcn.modality.widen_first_conv`); every other layer is copied unchanged.
    """
    wide = backbones.build_trunk(spec, channels=4)
    pairs = list(
        zip(
            [layer for layer in rgb_trunk.layers if layer.weights],
            [layer for layer in wide.layers if layer.weights],
        )
    )
    for index, (src, dst) in enumerate(pairs):
        values = src.get_weights()
        if index == 0:
            values = [modality_lib.widen_first_conv(values[0]), *values[1:]]
        expected = [tuple(w.shape) for w in dst.weights]
        if [v.shape for v in values] != expected:
            raise ValueError(
                f"`modality`='rgbd': backbone layer {dst.name!r} has weight shapes {expected}, "
                f"the RGB trunk's {src.name!r} {[v.shape for v in values]}; only the first "
                "convolution may differ (in its input channels)."
            )
        dst.set_weights(values)
    return wide


def _trunk(backbone, weights, channels: int = 3, prefix: str = "", strides=backbones.STRIDES):
    """Builds the trunk and returns (trunk model, taps at `strides`, spec, classifier or None)."""
    if isinstance(backbone, keras.Model):
        spec = backbones.BackboneSpec(constructor="", preprocessing="none")
        trunk = _renamed(backbone, prefix) if prefix else backbone
        return trunk, backbones.resolve_taps(trunk, None, strides), spec, None
    if not isinstance(backbone, str):
        raise ValueError(
            f"`backbone` must be a name or a keras.Model. Received: backbone={backbone!r}"
        )
    spec = backbones.get_spec(backbone)
    if channels == 4 and spec.preprocessing == "none":
        raise ValueError(
            "`modality`='rgbd' needs a backbone whose preprocessing kfcn applies (caffe, tf or "
            f"torch); {backbone!r} normalises its own 3-channel input. Received: "
            f"backbone={backbone!r}"
        )
    trunk = backbones.build_trunk(spec)
    classifier = None
    if weights is not None:
        classifier = backbones.build_classifier(spec, weights)
        weighted = [layer for layer in trunk.layers if layer.weights]
        surgery.transplant_trunk(classifier, weighted)
        surgery.match_input_scaling(classifier, trunk)
    if channels == 4:
        trunk = _widen_trunk(trunk, spec)
    if prefix:
        trunk = _renamed(trunk, prefix)
    names = None if spec.taps is None else {s: prefix + n for s, n in spec.taps.items()}
    return trunk, backbones.resolve_taps(trunk, names, strides), spec, classifier


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


def _named(base: str, stream: str | None = None, task: str | None = None) -> str:
    """`rgb_score_fr`, `score_fr_sem`: the reference's stream prefix and task suffix."""
    return (f"{stream}_" if stream else "") + base + (f"_{task}" if task else "")


@dataclasses.dataclass
class _Stream:
    """One input stream's features: its name (None for one stream), taps, top."""

    name: str | None
    tapped: dict
    top: object


def _stream(images, trunk, taps, spec, classifier, stream, modality, dropout, before):
    """pad -> preprocess -> trunk -> fc6/fc7 (VGG) -> dropout, for one input stream."""
    strides = sorted(taps)
    if modality == "rgbd":
        pad_value, preprocess = (
            modality_lib.PAD_VALUES["rgbd"],
            modality_lib.RGBDPreprocess(spec.preprocessing, name=_named("preprocess", stream)),
        )
    elif modality == "hha" and spec.preprocessing == "caffe":
        # The reference's HHA nets start from VGG16 (caffe): HHA in file order minus
        # its own mean. Other backbones keep their own normalisation of 0..255 input.
        pad_value = modality_lib.PAD_VALUES["hha"]
        preprocess = modality_lib.HHAPreprocess(name=_named("preprocess", stream))
    else:
        pad_value = modality_lib.PAD_VALUES["rgb"]
        preprocess = Preprocess(spec.preprocessing, name=_named("preprocess", stream))
    pad = PadToMultiple(
        max(backbones.STRIDES), value=pad_value, before=before, name=_named("pad", stream)
    )
    x = preprocess(pad(images))
    # Inline the trunk (call its graph layer by layer) so its layers, like the
    # head's, are layers of the returned model itself, found by get_layer.
    features = keras.Model(trunk.inputs[0], [taps[s][0] for s in strides], name="taps")
    tapped = dict(zip(strides, features.call(x)))
    x = tapped[32]
    if spec.fc_layers:
        fc6 = FullyConnectedConv2D(
            4096, 7, padding="same", activation="relu", name=_named("fc6", stream)
        )
        x = keras.layers.Dropout(dropout, name=_named("drop6", stream))(fc6(x))
        fc7 = FullyConnectedConv2D(4096, 1, activation="relu", name=_named("fc7", stream))
        x = keras.layers.Dropout(dropout, name=_named("drop7", stream))(fc7(x))
        if classifier is not None:
            surgery.dense_to_conv(classifier.get_layer(spec.fc_layers[0]), fc6)
            surgery.dense_to_conv(classifier.get_layer(spec.fc_layers[1]), fc7)
    else:
        x = keras.layers.Dropout(dropout, name=_named("drop", stream))(x)
    return _Stream(stream, tapped, x)


def _fused_score(streams, stride, num_classes, task, at_once):
    """One stride's class scores: each stream's score layer, averaged over streams.

    nyud-fcn32s-color-hha sums the two streams' `score_fr` with coefficients 0.5
    (`score_fused`); the skips of a two-stream FCN-16s/8s are fused the same way.
    """
    base = "score_fr" if stride == 32 else _SCORE_NAMES[stride]
    maps = []
    for stream in streams:
        feature = stream.top if stride == 32 else stream.tapped[stride]
        if at_once and stride != 32:
            scale = "scale_" + _SCORE_NAMES[stride].removeprefix("score_")
            feature = Scale(_AT_ONCE_SCALES[stride], name=_named(scale, stream.name, task))(feature)
        maps.append(_score(num_classes, _named(base, stream.name, task))(feature))
    if len(maps) == 1:
        return maps[0]
    fused = "score_fused" if stride == 32 else f"{base}_fused"
    return keras.layers.Average(name=_named(fused, task=task))(maps)


def _head(variant, streams, where, before, reference, num_classes, task, options):
    """score_fr, the skips and the upsampling of one task; returns its logits."""
    at_once, trainable_upsampling = options
    score = _fused_score(streams, 32, num_classes, task, at_once)
    score_where = where[32]
    for stride in _SKIPS[variant]:
        skip = _fused_score(streams, stride, num_classes, task, at_once)
        kernel, offset = _align(2, score_where, stride, where[stride].offset)
        name = _named(_UPSCORE_NAMES[stride], task=task)
        up = _upscore(num_classes, kernel, 2, name, trainable_upsampling)
        up = AlignCrop(offset, name=f"{name}c")([up(score), skip])
        score = keras.layers.Add(name=_named(_FUSE_NAMES[stride], task=task))([up, skip])
        score_where = where[stride]
    factor = score_where.stride[0]
    kernel, offset = _align(factor, score_where, 1, tuple(float(b) for b in before))
    up = _upscore(
        num_classes, kernel, factor, _named(_FINAL_UPSCORE[variant], task=task),
        trainable_upsampling,
    )  # fmt: skip
    return AlignCrop(offset, dtype="float32", name=_named("score", task=task))(
        [up(score), reference]
    )


def build_fcn(
    variant: str = "fcn8s",
    *,
    backbone: str | keras.Model = "vgg16",
    num_classes: int | None = None,
    weights: str | os.PathLike | None = None,
    input_shape: tuple | None = None,
    dropout: float = 0.5,
    trainable_upsampling: bool = False,
    at_once: bool = False,
    init_from: keras.Model | str | os.PathLike | dict | None = None,
    name: str | None = None,
    modality: str = "rgb",
    heads: dict[str, int] | None = None,
) -> keras.Model:
    """Builds an FCN-32s, FCN-16s, FCN-8s (Long, Shelhamer, Darrell, 2015) or FCN-4s.

    Args:
        variant: "fcn32s", "fcn16s" or "fcn8s", or "fcn4s": FCN-8s with one more
            skip, `score_pool2` on the stride-4 features, fused as the paper
            fuses pool3 (`upscore_pool3`, `fuse_pool2`, `upscore4`).
        backbone: A name from `kfcn.backbones.BACKBONES` (e.g. "vgg16",
            "resnet50", "mobilenetv2") or a `keras.Model` taking images, whose
            stride-8/16/32 (and 4) features are found by graph position. A given model
            must normalise its own input (it receives 0..255 RGB; for "rgbd" it
            takes 4 channels and receives 0..255 RGB and the log depth).
        num_classes: Number of classes, >= 1 (default 21). Not allowed with
            `heads`, which gives the classes of each task.
        weights: None (random), "imagenet", or the path of a Keras Applications
            classifier weights file (include_top=True). The trunk is copied from
            the classifier, and for VGG its fc1/fc2 are transplanted into the
            convolutions fc6/fc7, as the authors' surgery does. The trunk then
            computes what `keras.applications.<Backbone>(weights=weights)`
            computes. Keras builds EfficientNet B0-B7 differently for the two:
            with "imagenet" it rescales the normalised input once more, with a
            file it does not, so a file needs weights trained at that scale; to
            use the ImageNet file offline, put it in Keras' cache
            (`~/.keras/models`) and pass "imagenet". With `modality="rgbd"` the
            first convolution's depth channel is the mean of its RGB filters
            (nyud-fcn32s-color-d's surgery); with "rgb+hha" both streams start
            from the classifier.
        input_shape: `(height, width, channels)`, height and width may be None;
            channels 4 for "rgbd", else 3 (for "rgb+hha", each stream's shape).
            Default: any height and width.
        dropout: Dropout rate after fc6 and fc7 (VGG) or before score_fr.
        trainable_upsampling: Learn the bilinear-initialised upsampling
            (the reference freezes it).
        at_once: Scale pool4 by 0.01 and pool3 by 0.0001 before scoring them,
            as the all-at-once model (voc-fcn8s-atonce) does (not for FCN-4s).
        init_from: A model, or the path of a `.keras` file, whose same-named
            layers initialise this one (staged training 32s -> 16s -> 8s). For
            `modality="rgb+hha"` also a dict `{"rgb": ..., "hha": ...}` of
            single-stream models (or paths) whose layers initialise the stream's
            `rgb_<name>` / `hha_<name>` layers, as nyud-fcn32s-color-hha starts
            from the trained color and HHA nets.
        name: Model name; defaults to `"{variant}_{backbone}"` (and the modality).
        modality: The input (TPAMI 2017 section 5, NYUDv2):
            "rgb": 0..255 RGB images (the default, the VOC nets).
            "hha": 3-channel HHA images (Gupta et al., ECCV 2014), the same net;
                a VGG ("caffe") backbone subtracts the reference's HHA mean from
                the channels in file order (`kfcn.modality.HHAPreprocess`).
            "rgbd": early fusion, [b, h, w, 4] images: RGB 0..255, then depth as
                the NYUDv2 PNG stores it (millimetres); the model takes
                ``log(depth) - 7.844`` as the reference's data layer does
                (`kfcn.modality.RGBDPreprocess`), and the first convolution
                has a fourth input channel.
            "rgb+hha": late fusion (nyud-fcn32s-color-hha): two full streams,
                one on RGB and one on HHA (layers `rgb_block1_conv1`,
                `hha_score_fr`, ...), their class scores averaged
                (`score_fused`, the reference's 0.5/0.5 sum) before upsampling.
                The model takes a dict `{"rgb": ..., "hha": ...}`.
        heads: Multi-task prediction (SIFT Flow, TPAMI 2017 section 5): a dict of
            task name -> number of classes, e.g. `{"sem": 33, "geo": 3}`. One
            trunk (and fc6/fc7), and for each task its own score and upsampling
            layers named as the reference siftflow nets (`score_fr_sem`,
            `upscore2_sem`, `score_pool4_sem`, `fuse_pool4_sem`, ...). The model
            returns a dict `{task: logits}`.

    Returns:
        A `keras.Model` taking images with values 0..255 (uint8 or float) of
        any height and width (a dict of two for "rgb+hha") and returning
        float32 logits of shape `(batch, height, width, num_classes)`, the
        input's height and width; with `heads`, a dict of such logits per task.

    Raises:
        ValueError: If an argument is invalid; the message names it.
        kfcn.backbones.WeightsUnavailableError: An `OSError`, if
            `weights="imagenet"` cannot be downloaded; the message says what to
            pass instead.

    Example:
        >>> model = kfcn.build_fcn("fcn8s", backbone="vgg16", num_classes=21)
        >>> model.get_layer("upscore8").kernel.shape
        (16, 16, 21, 21)
        >>> siftflow = kfcn.build_fcn("fcn16s", heads={"sem": 33, "geo": 3})
        >>> sorted(siftflow.output)
        ['geo', 'sem']
    """
    tasks = _check_heads(heads, num_classes)
    if isinstance(init_from, dict) and (
        modality != "rgb+hha" or set(init_from) - set(modality_lib.STREAMS)
    ):
        raise ValueError(
            "`init_from` may be a dict only for modality='rgb+hha', with keys among "
            f"{modality_lib.STREAMS}. Received: modality={modality!r}, "
            f"init_from keys={sorted(init_from)}"
        )
    shape = _check_arguments(
        variant, next(iter(tasks.values())), input_shape, dropout, weights, backbone, modality
    )
    if at_once and not set(_SKIPS[variant]) <= set(_AT_ONCE_SCALES):
        raise ValueError(
            "`at_once` is the reference's voc-fcn8s-atonce (pool4 and pool3 scaled); it has "
            f"no pool2 scale for FCN-4s. Received: variant={variant!r}, at_once=True"
        )
    stream_names = modality_lib.STREAMS if modality == "rgb+hha" else (None,)
    strides = tuple(sorted({*backbones.STRIDES, *_SKIPS[variant]}))
    built = {
        stream: _trunk(backbone, weights, shape[2], f"{stream}_" if stream else "", strides)
        for stream in stream_names
    }
    first = built[stream_names[0]]
    where = {s: first[1][s][1] for s in sorted(first[1])}
    # Feature positions on the padded image; the image itself starts at `before`.
    before = _top_left_padding(where[min(_SKIPS[variant], default=32)])

    if modality == "rgb+hha":
        inputs = {s: keras.Input(shape=shape, name=s) for s in stream_names}
        kinds = dict(zip(stream_names, ("rgb", "hha")))
    else:
        inputs = keras.Input(shape=shape, name="images")
        kinds = {None: modality}
    streams = []
    for stream in stream_names:
        trunk, taps, spec, classifier = built[stream]
        images = inputs[stream] if stream else inputs
        streams.append(
            _stream(images, trunk, taps, spec, classifier, stream, kinds[stream], dropout, before)
        )
    reference = inputs[stream_names[0]] if stream_names[0] else inputs
    options = (at_once, trainable_upsampling)
    logits = {
        task: _head(variant, streams, where, before, reference, classes, task, options)
        for task, classes in tasks.items()
    }
    outputs = logits[None] if heads is None else logits

    backbone_name = backbone if isinstance(backbone, str) else backbone.name
    suffix = "" if modality == "rgb" else "_" + modality.replace("+", "_")
    model = keras.Model(inputs, outputs, name=name or f"{variant}_{backbone_name}{suffix}")
    # Same layers and weights; only the training pass changes (kfcn.batch_norm).
    fuse_batch_norm(model)
    use_matmul_gradients(model)
    if init_from is not None:
        _initialise_from(init_from, model, modality)
    return model


def _load_source(init_from, what: str = "init_from") -> keras.Model:
    if isinstance(init_from, (str, os.PathLike)):
        if not os.path.isfile(init_from):
            raise ValueError(f"`{what}` file does not exist. Received: {what}={init_from!r}")
        return load_model(init_from, compile=False)
    if not isinstance(init_from, keras.Model):
        raise ValueError(
            f"`{what}` must be a keras.Model or a .keras path. Received: {what}={init_from!r}"
        )
    return init_from


def _initialise_from(init_from, model: keras.Model, modality: str) -> None:
    if not isinstance(init_from, dict):
        surgery.copy_matching_layers(_load_source(init_from), model, what="init_from")
        return
    targets = {layer.name: layer for layer in model.layers if layer.weights}
    for stream, source in init_from.items():
        source = _load_source(source, f"init_from[{stream!r}]")
        copied = []
        for layer in source.layers:
            target = targets.get(f"{stream}_{layer.name}")
            if target is None or not layer.weights:
                continue
            values = layer.get_weights()
            expected = [tuple(w.shape) for w in target.weights]
            if [v.shape for v in values] != expected:
                raise ValueError(
                    f"`init_from[{stream!r}]`: layer {layer.name!r} has weight shapes "
                    f"{[v.shape for v in values]}, but {target.name!r} here has {expected}."
                )
            target.set_weights(values)
            copied.append(target.name)
        logger.info("Copied %d layers from %s: %s", len(copied), source.name, copied)


def build_fcn32s(**kwargs) -> keras.Model:
    """FCN-32s: `build_fcn(variant="fcn32s", ...)`; see `build_fcn`."""
    return build_fcn("fcn32s", **kwargs)


def build_fcn16s(**kwargs) -> keras.Model:
    """FCN-16s: `build_fcn(variant="fcn16s", ...)`; see `build_fcn`."""
    return build_fcn("fcn16s", **kwargs)


def build_fcn8s(**kwargs) -> keras.Model:
    """FCN-8s: `build_fcn(variant="fcn8s", ...)`; see `build_fcn`."""
    return build_fcn("fcn8s", **kwargs)


def build_fcn4s(**kwargs) -> keras.Model:
    """FCN-4s, FCN-8s with a pool2 skip: `build_fcn(variant="fcn4s", ...)`; see `build_fcn`."""
    return build_fcn("fcn4s", **kwargs)


def load_model(
    path: str | os.PathLike, compile: bool = True, safe_mode: bool = True
) -> keras.Model:
    """Loads a `.keras` file saved from a kfcn model.

    `keras.saving.load_model` with kfcn's registered layers, losses and metrics
    available (a model compiled for training carries its loss and metrics).
    `model.class_info` is the class names and palette the file carries
    (`kfcn.metadata.read_class_info`, None if it carries none), as for
    `kfcn.from_preset`.

    Raises:
        ValueError: If `path` does not exist.
    """
    import kfcn.losses  # noqa: F401 - registers SegmentationCrossEntropy
    import kfcn.metrics  # noqa: F401 - registers ConfusionMatrixMetric

    if not os.path.exists(path):
        raise ValueError(f"`path` does not exist. Received: path={str(path)!r}")
    from kfcn.metadata import read_class_info

    model = keras.saving.load_model(path, compile=compile, safe_mode=safe_mode)
    model.class_info = read_class_info(path)
    return model
