"""The few custom layers an FCN needs, all registered for serialization.

None of them has weights, so they add no parameters to the paper's counts, and
none is a `Lambda`, so `keras.saving.load_model` works with `safe_mode=True`.
Every op they emit is one the TFLite GPU delegate runs (CONV_2D, ADD, SUB, PAD,
STRIDED_SLICE without shrink masks, MUL, RESIZE_BILINEAR with half-pixel centres).
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
from keras import ops

IMAGENET_MEAN_RGB = (123.68, 116.779, 103.939)

# mode -> (channel order, scale per channel, shift per channel) applied as
# y[..., i] = x[..., order[i]] * scale[i] + shift[i], on 0..255 RGB input.
_MODES = {
    # Caffe VGG/ResNet: BGR, mean subtracted, no scaling.
    "caffe": ((2, 1, 0), (1.0, 1.0, 1.0), tuple(-m for m in IMAGENET_MEAN_RGB[::-1])),
    # TF-slim Inception/MobileNet: RGB scaled to [-1, 1].
    "tf": ((0, 1, 2), (1 / 127.5,) * 3, (-1.0,) * 3),
    # PyTorch DenseNet: RGB in [0, 1], standardised per channel.
    "torch": (
        (0, 1, 2),
        tuple(1 / (255.0 * s) for s in (0.229, 0.224, 0.225)),
        tuple(-m / s for m, s in zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))),
    ),
}
PREPROCESSING_MODES = (*_MODES, "none")


@keras.saving.register_keras_serializable(package="kfcn")
class Preprocess(keras.layers.Layer):
    """Keras Applications' `preprocess_input`, inside the model.

    The channel permutation and affine normalisation are one fixed 1x1
    convolution, a single CONV_2D in TFLite (a channel reversal would be a
    REVERSE_V2, which the GPU delegate lacks).

    Args:
        mode: One of "caffe", "tf", "torch" or "none" (the backbone normalises
            its input itself, as EfficientNet and ConvNeXt do).
    """

    def __init__(self, mode: str = "caffe", **kwargs):
        super().__init__(**kwargs)
        if mode not in PREPROCESSING_MODES:
            raise ValueError(
                f"`mode` must be one of {PREPROCESSING_MODES}. Received: mode={mode!r}"
            )
        self.mode = mode

    def call(self, images):
        x = ops.cast(images, self.compute_dtype)
        if self.mode == "none":
            return x
        order, scale, shift = _MODES[self.mode]
        kernel = np.zeros((1, 1, 3, 3), np.float32)
        for out_channel, in_channel in enumerate(order):
            kernel[0, 0, in_channel, out_channel] = scale[out_channel]
        kernel = ops.cast(kernel, self.compute_dtype)
        bias = ops.cast(np.asarray(shift, np.float32), self.compute_dtype)
        return ops.conv(x, kernel, strides=1, padding="valid") + bias

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        return {**super().get_config(), "mode": self.mode}


@keras.saving.register_keras_serializable(package="kfcn")
class PadToMultiple(keras.layers.Layer):
    """Pads images to a multiple of the network stride, and the top/left by a fixed amount.

    With every spatial size divisible by 32, each strided layer of the trunk
    sees a size divisible by its stride, so feature positions are the same
    for every input size and the output can be cropped back exactly (the role
    of the reference's 100-pixel padding). Padding on the bottom/right moves no
    feature; `before` rows and columns on the top/left shift every feature by
    that much, which a backbone needs when its first feature lies inside the
    image (Xception's unpadded convolutions), so that the upsampled scores
    reach the image's first row and column. The padding takes the colour
    `value` (the ImageNet mean by default, which preprocessing maps to about
    zero).

    Args:
        multiple: The size multiple, >= 1.
        value: Per-channel padding value (in input units).
        before: `(top, left)` rows and columns padded before the image, >= 0.
    """

    def __init__(self, multiple: int = 32, value=IMAGENET_MEAN_RGB, before=(0, 0), **kwargs):
        super().__init__(**kwargs)
        if int(multiple) < 1:
            raise ValueError(f"`multiple` must be >= 1. Received: multiple={multiple}")
        before = tuple(int(b) for b in before)
        if len(before) != 2 or min(before) < 0:
            raise ValueError(
                f"`before` must be two integers >= 0 (top, left). Received: before={before}"
            )
        self.multiple = int(multiple)
        self.value = tuple(float(v) for v in value)
        self.before = before

    def _padding(self, size):
        # Non-negative operands: converters that lower FloorMod with a truncating
        # division (tf2onnx) give the same result as TensorFlow.
        return (self.multiple - size % self.multiple) % self.multiple

    def call(self, images):
        x = ops.cast(images, self.compute_dtype)
        shape = ops.shape(x)
        top, left = self.before
        pad_h, pad_w = self._padding(shape[1] + top), self._padding(shape[2] + left)
        static = isinstance(pad_h, int) and isinstance(pad_w, int)
        if static and pad_h == 0 and pad_w == 0 and top == 0 and left == 0:
            return x  # static size already a multiple: no op at all
        value = ops.cast(np.asarray(self.value, np.float32), self.compute_dtype)
        # Pad (x - value) with zeros and add value back: a plain PAD op, which the
        # GPU delegate supports, instead of PADV2 with a constant.
        x = ops.pad(x - value, [[0, 0], [top, pad_h], [left, pad_w], [0, 0]])
        return x + value

    def compute_output_shape(self, input_shape):
        batch, height, width, channels = input_shape
        height, width = (
            None if s is None else s + b + self._padding(s + b)
            for s, b in zip((height, width), self.before)
        )
        return (batch, height, width, channels)

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "multiple": self.multiple,
            "value": list(self.value),
            "before": list(self.before),
        }


@keras.saving.register_keras_serializable(package="kfcn")
class AlignCrop(keras.layers.Layer):
    """Crops a map to the size of a reference map, starting at a fixed offset.

    The reference's `crop` layer: called on `[x, reference]`, it returns
    ``x[:, oy:oy + H, ox:ox + W]`` where ``H, W`` are the reference's size. The
    offsets come from the layers' strides and offsets (`kfcn.geometry`), so the
    crop aligns `x` with `reference` pixel for pixel. A negative offset (a
    backbone whose first feature lies inside the image, such as Xception) pads
    `x` with zeros on that side first.

    Args:
        offset: `(oy, ox)`, integer crop offsets.
    """

    def __init__(self, offset=(0, 0), **kwargs):
        super().__init__(**kwargs)
        offset = tuple(int(o) for o in offset)
        if len(offset) != 2:
            raise ValueError(f"`offset` must be two integers. Received: offset={offset}")
        self.offset = offset

    def call(self, inputs):
        x, reference = inputs
        height, width = ops.shape(reference)[1], ops.shape(reference)[2]
        oy, ox = self.offset
        if oy < 0 or ox < 0:
            x = ops.pad(x, [[0, 0], [max(-oy, 0), 0], [max(-ox, 0), 0], [0, 0]])
            oy, ox = max(oy, 0), max(ox, 0)
        return ops.cast(x[:, oy : oy + height, ox : ox + width, :], self.compute_dtype)

    def compute_output_shape(self, input_shape):
        x_shape, reference_shape = input_shape
        return (x_shape[0], reference_shape[1], reference_shape[2], x_shape[3])

    def get_config(self) -> dict:
        return {**super().get_config(), "offset": list(self.offset)}


@keras.saving.register_keras_serializable(package="kfcn")
class Scale(keras.layers.Layer):
    """Multiplies by a fixed factor (the all-at-once FCN's pool3/pool4 scaling).

    Args:
        scale: The factor (0.01 for pool4, 0.0001 for pool3 in voc-fcn8s-atonce).
    """

    def __init__(self, scale: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.scale = float(scale)

    def call(self, x):
        return x * ops.cast(self.scale, x.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        return {**super().get_config(), "scale": self.scale}


@keras.saving.register_keras_serializable(package="kfcn")
class FullyConnectedConv2D(keras.layers.Conv2D):
    """A convolutionalized fully connected layer (the paper's `fc6`).

    The same layer, weights and output as `keras.layers.Conv2D`, computed as one
    matrix product over the stacked shifted windows (im2col) instead of a
    direct convolution. VGG's fc6 is a 7x7 convolution from 512 to 4096
    channels over a small map; TensorFlow's CPU (oneDNN) convolution runs it
    several times below the machine's matmul rate, while a 1x1 convolution over
    the 25,088 stacked channels is a plain GEMM (measured in
    `bench/fcn_forward.py`), computed as a `tf.matmul` over the map's positions
    (oneDNN's 1x1 convolution ran it at 0.80 of the matmul rate, the matmul at
    0.93). The ops (PAD, STRIDED_SLICE, CONCATENATION, FULLY_CONNECTED) all
    convert to TFLite builtins the GPU delegate runs.

    The backward pass of that 1x1 convolution (and of a 1x1 `FullyConnectedConv2D`
    such as fc7) is two matrix products as well (`pointwise_conv`): oneDNN's
    1x1 filter and input gradients over a map of a few hundred positions and
    thousands of channels run at under half the matmul rate, and they were a
    third of the FCN-8s VGG16 training step (`bench/op_profile.py`).

    Takes `keras.layers.Conv2D`'s arguments; strides and dilation must be 1.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if tuple(self.strides) != (1, 1) or tuple(self.dilation_rate) != (1, 1):
            raise ValueError(
                "FullyConnectedConv2D needs strides=1 and dilation_rate=1. Received: "
                f"strides={self.strides}, dilation_rate={self.dilation_rate}"
            )
        if self.groups != 1 or self.data_format != "channels_last":
            raise ValueError("FullyConnectedConv2D needs groups=1 and channels_last data.")

    def convolution_op(self, inputs, kernel):
        # The matmul gradients only where a gradient is taken: an inference graph
        # (SavedModel, TFLite, ONNX) holds the plain product, no custom gradient.
        conv = pointwise_conv if keras_training() else _plain_pointwise_conv
        rows, cols = self.kernel_size
        if rows == 1 and cols == 1:
            return conv(inputs, kernel)
        x = inputs
        if self.padding == "same":
            # TensorFlow's 'same' for stride 1: (k - 1) // 2 before, the rest after.
            top, left = (rows - 1) // 2, (cols - 1) // 2
            x = ops.pad(x, [[0, 0], [top, rows - 1 - top], [left, cols - 1 - left], [0, 0]])
        height = ops.shape(x)[1] - rows + 1
        width = ops.shape(x)[2] - cols + 1
        # Window offset (dy, dx) in kernel order, so channel dy*cols*C + dx*C + c
        # of the stack meets kernel[dy, dx, c]: the kernel reshapes to 1x1.
        windows = [
            x[:, dy : dy + height, dx : dx + width, :] for dy in range(rows) for dx in range(cols)
        ]
        stacked = ops.concatenate(windows, axis=-1)
        flat = ops.reshape(kernel, (1, 1, -1, kernel.shape[-1]))
        return conv(stacked, flat)


def keras_training() -> bool:
    """Whether the Keras layer call in progress runs with `training=True`.

    Keras resolves `training` once for a whole model call and keeps it in its
    call context, also for layers whose `call` takes no `training` argument
    (Conv2D's): a train step's `model(images, training=True)` reads True, an
    inference or export trace (`training=False` or unset) False.
    """
    try:  # Keras 3's call context; without it, every call takes the inference path
        from keras.src.backend.common import global_state
    except ImportError:
        return False
    context = global_state.get_global_attribute("current_call_ctx")
    value = getattr(context, "training", None)
    return isinstance(value, bool) and value


def _pointwise_product(x: tf.Tensor, kernel: tf.Tensor) -> tf.Tensor:
    # x kernel over the map's positions as rows (FULLY_CONNECTED in TFLite): 0.93
    # of the matmul rate for fc6's shapes on the AMD EPYC VM, where oneDNN's 1x1
    # convolution ran at 0.80.
    channels, filters = kernel.shape[2], kernel.shape[3]
    y = tf.matmul(tf.reshape(x, (-1, channels)), tf.reshape(kernel, (channels, filters)))
    return tf.reshape(y, tf.concat([tf.shape(x)[:-1], [filters]], 0))


def static_kernel(kernel, size: tuple[int, int], x: tf.Tensor) -> tf.Tensor:
    """`kernel` as a tensor of `x`'s dtype, checked to be [*size, channels, filters].

    Raises:
        ValueError: If the kernel has another rank or spatial size, or an
            unknown dimension.
    """
    if len(kernel.shape) != 4 or tuple(kernel.shape[:2]) != size or None in kernel.shape:
        raise ValueError(
            f"`kernel` must be a [{size[0]}, {size[1]}, channels, filters] kernel of static "
            f"size. Received: shape {tuple(kernel.shape)}"
        )
    return tf.cast(tf.convert_to_tensor(kernel), x.dtype)


def _plain_pointwise_conv(x, kernel):
    return _pointwise_product(x, static_kernel(kernel, (1, 1), x))


@tf.custom_gradient
def _pointwise_conv(x: tf.Tensor, kernel: tf.Tensor):
    channels, filters = kernel.shape[2], kernel.shape[3]

    def grad(dy: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        rows = tf.reshape(x, (-1, channels))
        dy_rows = tf.reshape(dy, (-1, filters))
        # dy kernel^T as BatchMatMulV2 with adj_y: oneDNN's batched product with
        # the transposed operand ran at 0.91 of the matmul rate for fc6's shapes
        # on the AMD EPYC VM, MatMul with transpose_b at 0.59, (kernel dy^T)^T at 0.66.
        dx = tf.raw_ops.BatchMatMulV2(
            x=dy_rows, y=tf.reshape(kernel, (channels, filters)), adj_y=True
        )
        dkernel = tf.matmul(rows, dy_rows, transpose_a=True)
        return tf.reshape(dx, tf.shape(x)), tf.reshape(dkernel, (1, 1, channels, filters))

    return _pointwise_product(x, kernel), grad


def pointwise_conv(x: tf.Tensor, kernel: tf.Tensor) -> tf.Tensor:
    """A 1x1 convolution whose gradients are matrix products.

    Used in training calls (`FullyConnectedConv2D` takes the same product
    without a custom gradient otherwise, for inference and export graphs). The
    forward pass is `x kernel`, the filter gradient `x^T dy` and the input
    gradient `dy kernel^T` over the map's positions as rows: the convolution's
    values and gradients, computed by matmuls instead of oneDNN's convolution
    kernels.

    Args:
        x: [batch, height, width, channels], channels_last.
        kernel: [1, 1, channels, filters] with static channels and filters.

    Returns:
        [batch, height, width, filters].
    """
    return _pointwise_conv(x, static_kernel(kernel, (1, 1), x))


@keras.saving.register_keras_serializable(package="kfcn")
class ResizeLike(keras.layers.Layer):
    """Bilinearly resizes a map to the height and width of a reference map.

    mmsegmentation's `resize(..., size=img.shape[2:], mode="bilinear",
    align_corners=False)`: called on `[x, reference]`, it returns `x` resized to
    the reference's (dynamic) size with half-pixel centres, PyTorch's
    `F.interpolate(align_corners=False)` and TensorFlow's `tf.image.resize`
    (no antialiasing). One RESIZE_BILINEAR op in TFLite (half_pixel_centers=True,
    align_corners=False), which the GPU delegate runs. `keras.ops.image.resize`
    needs a static size, hence TensorFlow's op.
    """

    def call(self, inputs):
        x, reference = inputs
        size = tf.shape(reference)[1:3]
        x = tf.image.resize(x, size, method="bilinear", antialias=False)
        return ops.cast(x, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        x_shape, reference_shape = input_shape
        return (x_shape[0], reference_shape[1], reference_shape[2], x_shape[3])


@keras.saving.register_keras_serializable(package="kfcn")
class InputScale(keras.layers.Layer):
    """Bilinearly resizes images by a fixed factor: the net then runs at that resolution.

    An H x W batch becomes round(scale * H) x round(scale * W) (at least 1 x 1),
    the size `kfcn.evaluation.predict_msflip` gives each test scale, with
    half-pixel centres and no antialiasing (one RESIZE_BILINEAR in TFLite).
    `kfcn.input_scale.with_input_scale` puts it in front of a net and a
    `ResizeLike` behind it.

    Args:
        scale: The resize factor, a finite number > 0 (1.0 passes images through).
    """

    def __init__(self, scale: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        scale = float(scale)
        if not (np.isfinite(scale) and scale > 0):
            raise ValueError(f"`scale` must be a finite number > 0. Received: scale={scale!r}")
        self.scale = scale

    def call(self, images):
        if self.scale == 1.0:
            return images
        size = tf.cast(tf.shape(images)[1:3], tf.float32) * self.scale
        size = tf.maximum(tf.cast(tf.round(size), tf.int32), 1)
        resized = tf.image.resize(images, size, method="bilinear", antialias=False)
        return ops.cast(resized, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        def scaled(length):
            return None if length is None else max(1, round(length * self.scale))

        return (input_shape[0], scaled(input_shape[1]), scaled(input_shape[2]), input_shape[3])

    def get_config(self) -> dict:
        return {**super().get_config(), "scale": self.scale}


@keras.saving.register_keras_serializable(package="kfcn")
class LogitAdjustment(keras.layers.Layer):
    """Adds a fixed offset to each class's logit (post-hoc logit adjustment).

    Menon et al., "Long-tail learning via logit adjustment" (ICLR 2021): a net
    trained with class weights w learns scores shifted by log w; adding
    -tau * log w (`kfcn.logit_adjustment.class_weight_offsets`) takes part or
    all of that shift back at test time. One ADD of a constant in TFLite.

    Args:
        offsets: One finite number per class (the last axis of the logits).
    """

    def __init__(self, offsets=(), **kwargs):
        super().__init__(**kwargs)
        offsets = [float(v) for v in offsets]
        if not offsets or not np.all(np.isfinite(offsets)):
            raise ValueError(
                f"`offsets` must be finite numbers, one per class. Received: offsets={offsets!r}"
            )
        self.offsets = offsets

    def call(self, logits):
        return logits + ops.cast(np.asarray(self.offsets, np.float32), logits.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        return {**super().get_config(), "offsets": list(self.offsets)}


def _int_pair(value) -> tuple[int, int]:
    if np.isscalar(value):
        return (int(value), int(value))
    return (int(value[0]), int(value[1]))


@keras.saving.register_keras_serializable(package="kfcn")
class DilatedPooling2D(keras.layers.Layer):
    """Max or average pooling with a dilated window and explicit padding.

    Keras' pooling layers have no dilation rate; filter rarefaction
    (`kfcn.dilate`, Long et al. section 3.2) needs one for every pooling after
    the output stride, as DeepLab's dilated max pooling. The window is the
    maximum (or mean) of ``pool_size`` strided slices, so the layer emits only
    PAD, STRIDED_SLICE, MAXIMUM/ADD and MUL. Padded positions never count, as in
    Keras' "same" pooling: the maximum is over real values (padding takes the
    dtype's lowest finite value) and the mean divides by the number of real
    values in the window.

    Args:
        pool_type: "max" or "avg".
        pool_size: Window size `(rows, cols)`.
        strides: `(rows, cols)`; strides above 1 need a dilation rate of 1.
        dilation_rate: `(rows, cols)`, spacing between the window's taps.
        padding: `((top, bottom), (left, right))` positions padded before pooling.
    """

    def __init__(
        self,
        pool_type: str = "max",
        pool_size=(2, 2),
        strides=(1, 1),
        dilation_rate=(1, 1),
        padding=((0, 0), (0, 0)),
        **kwargs,
    ):
        super().__init__(**kwargs)
        if pool_type not in ("max", "avg"):
            raise ValueError(
                f"`pool_type` must be 'max' or 'avg'. Received: pool_type={pool_type!r}"
            )
        self.pool_type = pool_type
        self.pool_size = _int_pair(pool_size)
        self.strides = _int_pair(strides)
        self.dilation_rate = _int_pair(dilation_rate)
        self.padding = tuple(_int_pair(p) for p in padding)
        if (
            min(*self.pool_size, *self.strides, *self.dilation_rate) < 1
            or min(*self.padding[0], *self.padding[1]) < 0
        ):
            raise ValueError(
                "`pool_size`, `strides` and `dilation_rate` must be >= 1 and `padding` >= 0. "
                f"Received: pool_size={self.pool_size}, strides={self.strides}, "
                f"dilation_rate={self.dilation_rate}, padding={self.padding}"
            )
        if max(self.strides) > 1 and max(self.dilation_rate) > 1:
            raise ValueError(
                "`strides` above 1 need `dilation_rate` 1. Received: "
                f"strides={self.strides}, dilation_rate={self.dilation_rate}"
            )

    def _out_size(self, size, axis):
        span = self.dilation_rate[axis] * (self.pool_size[axis] - 1) + 1
        return (size + sum(self.padding[axis]) - span) // self.strides[axis] + 1

    def _windows(self, x, rows, cols):
        (sh, sw), (rh, rw) = self.strides, self.dilation_rate
        for dy in range(self.pool_size[0]):
            for dx in range(self.pool_size[1]):
                top, left = dy * rh, dx * rw
                yield x[
                    :, top : top + (rows - 1) * sh + 1 : sh, left : left + (cols - 1) * sw + 1 : sw
                ]

    def call(self, x):
        x = ops.cast(x, self.compute_dtype)
        pads = [[0, 0], list(self.padding[0]), list(self.padding[1]), [0, 0]]
        rows = self._out_size(ops.shape(x)[1], 0)
        cols = self._out_size(ops.shape(x)[2], 1)
        if self.pool_type == "max":
            lowest = float(np.finfo(keras.backend.standardize_dtype(x.dtype)).min)
            padded = ops.pad(x, pads, constant_values=lowest) if any(map(any, pads)) else x
            out = None
            for window in self._windows(padded, rows, cols):
                out = window if out is None else ops.maximum(out, window)
            return out
        total, count = None, None
        mask = ops.pad(ops.ones_like(x[:1, :, :, :1]), pads)
        padded = ops.pad(x, pads)
        for window, ones in zip(self._windows(padded, rows, cols), self._windows(mask, rows, cols)):
            total = window if total is None else total + window
            count = ones if count is None else count + ones
        return total / ops.maximum(count, 1.0)

    def compute_output_shape(self, input_shape):
        batch, height, width, channels = input_shape
        height = None if height is None else self._out_size(height, 0)
        width = None if width is None else self._out_size(width, 1)
        return (batch, height, width, channels)

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "pool_type": self.pool_type,
            "pool_size": list(self.pool_size),
            "strides": list(self.strides),
            "dilation_rate": list(self.dilation_rate),
            "padding": [list(p) for p in self.padding],
        }


@keras.saving.register_keras_serializable(package="kfcn")
class LocalResponseNormalization(keras.layers.Layer):
    """Caffe's LRN across channels (AlexNet's `norm1`/`norm2`, GoogLeNet's `pool1/norm1`).

    ``y_c = x_c / (k + alpha / size * sum_{c'} x_{c'}**2) ** beta``, the sum over the
    `size` channels centred on ``c`` (fewer at the first and last channels). Caffe
    divides `alpha` by `size`; `tf.nn.local_response_normalization` does not (its
    ``alpha`` is caffe's ``alpha / size``, its ``depth_radius`` is ``(size - 1) // 2``).
    Krizhevsky, Sutskever, Hinton, "ImageNet Classification with Deep Convolutional
    Neural Networks", NIPS 2012, section 3.3. The window sum is one fixed 1x1
    convolution with a banded kernel (a CONV_2D in TFLite, as `Preprocess`).

    Args:
        size: Channels in the window, odd (caffe's `local_size`), default 5.
        alpha: Caffe's `alpha` (divided by `size` here), default 1e-4.
        beta: The exponent, default 0.75.
        k: The additive constant, default 1.
    """

    def __init__(
        self, size: int = 5, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0, **kwargs
    ):
        super().__init__(**kwargs)
        if isinstance(size, bool) or not isinstance(size, int) or size < 1 or size % 2 == 0:
            raise ValueError(f"`size` must be an odd integer >= 1. Received: size={size!r}")
        self.size = size
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.k = float(k)

    def call(self, x):
        channels = x.shape[-1]
        half = (self.size - 1) // 2
        index = np.arange(channels)
        band = (np.abs(index[:, None] - index[None, :]) <= half).astype(np.float32)
        kernel = ops.cast(band.reshape(1, 1, channels, channels), x.dtype)
        window = ops.conv(ops.square(x), kernel, strides=1, padding="valid")
        scale = self.k + (self.alpha / self.size) * window
        return x * ops.power(scale, -self.beta)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "size": self.size,
            "alpha": self.alpha,
            "beta": self.beta,
            "k": self.k,
        }


@keras.saving.register_keras_serializable(package="kfcn")
class GroupedConv2D(keras.layers.Conv2D):
    """`keras.layers.Conv2D` with `groups`, run as one convolution per group.

    The same layer, weights (kernel ``(kh, kw, in / groups, filters)``, output
    channels grouped in order, as caffe's `group` and the AlexNet weight dumps
    store them) and output as `keras.layers.Conv2D`. TensorFlow's CPU kernels
    have no grouped convolution, so Keras compiles one with XLA (about 1.5x
    slower than this on the 2-core test machine, and an XLA function in every
    SavedModel); TFLite's GPU delegate has none either. Slicing the channels
    and concatenating gives plain CONV_2D, STRIDED_SLICE and CONCATENATION ops.
    """

    def convolution_op(self, inputs, kernel):
        if self.groups == 1:
            return super().convolution_op(inputs, kernel)
        width_in = inputs.shape[-1] // self.groups
        width_out = self.filters // self.groups
        outputs = [
            ops.conv(
                inputs[..., g * width_in : (g + 1) * width_in],
                kernel[..., g * width_out : (g + 1) * width_out],
                strides=self.strides,
                padding=self.padding,
                dilation_rate=self.dilation_rate,
            )
            for g in range(self.groups)
        ]
        return ops.concatenate(outputs, axis=-1)


@keras.saving.register_keras_serializable(package="kfcn")
class ShiftStack(keras.layers.Layer):
    """Stacks `factor**2` shifted copies of an image along the batch axis (shift-and-stitch).

    Long, Shelhamer, Darrell (TPAMI 2017), section 3.2: "shift the input x pixels
    to the right and y pixels down, once for every (x, y) with 0 <= x, y < f".
    Copy ``k = dy * factor + dx`` of image ``b`` is batch entry ``k * batch + b``
    and holds ``image[dy * step:, dx * step:]``, padded at the bottom/right with
    `value` to the image's size, so a net of stride ``factor * step`` centres
    its features ``(dy * step, dx * step)`` pixels further on. `Interlace`
    undoes the stacking.

    Args:
        factor: Shifts per axis, >= 1.
        step: Pixels between shifts, >= 1.
        value: Value of the padded pixels (in input units).
    """

    def __init__(self, factor: int = 2, step: int = 1, value: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        if int(factor) < 1 or int(step) < 1:
            raise ValueError(
                f"`factor` and `step` must be >= 1. Received: factor={factor}, step={step}"
            )
        self.factor, self.step, self.value = int(factor), int(step), float(value)

    def call(self, images):
        x = ops.cast(images, self.compute_dtype)
        height, width = ops.shape(x)[1], ops.shape(x)[2]
        reach = (self.factor - 1) * self.step
        if reach == 0:
            return x
        value = ops.cast(self.value, self.compute_dtype)
        padded = ops.pad(x - value, [[0, 0], [0, reach], [0, reach], [0, 0]]) + value
        copies = [
            padded[
                :, dy * self.step : dy * self.step + height, dx * self.step : dx * self.step + width
            ]
            for dy in range(self.factor)
            for dx in range(self.factor)
        ]
        return ops.concatenate(copies, axis=0)

    def compute_output_shape(self, input_shape):
        batch = input_shape[0]
        return (None if batch is None else batch * self.factor**2, *input_shape[1:])

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "factor": self.factor,
            "step": self.step,
            "value": self.value,
        }


@keras.saving.register_keras_serializable(package="kfcn")
class Interlace(keras.layers.Layer):
    """Interlaces the outputs of `ShiftStack`'s copies into one map `factor` times denser.

    Output ``[b, factor * i + dy, factor * j + dx]`` is entry ``[i, j]`` of copy
    ``dy * factor + dx`` of image ``b`` (Long et al., section 3.2, "interlace
    the outputs so that the predictions correspond to the pixels at the centers
    of their receptive fields").

    Args:
        factor: Shifts per axis, >= 1.
    """

    def __init__(self, factor: int = 2, **kwargs):
        super().__init__(**kwargs)
        if int(factor) < 1:
            raise ValueError(f"`factor` must be >= 1. Received: factor={factor}")
        self.factor = int(factor)

    def call(self, stacked):
        f = self.factor
        shape = ops.shape(stacked)
        rows, cols, channels = shape[1], shape[2], stacked.shape[3]
        x = ops.reshape(stacked, (f, f, -1, rows, cols, channels))
        x = ops.transpose(x, (2, 3, 0, 4, 1, 5))  # b, i, dy, j, dx, c
        return ops.reshape(x, (-1, rows * f, cols * f, channels))

    def compute_output_shape(self, input_shape):
        batch, rows, cols, channels = input_shape
        f = self.factor
        return (
            None if batch is None else batch // f**2,
            None if rows is None else rows * f,
            None if cols is None else cols * f,
            channels,
        )

    def get_config(self) -> dict:
        return {**super().get_config(), "factor": self.factor}
