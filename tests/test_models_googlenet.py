"""FCN-GoogLeNet: BVLC Inception v1 trunk, parameter counts by hand, numerics, save/load, export."""

import caffe_numpy as ref
import keras
import numpy as np
import pytest

import kfcn
from kfcn import geometry
from kfcn.models.googlenet import GoogLeNet

# Szegedy et al. 2015, table 1: input channels, then #1x1, #3x3 reduce, #3x3,
# #5x5 reduce, #5x5, pool proj.
PAPER_TABLE = {
    "3a": (192, 64, 96, 128, 16, 32, 32),
    "3b": (256, 128, 128, 192, 32, 96, 64),
    "4a": (480, 192, 96, 208, 16, 48, 64),
    "4b": (512, 160, 112, 224, 24, 64, 64),
    "4c": (512, 128, 128, 256, 24, 64, 64),
    "4d": (512, 112, 144, 288, 32, 64, 64),
    "4e": (528, 256, 160, 320, 32, 128, 128),
    "5a": (832, 256, 160, 320, 32, 128, 128),
    "5b": (832, 384, 192, 384, 48, 128, 128),
}


def _inception_parameters(cin, n1, r3, n3, r5, n5, proj):
    # Every convolution has a bias.
    return (
        (cin * n1 + n1)
        + (cin * r3 + r3)
        + (3 * 3 * r3 * n3 + n3)
        + (cin * r5 + r5)
        + (5 * 5 * r5 * n5 + n5)
        + (cin * proj + proj)
    )


STEM = (7 * 7 * 3 * 64 + 64) + (64 * 64 + 64) + (3 * 3 * 64 * 192 + 192)
TRUNK = STEM + sum(_inception_parameters(*row) for row in PAPER_TABLE.values())
SCORE_FR = 1024 * 21 + 21
SCORE_POOL4 = 832 * 21 + 21  # inception_4e, stride 16
SCORE_POOL3 = 480 * 21 + 21  # inception_3b, stride 8
COUNTS = {
    "fcn32s": (5_995_077, TRUNK + SCORE_FR),
    "fcn16s": (6_012_570, TRUNK + SCORE_FR + SCORE_POOL4),
    "fcn8s": (6_022_671, TRUNK + SCORE_FR + SCORE_POOL4 + SCORE_POOL3),
}


def _trainable(model):
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


def _dump(model, seed=0):
    """A random caffe-style dump of `model`: caffe names with '/', plus aux classifier entries."""
    rng = np.random.default_rng(seed)
    data = {"loss1/fc": [np.zeros((2048, 1024), np.float32), np.zeros(1024, np.float32)]}
    for layer in model.layers:
        if not layer.weights:
            continue
        kernel = layer.weights[0]
        fan_in = int(np.prod(kernel.shape[:-1]))
        # caffe's names: "conv1/7x7_s2", "inception_3a/pool_proj", "loss3/classifier".
        head, _, tail = layer.name.partition("_")
        if head == "inception":
            module, _, tail = tail.partition("_")
            head = f"inception_{module}"
        data[f"{head}/{tail}"] = [
            rng.normal(0, 2.0 / np.sqrt(fan_in), kernel.shape).astype(np.float32),
            rng.uniform(0, 0.5, kernel.shape[-1]).astype(np.float32),
        ]
    return data


@pytest.fixture(scope="module")
def fcn8s():
    return kfcn.build_fcn8s(backbone="googlenet", num_classes=21)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["fcn32s", "fcn16s"])
def test_parameter_counts_by_hand(variant):
    expected, by_hand = COUNTS[variant]
    assert expected == by_hand
    assert _trainable(kfcn.build_fcn(variant, backbone="googlenet", num_classes=21)) == expected


def test_fcn8s_count_taps_and_any_size(fcn8s):
    expected, by_hand = COUNTS["fcn8s"]
    assert expected == by_hand and _trainable(fcn8s) == expected
    taps = {"inception_3b_output": (8, 480), "inception_4e_output": (16, 832)}
    taps["inception_5b_output"] = (32, 1024)
    records = {layer.name: (tensor, geo) for layer, tensor, geo in geometry.trace(fcn8s)}
    for name, (stride, channels) in taps.items():
        tensor, geo = records[name]
        assert geo.stride == (stride, stride) and tensor.shape[-1] == channels, name
    assert fcn8s.get_layer("score_pool4").kernel.shape == (1, 1, 832, 21)
    assert fcn8s.get_layer("score_pool3").kernel.shape == (1, 1, 480, 21)
    # No average pooling, no classifier; caffe's LRN settings.
    names = {layer.name for layer in fcn8s.layers}
    assert not names & {"pool5_7x7_s1", "loss3_classifier", "predictions"}
    norm = fcn8s.get_layer("pool1_norm1")
    assert (norm.size, norm.alpha, norm.beta, norm.k) == (5, 1e-4, 0.75, 1.0)
    rng = np.random.default_rng(1)
    for name in ("score_fr", "score_pool4", "score_pool3"):
        layer = fcn8s.get_layer(name)
        layer.set_weights([rng.normal(size=w.shape).astype("float32") for w in layer.weights])
    for height, width in [(1, 1), (33, 47), (65, 97)]:
        images = rng.uniform(0, 255, (1, height, width, 3)).astype(np.float32)
        out = np.abs(np.asarray(fcn8s(images)))
        assert out.shape == (1, height, width, 21)
        assert out.max(axis=(0, 2, 3)).min() > 0 and out.max(axis=(0, 1, 3)).min() > 0


def test_stem_and_inception_3a_match_caffe_in_numpy(tmp_path):
    trunk = GoogLeNet(include_top=False)
    data = _dump(trunk)
    path = str(tmp_path / "googlenet.npy")
    np.save(path, data)
    trunk = GoogLeNet(include_top=False, weights=path)  # loads by caffe name, skips loss1/fc
    names = ("conv2_norm2", "inception_3a_output")
    probe = keras.Model(trunk.input, [trunk.get_layer(n).output for n in names])
    x = np.random.default_rng(2).normal(0, 60, (1, 64, 96, 3)).astype(np.float32)
    norm2, out3a = (np.asarray(t)[0] for t in probe(x))
    y = ref.conv(x[0], *data["conv1/7x7_s2"], stride=2, pad=(3, 3, 3, 3))  # caffe pad 3
    y = ref.lrn(ref.max_pool(y))
    y = ref.conv(y, *data["conv2/3x3_reduce"])
    y = ref.lrn(ref.conv(y, *data["conv2/3x3"], pad=(1, 1, 1, 1)))
    np.testing.assert_allclose(norm2, y, rtol=1e-3, atol=1e-3 * y.std())
    y = ref.max_pool(y)
    branches = [
        ref.conv(y, *data["inception_3a/1x1"]),
        ref.conv(
            ref.conv(y, *data["inception_3a/3x3_reduce"]),
            *data["inception_3a/3x3"],
            pad=(1, 1, 1, 1),
        ),
        ref.conv(
            ref.conv(y, *data["inception_3a/5x5_reduce"]),
            *data["inception_3a/5x5"],
            pad=(2, 2, 2, 2),
        ),
        ref.conv(ref.max_pool(y, 3, 1, pad=1), *data["inception_3a/pool_proj"]),
    ]
    expected = np.concatenate(branches, axis=-1)
    assert out3a.shape == expected.shape == (8, 12, 256)
    np.testing.assert_allclose(out3a, expected, rtol=1e-3, atol=1e-3 * expected.std())


@pytest.mark.slow
def test_classifier_and_weights_files_into_the_fcn(tmp_path):
    classifier = GoogLeNet()
    assert classifier.output_shape == (None, 1000)
    assert classifier.get_layer("pool5_7x7_s1").output.shape[1:3] == (1, 1)
    path = str(tmp_path / "googlenet.weights.h5")
    classifier.save_weights(path)
    model = kfcn.build_fcn32s(backbone="googlenet", num_classes=3, weights=path)
    data = _dump(classifier, seed=3)
    npy = str(tmp_path / "googlenet.npy")
    np.save(npy, data)
    from_npy = kfcn.build_fcn32s(backbone="googlenet", num_classes=3, weights=npy)
    for name in ("conv1_7x7_s2", "inception_4e_5x5", "inception_5b_pool_proj"):
        np.testing.assert_array_equal(
            model.get_layer(name).kernel.numpy(), classifier.get_layer(name).kernel.numpy()
        )
    np.testing.assert_array_equal(
        from_npy.get_layer("inception_4e_5x5").kernel.numpy(), data["inception_4e/5x5"][0]
    )


def test_save_load_safe_mode(fcn8s, tmp_path):
    path = tmp_path / "fcn8s_googlenet.keras"
    fcn8s.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    images = np.random.default_rng(4).uniform(0, 255, (1, 37, 53, 3)).astype(np.float32)
    np.testing.assert_allclose(loaded(images), fcn8s(images), rtol=1e-5, atol=1e-4)


@pytest.mark.slow
def test_export_saved_model_and_tflite(fcn8s, tmp_path):
    import tensorflow as tf

    from kfcn.export import saved_model, tflite

    images = np.random.default_rng(5).uniform(0, 255, (1, 32, 48, 3)).astype(np.uint8)
    expected = np.asarray(fcn8s(images.astype(np.float32)))
    export_dir = saved_model.export_saved_model(fcn8s, tmp_path / "sm", verify=False)
    served = tf.saved_model.load(export_dir).signatures["serving_default"]
    probabilities = served(images=tf.constant(images))["probabilities"].numpy()
    softmax = np.exp(expected - expected.max(-1, keepdims=True))
    softmax /= softmax.sum(-1, keepdims=True)
    # The random score layers give logits in the hundreds: float32 rounding moves
    # the steepest softmax entries by up to ~1e-4.
    np.testing.assert_allclose(probabilities, softmax, atol=1e-3)
    # TFLite: builtin ops the GPU delegate runs (POW and CONV_2D for the LRN).
    result = tflite.export_tflite(fcn8s, tmp_path / "m.tflite", (32, 48), gpu_check="error")
    interpreter = tf.lite.Interpreter(model_path=str(result.path))
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], images.astype(np.float32))
    interpreter.invoke()
    logits = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-3 * np.abs(expected).max())


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"`input_shape`.*224"):
        GoogLeNet(input_shape=(227, 227, 3))
    with pytest.raises(ValueError, match=r"`weights='imagenet'`"):
        GoogLeNet(weights="imagenet")
