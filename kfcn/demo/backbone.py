"""A small VGG-style trunk for the demo: FCN's three taps at a CPU's pace.

Keras Applications' smallest trunks train too slowly for a five-minute demo on two
CPU cores: at 128x128, batch 16, MobileNetV2 runs about 26 images/s and takes 18 s
to build and trace each of the three stages. This trunk has VGG's shape (3x3
convolutions, one downsampling per stage, the stride-8/16/32 features feeding
FCN's skips) in 0.46 M parameters and trains several times faster. It holds
only standard Keras layers, so a model built on it saves, loads (safe mode) and
exports like any other kfcn model.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras

#: Channels of the stages at strides 2, 4, 8, 16 and 32.
WIDTHS = (24, 32, 64, 96, 128)


def _conv(x, channels: int, name: str, strides: int = 1, momentum: float = 0.9):
    x = keras.layers.Conv2D(
        channels, 3, strides=strides, padding="same", use_bias=False, name=f"{name}_conv"
    )(x)
    x = keras.layers.BatchNormalization(momentum=momentum, name=f"{name}_bn")(x)
    return keras.layers.ReLU(name=f"{name}_relu")(x)


def build_backbone(widths: Sequence[int] = WIDTHS, name: str = "demo_vgg") -> keras.Model:
    """The demo's trunk: images (0..255 RGB) to stride-32 features.

    Stage s (stride 2^s) is a stride-2 3x3 convolution, plus a second 3x3
    convolution from stride 8 on (each Conv-BN-ReLU). `kfcn.build_fcn` finds the
    taps by graph position: the last layer at strides 8, 16 and 32 (`block3_2_relu`,
    `block4_2_relu`, `block5_2_relu`).

    Args:
        widths: Channels of the five stages.
        name: Model name.

    Returns:
        A functional `keras.Model` for images of any size, normalising its own
        input to [-1, 1] (kfcn passes 0..255 RGB to backbones given as models).

    Raises:
        ValueError: If `widths` does not have five entries.
    """
    if len(widths) != 5:
        raise ValueError(f"`widths` must have 5 entries. Received: widths={tuple(widths)}")
    images = keras.Input((None, None, 3), name="backbone_images")
    x = keras.layers.Rescaling(1 / 127.5, offset=-1.0, name="scale")(images)
    for stage, channels in enumerate(widths, start=1):
        x = _conv(x, channels, f"block{stage}_1", strides=2)
        if stage >= 3:
            x = _conv(x, channels, f"block{stage}_2")
    return keras.Model(images, x, name=name)
