"""Tests of kfcn.conv_gradients: nine-matmul filter gradients of 3x3 convolutions."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from kfcn.conv_gradients import MIN_CHANNELS, MatmulGradientConv2D, conv3x3, use_matmul_gradients


def _tf_gradients(x, kernel, upstream):
    # Independent: TensorFlow's own convolution and its registered gradients.
    with tf.GradientTape() as tape:
        tape.watch([x, kernel])
        y = tf.nn.conv2d(x, kernel, 1, "SAME")
    return y, tape.gradient(y, [x, kernel], output_gradients=upstream)


@pytest.mark.parametrize("shape", [(2, 5, 7, 3, 4), (1, 8, 3, 6, 2), (3, 1, 1, 2, 5)])
def test_gradients_equal_tensorflows_convolution_gradients(shape):
    batch, height, width, channels, filters = shape
    rng = np.random.default_rng(sum(shape))
    x = tf.constant(rng.normal(size=(batch, height, width, channels)), tf.float32)
    kernel = tf.constant(rng.normal(size=(3, 3, channels, filters)), tf.float32)
    upstream = tf.constant(rng.normal(size=(batch, height, width, filters)), tf.float32)
    with tf.GradientTape() as tape:
        tape.watch([x, kernel])
        y = conv3x3(x, kernel)
    dx, dkernel = tape.gradient(y, [x, kernel], output_gradients=upstream)
    y_ref, (dx_ref, dkernel_ref) = _tf_gradients(x, kernel, upstream)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dkernel, dkernel_ref, rtol=1e-4, atol=1e-4)


def test_filter_gradient_against_the_sum_in_numpy():
    """dW[i, j] = sum over b, y, x of X[b, y+i-1, x+j-1]^T dY[b, y, x], zero outside."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 4, 6, 3)).astype(np.float32)
    dy = rng.normal(size=(2, 4, 6, 2)).astype(np.float32)
    padded = np.pad(x, [(0, 0), (1, 1), (1, 1), (0, 0)])
    expected = np.zeros((3, 3, 3, 2), np.float32)
    for i in range(3):
        for j in range(3):
            window = padded[:, i : i + 4, j : j + 6]
            expected[i, j] = np.einsum("byxc,byxf->cf", window, dy)
    kernel = tf.Variable(rng.normal(size=(3, 3, 3, 2)).astype(np.float32))
    with tf.GradientTape() as tape:
        y = conv3x3(tf.constant(x), kernel)
    np.testing.assert_allclose(tape.gradient(y, kernel, output_gradients=dy), expected, 1e-4, 1e-4)


def test_kernel_shape_is_checked():
    with pytest.raises(ValueError, match=r"`kernel` must be a \[3, 3, channels, filters\].*\(1, 1"):
        conv3x3(tf.zeros((1, 4, 4, 2)), tf.zeros((1, 1, 2, 2)))


def _model():
    images = keras.Input((None, None, MIN_CHANNELS))
    x = keras.layers.Conv2D(8, 3, padding="same", name="qualifies")(images)  # 128 channels in
    narrow = keras.layers.Conv2D(4, 3, padding="same", name="narrow")(x)  # 8 channels in
    wide = keras.layers.Conv2D(MIN_CHANNELS, 1, name="pointwise")(x)
    y = keras.layers.Conv2D(4, 3, padding="same", name="wide")(wide)  # 128 channels in
    strided = keras.layers.Conv2D(4, 3, strides=2, padding="same", name="strided")(wide)
    dilated = keras.layers.Conv2D(4, 3, dilation_rate=2, padding="same", name="dilated")(wide)
    valid = keras.layers.Conv2D(4, 3, name="valid")(wide)
    inner = keras.Model(images, keras.layers.Conv2D(2, 3, padding="same", name="inner")(images))
    return keras.Model(images, [y, narrow, strided, dilated, valid, inner(images)])


def test_switch_takes_only_qualifying_layers_and_keeps_results():
    model = _model()
    reference = keras.models.clone_model(model)
    reference.set_weights(model.get_weights())
    assert use_matmul_gradients(model) == 3
    switched = {
        layer.name
        for layer in model._flatten_layers(include_self=False, recursive=True)
        if isinstance(layer, MatmulGradientConv2D)
    }
    assert switched == {"qualifies", "wide", "inner"}
    assert model.get_layer("wide").get_config() == reference.get_layer("wide").get_config()
    images = tf.constant(np.random.default_rng(0).normal(size=(2, 6, 5, MIN_CHANNELS)), tf.float32)
    with tf.GradientTape(persistent=True) as tape:
        ours = tf.add_n([tf.reduce_sum(o * o) for o in model(images, training=True)])
        theirs = tf.add_n([tf.reduce_sum(o * o) for o in reference(images, training=True)])
    np.testing.assert_allclose(ours, theirs, rtol=1e-5)
    for a, b in zip(
        tape.gradient(ours, model.trainable_variables),
        tape.gradient(theirs, reference.trainable_variables),
    ):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)
    assert use_matmul_gradients(model, enabled=False) == 3
    assert not any(
        isinstance(layer, MatmulGradientConv2D)
        for layer in model._flatten_layers(include_self=False, recursive=True)
    )


def test_fcn8s_vgg16_switches_its_wide_3x3_layers_and_saves(tmp_path):
    import kfcn

    model = kfcn.build_fcn8s(backbone="vgg16", num_classes=3, weights=None, input_shape=(64, 64, 3))
    names = sorted(
        layer.name
        for layer in model._flatten_layers(include_self=False, recursive=True)
        if isinstance(layer, MatmulGradientConv2D)
    )
    # VGG16's 3x3 layers with 128 or more input channels: conv2_2 and blocks 3-5.
    assert names == sorted(
        ["block2_conv2"] + [f"block{b}_conv{c}" for b in (3, 4, 5) for c in (1, 2, 3)]
    )
    path = str(tmp_path / "fcn8s.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, compile=False)
    assert isinstance(loaded.get_layer("block3_conv2"), MatmulGradientConv2D)


def _gradient_op_types(model, training):
    @tf.function
    def grads(images):
        with tf.GradientTape() as tape:
            loss = tf.add_n([tf.reduce_sum(o) for o in model(images, training=training)])
        return tape.gradient(loss, model.trainable_variables)

    spec = tf.TensorSpec((1, 6, 6, MIN_CHANNELS))
    return [op.type for op in grads.get_concrete_function(spec).graph.get_operations()]


def test_training_calls_take_the_matmuls_and_inference_calls_do_not():
    """training=True: the 3 switched layers' filter gradients are matmuls; otherwise
    (inference, export traces) every layer is Keras's convolution with its gradients."""
    model = _model()
    use_matmul_gradients(model)
    training = _gradient_op_types(model, True)
    inference = _gradient_op_types(model, False)
    # 8 Conv2D layers; "narrow", "pointwise" (1x1), "strided", "dilated" and "valid" keep
    # oneDNN's filter gradient in training.
    assert training.count("Conv2DBackpropFilter") == 5
    assert inference.count("Conv2DBackpropFilter") == 8
    assert training.count("MatMul") == 3 * 9 and "MatMul" not in inference


def test_dilated_fcn_switches_its_undilated_wide_3x3_layers():
    """FCN R-18-D8: layer2's stride-1 3x3 layers (128 channels) and the FCNHead's
    3x3 convolutions switch; the dilated layer3/layer4 ones and the 64-channel
    layer1 and stem keep Keras's Conv2D."""
    import kfcn

    model = kfcn.build_dilated_fcn("resnet18_v1c", num_classes=3, weights=None)
    switched, kept = set(), set()
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, MatmulGradientConv2D):
            switched.add(layer)
        elif type(layer) is keras.layers.Conv2D and tuple(layer.kernel_size) == (3, 3):
            kept.add(layer)
    assert switched and kept
    assert all(tuple(layer.dilation_rate) == (1, 1) for layer in switched)
    assert all(layer.kernel.shape[2] >= MIN_CHANNELS for layer in switched)
    assert all(
        layer.kernel.shape[2] < MIN_CHANNELS
        or tuple(layer.strides) != (1, 1)
        or tuple(layer.dilation_rate) != (1, 1)
        for layer in kept
    )
    assert any(tuple(layer.dilation_rate) != (1, 1) for layer in kept)
