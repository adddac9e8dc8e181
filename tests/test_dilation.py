"""kfcn.dilate (filter rarefaction) against the original networks themselves.

The acceptance criterion of issue 10: with random weights and random BatchNorm
statistics, on an input whose sides are multiples of the model's stride, the
dilated model's output sampled every ``stride // output_stride`` pixels from
pixel 0 equals the original output everywhere, borders included (Long et al.,
TPAMI 2017, section 3.2: the rarefied filters compute the original outputs on
the coarse lattice). The original model is the independent computation; the
dilation rates are checked against mmseg's `contract_dilation` rule by hand, and
`DilatedPooling2D` against a numpy loop.
"""

import functools
import os

import keras
import numpy as np
import pytest

import kfcn
from kfcn.layers import DilatedPooling2D

SIZE = (64, 96)  # sides multiples of 32


def randomize_batchnorm(model, seed=0):
    """Non-trivial BatchNorm statistics that keep the features varying over the image.

    Statistics drawn from nothing (mean 0, variance 1) let BatchNorm's shift
    swamp the signal of a deep net with random weights: MobileNetV2's output then
    barely varies across the image, and a misplaced feature would go unseen. So
    the moving statistics are first set to the batch statistics of random images
    (one training-mode pass with momentum 0), then perturbed, with random
    scale and shift.
    """
    rng = np.random.default_rng(seed)
    layers = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    momenta = [layer.momentum for layer in layers]
    for layer in layers:
        layer.momentum = 0.0
    model(images(seed + 100), training=True)
    for layer, momentum in zip(layers, momenta):
        layer.momentum = momentum
        gamma, beta, mean, variance = layer.get_weights()
        n = gamma.shape
        layer.set_weights(
            [
                rng.uniform(0.5, 1.5, n).astype("float32"),
                rng.normal(0.0, 0.2, n).astype("float32"),
                (mean + rng.normal(0.0, 0.2, n) * np.sqrt(variance)).astype("float32"),
                (variance * rng.uniform(0.7, 1.3, n)).astype("float32"),
            ]
        )
    return model


def images(seed=1, size=SIZE):
    return np.random.default_rng(seed).uniform(0, 255, (2, *size, 3)).astype("float32")


@functools.cache
def keras_app(name):
    """A Keras Applications trunk with random weights, built once per test module."""
    model = getattr(keras.applications, name)(
        include_top=False, weights=None, input_shape=(None, None, 3)
    )
    return randomize_batchnorm(model)


@functools.cache
def kfcn_resnet(name):
    from kfcn.models import resnet

    return randomize_batchnorm(getattr(resnet, name)(include_top=False))


@functools.cache
def features(model, seed=1):
    return keras.ops.convert_to_numpy(model(images(seed)))


@functools.cache
def dilate(model, output_stride):
    return kfcn.dilate(model, output_stride=output_stride)


def assert_exact(model, output_stride, stride=32, x_seed=1):
    dilated = dilate(model, output_stride)
    rate = stride // output_stride
    original = features(model, x_seed)
    dense = keras.ops.convert_to_numpy(dilated(images(x_seed)))
    assert dense.shape == (
        original.shape[0],
        original.shape[1] * rate,
        original.shape[2] * rate,
        original.shape[3],
    )
    scale = np.abs(original).max()
    # Not degenerate: the features vary across the image by a fair part of their scale.
    assert np.abs(original - original.mean(axis=(1, 2), keepdims=True)).max() > 0.1 * scale
    sampled = dense[:, ::rate, ::rate]
    np.testing.assert_allclose(sampled, original, rtol=0, atol=1e-4 * scale)
    if rate > 1:
        # The positions between are new outputs, not copies of the lattice.
        between = dense[:, rate // 2 :: rate, rate // 2 :: rate]
        assert np.abs(between - original).max() > 1e-3 * scale
    return dilated


# --- Exactness on Keras Applications and kfcn's ResNets ---------------------------------

FAST = [
    ("ResNet50", 8),
    ("ResNet50", 16),
    ("ResNet50V2", 8),
    ("ResNet50V2", 16),
    ("MobileNetV2", 8),
    ("MobileNetV2", 16),
    ("MobileNetV2", 4),
    ("MobileNetV2", 1),
    ("EfficientNetB0", 8),
    ("EfficientNetB0", 16),
]
# Deeper members of the same families: more blocks of the same kinds. The deepest
# of each kind run by default; the ones between (same blocks, counts between) when
# KFCN_TEST_ALL_BACKBONES=1 (all passed when this file was written).
ALL_BACKBONES = os.environ.get("KFCN_TEST_ALL_BACKBONES") == "1"
between = pytest.mark.skipif(not ALL_BACKBONES, reason="set KFCN_TEST_ALL_BACKBONES=1")
DEEP = [
    "ResNet101",
    pytest.param("ResNet152", marks=between),
    "ResNet101V2",
    pytest.param("ResNet152V2", marks=between),
    pytest.param("EfficientNetB1", marks=between),
    pytest.param("EfficientNetB2", marks=between),
    "EfficientNetB3",
]


@pytest.mark.slow
@pytest.mark.parametrize("name, output_stride", FAST)
def test_keras_applications_exact(name, output_stride):
    assert_exact(keras_app(name), output_stride)


@pytest.mark.slow
@pytest.mark.parametrize("name", DEEP)
def test_deep_keras_applications_exact(name):
    model = keras_app(name)
    assert_exact(model, 8)
    for cache in (keras_app, features, dilate):  # free the big ones as we go
        cache.cache_clear()


@pytest.mark.parametrize("output_stride", [8, 16])
def test_kfcn_resnet18_v1c_exact(output_stride):
    assert_exact(kfcn_resnet("ResNet18V1c"), output_stride)


@pytest.mark.slow
def test_kfcn_resnet50_v1c_equals_mmseg_d8():
    """Dilating the stride-32 net gives mmseg's ResNetV1c-D8 (contract_dilation) exactly.

    kfcn.models.resnet builds D8 directly from mmseg's strides (1, 2, 1, 1) and
    dilations (1, 1, 2, 4); with the same weights the two agree at every
    position, not only on the lattice.
    """
    from kfcn.models import resnet

    model = kfcn_resnet("ResNet50V1c")
    dilated = assert_exact(model, 8)
    direct = resnet.ResNet50V1c(include_top=False, output_stride=8)
    direct.set_weights(model.get_weights())
    x = images(3)
    expected = keras.ops.convert_to_numpy(direct(x))
    got = keras.ops.convert_to_numpy(dilated(x))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4 * np.abs(expected).max())


def test_rates_follow_contract_dilation():
    """The rate is the stride lost at a layer's input (mmseg's contract_dilation for D8)."""
    dilated = dilate(kfcn_resnet("ResNet18V1c"), 8)
    layer = dilated.get_layer
    # layer3 (stride 16 -> 8): its strided first conv loses nothing at its input.
    assert layer("layer3_0_conv1").strides == (1, 1)
    assert layer("layer3_0_conv1").dilation_rate == (1, 1)
    assert layer("layer3_0_downsample_0").strides == (1, 1)
    assert layer("layer3_0_conv2").dilation_rate == (2, 2)
    assert layer("layer3_1_conv1").dilation_rate == (2, 2)
    # layer4 (stride 32 -> 8): half the stage's rate on the first conv, then 4.
    assert layer("layer4_0_conv1").dilation_rate == (2, 2)
    assert layer("layer4_0_conv2").dilation_rate == (4, 4)
    assert layer("layer4_1_conv1").dilation_rate == (4, 4)
    # Explicit torch padding scaled onto the lattice: 1 -> 2 before layer4_0_conv1.
    assert layer("layer4_0_conv1_pad").padding == ((2, 2), (2, 2))
    assert layer("layer2_0_conv1").strides == (2, 2)  # before the output stride: unchanged


@pytest.mark.slow
def test_same_padding_of_strided_layers_made_explicit():
    dilated = dilate(keras_app("MobileNetV2"), 16)
    # Conv1 (3x3/2 "same") is before the output stride; block_13 (stride 16 -> 32)
    # pads explicitly by ZeroPadding2D((0, 1)) in Keras: on the rate-1 input the
    # pad stays, and the depthwise conv runs at stride 1, padded after by 1 more.
    assert dilated.get_layer("Conv1").strides == (2, 2)
    depthwise = dilated.get_layer("block_13_depthwise")
    assert depthwise.strides == (1, 1) and depthwise.dilation_rate == (1, 1)
    assert dilated.get_layer("block_14_depthwise").dilation_rate == (2, 2)


# --- A small model with every kind of layer ---------------------------------------------


def _inner():
    x = keras.Input((None, None, 12))
    y = keras.layers.DepthwiseConv2D(3, padding="same", name="inner_dw")(x)
    return keras.Model(x, keras.layers.ReLU(name="inner_relu")(y), name="inner")


def zoo_model():
    """Strided 'same' (odd and even kernels), ZeroPadding + 'valid', pooling both ways,
    separable and 5x5 convolutions, concatenation, squeeze-excite, a nested model."""
    images = keras.Input((None, None, 3), name="images")
    x = keras.layers.Rescaling(1 / 127.5, offset=-1, name="scale")(images)
    x = keras.layers.Conv2D(8, 5, strides=2, padding="same", name="c1")(x)  # 2
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.MaxPooling2D(3, strides=2, padding="same", name="pool1")(x)  # 4
    a = keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="a")(x)
    b = keras.layers.AveragePooling2D(3, strides=1, padding="same", name="b")(x)
    x = keras.layers.Concatenate(name="cat")([a, b])  # 14 channels
    x = keras.layers.ZeroPadding2D(((0, 1), (0, 1)), name="c2_pad")(x)
    x = keras.layers.Conv2D(12, 3, strides=2, padding="valid", name="c2")(x)  # 8
    x = _inner()(x)
    se = keras.layers.GlobalAveragePooling2D(keepdims=True, name="se_squeeze")(x)
    se = keras.layers.Conv2D(12, 1, activation="sigmoid", name="se_excite")(se)
    x = keras.layers.Multiply(name="se_scale")([x, se])
    x = keras.layers.AveragePooling2D(2, name="pool3")(x)  # 16, 'valid' 2x2
    x = keras.layers.SeparableConv2D(16, 3, padding="same", name="sep")(x)
    y = keras.layers.Conv2D(16, 4, strides=2, padding="same", name="c4")(x)  # 32, even kernel
    z = keras.layers.MaxPooling2D(2, padding="valid", name="pool4")(x)
    x = keras.layers.Add(name="add")([y, z])
    x = keras.layers.Conv2D(16, 3, padding="same", dilation_rate=2, name="c5")(x)
    return keras.Model(images, x, name="zoo")


@pytest.fixture(scope="module")
def zoo():
    model = zoo_model()
    rng = np.random.default_rng(5)
    model.set_weights([rng.normal(0, 0.3, w.shape).astype("float32") for w in model.get_weights()])
    return randomize_batchnorm(model)


@pytest.mark.parametrize("output_stride", [1, 2, 4, 8, 16, 32])
def test_zoo_exact(zoo, output_stride):
    dilated = assert_exact(zoo, output_stride)
    names = {layer.name for layer in dilated.layers}
    assert "inner_dw" in names  # nested model flattened
    if output_stride < 8:
        assert "se_squeeze_lattice" in names


def test_zoo_saves_and_loads(zoo, tmp_path):
    dilated = kfcn.dilate(zoo, output_stride=4)
    assert any(isinstance(layer, DilatedPooling2D) for layer in dilated.layers)
    path = tmp_path / "d4.keras"
    dilated.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    x = images(2, (32, 64))
    np.testing.assert_allclose(loaded(x), dilated(x), rtol=1e-5, atol=1e-5)


def test_original_untouched(zoo):
    before = [w.copy() for w in zoo.get_weights()]
    dilated = kfcn.dilate(zoo, output_stride=8)
    dilated.get_layer("c5").kernel.assign(np.zeros(dilated.get_layer("c5").kernel.shape))
    for a, b in zip(zoo.get_weights(), before):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("bad", [12, 0, 64, 3, True, 8.0, "8"])
def test_output_stride_checked(zoo, bad):
    with pytest.raises(ValueError, match=r"`output_stride` must be a power of two .*32.*"
                       rf"Received: output_stride={bad!r}"):  # fmt: skip
        kfcn.dilate(zoo, output_stride=bad)


def test_refuses_space_changing_layers():
    x = keras.Input((None, None, 3))
    y = keras.layers.Conv2D(4, 3, strides=8, padding="same")(x)
    up = keras.layers.UpSampling2D(name="up")(y)
    with pytest.raises(ValueError, match="'up'"):
        kfcn.dilate(keras.Model(x, [y, up]), output_stride=2)


# --- DilatedPooling2D against numpy ------------------------------------------------------


def numpy_pool(x, kind, size, strides, rate, padding):
    (top, bottom), (left, right) = padding
    h, w = x.shape[1:3]
    span = [r * (k - 1) + 1 for k, r in zip(size, rate)]
    rows = (h + top + bottom - span[0]) // strides[0] + 1
    cols = (w + left + right - span[1]) // strides[1] + 1
    out = np.zeros((x.shape[0], rows, cols, x.shape[3]), np.float32)
    for i in range(rows):
        for j in range(cols):
            taps = []
            for a in range(size[0]):
                for b in range(size[1]):
                    u = i * strides[0] - top + a * rate[0]
                    v = j * strides[1] - left + b * rate[1]
                    if 0 <= u < h and 0 <= v < w:
                        taps.append(x[:, u, v])
            taps = np.stack(taps)
            out[:, i, j] = taps.max(0) if kind == "max" else taps.mean(0)
    return out


@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize(
    "size, strides, rate, padding",
    [
        ((3, 3), (1, 1), (2, 2), ((2, 2), (2, 2))),
        ((3, 2), (1, 1), (4, 2), ((0, 4), (1, 1))),
        ((3, 3), (2, 2), (1, 1), ((0, 1), (1, 1))),
        ((1, 1), (2, 3), (1, 1), ((0, 0), (0, 0))),
    ],
)
def test_dilated_pooling_matches_numpy(kind, size, strides, rate, padding):
    x = np.random.default_rng(0).normal(size=(2, 9, 11, 3)).astype("float32")
    layer = DilatedPooling2D(kind, size, strides=strides, dilation_rate=rate, padding=padding)
    got = keras.ops.convert_to_numpy(layer(x))
    np.testing.assert_allclose(got, numpy_pool(x, kind, size, strides, rate, padding), atol=1e-6)
    assert got.shape[1:3] == layer.compute_output_shape((None, 9, 11, 3))[1:3]
    clone = keras.layers.deserialize(keras.layers.serialize(layer))
    assert clone.get_config() == layer.get_config()


def test_dilated_pooling_checks_arguments():
    with pytest.raises(ValueError, match="pool_type"):
        DilatedPooling2D("min")
    with pytest.raises(ValueError, match="dilation_rate"):
        DilatedPooling2D("max", 3, strides=2, dilation_rate=2)
