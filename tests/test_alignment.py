"""Exact alignment of features, skips and output with the input image.

Two independent checks:
1. Where each tapped feature is centred, measured from its receptive field:
   with positive weights, average pooling in place of max pooling and small
   positive inputs, every path is active, so the gradient of one feature with
   respect to the input is non-zero exactly on its receptive field, whose
   middle is the feature's centre. This is compared with the paper-style
   analytic position (VGG: pool-n feature j covers pixels 2^n j .. 2^n (j+1) - 1)
   and with `kfcn.geometry`.
2. The upsampling path: bilinear interpolation reproduces linear functions, so
   feeding score maps whose values are their own pixel coordinates through the
   model's upscore layers and crops must give every output pixel its own
   coordinate (away from the outermost features, where there is nothing to
   interpolate from).
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import kfcn
from kfcn import backbones, geometry


def _positive(model):
    """Max pooling -> average pooling, kernels 1/fan-in, biases 0 (BN stays identity)."""

    def swap(layer):
        if isinstance(layer, keras.layers.MaxPooling2D):
            config = layer.get_config()
            return keras.layers.AveragePooling2D(
                pool_size=config["pool_size"],
                strides=config["strides"],
                padding=config["padding"],
                name=config["name"],
            )
        return layer.__class__.from_config(layer.get_config())

    clone = keras.models.clone_model(model, clone_function=swap)
    for weight in clone.weights:
        if "kernel" in weight.path:
            fan_in = int(np.prod(weight.shape[:-1]))
            weight.assign(np.full(weight.shape, 1.0 / fan_in, np.float32))
        elif weight.path.endswith("bias") or weight.path.endswith("beta"):
            weight.assign(np.zeros(weight.shape, np.float32))
    return clone


def _centre(model, size, index):
    """Receptive-field centre (rows) of feature (index, index) of `model`'s output."""
    x = tf.constant(np.full((1, size, size, 3), 1e-3, np.float32))
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = model(x)
        total = tf.reduce_sum(y[0, index, index, :])
    grad = np.abs(tape.gradient(total, x).numpy()[0]).sum(axis=(1, 2))
    rows = np.nonzero(grad > 0)[0]
    assert rows[0] > 0 and rows[-1] < size - 1, "receptive field clipped by the image"
    return (rows[0] + rows[-1]) / 2


@pytest.mark.parametrize(
    "name, size, analytic",
    [
        # VGG16 pool2..5 (block2..5_pool): feature j covers s*j .. s*j + s - 1.
        ("vgg16", 512, {4: 1.5, 8: 3.5, 16: 7.5, 32: 15.5}),
        # ResNet50: 7x7/2 conv padded by 3 and 3x3/2 pool padded by 1 are centred.
        ("resnet50", 512, {4: 0.0, 8: 0.0, 16: 0.0, 32: 0.0}),
        ("mobilenetv2", 1024, None),
    ],
)
def test_tap_centres(name, size, analytic):
    spec = backbones.get_spec(name)
    trunk = backbones.build_trunk(spec)
    taps = backbones.resolve_taps(trunk, spec.taps, (backbones.FINE_STRIDE, *backbones.STRIDES))
    assert sorted(taps) == [4, 8, 16, 32]
    positive = _positive(trunk)
    for stride, (tensor, geo) in taps.items():
        layer = tensor._keras_history.operation
        tap = keras.Model(positive.input, positive.get_layer(layer.name).output)
        index = size // stride // 2
        measured = _centre(tap, size, index)
        assert measured == geo.offset[0] + stride * index, (name, stride)
        if analytic is not None:
            assert measured == analytic[stride] + stride * index, (name, stride)


def _ramp(rows, cols, stride, offset):
    """A two-class score map holding its own pixel coordinates (row, col)."""
    r = offset[0] + stride * np.arange(rows)
    c = offset[1] + stride * np.arange(cols)
    grid = np.stack(np.meshgrid(r, c, indexing="ij"), axis=-1)
    return grid[None].astype(np.float32)


@pytest.mark.parametrize("backbone", ["vgg16", "mobilenetv2", "resnet50", "xception"])
@pytest.mark.parametrize("variant", ["fcn32s", "fcn16s", "fcn8s", "fcn4s"])
def test_upsampling_path_is_aligned(variant, backbone):
    model = kfcn.build_fcn(variant, backbone=backbone, num_classes=2)
    spec = backbones.get_spec(backbone)
    strides = (backbones.FINE_STRIDE, *backbones.STRIDES)
    taps = backbones.resolve_taps(backbones.build_trunk(spec), spec.taps, strides)
    # Feature positions on the image: the trunk's, less the model's top/left padding.
    top, left = model.get_layer("pad").before
    where = {
        s: geometry.Geometry(geo.stride, (geo.offset[0] - top, geo.offset[1] - left))
        for s, (_, geo) in taps.items()
    }
    height, width = 160, 224  # padded input; maps at stride s are (h/s, w/s)
    score = _ramp(height // 32, width // 32, 32, where[32].offset)
    names = {
        16: ("upscore2", "upscore2c"),
        8: ("upscore_pool4", "upscore_pool4c"),
        4: ("upscore_pool3", "upscore_pool3c"),
    }
    skips = {"fcn32s": (), "fcn16s": (16,), "fcn8s": (16, 8), "fcn4s": (16, 8, 4)}[variant]
    for stride in skips:
        up_name, crop_name = names[stride]
        target = _ramp(height // stride, width // stride, stride, where[stride].offset)
        up = model.get_layer(up_name)(score)
        got = model.get_layer(crop_name)([up, target]).numpy()
        # Rows/cols between the first and last coarse feature centres are exact.
        lo = int(np.ceil((where[stride * 2].offset[0] - where[stride].offset[0]) / stride)) + 1
        hi = -2
        np.testing.assert_allclose(got[:, lo:hi, lo:hi], target[:, lo:hi, lo:hi], atol=1e-3)
        score = target  # fuse with a zero skip keeps the ramp
    final = {"fcn32s": "upscore", "fcn16s": "upscore16", "fcn8s": "upscore8", "fcn4s": "upscore4"}[
        variant
    ]
    stride = skips[-1] if skips else 32
    image = np.zeros((1, height - 5, width - 7, 3), np.float32)
    out = model.get_layer("score")([model.get_layer(final)(score), image]).numpy()
    assert out.shape[1:3] == image.shape[1:3]
    rows, cols = np.meshgrid(np.arange(out.shape[1]), np.arange(out.shape[2]), indexing="ij")
    margin = int(np.ceil(abs(where[stride].offset[0]))) + stride
    inner = (slice(margin, out.shape[1] - stride), slice(margin, out.shape[2] - stride))
    np.testing.assert_allclose(out[0][inner][..., 0], rows[inner], atol=1e-3)
    np.testing.assert_allclose(out[0][inner][..., 1], cols[inner], atol=1e-3)


def test_geometry_of_simple_layers():
    inputs = keras.Input((None, None, 3))
    x = keras.layers.ZeroPadding2D(((3, 3), (3, 3)))(inputs)
    x = keras.layers.Conv2D(2, 7, strides=2, padding="valid", name="c1")(x)  # centre 2j
    x = keras.layers.MaxPooling2D(2, name="p1")(x)  # centre 2*(2j + 0.5) = 4j + 1
    y = keras.layers.Conv2D(2, 3, strides=2, padding="same", name="c2")(x)  # pad 0 top
    model = keras.Model(inputs, y)
    found = {layer.name: geo for layer, _, geo in geometry.trace(model)}
    assert found["c1"] == geometry.Geometry((2, 2), (0.0, 0.0))
    assert found["p1"] == geometry.Geometry((4, 4), (1.0, 1.0))
    # 3x3/2 'same' on an even size pads 0 on top: centre 4*(2j + 1) + 1 = 8j + 5.
    assert found["c2"] == geometry.Geometry((8, 8), (5.0, 5.0))


def test_top_left_padding_moves_features():
    # PadToMultiple's `before` rows and columns shift every feature outward.
    inputs = keras.Input((None, None, 3))
    x = kfcn.layers.PadToMultiple(8, before=(2, 3), name="pad")(inputs)
    y = keras.layers.Conv2D(2, 3, strides=2, padding="same", name="c")(x)
    model = keras.Model(inputs, y)
    found = {layer.name: geo for layer, _, geo in geometry.trace(model)}
    assert found["pad"] == geometry.Geometry((1, 1), (-2.0, -3.0))
    assert found["c"] == geometry.Geometry((2, 2), (-1.0, -2.0))  # pads 0 on top: centre 2j + 1
    image = np.arange(5 * 4 * 3, dtype=np.float32).reshape(1, 5, 4, 3)
    padded = model.get_layer("pad")(image).numpy()
    assert padded.shape == (1, 8, 8, 3)  # 2 + 5 + 1 rows, 3 + 4 + 1 columns
    np.testing.assert_array_equal(padded[:, 2:7, 3:7], image)
    np.testing.assert_allclose(padded[0, 0, 0], kfcn.layers.IMAGENET_MEAN_RGB, rtol=1e-6)


def test_xception_is_padded_just_enough():
    """Its first stride-8 feature lies at pixel 9; the x8 kernel's centre is 7: pad 2."""
    model = kfcn.build_fcn8s(backbone="xception", num_classes=2)
    assert model.get_layer("pad").before == (2, 2)
    assert model.get_layer("score").offset == (0, 0)
    assert kfcn.build_fcn8s(backbone="mobilenetv2").get_layer("pad").before == (0, 0)

