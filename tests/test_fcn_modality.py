"""NYUDv2 modalities of `kfcn.build_fcn`: HHA, RGB-D early fusion, RGB-HHA late fusion."""

import keras
import numpy as np
import pytest

import kfcn
from kfcn import modality

# By hand, as tests/test_fcn.py: VGG16 trunk, fc6/fc7, score_fr for NYUDv2's 40 classes.
TRUNK = 14_714_688
FC = 7 * 7 * 512 * 4096 + 4096 + 4096 * 4096 + 4096
SCORE_FR_40 = 4096 * 40 + 40
ODD_SIZES = [(1, 1), (33, 47), (97, 131)]


def _trainable(model):
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


def _tiny_backbone(name="tiny"):
    """Strides 2..32, layers down0..down4 (taps found by position)."""
    inputs = keras.Input((None, None, 3))
    x = inputs
    for i in range(5):
        x = keras.layers.Conv2D(4 * (i + 1), 3, strides=2, padding="same", name=f"down{i}")(x)
        x = keras.layers.ReLU(name=f"relu{i}")(x)
    return keras.Model(inputs, x, name=name)


def _images(height, width, channels=3, batch=1, seed=0, high=255.0):
    rng = np.random.default_rng(seed)
    return rng.uniform(0, high, (batch, height, width, channels)).astype("float32")


def _score_randomly(model, seed=0):
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        # score_fr, score_pool4, rgb_score_fr, ... (not the upsampling upscore_pool4)
        if layer.name.removeprefix("rgb_").removeprefix("hha_").startswith("score_"):
            layer.set_weights([rng.normal(size=w.shape).astype("float32") for w in layer.weights])


def test_rgbd_preprocess_is_the_reference_data_layer():
    rgb = _images(5, 7, seed=1)
    depth = np.random.default_rng(2).uniform(400, 9000, (1, 5, 7, 1)).astype("float32")
    depth[0, 0, 0, 0] = 0.0  # missing depth
    got = modality.RGBDPreprocess("caffe")(np.concatenate([rgb, depth], -1)).numpy()
    # nyud_layers.py: BGR minus mean; log(depth) - 7.844 (kfcn clamps depth at 1 first).
    bgr = rgb[..., ::-1] - np.array([103.939, 116.779, 123.68])
    logd = np.log(np.maximum(depth, 1.0)) - 7.844
    np.testing.assert_allclose(got, np.concatenate([bgr, logd], -1), rtol=1e-5, atol=1e-4)
    assert got[0, 0, 0, 3] == pytest.approx(-7.844)


def test_hha_uses_the_reference_mean_on_vgg_and_the_backbone_mode_otherwise():
    x = _images(4, 6)
    np.testing.assert_allclose(
        modality.HHAPreprocess()(x).numpy(), x - np.array([132.431, 94.076, 118.477]), atol=1e-4
    )
    # VGG16 (caffe) takes the reference's HHA mean: checked in the slow test below.
    mobile = kfcn.build_fcn32s(backbone="mobilenetv2", modality="hha", num_classes=4)
    assert mobile.get_layer("preprocess").mode == "tf"


@pytest.fixture(scope="module")
def mobilenet_classifier_file(tmp_path_factory):
    classifier = keras.applications.MobileNetV2(weights=None)
    path = str(tmp_path_factory.mktemp("weights") / "mobilenetv2.weights.h5")
    classifier.save_weights(path)
    return classifier, path


def test_rgbd_first_convolution_from_the_rgb_classifier(mobilenet_classifier_file):
    classifier, path = mobilenet_classifier_file
    model = kfcn.build_fcn32s(backbone="mobilenetv2", modality="rgbd", num_classes=4, weights=path)
    kernel = model.get_layer("Conv1").kernel.numpy()
    rgb = classifier.get_layer("Conv1").kernel.numpy()
    assert kernel.shape == (3, 3, 4, 32)
    np.testing.assert_array_equal(kernel[:, :, :3], rgb)
    # nyud-fcn32s-color-d/solve.py: the depth filter is the mean of the colour filters.
    np.testing.assert_allclose(kernel[:, :, 3], rgb.mean(axis=2), rtol=1e-6)
    for name in ("bn_Conv1", "block_6_project", "Conv_1_bn"):
        for mine, theirs in zip(
            model.get_layer(name).get_weights(), classifier.get_layer(name).get_weights()
        ):
            np.testing.assert_array_equal(mine, theirs)


@pytest.fixture(scope="module")
def rgbd_model():
    model = kfcn.build_fcn16s(backbone="mobilenetv2", modality="rgbd", num_classes=3)
    _score_randomly(model)
    return model


def test_rgbd_is_the_rgb_net_plus_a_depth_channel(rgbd_model):
    rgbd = rgbd_model
    rgb = kfcn.build_fcn32s(backbone="mobilenetv2", num_classes=3)
    for layer in rgbd.layers:
        target = rgb.get_layer(layer.name) if layer.name in {x.name for x in rgb.layers} else None
        if target is not None and layer.weights:
            values = layer.get_weights()
            if layer.name == "Conv1":
                values = [values[0][:, :, :3]]
            target.set_weights(values)
    image = _images(45, 70)

    # A random MobileNetV2 saturates its ReLU6s, so compare the first convolution's
    # output (the only layer that differs), where the image and depth enter.
    def first_conv(model):
        layers = [model.get_layer(name) for name in ("pad", "preprocess", "Conv1")]
        return lambda x: layers[2](layers[1](layers[0](x)))

    conv1_rgbd, conv1_rgb = first_conv(rgbd), first_conv(rgb)
    # Depth exp(7.844) is 0 after the log-mean: only the RGB filters act.
    flat = np.full((1, 45, 70, 1), np.exp(modality.LOG_DEPTH_MEAN), "float32")
    out = conv1_rgbd(np.concatenate([image, flat], -1)).numpy()
    np.testing.assert_allclose(out, conv1_rgb(image).numpy(), rtol=1e-4, atol=1e-4)
    ramp = np.linspace(500, 8000, 45 * 70, dtype="float32").reshape(1, 45, 70, 1)
    moved = conv1_rgbd(np.concatenate([image, ramp], -1)).numpy()
    assert np.abs(moved - out).max() > 1e-2
    for height, width in ODD_SIZES:
        assert rgbd(_images(height, width, 4)).shape == (1, height, width, 3)


@pytest.mark.parametrize("variant", ["fcn32s", "fcn8s"])
def test_rgb_hha_is_the_average_of_two_single_stream_nets(variant, tmp_path):
    rgb_net = kfcn.build_fcn(variant, backbone=_tiny_backbone(), num_classes=3)
    hha_net = kfcn.build_fcn(variant, backbone=_tiny_backbone(), num_classes=3)
    _score_randomly(rgb_net, seed=1)
    _score_randomly(hha_net, seed=2)
    rgb_path = tmp_path / "rgb.keras"
    rgb_net.save(rgb_path)
    fused = kfcn.build_fcn(
        variant,
        backbone=_tiny_backbone(),
        modality="rgb+hha",
        num_classes=3,
        init_from={"rgb": str(rgb_path), "hha": hha_net},
    )
    names = {layer.name for layer in fused.layers}
    assert {"rgb_down0", "hha_down0", "rgb_score_fr", "hha_score_fr", "score_fused"} <= names
    assert [t.name for t in fused.inputs] == ["rgb", "hha"] or set(fused.input) == {"rgb", "hha"}
    np.testing.assert_array_equal(
        fused.get_layer("hha_down3").kernel.numpy(), hha_net.get_layer("down3").kernel.numpy()
    )
    for height, width in [(33, 47), (64, 96)]:
        rgb, hha = _images(height, width, seed=3), _images(height, width, seed=4)
        out = fused({"rgb": rgb, "hha": hha}).numpy()
        assert out.shape == (1, height, width, 3)
        # Scores averaged before the (linear, shared) upsampling = average of the nets.
        expected = 0.5 * (rgb_net(rgb).numpy() + hha_net(hha).numpy())
        np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
        moved = fused({"rgb": rgb, "hha": _images(height, width, seed=5)}).numpy()
        assert np.abs(moved - out).max() > 1e-3


def test_save_load_safe_mode(tmp_path, rgbd_model):
    fused = kfcn.build_fcn8s(num_classes=3, backbone=_tiny_backbone(), modality="rgb+hha")
    _score_randomly(fused)
    for model, inputs in [
        (rgbd_model, _images(33, 47, 4, high=4000)),
        (fused, {"rgb": _images(33, 47), "hha": _images(33, 47, seed=1)}),
    ]:
        path = tmp_path / f"{model.name}.keras"
        model.save(path)
        loaded = keras.saving.load_model(path, safe_mode=True)
        np.testing.assert_allclose(loaded(inputs), model(inputs), rtol=1e-5, atol=1e-5)
    rebuilt = keras.Model.from_config(fused.get_config())
    rebuilt.set_weights(fused.get_weights())
    np.testing.assert_allclose(rebuilt(inputs), fused(inputs), rtol=1e-5, atol=1e-5)


def test_staged_init_from_keeps_both_streams():
    fcn32 = kfcn.build_fcn32s(backbone=_tiny_backbone(), modality="rgb+hha", num_classes=3)
    _score_randomly(fcn32)
    fcn16 = kfcn.build_fcn16s(
        backbone=_tiny_backbone(), modality="rgb+hha", num_classes=3, init_from=fcn32
    )
    for name in ("rgb_score_fr", "hha_score_fr", "hha_down4"):
        np.testing.assert_array_equal(
            fcn16.get_layer(name).kernel.numpy(), fcn32.get_layer(name).kernel.numpy()
        )
    assert not fcn16.get_layer("hha_score_pool4").kernel.numpy().any()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"modality": "depth"}, r"`modality` must be one of .*depth"),
        ({"modality": "rgbd", "input_shape": (None, None, 3)}, r"`input_shape`.*4\).*rgbd"),
        ({"modality": "rgb+hha", "input_shape": (None, None, 6)}, r"`input_shape`.*6\)"),
        ({"modality": "rgbd", "backbone": "efficientnetb0"}, r"`modality`='rgbd'.*efficientnet"),
        ({"modality": "rgbd", "backbone": "KERAS_MODEL"}, r"`modality`='rgbd'.*4 channels.*tiny"),
        ({"init_from": {"rgb": None}}, r"`init_from` may be a dict only.*'rgb'"),
        ({"modality": "rgb+hha", "init_from": {"depth": None}}, r"`init_from`.*depth"),
    ],
)
def test_bad_modality_arguments(kwargs, match):
    if kwargs.get("backbone") == "KERAS_MODEL":
        kwargs["backbone"] = _tiny_backbone()
    kwargs = {"variant": "fcn32s", "backbone": "mobilenetv2", "num_classes": 3, **kwargs}
    with pytest.raises(ValueError, match=match):
        kfcn.build_fcn(**kwargs)


@pytest.mark.slow
def test_vgg16_parameter_counts_by_hand():
    """nyud-fcn32s-color-hha: two FCN-32s VGG16 streams; -color-d: one 4-channel conv1_1."""
    fused = kfcn.build_fcn32s(backbone="vgg16", modality="rgb+hha", num_classes=40)
    assert _trainable(fused) == 2 * (TRUNK + FC + SCORE_FR_40) == 268_848_848
    assert fused.get_layer("rgb_block1_conv1").kernel.shape == (3, 3, 3, 64)
    assert fused.get_layer("hha_fc6").kernel.shape == (7, 7, 512, 4096)
    assert fused.get_layer("hha_score_fr").kernel.shape == (1, 1, 4096, 40)
    assert fused.get_layer("upscore").kernel.shape == (64, 64, 40, 40)
    # The HHA stream on VGG16 (caffe) subtracts the reference's HHA mean, file order.
    assert isinstance(fused.get_layer("hha_preprocess"), modality.HHAPreprocess)
    assert fused.get_layer("hha_pad").value == pytest.approx(modality.HHA_MEAN)
    assert fused.get_layer("rgb_preprocess").mode == "caffe"
    del fused
    early = kfcn.build_fcn32s(backbone="vgg16", modality="rgbd", num_classes=40)
    assert _trainable(early) == TRUNK + 3 * 3 * 1 * 64 + FC + SCORE_FR_40 == 134_425_000
    assert early.get_layer("block1_conv1").kernel.shape == (3, 3, 4, 64)
    for height, width in [(1, 1), (97, 131)]:
        assert early(_images(height, width, 4)).shape == (1, height, width, 40)
