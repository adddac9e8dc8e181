"""kfcn's ResNet V1b/V1c against hand-derived parameter counts and a numpy ResNet.

The reference forward pass below is written from torchvision's and mmseg's
module definitions (torch layouts OIHW, symmetric padding, -inf max-pool
padding, BatchNorm in eval mode) and reads the same state dict the model loads,
so layout conversion, padding, strides, dilations and names are all checked
against code that shares nothing with `kfcn.models.resnet`.
"""

import keras
import numpy as np
import pytest

import kfcn
from kfcn import backbones, geometry
from kfcn.models import resnet
from kfcn.models.torch_weights import load_torch_state_dict

# Blocks per stage (He et al. 2016, Table 1).
BLOCKS = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}
BOTTLENECK = {18: False, 34: False, 50: True, 101: True, 152: True}


# --- Parameter counts, from the architecture (He et al. 2016, Table 1) ------------------


def conv(k, cin, cout):
    return k * k * cin * cout  # no bias: BatchNorm follows


def bn(c):
    return 2 * c  # gamma, beta (running statistics are buffers, not parameters)


def hand_count(depth, stem, classes=1000):
    """Trainable parameters of torchvision's (v1b) or mmseg's (v1c) ResNet with fc."""
    if stem == "v1b":
        total = conv(7, 3, 64) + bn(64)
    else:  # three 3x3 convolutions 3->32->32->64
        total = conv(3, 3, 32) + bn(32) + conv(3, 32, 32) + bn(32) + conv(3, 32, 64) + bn(64)
    cin = 64
    for stage, count in enumerate(BLOCKS[depth]):
        planes = 64 * 2**stage
        for index in range(count):
            if BOTTLENECK[depth]:
                cout = 4 * planes
                total += conv(1, cin, planes) + bn(planes)
                total += conv(3, planes, planes) + bn(planes)
                total += conv(1, planes, cout) + bn(cout)
            else:
                cout = planes
                total += conv(3, cin, planes) + bn(planes) + conv(3, planes, planes) + bn(planes)
            if index == 0 and (stage > 0 or cin != cout):
                total += conv(1, cin, cout) + bn(cout)  # downsample_0, downsample_1
            cin = cout
    return total + cin * classes + classes  # fc


def trainable(model):
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


def test_hand_counts_match_torchvision():
    # torchvision's published counts (torchvision.models docs, num_params).
    assert hand_count(18, "v1b") == 11_689_512
    assert hand_count(50, "v1b") == 25_557_032
    assert hand_count(101, "v1b") == 44_549_160
    assert hand_count(34, "v1b") == 21_797_672
    assert hand_count(152, "v1b") == 60_192_808
    # The deep stem: 864 + 9216 + 18432 weights and 2 x (32 + 32 + 64) BN
    # parameters replace conv1's 7 x 7 x 3 x 64 = 9408 and bn1's 128.
    delta = (864 + 9216 + 18432 + 256) - (9408 + 128)
    assert delta == 19_232
    for depth in BLOCKS:
        assert hand_count(depth, "v1c") - hand_count(depth, "v1b") == delta


@pytest.fixture(scope="module")
def r18():
    return resnet.ResNet18V1b(classifier_activation=None)


@pytest.fixture(scope="module")
def r18c():
    return resnet.ResNet18V1c()


def test_resnet18_counts(r18, r18c):
    assert trainable(r18) == hand_count(18, "v1b") == 11_689_512
    assert trainable(r18c) == hand_count(18, "v1c") == 11_689_512 + 19_232
    # The BatchNorm buffers: 2 per channel of every bn (half the BN parameters).
    bn_channels = sum(
        layer.gamma.shape[0]
        for layer in r18.layers
        if isinstance(layer, keras.layers.BatchNormalization)
    )
    assert r18.count_params() - trainable(r18) == 2 * bn_channels


@pytest.fixture(scope="module")
def r50():
    return resnet.ResNet50V1b(classifier_activation=None)


@pytest.mark.slow
def test_resnet50_101_counts(r50):
    assert trainable(r50) == hand_count(50, "v1b") == 25_557_032
    r101 = resnet.ResNet101V1c()
    assert trainable(r101) == hand_count(101, "v1c") == 44_549_160 + 19_232
    del r101


def test_names_are_torch_names_and_deterministic(r18):
    again = resnet.ResNet18V1b(classifier_activation=None)
    assert [layer.name for layer in again.layers] == [layer.name for layer in r18.layers]
    names = {layer.name for layer in r18.layers}
    for name in (
        "conv1", "bn1", "maxpool", "layer1_0_conv1", "layer1_1_bn2", "layer2_0_downsample_0",
        "layer2_0_downsample_1", "layer4_1_out", "layer2_out", "layer4_out", "fc",
    ):  # fmt: skip
        assert name in names
    assert "layer1_0_downsample_0" not in names  # 64 -> 64 at stride 1: no projection


# --- A numpy ResNet, from torch's definitions ----------------------------------------


def np_conv(x, w, stride=1, padding=0, dilation=1):
    """torch.nn.functional.conv2d on NHWC `x` with an OIHW kernel, no bias."""
    x = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    _, kh, kw = w.shape[0], w.shape[2], w.shape[3]
    rows = (x.shape[1] - dilation * (kh - 1) - 1) // stride + 1
    cols = (x.shape[2] - dilation * (kw - 1) - 1) // stride + 1
    out = np.zeros((x.shape[0], rows, cols, w.shape[0]))
    for i in range(kh):
        for j in range(kw):
            patch = x[
                :,
                i * dilation : i * dilation + stride * (rows - 1) + 1 : stride,
                j * dilation : j * dilation + stride * (cols - 1) + 1 : stride,
            ]
            out += patch @ w[:, :, i, j].T
    return out


def np_maxpool(x):
    """MaxPool2d(3, stride=2, padding=1): -inf padding."""
    x = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
    rows, cols = (x.shape[1] - 3) // 2 + 1, (x.shape[2] - 3) // 2 + 1
    windows = [
        x[:, i : i + 2 * (rows - 1) + 1 : 2, j : j + 2 * (cols - 1) + 1 : 2]
        for i in range(3)
        for j in range(3)
    ]
    return np.max(windows, axis=0)


def np_bn(x, sd, key):
    scale = sd[f"{key}.weight"] / np.sqrt(sd[f"{key}.running_var"] + 1e-5)
    return (x - sd[f"{key}.running_mean"]) * scale + sd[f"{key}.bias"]


def relu(x):
    return np.maximum(x, 0)


def np_resnet(x, sd, depth, stem, strides=(1, 2, 2, 2), dilations=(1, 1, 1, 1), prefix=""):
    """mmseg's ResNet forward (contract_dilation=True): the stage outputs and fc logits."""
    p = prefix
    if stem == "v1b":
        x = relu(np_bn(np_conv(x, sd[f"{p}conv1.weight"], 2, 3), sd, f"{p}bn1"))
    else:
        x = relu(np_bn(np_conv(x, sd[f"{p}stem.0.weight"], 2, 1), sd, f"{p}stem.1"))
        x = relu(np_bn(np_conv(x, sd[f"{p}stem.3.weight"], 1, 1), sd, f"{p}stem.4"))
        x = relu(np_bn(np_conv(x, sd[f"{p}stem.6.weight"], 1, 1), sd, f"{p}stem.7"))
    x = np_maxpool(x)
    outs = []
    for stage, count in enumerate(BLOCKS[depth]):
        for index in range(count):
            b = f"{p}layer{stage + 1}.{index}"
            stride = strides[stage] if index == 0 else 1
            d = dilations[stage]
            d = d // 2 if index == 0 and d > 1 else d
            if BOTTLENECK[depth]:
                y = relu(np_bn(np_conv(x, sd[f"{b}.conv1.weight"]), sd, f"{b}.bn1"))
                y = np_conv(y, sd[f"{b}.conv2.weight"], stride, d, d)
                y = relu(np_bn(y, sd, f"{b}.bn2"))
                y = np_bn(np_conv(y, sd[f"{b}.conv3.weight"]), sd, f"{b}.bn3")
            else:
                y = np_conv(x, sd[f"{b}.conv1.weight"], stride, d, d)
                y = relu(np_bn(y, sd, f"{b}.bn1"))
                # mmseg's BasicBlock: conv2 is never dilated.
                y = np_bn(np_conv(y, sd[f"{b}.conv2.weight"], 1, 1), sd, f"{b}.bn2")
            if f"{b}.downsample.0.weight" in sd:
                x = np_bn(
                    np_conv(x, sd[f"{b}.downsample.0.weight"], stride), sd, f"{b}.downsample.1"
                )
            x = relu(y + x)
        outs.append(x)
    logits = None
    if "fc.weight" in sd:
        logits = x.mean(axis=(1, 2)) @ sd["fc.weight"].T + sd["fc.bias"]
    return outs, logits


def torch_state_dict(depth, stem, seed=0, prefix="", fc=True):
    """A state dict with torchvision's (v1b) or mmseg's (v1c) keys and random values."""
    rng = np.random.default_rng(seed)
    sd = {}

    def add_conv(key, cout, cin, k):
        std = np.sqrt(2.0 / (cin * k * k))
        sd[f"{prefix}{key}.weight"] = rng.normal(0, std, (cout, cin, k, k)).astype(np.float32)

    def add_bn(key, c):
        sd[f"{prefix}{key}.weight"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
        sd[f"{prefix}{key}.bias"] = rng.normal(0, 0.1, c).astype(np.float32)
        sd[f"{prefix}{key}.running_mean"] = rng.normal(0, 0.1, c).astype(np.float32)
        sd[f"{prefix}{key}.running_var"] = rng.uniform(0.5, 2.0, c).astype(np.float32)
        sd[f"{prefix}{key}.num_batches_tracked"] = np.array(7, np.int64)

    if stem == "v1b":
        add_conv("conv1", 64, 3, 7)
        add_bn("bn1", 64)
    else:
        add_conv("stem.0", 32, 3, 3)
        add_bn("stem.1", 32)
        add_conv("stem.3", 32, 32, 3)
        add_bn("stem.4", 32)
        add_conv("stem.6", 64, 32, 3)
        add_bn("stem.7", 64)
    cin = 64
    for stage, count in enumerate(BLOCKS[depth]):
        planes = 64 * 2**stage
        for index in range(count):
            b = f"layer{stage + 1}.{index}"
            if BOTTLENECK[depth]:
                cout = 4 * planes
                add_conv(f"{b}.conv1", planes, cin, 1)
                add_bn(f"{b}.bn1", planes)
                add_conv(f"{b}.conv2", planes, planes, 3)
                add_bn(f"{b}.bn2", planes)
                add_conv(f"{b}.conv3", cout, planes, 1)
                add_bn(f"{b}.bn3", cout)
            else:
                cout = planes
                add_conv(f"{b}.conv1", planes, cin, 3)
                add_bn(f"{b}.bn1", planes)
                add_conv(f"{b}.conv2", planes, planes, 3)
                add_bn(f"{b}.bn2", planes)
            if index == 0 and (stage > 0 or cin != cout):
                add_conv(f"{b}.downsample.0", cout, cin, 1)
                add_bn(f"{b}.downsample.1", cout)
            cin = cout
    if fc:
        sd["fc.weight"] = rng.normal(0, 0.01, (1000, cin)).astype(np.float32)
        sd["fc.bias"] = rng.normal(0, 0.01, 1000).astype(np.float32)
    return sd


def save(tmp_path, name, sd):
    path = tmp_path / name
    np.savez(path, **sd)
    return path


def assert_close(actual, expected):
    actual = np.asarray(actual, np.float64)
    scale = np.abs(expected).max()
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-4 * scale)


def stage_model(model, names=("layer1_out", "layer2_out", "layer3_out", "layer4_out")):
    return keras.Model(model.input, [model.get_layer(n).output for n in names])


def test_torchvision_resnet18_numerics(r18, tmp_path):
    sd = torch_state_dict(18, "v1b", seed=1)
    loaded = load_torch_state_dict(r18, save(tmp_path, "r18.npz", sd))
    assert "layer4_1_bn2" in loaded and "fc" in loaded
    # Even and odd sizes: torch and Keras "same" pad differently only on even ones.
    x = np.random.default_rng(2).uniform(-2, 2, (1, 64, 45, 3))
    outs, logits = np_resnet(x, sd, 18, "v1b")
    got = stage_model(r18, ("layer1_out", "layer4_out"))(x.astype("float32"), training=False)
    assert_close(got[0], outs[0])
    assert_close(got[1], outs[3])
    assert_close(r18(x.astype("float32"), training=False), logits)


def test_mmseg_resnet18_v1c_d8_numerics(tmp_path):
    # mmseg's backbone keys, an odd input, output stride 8 with contract_dilation.
    # The ImageNet classifier's fc is in the file: skipped, as the trunk has none.
    sd = torch_state_dict(18, "v1c", seed=3, prefix="backbone.", fc=True)
    model = resnet.ResNet18V1c(include_top=False, output_stride=8)
    load_torch_state_dict(model, save(tmp_path, "r18c.npz", sd))
    x = np.random.default_rng(4).uniform(-2, 2, (1, 36, 29, 3))
    plain = {k[len("backbone.") :]: v for k, v in sd.items()}
    outs, _ = np_resnet(x, plain, 18, "v1c", strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4))
    got = stage_model(model)(x.astype("float32"), training=False)
    for g, e in zip(got, outs):
        assert_close(g, e)


@pytest.mark.slow
def test_torchvision_resnet50_numerics(r50, tmp_path):
    sd = torch_state_dict(50, "v1b", seed=5)
    load_torch_state_dict(r50, save(tmp_path, "r50.npz", sd))
    x = np.random.default_rng(6).uniform(-2, 2, (1, 33, 40, 3))
    outs, logits = np_resnet(x, sd, 50, "v1b")
    got = stage_model(r50, ("layer2_out", "fc"))(x.astype("float32"), training=False)
    assert_close(got[0], outs[1])
    assert_close(got[1], logits)


def test_wrong_or_missing_names_fail_clearly(r18, tmp_path):
    sd = torch_state_dict(18, "v1b", seed=7)
    before = r18.get_layer("conv1").kernel.numpy().copy()

    missing = dict(sd)
    del missing["layer3.1.bn2.running_var"]
    with pytest.raises(ValueError, match=r"not in the file: layer3_1_bn2/moving_variance"):
        load_torch_state_dict(r18, save(tmp_path, "missing.npz", missing))

    extra = {**sd, "layer5.0.conv1.weight": np.zeros((8, 8, 3, 3), np.float32)}
    with pytest.raises(ValueError, match=r"match no layer weight: layer5\.0\.conv1\.weight"):
        load_torch_state_dict(r18, save(tmp_path, "extra.npz", extra))

    wrong = {**sd, "layer1.0.conv1.weight": np.zeros((64, 64, 1, 1), np.float32)}
    with pytest.raises(ValueError, match=r"do not fit: layer1\.0\.conv1\.weight \(64, 64, 1, 1\)"):
        load_torch_state_dict(r18, save(tmp_path, "wrong.npz", wrong))
    # Nothing was assigned by the failed loads.
    np.testing.assert_array_equal(r18.get_layer("conv1").kernel.numpy(), before)

    # strict=False loads what fits and leaves the rest.
    loaded = load_torch_state_dict(r18, save(tmp_path, "partial.npz", missing), strict=False)
    assert "conv1" in loaded and "layer3_1_bn2" in loaded  # its other three tensors

    # DataParallel's "module." prefix is dropped.
    wrapped = {f"module.{key}": value for key, value in sd.items()}
    assert "fc" in load_torch_state_dict(r18, save(tmp_path, "wrapped.npz", wrapped))

    with pytest.raises(ValueError, match="`npz_path` must be an existing"):
        load_torch_state_dict(r18, tmp_path / "absent.npz")


# --- Output strides, backbone table, FCNs --------------------------------------------


def torch_size(n, stride):
    """Size after a stride-`stride` ResNet trunk: every stride-2 layer gives ceil(n / 2)."""
    while stride > 1:
        n, stride = -(-n // 2), stride // 2
    return n


@pytest.mark.parametrize("output_stride", [8, 16])
def test_output_stride_geometry_and_shapes(output_stride):
    model = resnet.ResNet18V1b(include_top=False, output_stride=output_stride)
    strides = {layer.name: geo.stride for layer, _, geo in geometry.trace(model)}
    expected = {"layer1_out": 4, "layer2_out": 8, "layer3_out": 16, "layer4_out": 32}
    for name, stride in expected.items():
        stride = min(stride, output_stride)
        assert strides[name] == (stride, stride)
    # mmseg: D8 runs layer3 at dilation 2 (first block 1), layer4 at 4 (first block 2).
    rates = {
        8: {"layer3_0": 1, "layer3_1": 2, "layer4_0": 2, "layer4_1": 4},
        16: {"layer3_0": 1, "layer3_1": 1, "layer4_0": 1, "layer4_1": 2},
    }[output_stride]
    for block, rate in rates.items():
        assert model.get_layer(f"{block}_conv1").dilation_rate == (rate, rate)
        assert model.get_layer(f"{block}_conv2").dilation_rate == (1, 1)
    for rows, cols in [(33, 47), (64, 64), (1, 3)]:
        out = stage_model(model, ("layer2_out", "layer4_out"))(
            np.zeros((1, rows, cols, 3), "float32"), training=False
        )
        assert out[0].shape == (1, torch_size(rows, 8), torch_size(cols, 8), 128)
        shape = (1, torch_size(rows, output_stride), torch_size(cols, output_stride), 512)
        assert out[1].shape == shape


@pytest.fixture(scope="module")
def r50c_d8():
    return resnet.ResNet50V1c(include_top=False, output_stride=8)


def test_bottleneck_dilates_conv2(r50c_d8):
    model = r50c_d8
    assert model.get_layer("layer4_0_conv2").dilation_rate == (2, 2)
    assert model.get_layer("layer4_2_conv2").dilation_rate == (4, 4)
    assert model.get_layer("layer4_0_conv1").dilation_rate == (1, 1)
    assert model.get_layer("layer4_0_downsample_0").strides == (1, 1)


def test_argument_errors():
    with pytest.raises(
        ValueError, match="`output_stride` must be one of .* Received: output_stride=12"
    ):
        resnet.ResNet18V1c(output_stride=12)
    with pytest.raises(ValueError, match="load_torch_state_dict"):
        resnet.ResNet18V1c(weights="imagenet")
    with pytest.raises(ValueError, match="Received: multi_grid=\\(1, 2, 4\\)"):
        resnet.ResNet18V1c(multi_grid=(1, 2, 4))
    with pytest.raises(ValueError, match="Received: weights='nope.h5'"):
        resnet.ResNet18V1c(weights="nope.h5")


def test_backbone_rows():
    for depth in (18, 34, 50, 101, 152):
        for stem in ("v1b", "v1c"):
            spec = backbones.get_spec(f"resnet{depth}_{stem}")
            assert spec is backbones.get_spec(f"ResNet{depth}{stem}")
            assert spec.module == "kfcn.models.resnet"
            assert backbones.constructor_of(spec) is resnet.CONSTRUCTORS[f"resnet{depth}_{stem}"]
    # mmseg's img_norm_cfg (mean 123.675 116.28 103.53, std 58.395 57.12 57.375)
    # is the "torch" mode: check it on a pixel.
    pixel = np.array([[[[10.0, 128.0, 250.0]]]], "float32")
    got = kfcn.layers.Preprocess("torch")(pixel).numpy().ravel()
    mean, std = np.array([123.675, 116.28, 103.53]), np.array([58.395, 57.12, 57.375])
    np.testing.assert_allclose(got, (pixel.ravel() - mean) / std, rtol=1e-5)


def test_fcn8s_on_resnet18_v1c_with_converted_weights(tmp_path):
    sd = torch_state_dict(18, "v1c", seed=9)
    path = save(tmp_path, "r18c_in1k.npz", sd)
    model = kfcn.build_fcn8s(backbone="resnet18_v1c", num_classes=5, weights=str(path))
    kernel = model.get_layer("stem_0").kernel.numpy()
    np.testing.assert_array_equal(kernel, sd["stem.0.weight"].transpose(2, 3, 1, 0))
    assert model(np.zeros((1, 45, 61, 3), "float32"), training=False).shape == (1, 45, 61, 5)
    # The whole FCN loads a backbone checkpoint by name (its score layers untouched).
    sd2 = torch_state_dict(18, "v1c", seed=10, prefix="backbone.", fc=False)
    load_torch_state_dict(model, save(tmp_path, "mmseg.npz", sd2))
    np.testing.assert_array_equal(
        model.get_layer("layer4_1_bn2").moving_variance.numpy(),
        sd2["backbone.layer4.1.bn2.running_var"],
    )


def test_save_and_reload(tmp_path):
    model = resnet.ResNet18V1c(include_top=False, output_stride=16, input_shape=(None, None, 3))
    path = tmp_path / "r18c.keras"
    model.save(path)
    again = keras.saving.load_model(path, safe_mode=True)
    x = np.random.default_rng(0).uniform(0, 1, (1, 35, 41, 3)).astype("float32")
    np.testing.assert_allclose(again(x, training=False), model(x, training=False), atol=1e-6)


def test_keras_weights_file(r18c, tmp_path):
    # `weights=` takes a Keras weights file too, as Keras Applications do.
    path = tmp_path / "r18c.weights.h5"
    r18c.save_weights(path)
    again = resnet.ResNet18V1c(weights=str(path))
    np.testing.assert_array_equal(
        again.get_layer("layer3_0_downsample_0").kernel.numpy(),
        r18c.get_layer("layer3_0_downsample_0").kernel.numpy(),
    )
    # The classifier's file also fits the dilated trunk without fc (build_dilated_fcn's use).
    trunk = resnet.ResNet18V1c(include_top=False, output_stride=8, weights=str(path))
    np.testing.assert_array_equal(
        trunk.get_layer("layer4_1_conv2").kernel.numpy(),
        r18c.get_layer("layer4_1_conv2").kernel.numpy(),
    )


@pytest.mark.slow
def test_bottleneck_output_stride_8_is_filter_rarefaction(r50c_d8):
    # With contract_dilation, mmseg's D8 Bottleneck ResNet is exactly the paper's
    # filter rarefaction of the stride-32 network (section 3.2): its stride-8
    # map, sampled every 4 pixels, is the original one. kfcn.dilate (the
    # graph rewrite) must build the same network. (A BasicBlock differs: mmseg
    # leaves its conv2 undilated.)
    dilation = pytest.importorskip("kfcn.dilation")
    original = resnet.ResNet50V1c(include_top=False)
    ours = r50c_d8
    rng = np.random.default_rng(11)
    for layer in original.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            c = layer.gamma.shape
            values = [rng.uniform(0.5, 1.5, c), rng.normal(0, 0.1, c)]
            values += [rng.normal(0, 0.1, c), rng.uniform(0.5, 2.0, c)]
            layer.set_weights(values)
        if layer.weights:
            ours.get_layer(layer.name).set_weights(layer.get_weights())
    x = rng.uniform(-1, 1, (1, 64, 96, 3)).astype("float32")
    expected = original(x, training=False).numpy()
    got = ours(x, training=False).numpy()
    assert got.shape == (1, 8, 12, 2048)
    assert_close(got[:, ::4, ::4], expected.astype(np.float64))
    rewritten = dilation.dilate(original, 8)(x, training=False).numpy()
    np.testing.assert_allclose(rewritten, got, rtol=0, atol=1e-5 * np.abs(got).max())
