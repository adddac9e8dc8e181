"""FCN-AlexNet (voc-fcn-alexnet): layers, parameter count by hand, caffe weight dumps, numerics.

The reference values come from caffe's definitions computed in numpy
(`caffe_numpy`), from a weight dump this test writes in the layout of the
shared `bvlc_alexnet.npy` (dict layer -> [kernel HWIO, bias], conv2 (5, 5, 48,
256), fc6 (9216, 4096)), and from arithmetic per layer.
"""

import caffe_numpy as ref
import keras
import numpy as np
import pytest

import kfcn
from kfcn import backbones, bilinear, geometry
from kfcn.layers import GroupedConv2D, LocalResponseNormalization
from kfcn.models.alexnet import AlexNet, load_caffe_npy

# Learned parameters of voc-fcn-alexnet (21 classes), layer by layer. Groups halve
# the input channels each kernel sees in conv2, conv4 and conv5.
CONV1 = 11 * 11 * 3 * 96 + 96
CONV2 = 5 * 5 * (96 // 2) * 256 + 256
CONV3 = 3 * 3 * 256 * 384 + 384
CONV4 = 3 * 3 * (384 // 2) * 384 + 384
CONV5 = 3 * 3 * (384 // 2) * 256 + 256
FC6 = 6 * 6 * 256 * 4096 + 4096
FC7 = 4096 * 4096 + 4096
SCORE_FR = 4096 * 21 + 21
FCN32S_ALEXNET = CONV1 + CONV2 + CONV3 + CONV4 + CONV5 + FC6 + FC7 + SCORE_FR
# The skips score conv5 (stride 16) and conv2 (stride 8), 256 channels each.
FCN8S_ALEXNET = FCN32S_ALEXNET + 2 * (256 * 21 + 21)

# The dump's shapes, as the Caffe-to-TensorFlow conversions write them.
DUMP_SHAPES = {
    "conv1": (11, 11, 3, 96),
    "conv2": (5, 5, 48, 256),
    "conv3": (3, 3, 256, 384),
    "conv4": (3, 3, 192, 384),
    "conv5": (3, 3, 192, 256),
    "fc6": (9216, 4096),
    "fc7": (4096, 4096),
    "fc8": (4096, 1000),
}


def _trainable(model):
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


@pytest.fixture(scope="module")
def dump(tmp_path_factory):
    """A random weight dump in the bvlc_alexnet.npy layout, scaled so LRN matters.

    Values cycle through a block of a prime length (drawing 61M normals takes
    seconds): no two of the index orders a wrong reshape could use coincide.
    """
    rng = np.random.default_rng(0)
    block = rng.uniform(-1.0, 1.0, 1_000_003).astype(np.float32)
    data = {}
    for i, (name, shape) in enumerate(DUMP_SHAPES.items()):
        scale = np.float32(2.5 / np.sqrt(np.prod(shape[:-1])))
        kernel = np.resize(np.roll(block, 7919 * i), shape) * scale
        data[name] = [kernel, rng.uniform(0, 1, shape[-1]).astype(np.float32)]
    path = tmp_path_factory.mktemp("alexnet") / "bvlc_alexnet.npy"
    np.save(path, data)
    return str(path), data


@pytest.fixture(scope="module")
def fcn32s(dump):
    """The full FCN-32s AlexNet, 21 classes, from the dump (built once)."""
    return kfcn.build_fcn32s(backbone="alexnet", num_classes=21, weights=dump[0])


@pytest.fixture(scope="module")
def classifier(dump):
    return backbones.build_classifier(backbones.get_spec("alexnet"), dump[0])


def test_lrn_matches_caffe_in_numpy():
    x = np.random.default_rng(1).normal(0, 60, (2, 3, 4, 9)).astype(np.float32)
    got = LocalResponseNormalization()(x).numpy()
    np.testing.assert_allclose(got, ref.lrn(x), rtol=1e-5)
    # The normalisation is strong at this scale, so a wrong alpha/size shows.
    assert np.abs(ref.lrn(x) - x).max() > 0.1 * np.abs(x).max()
    other = LocalResponseNormalization(size=3, alpha=2e-4, beta=0.5, k=2.0)
    np.testing.assert_allclose(
        other(x).numpy(), ref.lrn(x, size=3, alpha=2e-4, beta=0.5, k=2.0), rtol=1e-5
    )
    clone = keras.layers.deserialize(keras.layers.serialize(other))
    assert clone.get_config() == other.get_config()
    with pytest.raises(ValueError, match=r"`size`.*size=4"):
        LocalResponseNormalization(size=4)


def test_grouped_conv_matches_numpy_and_keras():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(1, 7, 9, 6)).astype(np.float32)
    layer = GroupedConv2D(4, 3, padding="same", groups=2, activation="relu")
    layer.build(x.shape)
    kernel = rng.normal(size=(3, 3, 3, 4)).astype(np.float32)
    bias = rng.normal(size=4).astype(np.float32)
    layer.set_weights([kernel, bias])
    expected = ref.conv(x[0], kernel, bias, pad=(1, 1, 1, 1), groups=2)
    np.testing.assert_allclose(layer(x).numpy()[0], expected, rtol=1e-4, atol=1e-4)
    plain = keras.layers.Conv2D(4, 3, padding="same", groups=2, activation="relu")
    plain.build(x.shape)
    plain.set_weights([kernel, bias])
    np.testing.assert_allclose(layer(x).numpy(), plain(x).numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_fcn32s_alexnet_is_voc_fcn_alexnet(fcn32s):
    assert FCN32S_ALEXNET == 56_954_261
    assert _trainable(fcn32s) == FCN32S_ALEXNET
    kernels = {
        "conv1": (11, 11, 3, 96),
        "conv2": (5, 5, 48, 256),
        "conv3": (3, 3, 256, 384),
        "conv4": (3, 3, 192, 384),
        "conv5": (3, 3, 192, 256),
        "fc6": (6, 6, 256, 4096),
        "fc7": (1, 1, 4096, 4096),
        "score_fr": (1, 1, 4096, 21),
    }
    for name, shape in kernels.items():
        assert tuple(fcn32s.get_layer(name).kernel.shape) == shape, name
    for name in ("conv2", "conv4", "conv5"):
        assert fcn32s.get_layer(name).groups == 2
    for name in ("norm1", "norm2"):
        layer = fcn32s.get_layer(name)
        assert (layer.size, layer.alpha, layer.beta, layer.k) == (5, 1e-4, 0.75, 1.0)
    upscore = fcn32s.get_layer("upscore")
    assert upscore.strides == (32, 32) and not upscore.trainable and upscore.bias is None
    np.testing.assert_allclose(upscore.kernel.numpy(), bilinear.bilinear_upsampling_weights(63, 21))
    images = np.random.default_rng(3).uniform(0, 255, (1, 97, 131, 3)).astype(np.float32)
    for height, width in [(1, 1), (33, 47), (97, 131)]:
        out = fcn32s(images[:, :height, :width])
        assert out.shape == (1, height, width, 21)


@pytest.mark.slow
def test_fcn8s_alexnet_taps_and_count():
    model = kfcn.build_fcn8s(backbone="alexnet", num_classes=21)
    assert _trainable(model) == FCN8S_ALEXNET
    assert model.get_layer("score_pool4").kernel.shape == (1, 1, 256, 21)
    assert model.get_layer("score_pool3").kernel.shape == (1, 1, 256, 21)
    strides = {
        layer.name: geo.stride
        for layer, _, geo in geometry.trace(model)
        if isinstance(geo, geometry.Geometry)
    }
    assert (strides["conv2"], strides["conv5"], strides["fc7"]) == ((8, 8), (16, 16), (32, 32))
    rng = np.random.default_rng(4)
    for name in ("score_fr", "score_pool4", "score_pool3"):
        layer = model.get_layer(name)
        layer.set_weights([rng.normal(size=w.shape).astype("float32") for w in layer.weights])
    out = np.asarray(model(rng.uniform(0, 255, (1, 45, 71, 3)).astype(np.float32)))
    assert out.shape == (1, 45, 71, 21)
    # Every row and column comes from the network, none from crop padding.
    assert np.abs(out).max(axis=(0, 2, 3)).min() > 0 and np.abs(out).max(axis=(0, 1, 3)).min() > 0


@pytest.mark.slow
def test_fcn_first_layers_from_the_dump_match_numpy(fcn32s, dump):
    _, data = dump
    for name in ("conv1", "conv2", "conv5"):
        np.testing.assert_array_equal(fcn32s.get_layer(name).kernel.numpy(), data[name][0])
    np.testing.assert_array_equal(
        fcn32s.get_layer("fc6").kernel.numpy(), data["fc6"][0].reshape(6, 6, 256, 4096)
    )
    # The FCN's own graph from the image: padding with the mean, caffe preprocessing,
    # conv1 ("same": 3 rows above, 4 below), pool1, norm1, conv2 in two groups.
    records = {layer.name: tensor for layer, tensor, _ in geometry.trace(fcn32s)}
    probe = keras.Model(fcn32s.input, [records["conv1"], records["conv2"]])
    image = np.random.default_rng(5).uniform(0, 255, (45, 70, 3)).astype(np.float32)
    conv1, conv2 = (np.asarray(t)[0] for t in probe(image[None]))
    top, left = fcn32s.get_layer("pad").before
    rows, cols = -(-(45 + top) // 32) * 32, -(-(70 + left) // 32) * 32
    x = np.pad(
        ref.caffe_preprocess(image), ((top, rows - 45 - top), (left, cols - 70 - left), (0, 0))
    )
    expected1 = ref.conv(x, data["conv1"][0], data["conv1"][1], stride=4, pad=(3, 4, 3, 4))
    np.testing.assert_allclose(conv1, expected1, rtol=1e-3, atol=1e-2 * expected1.std())
    x = ref.lrn(ref.max_pool(expected1))
    expected2 = ref.conv(x, data["conv2"][0], data["conv2"][1], pad=(2, 2, 2, 2), groups=2)
    np.testing.assert_allclose(conv2, expected2, rtol=1e-3, atol=1e-2 * expected2.std())


@pytest.mark.slow
def test_classifier_from_the_dump_is_caffes_alexnet(classifier, dump):
    """At 227x227 the classifier computes caffe's net: unpadded conv1 and pools, dense fc6."""
    _, data = dump
    x = np.random.default_rng(6).normal(0, 60, (1, 227, 227, 3)).astype(np.float32)
    names = ("conv2", "pool5", "predictions")
    probe = keras.Model(classifier.input, [classifier.get_layer(n).output for n in names])
    conv2, pool5, predictions = (np.asarray(t)[0] for t in probe(x))
    y = ref.lrn(ref.max_pool(ref.conv(x[0], *data["conv1"], stride=4)))
    y = ref.conv(y, *data["conv2"], pad=(2, 2, 2, 2), groups=2)
    assert y.shape == conv2.shape == (27, 27, 256) and pool5.shape == (6, 6, 256)
    np.testing.assert_allclose(conv2, y, rtol=1e-3, atol=1e-2 * y.std())
    # fc6..fc8 as caffe's dense layers over pool5 flattened (height, width, channels).
    h = np.maximum(pool5.reshape(-1).astype(np.float64) @ data["fc6"][0] + data["fc6"][1], 0)
    h = np.maximum(h @ data["fc7"][0] + data["fc7"][1], 0)
    logits = h @ data["fc8"][0] + data["fc8"][1]
    softmax = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    np.testing.assert_allclose(predictions, softmax, rtol=1e-3, atol=1e-6)
    # The existing surgery applies: convolutionalized, it gives the same scores.
    heatmap = kfcn.convolutionalize(classifier)(x)
    assert heatmap.shape == (1, 1, 1, 1000)
    np.testing.assert_allclose(np.asarray(heatmap)[0, 0, 0], predictions, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_keras_weights_file(classifier, tmp_path):
    # build_fcn passes a weights file to the same AlexNet(weights=...) as the dump.
    path = str(tmp_path / "alexnet.weights.h5")
    classifier.save_weights(path)
    loaded = AlexNet(weights=path)
    for name in ("conv1", "conv4", "fc6", "fc8"):
        for mine, theirs in zip(
            loaded.get_layer(name).get_weights(), classifier.get_layer(name).get_weights()
        ):
            np.testing.assert_array_equal(mine, theirs)


@pytest.mark.slow
def test_save_load_safe_mode(fcn32s, tmp_path):
    path = tmp_path / "fcn32s_alexnet.keras"
    fcn32s.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    images = np.random.default_rng(7).uniform(0, 255, (1, 37, 53, 3)).astype(np.float32)
    np.testing.assert_allclose(loaded(images), fcn32s(images), rtol=1e-5, atol=1e-4)


@pytest.mark.slow
def test_dump_errors(classifier, dump, tmp_path):
    path = tmp_path / "partial.npy"
    _, data = dump
    np.save(path, {"conv1": [np.zeros((11, 11, 3, 96), np.float32), np.zeros(96, np.float32)]})
    with pytest.raises(ValueError, match=r"`weights`.*no entry for layer 'conv2'"):
        load_caffe_npy(classifier, path)
    ungrouped = {"conv1": data["conv1"], "conv2": [np.zeros((5, 5, 96, 256)), np.zeros(256)]}
    np.save(path, ungrouped)
    with pytest.raises(ValueError, match=r"`weights` entry 'conv2' has shape \(5, 5, 96, 256\)"):
        load_caffe_npy(classifier, path)
    # Nothing was set: the classifier still holds the dump's conv1.
    np.testing.assert_array_equal(classifier.get_layer("conv1").kernel.numpy(), data["conv1"][0])


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"`weights='imagenet'`"):
        AlexNet(weights="imagenet")
    with pytest.raises(ValueError, match=r"`input_shape`.*227"):
        AlexNet(input_shape=(224, 224, 3))
    with pytest.raises(ValueError, match=r"`padding`.*'full'"):
        AlexNet(padding="full")
    with pytest.raises(ValueError, match=r"`pooling`.*'sum'"):
        AlexNet(include_top=False, pooling="sum")
