"""Bilinear interpolation kernels for the FCN upsampling layers.

Long, Shelhamer, Darrell, "Fully Convolutional Networks for Semantic
Segmentation" (CVPR 2015 / TPAMI 2017), section 3.3: in-network upsampling is a
backwards-strided convolution whose filter is initialised to bilinear
interpolation (the reference's `surgery.upsample_filt`).
"""

from __future__ import annotations

import keras
import numpy as np


def bilinear_kernel(size: int) -> np.ndarray:
    """The 2-D bilinear interpolation filter of side `size`.

    ``(1 - |i - c| / f) * (1 - |j - c| / f)`` with ``f = (size + 1) // 2`` and
    ``c = f - 1`` for odd sizes, ``f - 0.5`` for even sizes.

    Args:
        size: Filter side in pixels, >= 1 (``2 * factor`` for an upsampling
            by ``factor``, as the reference uses).

    Returns:
        A float32 array of shape `(size, size)`.

    Raises:
        ValueError: If `size` is not a positive integer.
    """
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 1:
        raise ValueError(f"`size` must be a positive integer. Received: size={size!r}")
    factor = (size + 1) // 2
    center = factor - 1 if size % 2 == 1 else factor - 0.5
    ramp = 1.0 - np.abs(np.arange(size) - center) / factor
    return np.outer(ramp, ramp).astype(np.float32)


def bilinear_upsampling_weights(size: int, channels: int) -> np.ndarray:
    """A Conv2DTranspose kernel that upsamples each channel bilinearly.

    Every class is interpolated from the same class only: the filter sits on the
    class-to-same-class diagonal and is zero elsewhere.

    Args:
        size: Filter side in pixels.
        channels: Number of channels (classes) in and out.

    Returns:
        A float32 array of shape `(size, size, channels, channels)`, Keras'
        Conv2DTranspose kernel layout `(height, width, out, in)`.
    """
    if channels < 1:
        raise ValueError(f"`channels` must be >= 1. Received: channels={channels}")
    weights = np.zeros((size, size, channels, channels), np.float32)
    kernel = bilinear_kernel(size)
    for c in range(channels):
        weights[:, :, c, c] = kernel
    return weights


@keras.saving.register_keras_serializable(package="kfcn")
class BilinearInitializer(keras.initializers.Initializer):
    """Initialises a Conv2DTranspose kernel to per-class bilinear interpolation."""

    def __call__(self, shape, dtype=None):
        height, width, out_channels, in_channels = shape
        if height != width or out_channels != in_channels:
            raise ValueError(
                "BilinearInitializer needs a square kernel with as many output as input "
                f"channels. Received: shape={tuple(shape)}"
            )
        weights = bilinear_upsampling_weights(int(height), int(in_channels))
        return keras.ops.convert_to_tensor(weights, dtype=dtype or "float32")

    def get_config(self) -> dict:
        return {}
