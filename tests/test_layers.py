"""kfcn's custom layers against plain TensorFlow/numpy computations."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from kfcn.layers import AlignCrop, FullyConnectedConv2D, PadToMultiple, Scale, pointwise_conv


@pytest.mark.parametrize("kernel", [(7, 7), (3, 2), (2, 4), (1, 1)])
@pytest.mark.parametrize("padding", ["same", "valid"])
@pytest.mark.parametrize("size", [(9, 11), (7, 7), (1, 1)])
def test_fully_connected_conv_equals_convolution(kernel, padding, size):
    if padding == "valid" and (size[0] < kernel[0] or size[1] < kernel[1]):
        pytest.skip("no valid output")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, *size, 5)).astype("float32")
    layer = FullyConnectedConv2D(6, kernel, padding=padding, activation="relu")
    layer.build(x.shape)
    w = rng.normal(size=(*kernel, 5, 6)).astype("float32")
    b = rng.normal(size=(6,)).astype("float32")
    layer.set_weights([w, b])
    expected = tf.nn.relu(tf.nn.conv2d(x, w, 1, padding.upper()) + b).numpy()
    np.testing.assert_allclose(layer(x).numpy(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kernel", [(7, 7), (3, 2), (1, 1)])
@pytest.mark.parametrize("padding", ["same", "valid"])
def test_fully_connected_conv_gradients_equal_convolution_gradients(kernel, padding):
    # The matmul backward pass against TensorFlow's own convolution gradients,
    # with an uneven upstream gradient so that every position and channel counts.
    rng = np.random.default_rng(1)
    x = tf.constant(rng.normal(size=(2, 9, 8, 5)).astype("float32"))
    w = rng.normal(size=(*kernel, 5, 6)).astype("float32")
    b = rng.normal(size=(6,)).astype("float32")
    layer = FullyConnectedConv2D(6, kernel, padding=padding)
    layer.build(x.shape)
    layer.set_weights([w, b])
    kernel_var = tf.Variable(w)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        got = layer(x, training=True)  # the matmul gradients are training's
        expected = tf.nn.conv2d(x, kernel_var, 1, padding.upper()) + b
    upstream = tf.constant(rng.normal(size=expected.shape).astype("float32"))
    got_dx, got_dw, got_db = tape.gradient(got, [x, layer.kernel, layer.bias], upstream)
    dx, dw = tape.gradient(expected, [x, kernel_var], upstream)
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got_dx.numpy(), dx.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got_dw.numpy(), dw.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got_db.numpy(), upstream.numpy().sum(axis=(0, 1, 2)), rtol=1e-4)


def test_pointwise_conv_gradients_in_a_function_with_unknown_map_size():
    rng = np.random.default_rng(2)
    w = tf.Variable(rng.normal(size=(1, 1, 4, 3)).astype("float32"))

    @tf.function(input_signature=[tf.TensorSpec((None, None, None, 4))])
    def grads(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(tf.square(pointwise_conv(x, w)))
        return tape.gradient(loss, [x, w])

    x = tf.constant(rng.normal(size=(3, 5, 2, 4)).astype("float32"))
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(tf.square(tf.nn.conv2d(x, w, 1, "VALID")))
    for got, expected in zip(grads(x), tape.gradient(loss, [x, w])):
        np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="kernel"):
        pointwise_conv(x, tf.zeros((3, 3, 4, 3)))


def test_fully_connected_conv_rejects_strides():
    with pytest.raises(ValueError, match="strides"):
        FullyConnectedConv2D(4, 3, strides=2)


def test_pad_to_multiple_pads_bottom_right_with_value():
    x = np.zeros((1, 33, 40, 3), np.float32)
    y = PadToMultiple(32, value=(1.0, 2.0, 3.0))(x).numpy()
    assert y.shape == (1, 64, 64, 3)
    assert not y[:, :33, :40].any()
    np.testing.assert_array_equal(y[0, 40, 50], [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(y[0, 10, 45], [1.0, 2.0, 3.0])
    same = np.ones((1, 64, 32, 3), np.float32)
    np.testing.assert_array_equal(PadToMultiple(32)(same).numpy(), same)


def test_align_crop_offsets():
    x = np.arange(10 * 12, dtype=np.float32).reshape(1, 10, 12, 1)
    ref = np.zeros((1, 4, 5, 3), np.float32)
    np.testing.assert_array_equal(AlignCrop((2, 3))([x, ref]).numpy(), x[:, 2:6, 3:8])
    # A negative offset pads zeros before cropping.
    got = AlignCrop((-1, 0))([x, ref]).numpy()
    assert not got[:, 0].any()
    np.testing.assert_array_equal(got[:, 1:], x[:, 0:3, 0:5])


def test_scale_and_serialization():
    layer = Scale(0.01, name="scale_pool4")
    np.testing.assert_allclose(layer(np.full((1, 2, 2, 1), 3.0, np.float32)), 0.03, rtol=1e-6)
    for layer in (Scale(0.5), AlignCrop((1, 2)), PadToMultiple(16), FullyConnectedConv2D(3, 7)):
        clone = keras.layers.deserialize(keras.layers.serialize(layer))
        assert type(clone) is type(layer) and clone.get_config() == layer.get_config()
