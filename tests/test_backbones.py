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

# Families whose Keras application builds its input scaling in the graph (a
# Rescaling/Normalization stem that depends on `weights == "imagenet"` or on
# `include_preprocessing`): the smallest member of each, and two layers with
# stable names, the first convolution and a deep one.
IMAGENET_GRAPH_FAMILIES = {
    "efficientnetb0": ("stem_conv", "block6a_expand_activation"),
    "efficientnetv2b0": ("stem_conv", "block6a_expand_activation"),
    "convnexttiny": ("convnext_tiny_stem", "convnext_tiny_stage_2_block_0_depthwise_conv"),
    "mobilenetv3small": ("conv", "expanded_conv_7_project_bn"),
}


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

    # The trunk's layers were built in their own graph first: take the FCN's tensors.
    tensors = {layer.name: tensor for layer, tensor, _ in geometry.trace(model)}
    images = np.random.default_rng(1).uniform(0, 255, (1, 224, 224, 3)).astype("float32")
    for layer in IMAGENET_GRAPH_FAMILIES[name]:
        expected = keras.Model(classifier.input, classifier.get_layer(layer).output)(images)
        # The FCN's trunk from its preprocessed input (no padding: 224 = 7 * 32).
        trunk = keras.Model(model.get_layer("preprocess").output, tensors[layer])
        got = trunk(images)
        scale = float(np.abs(expected).max())
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4 * scale, err_msg=layer)


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
