"""FusedBatchNormalization against the batch-norm formulas and Keras's own layer."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import kfcn
from kfcn.batch_norm import FusedBatchNormalization, fuse_batch_norm

EPSILON = 1e-3
MOMENTUM = 0.9


def _pair(shape, **kwargs):
    """A Keras BatchNormalization and a fused one with the same random weights."""
    rng = np.random.default_rng(1)
    layers = (
        keras.layers.BatchNormalization(momentum=MOMENTUM, epsilon=EPSILON, **kwargs),
        FusedBatchNormalization(momentum=MOMENTUM, epsilon=EPSILON, **kwargs),
    )
    weights = None
    for layer in layers:
        layer.build(shape)
        if weights is None:
            weights = [rng.normal(1, 0.5, w.shape).astype("float32") for w in layer.weights]
            weights[-1] = np.abs(weights[-1])  # moving variance
        layer.set_weights(weights)
    return layers


def _graph_ops(layer, x, training):
    fn = tf.function(lambda t: layer(t, training=training))
    return {op.type for op in fn.get_concrete_function(x).graph.get_operations()}


def test_training_pass_matches_the_formulas():
    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 3.0, (4, 9, 7, 5)).astype("float32")
    _, fused = _pair(x.shape)
    gamma, beta, moving_mean, moving_var = (w.copy() for w in fused.get_weights())
    y = fused(x, training=True).numpy()

    mean = x.mean(axis=(0, 1, 2))
    var = x.var(axis=(0, 1, 2))  # biased, as Ioffe & Szegedy normalise with
    expected = gamma * (x - mean) / np.sqrt(var + EPSILON) + beta
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        fused.moving_mean.numpy(), MOMENTUM * moving_mean + (1 - MOMENTUM) * mean, rtol=1e-5
    )
    np.testing.assert_allclose(
        fused.moving_variance.numpy(), MOMENTUM * moving_var + (1 - MOMENTUM) * var, rtol=1e-5
    )


def test_training_gradients_and_statistics_equal_keras():
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(2.0, 3.0, (3, 6, 8, 4)).astype("float32"))
    upstream = tf.constant(rng.normal(size=x.shape).astype("float32"))
    results = []
    for layer in _pair(x.shape):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(layer(x, training=True) * upstream)
        grads = tape.gradient(loss, [x, layer.gamma, layer.beta])
        results.append(
            [g.numpy() for g in grads] + [w.numpy() for w in layer.non_trainable_weights]
        )
    for keras_value, fused_value in zip(*results):
        np.testing.assert_allclose(fused_value, keras_value, rtol=1e-4, atol=1e-4)


def test_training_runs_the_fused_kernel_and_inference_does_not():
    x = tf.zeros((2, 4, 4, 3))
    _, fused = _pair(x.shape)
    assert "FusedBatchNormV3" in _graph_ops(fused, x, training=True)
    assert "FusedBatchNormV3" not in _graph_ops(fused, x, training=False)


def test_synchronized_layer_is_fused_on_one_replica():
    x = tf.zeros((2, 4, 4, 3))
    keras_layer, fused = _pair(x.shape, synchronized=True)
    assert "FusedBatchNormV3" in _graph_ops(fused, x, training=True)
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    images = np.random.default_rng(6).normal(size=x.shape).astype("float32")
    outputs = [
        strategy.run(tf.function(lambda t, layer=layer: layer(t, training=True)), (images,))
        for layer in (keras_layer, fused)
    ]
    np.testing.assert_allclose(outputs[1].numpy(), outputs[0].numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        fused.moving_variance.numpy(), keras_layer.moving_variance.numpy(), rtol=1e-5
    )


@pytest.mark.parametrize(
    "shape, kwargs",
    [
        ((2, 5, 3), {}),  # 3-D input
        ((2, 4, 4, 3), {"axis": 1}),  # not the channels-last axis
        ((2, 4, 4, 3), {"epsilon_small": True}),  # below the kernel's 1.001e-5
        ((2, 4, 4, 3), {"center": False, "scale": False}),
    ],
)
def test_other_layouts_equal_keras(shape, kwargs):
    kwargs = dict(kwargs)
    small = kwargs.pop("epsilon_small", False)
    rng = np.random.default_rng(2)
    x = rng.normal(size=shape).astype("float32")
    layers = _pair(shape, **kwargs)
    if small:
        for layer in layers:
            layer.epsilon = 1e-6
    for training in (True, False):
        outputs = [layer(x, training=training).numpy() for layer in layers]
        np.testing.assert_allclose(outputs[1], outputs[0], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        layers[1].moving_variance.numpy(), layers[0].moving_variance.numpy(), rtol=1e-5
    )


def test_bfloat16_training_pass_is_close_to_float32():
    rng = np.random.default_rng(3)
    x = rng.normal(1.0, 2.0, (2, 8, 8, 6)).astype("float32")
    reference, _ = _pair(x.shape)
    fused = FusedBatchNormalization(
        momentum=MOMENTUM, epsilon=EPSILON, dtype=keras.DTypePolicy("mixed_bfloat16")
    )
    fused.build(x.shape)
    fused.set_weights(reference.get_weights())
    y = fused(tf.cast(x, "bfloat16"), training=True)
    assert y.dtype == tf.bfloat16
    assert fused.moving_mean.dtype == "float32"
    expected = reference(x, training=True).numpy()
    np.testing.assert_allclose(tf.cast(y, "float32").numpy(), expected, atol=0.05, rtol=0.02)


def test_builders_fuse_every_batch_norm_and_save_round_trip(tmp_path):
    model = kfcn.build_fcn8s(backbone="mobilenetv2", num_classes=3, input_shape=(64, 64, 3))
    norms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(norms) == 52  # MobileNetV2's
    assert all(type(layer) is FusedBatchNormalization for layer in norms)
    assert fuse_batch_norm(model) == 0  # nothing left to switch
    assert fuse_batch_norm(model, fused=False) == 52
    assert all(type(layer) is keras.layers.BatchNormalization for layer in norms)
    assert fuse_batch_norm(model) == 52

    x = np.random.default_rng(4).uniform(0, 255, (2, 64, 64, 3)).astype("float32")
    model(x, training=True)  # moves the moving averages off their initial values
    path = os.path.join(tmp_path, "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded.get_layer(norms[0].name)) is FusedBatchNormalization
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5, atol=1e-5
    )


def test_fuse_batch_norm_keeps_names_weights_and_results():
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    model = keras.Model(inputs, x)
    images = np.random.default_rng(5).normal(size=(2, 8, 8, 3)).astype("float32")
    before = [w.copy() for w in model.get_weights()]
    train_before = model(images, training=True).numpy()
    for w, v in zip(model.weights, before):
        w.assign(v)  # undo the moving-average update
    assert fuse_batch_norm(model) == 1
    assert type(model.get_layer("bn")) is FusedBatchNormalization
    for w, v in zip(model.get_weights(), before):
        np.testing.assert_array_equal(w, v)
    np.testing.assert_allclose(model(images, training=True).numpy(), train_before, atol=1e-4)
