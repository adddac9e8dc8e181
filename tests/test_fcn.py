"""The FCN builders: the paper's networks, every backbone, bad input."""

import keras
import numpy as np
import pytest

import kfcn
from kfcn import backbones, bilinear

# The reference nets' learned parameters (voc-fcn*s, VGG16, 21 classes), by hand:
# trunk 14,714,688; fc6 7*7*512*4096+4096; fc7 4096*4096+4096; score_fr 4096*21+21;
# score_pool4 512*21+21; score_pool3 256*21+21; FCN-4s's score_pool2 128*21+21.
TRUNK = 14_714_688
FC = 7 * 7 * 512 * 4096 + 4096 + 4096 * 4096 + 4096
SCORE_FR = 4096 * 21 + 21
REFERENCE_COUNTS = {
    "fcn32s": (134_346_581, TRUNK + FC + SCORE_FR),
    "fcn16s": (134_357_354, TRUNK + FC + SCORE_FR + 512 * 21 + 21),
    "fcn8s": (134_362_751, TRUNK + FC + SCORE_FR + 512 * 21 + 21 + 256 * 21 + 21),
    "fcn4s": (134_365_460, TRUNK + FC + SCORE_FR + 512 * 21 + 21 + 256 * 21 + 21 + 128 * 21 + 21),
}
ODD_SIZES = [(1, 1), (33, 47), (97, 131)]
# Every backbone the issue names; the rest of the table shares their code paths.
BACKBONES = [
    "vgg16", "vgg19", "resnet50", "resnet101", "resnet152", "resnet50v2", "mobilenet",
    "mobilenetv2", "mobilenetv3small", "mobilenetv3large",
    *[f"efficientnetb{i}" for i in range(8)],
    *[f"efficientnetv2b{i}" for i in range(4)],
    "convnexttiny", "densenet121", "xception",
]  # fmt: skip


def _trainable(model):
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


def _images(height, width, batch=1, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (batch, height, width, 3)).astype("float32")


@pytest.mark.parametrize("variant", ["fcn32s", "fcn16s", "fcn8s", "fcn4s"])
def test_vgg16_matches_reference(variant):
    model = kfcn.build_fcn(variant, backbone="vgg16")
    expected, by_hand = REFERENCE_COUNTS[variant]
    assert expected == by_hand
    assert _trainable(model) == expected
    names = {layer.name for layer in model.layers}
    paper = {
        "fcn32s": {"fc6", "fc7", "score_fr", "upscore"},
        "fcn16s": {"fc6", "fc7", "score_fr", "upscore2", "score_pool4", "fuse_pool4", "upscore16"},
        "fcn8s": {
            "fc6", "fc7", "score_fr", "upscore2", "score_pool4", "fuse_pool4", "upscore_pool4",
            "score_pool3", "fuse_pool3", "upscore8",
        },
        "fcn4s": {
            "fc6", "fc7", "score_fr", "upscore2", "score_pool4", "fuse_pool4", "upscore_pool4",
            "score_pool3", "fuse_pool3", "upscore_pool3", "score_pool2", "fuse_pool2", "upscore4",
        },
    }[variant]  # fmt: skip
    assert paper <= names
    assert model.get_layer("fc6").kernel.shape == (7, 7, 512, 4096)
    assert model.get_layer("fc7").kernel.shape == (1, 1, 4096, 4096)
    kernels = {
        "upscore": 64, "upscore2": 4, "upscore16": 32, "upscore_pool4": 4, "upscore8": 16,
        "upscore_pool3": 4, "upscore4": 8,
    }  # fmt: skip
    for name, size in kernels.items():
        if name in names:
            layer = model.get_layer(name)
            assert isinstance(layer, keras.layers.Conv2DTranspose)
            assert layer.kernel.shape == (size, size, 21, 21)
            assert not layer.trainable and layer.bias is None
            np.testing.assert_allclose(
                layer.kernel.numpy(), bilinear.bilinear_upsampling_weights(size, 21)
            )
    for height, width in [*ODD_SIZES, (375, 500)]:
        out = model(_images(height, width))
        assert out.shape == (1, height, width, 21) and out.dtype == "float32"


def test_fresh_skips_and_score_start_at_zero():
    model = kfcn.build_fcn4s(backbone="vgg16", num_classes=5)
    assert model.get_layer("score_pool2").kernel.shape == (1, 1, 128, 5)  # pool2: conv2_x
    for name in ("score_pool4", "score_pool3", "score_pool2", "score_fr"):
        for weight in model.get_layer(name).get_weights():
            assert not weight.any()


def test_trainable_upsampling_adds_the_upsampling_weights():
    frozen = kfcn.build_fcn16s(backbone="mobilenetv2", num_classes=4)
    learned = kfcn.build_fcn16s(backbone="mobilenetv2", num_classes=4, trainable_upsampling=True)
    # MobileNetV2's features sit on whole pixels, so its kernels are 2r - 1 wide.
    assert learned.get_layer("upscore2").kernel.shape[0] == 3
    assert learned.get_layer("upscore16").kernel.shape[0] == 31
    extra = 3 * 3 * 4 * 4 + 31 * 31 * 4 * 4
    assert _trainable(learned) - _trainable(frozen) == extra


def test_at_once_scales_pool4_and_pool3():
    model = kfcn.build_fcn8s(backbone="vgg16", at_once=True)
    assert model.get_layer("scale_pool4").scale == 0.01
    assert model.get_layer("scale_pool3").scale == 0.0001
    assert _trainable(model) == REFERENCE_COUNTS["fcn8s"][0]


def test_preprocessing_matches_keras_applications():
    from kfcn.layers import Preprocess

    x = _images(5, 7, batch=2)
    pairs = {
        "caffe": keras.applications.vgg16.preprocess_input,
        "tf": keras.applications.mobilenet_v2.preprocess_input,
        "torch": keras.applications.densenet.preprocess_input,
    }
    for mode, reference in pairs.items():
        np.testing.assert_allclose(
            Preprocess(mode)(x).numpy(), reference(x.copy()), rtol=1e-5, atol=1e-4
        )


def _score_randomly(model, seed=0):
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if layer.name.startswith("score_"):
            layer.set_weights([rng.normal(size=w.shape).astype("float32") for w in layer.weights])


def _assert_no_padding_border(out, where):
    # With non-zero scores every output pixel that comes from the network is
    # non-zero; a row or column of zeros is the crop's zero padding.
    magnitude = np.abs(np.asarray(out))
    rows, cols = magnitude.max(axis=(0, 2, 3)), magnitude.max(axis=(0, 1, 3))
    assert rows.min() > 0 and cols.min() > 0, (where, np.flatnonzero(rows == 0))


@pytest.mark.parametrize("backbone", BACKBONES)
def test_every_backbone_any_size(backbone):
    model = kfcn.build_fcn8s(backbone=backbone, num_classes=3)
    assert {"score_fr", "score_pool4", "score_pool3", "upscore8"} <= {
        layer.name for layer in model.layers
    }
    _score_randomly(model)
    for height, width in ODD_SIZES:
        out = model(_images(height, width))
        assert out.shape == (1, height, width, 3), (backbone, height, width)
        _assert_no_padding_border(out, (backbone, height, width))
    # The trunk is not a nested sub-model: its layers are the model's own (only
    # ConvNeXt's own Sequential stem/downsampling blocks stay nested, as in Keras).
    assert not any(
        isinstance(layer, keras.Model) and not isinstance(layer, keras.Sequential)
        for layer in model.layers
    )


# One backbone per rule of the stride-4 tap (a named layer, or found by position).
FINE_BACKBONES = [
    "vgg16", "resnet50", "resnet50v2", "mobilenet", "mobilenetv2", "mobilenetv3small",
    "efficientnetb0", "efficientnetv2b0", "convnexttiny", "densenet121", "xception",
    "resnet18v1c",
]  # fmt: skip


@pytest.mark.parametrize("backbone", FINE_BACKBONES)
def test_fcn4s_every_tap_rule_any_size(backbone):
    model = kfcn.build_fcn4s(backbone=backbone, num_classes=3)
    _score_randomly(model)
    for height, width in ODD_SIZES:
        out = model(_images(height, width))
        assert out.shape == (1, height, width, 3), (backbone, height, width)
        _assert_no_padding_border(out, (backbone, height, width))
    # The pool2 skip moves the output: zeroing it changes the scores.
    before = model(_images(64, 96)).numpy()
    for weight in model.get_layer("score_pool2").weights:
        weight.assign(np.zeros(weight.shape, np.float32))
    assert np.abs(model(_images(64, 96)).numpy() - before).max() > 1e-3


@pytest.mark.parametrize("backbone", ["resnet50", "mobilenetv2", "xception", "convnexttiny"])
@pytest.mark.parametrize("variant", ["fcn32s", "fcn16s"])
def test_coarser_variants_other_backbones(variant, backbone):
    model = kfcn.build_fcn(variant, backbone=backbone, num_classes=2)
    _score_randomly(model)
    for height, width in [(33, 47), (97, 131)]:
        out = model(_images(height, width))
        assert out.shape == (1, height, width, 2)
        _assert_no_padding_border(out, (variant, backbone, height, width))


def test_static_input_shape_and_uint8():
    model = kfcn.build_fcn8s(backbone="mobilenetv2", num_classes=4, input_shape=(97, 131, 3))
    assert model.output_shape == (None, 97, 131, 4)
    images = _images(97, 131, batch=2)
    out_u8 = model.predict(images.astype(np.uint8), verbose=0)
    out_f = model.predict(np.floor(images), verbose=0)
    np.testing.assert_allclose(out_u8, out_f, rtol=1e-5, atol=1e-5)


def test_keras_model_backbone_taps_found_by_position():
    # A hand-made classifier trunk: strides 2, 4, 8, 16, 32.
    inputs = keras.Input((None, None, 3))
    x = inputs
    for i in range(5):
        x = keras.layers.Conv2D(4 * (i + 1), 3, strides=2, padding="same", name=f"down{i}")(x)
    backbone = keras.Model(inputs, x, name="tiny")
    model = kfcn.build_fcn8s(backbone=backbone, num_classes=2)
    assert model(_images(45, 70)).shape == (1, 45, 70, 2)
    # The stride-8 tap is down2's output (4*3 channels) -> score_pool3 kernel.
    assert model.get_layer("score_pool3").kernel.shape == (1, 1, 12, 2)


def test_keras_model_backbone_without_taps():
    inputs = keras.Input((None, None, 3))
    x = keras.layers.Conv2D(4, 3, strides=2, padding="same")(inputs)
    shallow = keras.Model(inputs, x, name="shallow")
    with pytest.raises(ValueError, match=r"`backbone`.*stride"):
        kfcn.build_fcn8s(backbone=shallow)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"variant": "fcn2s"}, r"`variant` must be one of .*fcn4s.*fcn2s"),
        ({"variant": "fcn4s", "at_once": True}, r"`at_once`.*fcn4s"),
        ({"num_classes": 0}, r"`num_classes`.*num_classes=0"),
        ({"num_classes": 2.5}, r"`num_classes`.*2.5"),
        ({"backbone": "vgg17"}, r"`backbone`.*vgg17"),
        ({"backbone": 42}, r"`backbone`.*42"),
        ({"input_shape": (None, None, 1)}, r"`input_shape`.*1\)"),
        ({"input_shape": (64, 64)}, r"`input_shape`"),
        ({"input_shape": (0, 64, 3)}, r"`input_shape`"),
        ({"dropout": 1.5}, r"`dropout`.*1.5"),
        ({"weights": "/no/such/file.h5"}, r"`weights`.*/no/such/file.h5"),
        ({"weights": 3}, r"`weights`.*3"),
        ({"init_from": "/no/such/model.keras"}, r"`init_from`.*/no/such"),
    ],
)
def test_bad_arguments(kwargs, match):
    kwargs = {"variant": "fcn8s", "backbone": "mobilenetv2", **kwargs}
    with pytest.raises(ValueError, match=match):
        kfcn.build_fcn(**kwargs)


def test_save_load_round_trip(tmp_path):
    model = kfcn.build_fcn8s(backbone="mobilenetv2", num_classes=4)
    rng = np.random.default_rng(1)
    for name in ("score_fr", "score_pool4", "score_pool3"):
        layer = model.get_layer(name)
        layer.set_weights([rng.normal(size=w.shape).astype("float32") for w in layer.weights])
    path = tmp_path / "fcn8s.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    images = _images(33, 47)
    np.testing.assert_allclose(loaded(images), model(images), rtol=1e-5, atol=1e-5)
    assert kfcn.load_model(path).get_layer("upscore8").kernel.shape[-1] == 4
    # Config round trip too.
    rebuilt = keras.Model.from_config(model.get_config())
    rebuilt.set_weights(model.get_weights())
    np.testing.assert_allclose(rebuilt(images), model(images), rtol=1e-5, atol=1e-5)


def test_transplant_from_weights_file(tmp_path):
    classifier = keras.applications.VGG16(weights=None)
    path = str(tmp_path / "vgg16_classifier.weights.h5")
    classifier.save_weights(path)
    model = kfcn.build_fcn32s(backbone="vgg16", weights=path)
    np.testing.assert_array_equal(
        model.get_layer("block1_conv1").kernel.numpy(),
        classifier.get_layer("block1_conv1").kernel.numpy(),
    )
    np.testing.assert_array_equal(
        model.get_layer("block5_conv3").bias.numpy(),
        classifier.get_layer("block5_conv3").bias.numpy(),
    )
    fc1 = classifier.get_layer("fc1").kernel.numpy()  # (7*7*512, 4096), flattened h, w, c
    fc6 = model.get_layer("fc6").kernel.numpy()
    # Flatten order is row-major over (h, w, c): element (h, w, c) -> (h*7 + w)*512 + c.
    for h, w, c in [(0, 0, 0), (3, 5, 17), (6, 6, 511)]:
        np.testing.assert_array_equal(fc6[h, w, c], fc1[(h * 7 + w) * 512 + c])
    np.testing.assert_array_equal(
        model.get_layer("fc7").kernel.numpy()[0, 0], classifier.get_layer("fc2").kernel.numpy()
    )


def test_weights_file_that_does_not_fit(tmp_path):
    path = str(tmp_path / "mobilenet.weights.h5")
    keras.applications.MobileNetV2(alpha=0.35, weights=None).save_weights(path)
    with pytest.raises(ValueError, match=r"`weights`.*mobilenet.weights.h5"):
        kfcn.build_fcn8s(backbone="mobilenetv2", weights=path)


def test_transplant_non_vgg_from_weights_file(tmp_path):
    classifier = keras.applications.MobileNetV2(weights=None)
    path = str(tmp_path / "mobilenetv2.weights.h5")
    classifier.save_weights(path)
    model = kfcn.build_fcn8s(backbone="mobilenetv2", weights=path)
    for name in ("Conv1", "block_6_project", "Conv_1_bn"):
        for mine, theirs in zip(
            model.get_layer(name).get_weights(), classifier.get_layer(name).get_weights()
        ):
            np.testing.assert_array_equal(mine, theirs)


def test_imagenet_path_is_real_code(monkeypatch):
    """`weights="imagenet"` asks Keras Applications for the real classifier weights."""
    calls = []

    def fake_vgg16(include_top, weights, **kwargs):
        calls.append((include_top, weights))
        raise OSError("no network here")

    monkeypatch.setattr(keras.applications, "VGG16", fake_vgg16)
    with pytest.raises(backbones.WeightsUnavailableError, match=r"`weights.*imagenet.*no network"):
        backbones.build_classifier(backbones.get_spec("vgg16"), "imagenet")
    assert calls == [(True, "imagenet")]


def test_init_from_copies_same_named_layers(tmp_path):
    fcn32 = kfcn.build_fcn32s(backbone="mobilenetv2", num_classes=3)
    rng = np.random.default_rng(2)
    layer = fcn32.get_layer("score_fr")
    layer.set_weights([rng.normal(size=w.shape).astype("float32") for w in layer.weights])
    path = tmp_path / "fcn32s.keras"
    fcn32.save(path)
    for source in (fcn32, str(path)):
        fcn16 = kfcn.build_fcn16s(backbone="mobilenetv2", num_classes=3, init_from=source)
        for mine, theirs in zip(
            fcn16.get_layer("score_fr").get_weights(), layer.get_weights()
        ):
            np.testing.assert_array_equal(mine, theirs)
        np.testing.assert_array_equal(
            fcn16.get_layer("Conv1").kernel.numpy(), fcn32.get_layer("Conv1").kernel.numpy()
        )
        assert not fcn16.get_layer("score_pool4").kernel.numpy().any()


def test_init_from_with_other_shapes():
    fcn32 = kfcn.build_fcn32s(backbone="mobilenetv2", num_classes=3)
    with pytest.raises(ValueError, match=r"`init_from`.*score_fr"):
        kfcn.build_fcn16s(backbone="mobilenetv2", num_classes=5, init_from=fcn32)


def test_every_table_entry_names_a_keras_application():
    # The heavy backbones outside BACKBONES above are built once by hand, not in CI;
    # this pins that each table entry at least names a real constructor (Keras
    # Applications' or, with `module=`, one of kfcn's own).
    for name, spec in backbones.BACKBONES.items():
        assert callable(backbones.constructor_of(spec)), name
        assert spec.preprocessing in ("caffe", "tf", "torch", "none"), name


def test_mixed_bfloat16_policy_keeps_float32_logits():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = kfcn.build_fcn8s(backbone="mobilenetv2", num_classes=3)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert model.get_layer("score_fr").compute_dtype == "bfloat16"
    out = model(_images(33, 47))
    assert out.dtype == "float32" and out.shape == (1, 33, 47, 3)


def test_top_left_padding_survives_onnx_conversion():
    # tf2onnx lowers FloorMod with a truncating division: PadToMultiple must not
    # take the modulo of a negative size, or Xception's padded input comes out short.
    tf = pytest.importorskip("tensorflow")
    tf2onnx = pytest.importorskip("tf2onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    from kfcn.layers import PadToMultiple

    inputs = keras.Input((None, None, 3))
    pad = keras.Model(inputs, PadToMultiple(32, before=(2, 2))(inputs))
    spec = (tf.TensorSpec([None, None, None, 3], tf.float32, name="images"),)
    function = tf.function(lambda images: {"padded": pad(images)}, input_signature=spec)
    proto, _ = tf2onnx.convert.from_function(function, input_signature=spec, opset=17)
    session = onnxruntime.InferenceSession(proto.SerializeToString())
    images = _images(45, 77)
    expected = pad(images).numpy()
    assert expected.shape == (1, 64, 96, 3)
    np.testing.assert_array_equal(session.run(None, {"images": images})[0], expected)
