"""The FCNs of mmsegmentation's model zoo: a dilated ResNet, FCNHead, bilinear resize.

mmsegmentation `configs/fcn` (`configs/_base_/models/fcn_r50-d8.py`): a ResNet
whose last stages keep stride 8 (D8) or 16 (D16) by dilation (Yu and Koltun,
2016; the FCN paper's "filter rarefaction", section 3.2), an `FCNHead` on its
last stage, the logits resized bilinearly to the input (half-pixel centres, as
`align_corners=False`), and during training an auxiliary `FCNHead` on the stage
before the last (loss weight 0.4). FCN-D6 is the D16 network with the head's
convolutions dilated by 6. The network::

    images -> preprocess -> trunk (layer1 .. layer4, dilated)
    layer4 -> decode_head (convs_0, convs_1, conv_cat, dropout, conv_seg) -> logits
    layer3 -> auxiliary_head (convs_0, dropout, conv_seg) -> aux_logits  (aux_head=True)

Both outputs are resized to the input's height and width, any size, odd ones
included (`kfcn.layers.ResizeLike`).
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Mapping

import keras

from kfcn import backbones, fcn, geometry
from kfcn.batch_norm import fuse_batch_norm
from kfcn.conv_gradients import use_matmul_gradients
from kfcn.heads import fcn_head
from kfcn.layers import Preprocess, ResizeLike

logger = logging.getLogger(__name__)

OUTPUT_STRIDES = (8, 16, 32)
#: The output keys of a model with an auxiliary head (PLAN.md's model contract).
LOGITS_KEY = "logits"
AUX_PREFIX = "aux_"


def _check_int(value, name: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}. Received: {name}={value!r}")


def _check_arguments(backbone, num_classes, output_stride, input_shape, weights, ints) -> tuple:
    _check_int(num_classes, "num_classes", 1)
    for name, (value, minimum) in ints.items():
        _check_int(value, name, minimum)
    if output_stride not in OUTPUT_STRIDES:
        raise ValueError(
            f"`output_stride` must be one of {OUTPUT_STRIDES}. "
            f"Received: output_stride={output_stride!r}"
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
    if not isinstance(backbone, (str, keras.Model)):
        raise ValueError(
            f"`backbone` must be a name or a keras.Model. Received: backbone={backbone!r}"
        )
    if isinstance(backbone, keras.Model) and weights is not None:
        raise ValueError(
            "`weights` applies to named backbones; load weights into your keras.Model before "
            f"passing it. Received: weights={weights!r}"
        )
    if weights is not None and not isinstance(weights, (str, os.PathLike)):
        raise ValueError(
            "`weights` must be None, 'imagenet' or the path of a weights file. "
            f"Received: weights={weights!r}"
        )
    return shape


def _tap_names(model: keras.Model, names: Mapping[int, str] | None) -> dict[int, str]:
    """Layer names of the stride-16 and stride-32 taps of an undilated trunk."""
    if names is not None:
        return {16: names[16], 32: names[32]}
    found = geometry.find_taps(model, (16, 32))
    if set(found) != {16, 32}:
        raise ValueError(
            f"`backbone` has no feature maps at strides 16 and 32 (found {sorted(found)}). "
            f"Received: backbone={model.name!r}"
        )
    return {s: layer.name for s, (layer, _, _) in found.items()}


def _dilated_trunk(backbone, output_stride: int, weights, sync_batchnorm: bool):
    """Returns (trunk at `output_stride`, preprocessing mode, {16: name, 32: name}).

    kfcn's own ResNets dilate themselves (`output_stride=`, mmseg's
    `contract_dilation`); any other backbone (Keras Applications' ResNets, a
    given model) is built at stride 32 and dilated by `kfcn.dilate`, which
    keeps its layer names and weights.
    """
    if isinstance(backbone, keras.Model):
        trunk, preprocessing, names = backbone, "none", _tap_names(backbone, None)
    else:
        spec = backbones.get_spec(backbone)
        constructor = backbones.constructor_of(spec)
        if "output_stride" in inspect.signature(constructor).parameters:
            trunk = constructor(
                include_top=False,
                weights=weights,
                input_shape=(None, None, 3),
                output_stride=output_stride,
                sync_batchnorm=sync_batchnorm,
            )
            return trunk, spec.preprocessing, _tap_names(trunk, spec.taps)
        # Keras Applications: the classifier's weights are transplanted as for the skip FCNs.
        trunk, _, _, _ = fcn._trunk(backbone, weights)  # noqa: SLF001 - one transplant path
        preprocessing, names = spec.preprocessing, _tap_names(trunk, spec.taps)
    if output_stride < 32:
        from kfcn.dilation import dilate

        trunk = dilate(trunk, output_stride)
    return trunk, preprocessing, names


def _tap(trunk: keras.Model, name: str, stride: int, records) -> keras.KerasTensor:
    """The output of layer `name`, checked to sit at `stride`."""
    for layer, tensor, where in records:
        if layer.name == name:
            if not isinstance(where, geometry.Geometry) or where.stride != (stride, stride):
                raise ValueError(
                    f"`backbone` {trunk.name!r}: tap {name!r} should have stride {stride} "
                    f"after dilation, but its geometry is {where}."
                )
            return tensor
    raise ValueError(f"`backbone` {trunk.name!r} has no layer {name!r} to tap.")


def build_dilated_fcn(
    backbone: str | keras.Model = "resnet50_v1c",
    num_classes: int = 19,
    output_stride: int = 8,
    head_channels: int = 512,
    num_convs: int = 2,
    concat_input: bool = True,
    head_dilation: int = 1,
    dropout: float = 0.1,
    aux_head: bool = False,
    aux_channels: int = 256,
    weights: str | os.PathLike | None = None,
    input_shape: tuple = (None, None, 3),
    sync_batchnorm: bool = True,
    name: str | None = None,
) -> keras.Model:
    """Builds an FCN of mmsegmentation's model zoo (FCN R-50-D8, FCN-D6 R-50-D16, ...).

    mmseg's `EncoderDecoder` with a dilated `ResNetV1c` backbone, an `FCNHead`
    decode head and an optional auxiliary `FCNHead` (`configs/_base_/models/
    fcn_r50-d8.py`); torchvision's `fcn_resnet50` is the same network with a
    V1b backbone, `num_convs=1`, `concat_input=False` and `aux_channels=256`.

    The model zoo's rows:

    - FCN R-50-D8: `build_dilated_fcn("resnet50_v1c", aux_head=True)`;
      R-101-D8 with "resnet101_v1c"; the "b" rows with "resnet50_v1b" etc.
    - FCN R-18-D8: `build_dilated_fcn("resnet18_v1c", head_channels=128,
      aux_channels=64, aux_head=True)`.
    - FCN-D6 R-50-D16: `build_dilated_fcn("resnet50_v1c", output_stride=16,
      head_dilation=6, aux_head=True)`.

    Args:
        backbone: A name from `kfcn.backbones.BACKBONES`: kfcn's own ResNets
            ("resnet18_v1c", "resnet50_v1c", "resnet101_v1c", the "_v1b" rows,
            34 and 152), which dilate themselves as mmseg's, or a Keras
            Applications ResNet ("resnet50", "resnet101", "resnet152",
            "resnet50v2", ...), dilated by `kfcn.dilate`. Or a `keras.Model`
            at stride 32 taking images it normalises itself (0..255 RGB in),
            whose stride-16 and -32 maps are found by graph position.
        num_classes: Number of classes (19 for Cityscapes), >= 1.
        output_stride: 8 (D8), 16 (D16) or 32 (no dilation).
        head_channels: Width of the decode head (mmseg's `channels`).
        num_convs: The decode head's 3x3 conv-BN-ReLU modules.
        concat_input: Fuse the head's input with its convs' output (`conv_cat`).
        head_dilation: Dilation of the decode head's convs (6 for FCN-D6).
        dropout: Channel dropout before each classifier, in [0, 1).
        aux_head: Add the auxiliary head (training only; see `inference_model`).
        aux_channels: Width of the auxiliary head's one conv.
        weights: For a named backbone: None (random), or what its constructor
            takes (kfcn's ResNets: a Keras weights file or a torchvision/mmseg
            state dict as .npz; Keras Applications: "imagenet" or a classifier
            weights file, transplanted as `kfcn.build_fcn` does).
        input_shape: `(height, width, 3)`; height and width may be None.
        sync_batchnorm: Every BatchNormalization, trunk included, synchronises
            its batch statistics across replicas (`synchronized=True`, mmseg's
            SyncBN); no effect on one device.
        name: Model name; default `fcn_{backbone}_d{output_stride}`.

    Returns:
        A `keras.Model` taking RGB images with values 0..255 of any height and
        width and returning float32 logits `(batch, height, width, num_classes)`
        at the input's size; with `aux_head=True` a dict `{"logits": ...,
        "aux_logits": ...}`, both at the input's size.

    Raises:
        ValueError: If an argument is invalid; the message names it.

    Example:
        >>> model = kfcn.build_dilated_fcn("resnet50_v1c", num_classes=19, aux_head=True)
        >>> model.count_params()  # doctest: +SKIP
    """
    shape = _check_arguments(
        backbone,
        num_classes,
        output_stride,
        input_shape,
        weights,
        {
            "head_channels": (head_channels, 1),
            "num_convs": (num_convs, 0),
            "head_dilation": (head_dilation, 1),
            "aux_channels": (aux_channels, 1),
        },
    )
    trunk, preprocessing, names = _dilated_trunk(backbone, output_stride, weights, sync_batchnorm)
    records = geometry.trace(trunk)
    last = _tap(trunk, names[32], output_stride, records)
    before_last = _tap(trunk, names[16], min(16, output_stride), records)

    images = keras.Input(shape=shape, name="images")
    x = Preprocess(preprocessing, name="preprocess")(images)
    # Inline the trunk so its layers are the model's own (found by get_layer), as kfcn.fcn does.
    taps = keras.Model(trunk.inputs[0], [last, before_last], name="taps")
    last, before_last = taps.call(x)

    logits = fcn_head(
        last,
        num_classes,
        channels=head_channels,
        num_convs=num_convs,
        concat_input=concat_input,
        dilation=head_dilation,
        dropout=dropout,
        name="decode_head",
        sync_batchnorm=sync_batchnorm,
    )
    outputs = ResizeLike(dtype="float32", name=LOGITS_KEY)([logits, images])
    if aux_head:
        aux = fcn_head(
            before_last,
            num_classes,
            channels=aux_channels,
            num_convs=1,
            concat_input=False,
            dropout=dropout,
            name="auxiliary_head",
            sync_batchnorm=sync_batchnorm,
        )
        aux = ResizeLike(dtype="float32", name=AUX_PREFIX + LOGITS_KEY)([aux, images])
        outputs = {LOGITS_KEY: outputs, AUX_PREFIX + LOGITS_KEY: aux}

    backbone_name = backbone if isinstance(backbone, str) else backbone.name
    model = keras.Model(images, outputs, name=name or f"fcn_{backbone_name}_d{output_stride}")
    # Keras Applications' constructors take no norm argument: switch their
    # BatchNormalization layers here (the flag is read when the layer is called,
    # and saved in its config).
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.synchronized = sync_batchnorm
    # Same layers and weights; only the training pass changes (kfcn.batch_norm;
    # synchronized layers keep Keras's cross-replica moments; kfcn.conv_gradients).
    fuse_batch_norm(model)
    use_matmul_gradients(model)
    return model


def inference_model(model: keras.Model) -> keras.Model:
    """The model without its auxiliary outputs, for prediction and export.

    Drops every output whose key starts with "aux_" (the auxiliary heads, which
    only serve training); when only "logits" is left, the returned model's
    output is that tensor (the skip FCNs' contract, which every export path
    takes). The layers and weights are shared, not copied. A model with nothing
    to drop (a tensor output, or dict outputs without "aux_" keys) is returned
    as it is, so calling this twice is the same as once.

    Args:
        model: A Keras model whose output is a tensor or a dict of tensors
            (functional, when it has outputs to drop).

    Returns:
        `model` itself, or a functional `keras.Model` with the same input and
        name and the kept outputs.

    Raises:
        ValueError: If `model` is not a keras.Model, has only auxiliary outputs,
            or is not functional and has outputs to drop.

    Example:
        >>> train = kfcn.build_dilated_fcn("resnet18_v1c", aux_head=True)
        >>> kfcn.inference_model(train).output.shape[-1]
        19
    """
    if not isinstance(model, keras.Model):
        raise ValueError(f"`model` must be a keras.Model. Received: model={model!r}")
    try:
        outputs = model.output
    except (AttributeError, ValueError):  # a subclassed model never called symbolically
        return model
    if not isinstance(outputs, Mapping) or not any(k.startswith(AUX_PREFIX) for k in outputs):
        return model
    kept = {k: v for k, v in outputs.items() if not k.startswith(AUX_PREFIX)}
    if not kept:
        raise ValueError(
            f"`model` has only auxiliary outputs {sorted(outputs)}: nothing is left for "
            f"inference. Received: model={model.name!r}"
        )
    if set(kept) == {LOGITS_KEY}:
        kept = kept[LOGITS_KEY]
    return keras.Model(model.input, kept, name=model.name)
