"""Caffe's layers in plain numpy (float64), as independent references for the model tests.

Written from caffe's layer definitions, not from kfcn: convolution with explicit
padding, stride and groups; max pooling with caffe's ceil rounding (windows
clipped at the end); LRN across channels with alpha divided by the window size.
"""

import numpy as np

IMAGENET_MEAN_BGR = np.array([103.939, 116.779, 123.68])


def caffe_preprocess(image_rgb):
    """0..255 RGB -> BGR minus the ImageNet mean (caffe's transform_param)."""
    return np.asarray(image_rgb, np.float64)[..., ::-1] - IMAGENET_MEAN_BGR


def conv(x, kernel, bias, stride=1, pad=(0, 0, 0, 0), groups=1, relu=True):
    """One image `x` (H, W, C), kernel HWIO (inputs per group); pad (top, bottom, left, right)."""
    top, bottom, left, right = pad
    x = np.pad(np.asarray(x, np.float64), ((top, bottom), (left, right), (0, 0)))
    kh, kw, cin, cout = kernel.shape
    windows = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(0, 1))
    windows = windows[::stride, ::stride]  # (oh, ow, C, kh, kw)
    per_group = cout // groups
    outputs = []
    for g in range(groups):
        part = windows[:, :, g * cin : (g + 1) * cin]
        weights = np.asarray(kernel[..., g * per_group : (g + 1) * per_group], np.float64)
        outputs.append(np.tensordot(part, weights, axes=([2, 3, 4], [2, 0, 1])))
    y = np.concatenate(outputs, axis=-1) + bias
    return np.maximum(y, 0) if relu else y


def max_pool(x, size=3, stride=2, pad=0):
    """Caffe's max pooling: ceil((H + 2 pad - size) / stride) + 1 outputs, padding never wins."""
    x = np.pad(np.asarray(x, np.float64), ((pad, pad), (pad, pad), (0, 0)), constant_values=-np.inf)
    height, width, _ = x.shape
    rows = -(-(height - size) // stride) + 1
    cols = -(-(width - size) // stride) + 1
    out = np.empty((rows, cols, x.shape[2]))
    for i in range(rows):
        for j in range(cols):
            window = x[i * stride : i * stride + size, j * stride : j * stride + size]
            out[i, j] = window.max(axis=(0, 1))
    return out


def lrn(x, size=5, alpha=1e-4, beta=0.75, k=1.0):
    """Caffe's LRN (ACROSS_CHANNELS): x / (k + alpha / size * sum of squares) ** beta."""
    channels = x.shape[-1]
    half = size // 2
    out = np.empty_like(x, dtype=np.float64)
    for c in range(channels):
        window = x[..., max(0, c - half) : min(channels, c + half + 1)]
        out[..., c] = x[..., c] / (k + alpha / size * (window**2).sum(-1)) ** beta
    return out
