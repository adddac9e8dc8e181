"""SIFT Flow multi-task FCNs: `kfcn.build_fcn(..., heads={"sem": 33, "geo": 3})`."""

import keras
import numpy as np
import pytest

import kfcn

HEADS = {"sem": 5, "geo": 3}
# The reference siftflow nets' layer names, per variant (each with _sem and _geo).
REFERENCE_NAMES = {
    "fcn32s": ("score_fr", "upscore", "score"),
    "fcn16s": ("score_fr", "upscore2", "score_pool4", "fuse_pool4", "upscore16", "score"),
    "fcn8s": (
        "score_fr", "upscore2", "score_pool4", "fuse_pool4", "upscore_pool4", "score_pool3",
        "fuse_pool3", "upscore8", "score",
    ),
    "fcn4s": (
        "score_fr", "upscore2", "score_pool4", "fuse_pool4", "upscore_pool4", "score_pool3",
        "fuse_pool3", "upscore_pool3", "score_pool2", "fuse_pool2", "upscore4", "score",
    ),
}  # fmt: skip


def _trainable(model):
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


def _tiny_backbone():
    inputs = keras.Input((None, None, 3))
    x = inputs
    for i in range(5):
        x = keras.layers.Conv2D(4 * (i + 1), 3, strides=2, padding="same", name=f"down{i}")(x)
        x = keras.layers.ReLU(name=f"relu{i}")(x)
    return keras.Model(inputs, x, name="tiny")


def _images(height, width, batch=1, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (batch, height, width, 3)).astype("float32")


def _score_randomly(model, seed=0):
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if layer.name.startswith("score_") and layer.weights:
            layer.set_weights([rng.normal(size=w.shape).astype("float32") for w in layer.weights])


@pytest.mark.parametrize("variant", kfcn.VARIANTS)
def test_each_head_is_the_single_task_net(variant):
    """Same trunk, heads copied: each output equals a single-task FCN's output."""
    model = kfcn.build_fcn(variant, backbone=_tiny_backbone(), heads=HEADS)
    names = {layer.name for layer in model.layers}
    for task in HEADS:
        assert {f"{name}_{task}" for name in REFERENCE_NAMES[variant]} <= names
    assert set(model.output) == set(HEADS)
    _score_randomly(model)
    for task, classes in HEADS.items():
        single = kfcn.build_fcn(variant, backbone=_tiny_backbone(), num_classes=classes)
        for layer in single.layers:
            if layer.weights:
                source = layer.name if layer.name in names else f"{layer.name}_{task}"
                layer.set_weights(model.get_layer(source).get_weights())
        for height, width in [(1, 1), (33, 47), (64, 96)]:
            images = _images(height, width, seed=height)
            out = model(images)
            assert out[task].shape == (1, height, width, classes)
            np.testing.assert_allclose(out[task], single(images), rtol=1e-5, atol=1e-5)


def test_save_load_and_staged_init(tmp_path):
    fcn32 = kfcn.build_fcn32s(backbone=_tiny_backbone(), heads=HEADS)
    _score_randomly(fcn32)
    path = tmp_path / "siftflow32.keras"
    fcn32.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    images = _images(33, 47)
    for task in HEADS:
        np.testing.assert_allclose(loaded(images)[task], fcn32(images)[task], atol=1e-5)
    fcn16 = kfcn.build_fcn16s(backbone=_tiny_backbone(), heads=HEADS, init_from=str(path))
    for task in HEADS:
        np.testing.assert_array_equal(
            fcn16.get_layer(f"score_fr_{task}").kernel.numpy(),
            fcn32.get_layer(f"score_fr_{task}").kernel.numpy(),
        )
        assert not fcn16.get_layer(f"score_pool4_{task}").kernel.numpy().any()


def test_multitask_two_streams():
    model = kfcn.build_fcn16s(backbone=_tiny_backbone(), modality="rgb+hha", heads=HEADS)
    names = {layer.name for layer in model.layers}
    assert {"rgb_score_fr_sem", "hha_score_pool4_geo", "score_fused_sem", "upscore16_geo"} <= names
    out = model({"rgb": _images(33, 47), "hha": _images(33, 47, seed=1)})
    assert out["sem"].shape == (1, 33, 47, 5) and out["geo"].shape == (1, 33, 47, 3)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_classes": 33}, r"either `num_classes`.*or `heads`.*num_classes=33"),
        ({"heads": {}}, r"`heads` must be a non-empty dict"),
        ({"heads": [33, 3]}, r"`heads` must be a non-empty dict.*\[33, 3\]"),
        ({"heads": {"aux_sem": 3}}, r"`heads` keys.*aux_sem"),
        ({"heads": {"Sem": 3}}, r"`heads` keys.*Sem"),
        ({"heads": {"sem": 0}}, r"`heads` values.*heads\['sem'\]=0"),
    ],
)
def test_bad_heads(kwargs, match):
    kwargs = {"heads": {"sem": 33, "geo": 3}, **kwargs}
    with pytest.raises(ValueError, match=match):
        kfcn.build_fcn("fcn32s", backbone=_tiny_backbone(), **kwargs)


@pytest.mark.slow
def test_siftflow_fcn16s_vgg16_parameters_by_hand():
    model = kfcn.build_fcn16s(backbone="vgg16", heads={"sem": 33, "geo": 3})
    trunk, fc = 14_714_688, 7 * 7 * 512 * 4096 + 4096 + 4096 * 4096 + 4096
    heads = sum(4096 * k + k + 512 * k + k for k in (33, 3))  # score_fr_*, score_pool4_*
    assert _trainable(model) == trunk + fc + heads == 134_426_504
    assert model.get_layer("upscore2_sem").kernel.shape == (4, 4, 33, 33)
    assert model.get_layer("upscore16_geo").kernel.shape == (32, 32, 3, 3)
    out = model(_images(97, 131))
    assert out["sem"].shape == (1, 97, 131, 33) and out["geo"].shape == (1, 97, 131, 3)
