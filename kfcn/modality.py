"""Input modalities of the NYUDv2 FCNs: HHA and RGB-D preprocessing inside the model.

Long, Shelhamer, Darrell, "Fully Convolutional Networks for Semantic
Segmentation", TPAMI 2017, section 5 (NYUDv2), and the reference nets
nyud-fcn32s-color, -hha, -color-d and -color-hha with their data layer
`nyud_layers.py`, whose preprocessing these layers reproduce:

- color: BGR, minus a mean (the reference uses NYUDv2's own BGR mean
  (116.190, 97.203, 92.318); kfcn keeps the backbone's ImageNet preprocessing for
  every RGB input, a constant difference the first convolution's bias absorbs);
- HHA (Gupta et al., ECCV 2014): the three channels in file order, minus
  `HHA_MEAN`;
- depth: ``log(depth) - 7.844`` (`LOG_DEPTH_MEAN`), depth as the NYUDv2 PNG holds
  it (millimetres; ``exp(7.844)`` is about 2.55 m).

All are weightless registered layers (no Lambda), so models load in safe mode.
"""

from __future__ import annotations

import math

import keras
import numpy as np
from keras import ops

from kfcn.layers import IMAGENET_MEAN_RGB, Preprocess

#: The reference's HHA mean (nyud_layers.py `mean_hha`), in the PNG's channel order.
HHA_MEAN = (132.431, 94.076, 118.477)
#: The reference's mean of log depth (nyud_layers.py `mean_logd`).
LOG_DEPTH_MEAN = 7.844
#: Depth below this (missing depth is stored as 0) is clamped before the log.
MIN_DEPTH = 1.0
#: The modalities `kfcn.build_fcn` takes, and the input channels of each stream.
MODALITIES = ("rgb", "hha", "rgbd", "rgb+hha")
#: The dict keys (and Keras input names) of a two-stream model.
STREAMS = ("rgb", "hha")
#: Padding colour per modality, in input units: what preprocessing maps to about zero.
PAD_VALUES = {
    "rgb": IMAGENET_MEAN_RGB,
    "hha": HHA_MEAN,
    "rgbd": (*IMAGENET_MEAN_RGB, math.exp(LOG_DEPTH_MEAN)),
}


@keras.saving.register_keras_serializable(package="kfcn")
class HHAPreprocess(keras.layers.Layer):
    """Subtracts the HHA mean, channels in file order (nyud-fcn32s-hha's data layer).

    Args:
        mean: Per-channel mean of the HHA images (default: the reference's).
    """

    def __init__(self, mean=HHA_MEAN, **kwargs):
        super().__init__(**kwargs)
        self.mean = tuple(float(m) for m in mean)
        if len(self.mean) != 3:
            raise ValueError(f"`mean` must have 3 values. Received: mean={mean!r}")

    def call(self, images):
        x = ops.cast(images, self.compute_dtype)
        return x - ops.cast(np.asarray(self.mean, np.float32), self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        return {**super().get_config(), "mean": list(self.mean)}


@keras.saving.register_keras_serializable(package="kfcn")
class RGBDPreprocess(keras.layers.Layer):
    """RGB-D early fusion input: the backbone's RGB preprocessing and log depth.

    Takes [b, h, w, 4] (RGB 0..255, then depth as the NYUDv2 PNG holds it) and
    returns the first three channels as `kfcn.layers.Preprocess(mode)` returns
    them (BGR minus the ImageNet mean for "caffe") and, as the fourth channel,
    ``log(max(depth, MIN_DEPTH)) - log_depth_mean`` (nyud_layers.py `load_depth`;
    the clamp keeps missing depth, stored as 0, finite).

    Args:
        mode: The RGB channels' `Preprocess` mode ("none": 0..255 as given, for a
            `keras.Model` backbone that normalises its own input).
        log_depth_mean: Subtracted from the log depth.
    """

    def __init__(self, mode: str = "caffe", log_depth_mean: float = LOG_DEPTH_MEAN, **kwargs):
        super().__init__(**kwargs)
        self.mode = mode
        self.log_depth_mean = float(log_depth_mean)
        self._rgb = Preprocess(mode, dtype=self.dtype_policy)  # checks `mode`

    def call(self, images):
        x = ops.cast(images, self.compute_dtype)
        rgb = self._rgb(x[..., :3])
        depth = ops.maximum(x[..., 3:4], ops.cast(MIN_DEPTH, self.compute_dtype))
        depth = ops.log(depth) - ops.cast(self.log_depth_mean, self.compute_dtype)
        return ops.concatenate([rgb, depth], axis=-1)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        return {**super().get_config(), "mode": self.mode, "log_depth_mean": self.log_depth_mean}


def widen_first_conv(kernel: np.ndarray) -> np.ndarray:
    """A 3-channel first-layer kernel with a 4th (depth) input channel, as the reference.

    nyud-fcn32s-color-d/solve.py sets ``conv1_1_bgrd[:, 3] = mean(conv1_1, axis=1)``:
    the depth filter of each output is the mean of its three colour filters, so the
    classifier's first layer starts by treating depth as one more grey-level channel
    (its bias and colour filters are copied unchanged). Keras kernels are HWIO, so the
    mean is over axis 2.

    Args:
        kernel: [kh, kw, 3, filters].

    Returns:
        [kh, kw, 4, filters].
    """
    kernel = np.asarray(kernel)
    if kernel.ndim != 4 or kernel.shape[2] != 3:
        raise ValueError(f"`kernel` must be [kh, kw, 3, filters]. Received: shape={kernel.shape}")
    return np.concatenate([kernel, kernel.mean(axis=2, keepdims=True)], axis=2)
