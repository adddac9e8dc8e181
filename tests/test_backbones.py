"""The backbone table: ImageNet input scale, tap channels, offline weights."""

import socket
import urllib.error

import keras
import numpy as np
import pytest
from keras.src.backend import config
from keras.src.utils import file_utils

import kfcn
from kfcn import backbones, geometry

# Families whose Keras application (3.15) builds its input scaling into the
# graph: EfficientNet B0-B7 by `weights == "imagenet"` (a second Rescaling),
# EfficientNetV2, ConvNeXt and MobileNetV3 by `include_preprocessing`; the other
# applications check `weights` only to validate arguments and download. The
# smallest member of each, with two layers of stable name: the first
# convolution and a deep one.
IMAGENET_GRAPH_FAMILIES = {
    "efficientnetb0": ("stem_conv", "block6a_expand_activation"),
    "efficientnetv2b0": ("stem_conv", "block6a_expand_activation"),
    "convnexttiny": ("convnext_tiny_stem", "convnext_tiny_stage_2_block_0_depthwise_conv"),
    "mobilenetv3small": ("conv", "expanded_conv_7_project_bn"),
}


# Channels of the stride 8 / 16 / 32 taps, from the architectures' definitions
# (not from kfcn): the full-width features each stage leaves at that stride.
TAP_CHANNELS = {
    "vgg16": (256, 512, 512),  # conv3_x, conv4_x, conv5_x
    "resnet50": (512, 1024, 2048),  # bottleneck outputs 4 x (128, 256, 512)
    # V2 strides in a stack's last block: 4 x 128 and 4 x 256 enter it, not the
    # 1x1 bottleneck's 128 and 256.
    "resnet50v2": (512, 1024, 2048),
    "mobilenet": (256, 512, 1024),  # pointwise 5, 11, 13
    "mobilenetv2": (32 * 6, 96 * 6, 1280),  # expansions of blocks 6 and 13 (t=6), last conv
    "mobilenetv3small": (24 * 4, 48 * 6, 96 * 6),  # expansions of blocks 3, 8; last conv 6x96
    "mobilenetv3large": (40 * 6, 112 * 6, 160 * 6),  # expansions of blocks 6, 12; last conv
    "efficientnetb0": (40 * 6, 112 * 6, 1280),  # expansions of block4a, block6a (t=6); top
    "efficientnetv2b0": (48 * 4, 112 * 6, 1280),  # block4a (t=4) and block6a (t=6); top
    "convnexttiny": (192, 384, 768),  # projection dims of stages 1, 2, 3
    # Dense blocks 2, 3, 4: 128 + 12 x 32, 256 + 24 x 32, 512 + 16 x 32 (before
    # the transitions halve them).
    "densenet121": (512, 1024, 1024),
    "xception": (728, 1024, 2048),  # entry flow block 4, exit flow blocks 13, 14
}


# Channels of the stride-4 tap (FCN-4s's pool2), from the same definitions.
FINE_TAP_CHANNELS = {
    "vgg16": 128,  # conv2_x
    "resnet50": 256,  # conv2_x bottleneck outputs 3 x (64, 64, 256)
    "resnet50v2": 256,  # what enters conv2's last (striding) block
    "mobilenet": 128,  # pointwise 3
    "mobilenetv2": 24 * 6,  # expansion of block 3 (t=6), which strides next
    "mobilenetv3small": 72,  # expansion of block 1 (16 -> 24, expanded to 72)
    "mobilenetv3large": 24 * 3,  # expansion of block 3 (24 -> 40, t=3)
    "efficientnetb0": 24 * 6,  # expansion of block3a (t=6)
    "efficientnetv2b0": 32,  # stage 2's output: fused block3a strides in its expansion
    "convnexttiny": 96,  # projection dim of stage 0
    "densenet121": 64 + 6 * 32,  # dense block 1, before transition 1 halves it
    "xception": 256,  # entry flow block 3
}


@pytest.mark.parametrize("name", sorted(TAP_CHANNELS))
def test_taps_are_full_width_stage_features(name):
    spec = backbones.get_spec(name)
    strides = (backbones.FINE_STRIDE, *backbones.STRIDES)
    taps = backbones.resolve_taps(backbones.build_trunk(spec), spec.taps, strides)
    channels = tuple(int(taps[stride][0].shape[-1]) for stride in backbones.STRIDES)
    assert channels == TAP_CHANNELS[name]
    assert int(taps[backbones.FINE_STRIDE][0].shape[-1]) == FINE_TAP_CHANNELS[name]


def _randomise(model, seed=0):
    """Non-trivial weights everywhere: kernels and biases, BN statistics, input normalisation."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.Normalization) and layer.weights:
            # Adaptable normalisation (EfficientNet): ImageNet-like statistics.
            mean, variance, count = layer.get_weights()
            mean = rng.uniform(100, 130, mean.shape).astype("float32") / 255
            variance = rng.uniform(0.04, 0.06, variance.shape).astype("float32")
            layer.set_weights([mean, variance, count])
            layer.finalize_state()
        elif isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, moving_mean, moving_variance = layer.get_weights()
            layer.set_weights([
                rng.uniform(0.5, 1.5, gamma.shape), rng.normal(0, 0.1, beta.shape),
                rng.normal(0, 0.1, moving_mean.shape), rng.uniform(0.5, 1.5, moving_variance.shape),
            ])  # fmt: skip


def _serve(monkeypatch, path):
    """Keras Applications' download returns `path` instead of fetching."""
    monkeypatch.setattr(file_utils, "get_file", lambda *args, **kwargs: str(path))


@pytest.mark.parametrize("name", sorted(IMAGENET_GRAPH_FAMILIES))
def test_imagenet_trunk_computes_what_the_imagenet_classifier_computes(name, tmp_path, monkeypatch):
    spec = backbones.get_spec(name)
    constructor = getattr(keras.applications, spec.constructor)
    source = constructor(weights=None)
    _randomise(source)
    path = tmp_path / f"{name}.weights.h5"
    source.save_weights(path)
    _serve(monkeypatch, path)
    classifier = constructor(weights="imagenet")  # Keras' own graph for ImageNet weights
    model = kfcn.build_fcn32s(backbone=name, num_classes=2, weights="imagenet")

    _assert_same_activations(model, classifier, IMAGENET_GRAPH_FAMILIES[name])


def _assert_same_activations(model, classifier, layers):
    # The trunk's layers were built in their own graph first: take the FCN's tensors.
    tensors = {layer.name: tensor for layer, tensor, _ in geometry.trace(model)}
    images = np.random.default_rng(1).uniform(0, 255, (1, 224, 224, 3)).astype("float32")
    for layer in layers:
        expected = keras.Model(classifier.input, classifier.get_layer(layer).output)(images)
        # The FCN's trunk from its preprocessed input (no padding: 224 = 7 * 32).
        trunk = keras.Model(model.get_layer("preprocess").output, tensors[layer])
        got = trunk(images)
        scale = float(np.abs(expected).max())
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4 * scale, err_msg=layer)


def test_efficientnet_weights_file_is_used_as_keras_uses_it(tmp_path):
    """A weights file gets Keras' graph for a file: one input rescaling, not the ImageNet two."""
    source = keras.applications.EfficientNetB0(weights=None)
    _randomise(source)
    path = tmp_path / "efficientnetb0.weights.h5"
    source.save_weights(path)
    classifier = keras.applications.EfficientNetB0(weights=str(path))
    model = kfcn.build_fcn32s(backbone="efficientnetb0", num_classes=2, weights=str(path))
    _assert_same_activations(model, classifier, ("stem_conv",))


def _offline(url, *args, **kwargs):
    raise urllib.error.URLError(socket.gaierror(-3, "Temporary failure in name resolution"))


def test_imagenet_weights_offline_raise_one_clear_error(tmp_path, monkeypatch):
    # Keras' real `get_file`, with an empty cache and no network under it.
    monkeypatch.setattr(config, "_KERAS_DIR", str(tmp_path))
    monkeypatch.setattr(file_utils, "urlretrieve", _offline)
    with pytest.raises(backbones.WeightsUnavailableError) as caught:
        kfcn.build_fcn8s(backbone="mobilenetv2", weights="imagenet")
    message = str(caught.value)
    assert isinstance(caught.value, OSError) and "\n" not in message
    assert message.startswith("`weights='imagenet'`: the ImageNet weights of MobileNetV2 could")
    assert "could not be downloaded (URL fetch failure on https://" in message
    assert "Temporary failure in name resolution" in message
    assert "Pass weights=None" in message and "local Keras Applications classifier" in message
