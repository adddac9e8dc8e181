"""3x3 convolutions whose filter gradient is nine matrix products.

The filter gradient of a stride-1 "same" 3x3 convolution is, for each of the
nine kernel taps (i, j), the product of the input shifted by (i, j) with the
output gradient over the map's positions:

    dW[i, j] = sum over (b, y, x) of  X[b, y + i - 1, x + j - 1]^T  dY[b, y, x]

With the input zero-padded to width W + 2 and flattened to rows of channels,
the shift by (i, j) is a contiguous block of rows starting at i (W + 2) + j
(a slice that shares the padded input's memory), so each tap is one
`tf.matmul(rows^T, dY)`: no im2col copy, and the output gradient padded to
the same grid contributes zeros where the shifted rows wrap around.

oneDNN's `Conv2DBackpropFilter` ran at 0.57-0.86 of the float32 matmul rate
for VGG16's 3x3 layers at 512x512 on the 2-core AMD EPYC (Zen 5) VM, the
nine products at 0.79-0.89 for the layers of 128 input channels or more
(`python -m bench.conv_gradients`); it is the largest part of FCN-8s VGG16's
training step. With 64 input channels or fewer the products are slower, so
those layers keep oneDNN's kernel. The forward pass and the input gradient
are TensorFlow's own (`tf.nn.conv2d`, `Conv2DBackpropInput`), and only calls
with `training=True` take this path, so inference and every export (a custom
gradient in a frozen graph cost TFLite files their signature) hold Keras's
own convolution.

`MatmulGradientConv2D` is `keras.layers.Conv2D` with that gradient;
`use_matmul_gradients` switches the qualifying Conv2D layers of a built model
to it in place (same weights, config and names), as `kfcn.build_fcn` and
`kfcn.build_dilated_fcn` do.
fc6 and fc7 have their own matmul gradients (`kfcn.layers.pointwise_conv`).

Simonyan and Zisserman, "Very Deep Convolutional Networks for Large-Scale
Image Recognition", ICLR 2015 (VGG16's 3x3 layers); Long, Shelhamer and
Darrell, "Fully Convolutional Networks for Semantic Segmentation", CVPR 2015.
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

from kfcn.layers import keras_training, static_kernel

# Below this many input channels oneDNN's filter gradient is as fast or faster.
MIN_CHANNELS = 128
_DTYPES = ("float32",)


@tf.custom_gradient
def _conv3x3(x: tf.Tensor, kernel: tf.Tensor):
    channels, filters = kernel.shape[2], kernel.shape[3]

    def grad(dy: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        dx = tf.raw_ops.Conv2DBackpropInput(
            input_sizes=tf.shape(x),
            filter=kernel,
            out_backprop=dy,
            strides=[1, 1, 1, 1],
            padding="SAME",
        )
        width = tf.shape(x)[2] + 2
        # Each image padded to H + 3 rows of W + 2 (one row more below than the
        # convolution's padding), the output gradient to the same grid with zeros:
        # the last tap's block of rows, shifted by 2 (W + 2) + 2, stays inside the
        # padded input, and the rows it leaves out at the end are all zeros in dY.
        rows = tf.reshape(tf.pad(x, [[0, 0], [1, 2], [1, 1], [0, 0]]), (-1, channels))
        dy_rows = tf.reshape(tf.pad(dy, [[0, 0], [0, 3], [0, 2], [0, 0]]), (-1, filters))
        count = tf.shape(dy_rows)[0] - (2 * width + 2)
        dy_rows = dy_rows[:count]
        taps = [
            tf.matmul(rows[i * width + j : i * width + j + count], dy_rows, transpose_a=True)
            for i in range(3)
            for j in range(3)
        ]
        return dx, tf.reshape(tf.stack(taps), (3, 3, channels, filters))

    return tf.nn.conv2d(x, kernel, strides=1, padding="SAME"), grad


def conv3x3(x: tf.Tensor, kernel: tf.Tensor) -> tf.Tensor:
    """A stride-1 "same" 3x3 convolution whose filter gradient is nine matmuls.

    Args:
        x: [batch, height, width, channels], channels_last.
        kernel: [3, 3, channels, filters] with static channels and filters.

    Returns:
        `tf.nn.conv2d(x, kernel, 1, "SAME")`, [batch, height, width, filters].
    """
    return _conv3x3(x, static_kernel(kernel, (3, 3), x))


def _qualifies(layer: keras.layers.Conv2D, channels: int | None) -> bool:
    return (
        tuple(layer.kernel_size) == (3, 3)
        and tuple(layer.strides) == (1, 1)
        and tuple(layer.dilation_rate) == (1, 1)
        and layer.groups == 1
        and layer.padding == "same"
        and layer.data_format == "channels_last"
        and channels is not None
        and channels >= MIN_CHANNELS
    )


@keras.saving.register_keras_serializable(package="kfcn")
class MatmulGradientConv2D(keras.layers.Conv2D):
    """`keras.layers.Conv2D` whose filter gradient is `conv3x3`'s nine matmuls.

    The same arguments, weights, config and forward pass as Keras's layer.
    Only a call with `training=True` takes `conv3x3`; a layer or input it does
    not cover (another kernel size, stride, dilation, groups, padding or
    layout, fewer than `MIN_CHANNELS` input channels, a dtype other than
    float32) convolves as Keras's does.
    """

    def convolution_op(self, inputs: Any, kernel: Any) -> Any:
        # Only where a gradient is taken (`training=True`): inference and export
        # graphs hold Keras's own convolution, no custom gradient.
        if (
            keras_training()
            and _qualifies(self, inputs.shape[-1])
            and keras.backend.standardize_dtype(inputs.dtype) in _DTYPES
        ):
            return conv3x3(inputs, kernel)
        return super().convolution_op(inputs, kernel)


def use_matmul_gradients(model: Any, enabled: bool = True) -> int:
    """Switches the qualifying Conv2D layers of `model` to `MatmulGradientConv2D`, or back.

    In place: each layer keeps its weights, config and name (a saved model
    names the class; `import kfcn` registers it). Nested models are searched.
    A layer qualifies when it is a plain `keras.layers.Conv2D` (no subclass)
    with a 3x3 kernel, stride 1, no dilation, one group, "same" padding,
    channels_last and at least `MIN_CHANNELS` input channels.

    Args:
        model: A built Keras model (or layer).
        enabled: True: qualifying Keras layers switch; False: switched ones go back.

    Returns:
        The number of layers switched.
    """
    switched = 0
    for layer in model._flatten_layers(include_self=True, recursive=True):
        if enabled and type(layer) is keras.layers.Conv2D:
            channels = layer.kernel.shape[2] if layer.built else None
            if _qualifies(layer, channels):
                layer.__class__ = MatmulGradientConv2D
                switched += 1
        elif not enabled and type(layer) is MatmulGradientConv2D:
            layer.__class__ = keras.layers.Conv2D
            switched += 1
    return switched
