"""mmsegmentation's FCNs (kfcn.build_dilated_fcn, kfcn.heads, kfcn.inference_model).

Parameter counts are derived by hand from the architecture (torchvision's ResNet,
mmseg's deep stem and FCNHead) and must equal mmseg's published figures; the
head's numerics are recomputed in numpy from the layers' weights; SyncBN is
checked under a 2-replica MirroredStrategy in a fresh process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

import kfcn
from kfcn import geometry
from kfcn.dilated_fcn import inference_model
from kfcn.export import gpu_compat
from kfcn.export.saved_model import export_saved_model
from kfcn.export.tflite import export_tflite, make_interpreter, tflite_logits

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------ counts by hand
def _conv(k, cin, cout):
    return k * k * cin * cout  # no bias: every conv before a BatchNorm


def _bn(c):
    return 2 * c  # gamma and beta; moving statistics are not trainable


_STAGES = {18: ("basic", (2, 2, 2, 2)), 50: ("bottleneck", (3, 4, 6, 3)),
           101: ("bottleneck", (3, 4, 23, 3))}  # fmt: skip


def _resnet_v1c(depth):
    """Trainable parameters of torchvision's ResNet without fc, with mmseg's deep stem.

    Returns (count, layer3 channels, layer4 channels).
    """
    count = _conv(3, 3, 32) + _bn(32) + _conv(3, 32, 32) + _bn(32) + _conv(3, 32, 64) + _bn(64)
    kind, blocks = _STAGES[depth]
    expansion = 1 if kind == "basic" else 4
    cin, widths = 64, []
    for stage, n in enumerate(blocks):
        planes = 64 * 2**stage
        out = planes * expansion
        for block in range(n):
            if kind == "basic":
                count += (
                    _conv(3, cin, planes) + _bn(planes) + _conv(3, planes, planes) + _bn(planes)
                )
            else:
                count += _conv(1, cin, planes) + _bn(planes) + _conv(3, planes, planes)
                count += _bn(planes) + _conv(1, planes, out) + _bn(out)
            if block == 0 and (stage > 0 or cin != out):  # the downsample shortcut
                count += _conv(1, cin, out) + _bn(out)
            cin = out
        widths.append(out)
    return count, widths[2], widths[3]


def _fcn_head(cin, channels, num_convs, concat_input, num_classes):
    count = _conv(3, cin, channels) + _bn(channels)
    count += (num_convs - 1) * (_conv(3, channels, channels) + _bn(channels))
    if concat_input:
        count += _conv(3, cin + channels, channels) + _bn(channels)
    return count + channels * num_classes + num_classes  # conv_seg has a bias


def _by_hand(depth, head_channels, aux_channels, num_classes=19):
    trunk, c3, c4 = _resnet_v1c(depth)
    main = trunk + _fcn_head(c4, head_channels, 2, True, num_classes)
    return main, main + _fcn_head(c3, aux_channels, 1, False, num_classes)


# mmseg's model zoo figures (issue 10): trainable parameters without / with the aux head.
MMSEG_COUNTS = {
    18: (12_673_523, 12_822_342),
    50: (47_133_043, 49_497_734),
    101: (66_125_171, 68_489_862),
}
# (depth, output_stride, head_dilation): the D8 rows, D16 and FCN-D6 (R-50-D16). Dilation
# adds no parameter, so R-101-D16 / FCN-D6 R-101-D16 (the R-101 counts) are not rebuilt.
ROWS = [(18, 8, 1), (50, 8, 1), (50, 16, 1), (50, 16, 6), (101, 8, 1)]


def _trainable(model):
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


def test_counts_by_hand_equal_mmseg():
    for depth, expected in MMSEG_COUNTS.items():
        head, aux = (128, 64) if depth == 18 else (512, 256)
        assert _by_hand(depth, head, aux) == expected, depth


@pytest.mark.slow
@pytest.mark.parametrize("depth,output_stride,head_dilation", ROWS)
def test_parameter_counts(depth, output_stride, head_dilation):
    head, aux = (128, 64) if depth == 18 else (512, 256)
    model = kfcn.build_dilated_fcn(
        f"resnet{depth}_v1c",
        num_classes=19,
        output_stride=output_stride,
        head_channels=head,
        head_dilation=head_dilation,
        aux_head=True,
        aux_channels=aux,
    )
    without, with_aux = _by_hand(depth, head, aux)
    assert _trainable(model) == with_aux
    assert _trainable(inference_model(model)) == without
    rate = (head_dilation, head_dilation)
    assert model.get_layer("decode_head_convs_1_conv").dilation_rate == rate
    assert model.get_layer("decode_head_conv_cat_conv").dilation_rate == (1, 1)  # as mmseg


@pytest.mark.slow
def test_keras_applications_resnet_dilated_by_kfcn_dilate():
    model = kfcn.build_dilated_fcn(
        "resnet50", num_classes=3, head_channels=8, aux_head=True, aux_channels=8
    )
    where = {layer.name: g for layer, _, g in geometry.trace(model)}
    # The decode head on conv5, the auxiliary head on conv4, both at stride 8.
    assert where["conv5_block3_out"].stride == where["conv4_block6_out"].stride == (8, 8)
    assert model.get_layer("auxiliary_head_convs_0_conv").kernel.shape == (3, 3, 1024, 8)
    assert model.get_layer("decode_head_conv_cat_conv").kernel.shape == (3, 3, 2048 + 8, 8)
    assert model.get_layer("preprocess").mode == "caffe"
    out = model(_images(37, 45), training=False)
    assert out["logits"].shape == out["aux_logits"].shape == (1, 37, 45, 3)


# ------------------------------------------------------------------ a tiny model
NUM_CLASSES = 5


def _randomize_batchnorm(model, seed=0):
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            c = layer.gamma.shape[0]
            layer.set_weights([
                rng.uniform(0.5, 1.5, c), rng.normal(0, 0.2, c),
                rng.normal(0, 0.2, c), rng.uniform(0.5, 2.0, c),
            ])  # fmt: skip


@pytest.fixture(scope="module")
def tiny():
    """R-18-D8 with a 16-wide head, an 8-wide aux head and 5 classes; BN stats randomised."""
    model = kfcn.build_dilated_fcn(
        "resnet18_v1c", num_classes=NUM_CLASSES, head_channels=16, aux_head=True, aux_channels=8
    )
    _randomize_batchnorm(model)
    return model


@pytest.fixture(scope="module")
def tiny_d6():
    """FCN-D6 R-18-D16, 8-wide head without aux: dilated head convs."""
    model = kfcn.build_dilated_fcn(
        "resnet18_v1c", num_classes=NUM_CLASSES, output_stride=16, head_dilation=6,
        head_channels=8, sync_batchnorm=False,
    )  # fmt: skip
    _randomize_batchnorm(model, seed=1)
    return model


def _images(height, width, batch=1, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (batch, height, width, 3)).astype("float32")


@pytest.mark.parametrize("size", [(1, 1), (33, 47), (61, 29)])
def test_output_is_input_size_for_odd_sizes(tiny, tiny_d6, size):
    out = tiny(_images(*size, batch=2), training=False)
    assert set(out) == {"logits", "aux_logits"}
    for value in out.values():
        assert value.shape == (2, *size, NUM_CLASSES) and value.dtype == "float32"
    assert tiny_d6(_images(*size), training=False).shape == (1, *size, NUM_CLASSES)


def test_layers_named_as_mmseg_and_synchronized(tiny, tiny_d6):
    names = {layer.name for layer in tiny.layers}
    for prefix in ("decode_head_convs_0", "decode_head_convs_1", "decode_head_conv_cat"):
        assert {f"{prefix}_conv", f"{prefix}_bn", f"{prefix}_activate"} <= names
    assert {
        "decode_head_conv_seg",
        "decode_head_dropout",
        "auxiliary_head_convs_0_conv",
        "auxiliary_head_conv_seg",
        "preprocess",
        "layer3_out",
        "layer4_out",
    } <= names
    assert "auxiliary_head_conv_cat_conv" not in names
    assert tiny.get_layer("decode_head_conv_seg").bias is not None
    assert tiny.get_layer("decode_head_convs_0_conv").bias is None
    assert tiny.get_layer("decode_head_conv_cat_conv").kernel.shape == (3, 3, 512 + 16, 16)
    assert tiny.get_layer("auxiliary_head_convs_0_conv").kernel.shape == (3, 3, 256, 8)
    assert tiny.get_layer("preprocess").mode == "torch"
    norms = [layer for layer in tiny.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(norms) > 20 and all(layer.synchronized for layer in norms)  # trunk included
    assert not any(
        layer.synchronized
        for layer in tiny_d6.layers
        if isinstance(layer, keras.layers.BatchNormalization)
    )


# ------------------------------------------------------------------ numpy head
def _np_conv(x, kernel, dilation=1, bias=None):
    """Stride-1 convolution with torch's padding (k // 2) * dilation; x [h, w, c]."""
    k = kernel.shape[0]
    pad = (k // 2) * dilation
    padded = np.pad(x, ((pad, pad), (pad, pad), (0, 0)))
    h, w = x.shape[:2]
    out = np.zeros((h, w, kernel.shape[-1]))
    for i in range(k):
        for j in range(k):
            window = padded[i * dilation : i * dilation + h, j * dilation : j * dilation + w]
            out += window @ kernel[i, j]
    return out if bias is None else out + bias


def _np_conv_bn_relu(x, model, name, dilation=1):
    kernel = np.asarray(model.get_layer(f"{name}_conv").kernel, np.float64)
    gamma, beta, mean, var = (
        np.asarray(w, np.float64) for w in model.get_layer(f"{name}_bn").weights
    )
    y = (_np_conv(x, kernel, dilation) - mean) / np.sqrt(var + 1e-5) * gamma + beta
    return np.maximum(y, 0.0)


def _np_resize(x, height, width):
    """PyTorch's F.interpolate(mode="bilinear", align_corners=False), from its formula."""

    def axis(out_size, in_size):
        src = np.maximum((np.arange(out_size) + 0.5) * in_size / out_size - 0.5, 0.0)
        i0 = np.minimum(np.floor(src).astype(int), in_size - 1)
        i1 = np.minimum(i0 + 1, in_size - 1)
        return i0, i1, src - i0

    r0, r1, fr = axis(height, x.shape[0])
    c0, c1, fc = axis(width, x.shape[1])
    rows = x[r0] * (1 - fr)[:, None, None] + x[r1] * fr[:, None, None]
    return rows[:, c0] * (1 - fc)[None, :, None] + rows[:, c1] * fc[None, :, None]


def _np_fcn_head(x, model, prefix, num_convs, concat_input, dilation=1):
    y = x
    for i in range(num_convs):
        y = _np_conv_bn_relu(y, model, f"{prefix}_convs_{i}", dilation)
    if concat_input:
        y = _np_conv_bn_relu(np.concatenate([x, y], -1), model, f"{prefix}_conv_cat")
    seg = model.get_layer(f"{prefix}_conv_seg")
    return _np_conv(y, np.asarray(seg.kernel, np.float64), 1, np.asarray(seg.bias, np.float64))


@pytest.mark.parametrize("which", ["d8_aux", "d6"])
def test_head_numerics_against_numpy(tiny, tiny_d6, which):
    model = tiny if which == "d8_aux" else tiny_d6
    images = _images(37, 45, seed=3)
    # The torch normalisation inside the model (mmseg's mean and std on RGB 0..255).
    preprocess = keras.Model(model.input, model.get_layer("preprocess").output)
    mean, std = np.array([123.675, 116.28, 103.53]), np.array([58.395, 57.12, 57.375])
    np.testing.assert_allclose(preprocess(images), (images - mean) / std, atol=1e-4)

    # The model's own tensors (its trunk layers were also called once when the trunk was built).
    tensors = {layer.name: tensor for layer, tensor, _ in geometry.trace(model)}
    taps = keras.Model(model.input, [tensors["layer4_out"], tensors["layer3_out"]])
    layer4, layer3 = (np.asarray(t, np.float64)[0] for t in taps(images, training=False))
    out = model(images, training=False)
    if which == "d8_aux":
        assert layer4.shape[:2] == layer3.shape[:2] == (5, 6)  # ceil(37 / 8), ceil(45 / 8)
        expected = {
            "logits": _np_fcn_head(layer4, model, "decode_head", 2, True),
            "aux_logits": _np_fcn_head(layer3, model, "auxiliary_head", 1, False),
        }
    else:
        assert layer4.shape[:2] == (3, 3)  # ceil(37 / 16), ceil(45 / 16)
        expected = {"logits": _np_fcn_head(layer4, model, "decode_head", 2, True, dilation=6)}
        out = {"logits": out}
    for key, scores in expected.items():
        reference = _np_resize(scores, 37, 45)
        scale = np.abs(reference).max()
        np.testing.assert_allclose(np.asarray(out[key])[0], reference, atol=1e-4 * scale)


def test_resize_matches_torch_formula_when_shrinking_and_growing():
    from kfcn.layers import ResizeLike

    x = np.random.default_rng(0).normal(size=(1, 7, 10, 2)).astype("float32")
    for size in ((23, 31), (3, 4), (7, 10)):
        resized = ResizeLike()([x, np.zeros((1, *size, 1), "float32")])
        np.testing.assert_allclose(
            resized[0], _np_resize(x[0].astype(np.float64), *size), atol=1e-5
        )


# ------------------------------------------------------------------ inference_model
def test_inference_model_drops_aux_and_shares_weights(tiny):
    inference = inference_model(tiny)
    assert not isinstance(inference.output, dict) and inference.name == tiny.name
    assert inference_model(inference) is inference  # idempotent, no copy
    images = _images(29, 35)
    np.testing.assert_array_equal(inference(images), tiny(images)["logits"])
    assert inference.get_layer("decode_head_conv_seg") is tiny.get_layer("decode_head_conv_seg")
    assert "auxiliary_head_conv_seg" not in {layer.name for layer in inference.layers}


def test_inference_model_on_task_dicts_and_bad_input():
    images = keras.Input((None, None, 3))
    x = keras.layers.Conv2D(2, 1, name="a")(images)
    plain = keras.Model(images, x)
    assert inference_model(plain) is plain
    tasks = keras.Model(images, {"sem": x, "geo": x, "aux_sem": x, "aux_geo": x})
    kept = inference_model(tasks)
    assert set(kept.output) == {"sem", "geo"}
    no_aux = keras.Model(images, {"sem": x, "geo": x})
    assert inference_model(no_aux) is no_aux
    with pytest.raises(ValueError, match="only auxiliary outputs"):
        inference_model(keras.Model(images, {"aux_logits": x}))
    with pytest.raises(ValueError, match="`model` must be a keras.Model"):
        inference_model("model.keras")


def test_save_and_load_in_safe_mode(tiny, tmp_path):
    path = tmp_path / "fcn.keras"
    tiny.save(path)
    loaded = kfcn.load_model(path, compile=False, safe_mode=True)
    images = _images(41, 27, seed=5)
    expected, got = tiny(images, training=False), loaded(images, training=False)
    for key in ("logits", "aux_logits"):
        np.testing.assert_allclose(got[key], expected[key], atol=1e-5)
    assert loaded.get_layer("decode_head_convs_0_bn").synchronized
    assert inference_model(loaded).output.shape[-1] == NUM_CLASSES


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"output_stride": 4}, "output_stride"),
        ({"head_channels": 0}, "head_channels"),
        ({"num_convs": -1}, "num_convs"),
        ({"aux_channels": 1.5}, "aux_channels"),
        ({"head_dilation": 0}, "head_dilation"),
        ({"input_shape": (None, None, 4)}, "input_shape"),
        ({"backbone": 3}, "backbone"),
        ({"backbone": "resnet9000"}, "backbone"),
        ({"num_classes": 0}, "num_classes"),
    ],
)
def test_bad_arguments_name_themselves(kwargs, message):
    with pytest.raises(ValueError, match=f"`{message}`"):
        kfcn.build_dilated_fcn(**{"backbone": "resnet18_v1c", **kwargs})


# ------------------------------------------------------------------ export
@pytest.mark.slow
def test_export_saved_model_and_tflite(tiny, tmp_path):
    images = _images(48, 64, seed=9)
    expected = np.asarray(tiny(images, training=False)["logits"])
    # Both exporters take the training model (with its aux head) and drop the head.
    directory = export_saved_model(tiny, tmp_path / "saved", include_probabilities=True)
    import tensorflow as tf

    served = tf.saved_model.load(directory).signatures["serving_default"]
    probabilities = served(images=tf.constant(images.astype(np.uint8)))["probabilities"]
    reference = tf.nn.softmax(tiny(images.astype(np.uint8).astype("float32"))["logits"])
    np.testing.assert_allclose(probabilities, reference, atol=1e-4)

    result = export_tflite(tiny, tmp_path / "fcn.tflite", (48, 64), gpu_check="error")
    assert result.gpu_report.ok, result.gpu_report.format()
    resizes = [op for op in gpu_compat.read_operators(result.path) if op.name == "RESIZE_BILINEAR"]
    assert len(resizes) == 1  # the aux head's resize is gone
    assert resizes[0].options.halfPixelCenters and not resizes[0].options.alignCorners
    ours = tflite_logits(make_interpreter(result.path), images[0])
    np.testing.assert_allclose(ours, expected[0], atol=1e-3 * np.abs(expected).max())


# ------------------------------------------------------------------ SyncBN
SYNC_BN = textwrap.dedent(
    """
    import json, sys
    from kfcn.training.strategy import configure_cpu_replicas, create_strategy
    configure_cpu_replicas(2)  # before any TensorFlow op
    import keras, numpy as np, tensorflow as tf
    import kfcn

    rng = np.random.default_rng(0)
    # The two replicas see different halves: their statistics differ from the batch's.
    images = rng.uniform(0, 255, (4, 32, 32, 3)).astype(np.float32)
    images[2:] = images[2:] * 0.3 + 150.0
    labels = rng.integers(0, 3, (4, 32, 32)).astype(np.int32)

    def trunk():
        # A small stride-32 backbone with BatchNorm, dilated to D8 by the builder (kfcn.dilate).
        x = images_in = keras.Input((None, None, 3))
        for i, width in enumerate((8, 8, 16, 16, 16)):
            x = keras.layers.Conv2D(width, 3, strides=2, padding="same", name=f"c{i}")(x)
            x = keras.layers.BatchNormalization(name=f"bn{i}")(x)
            x = keras.layers.ReLU(name=f"r{i}")(x)
        return keras.Model(images_in, x)

    def build(synchronized):
        return kfcn.build_dilated_fcn(trunk(), num_classes=3, head_channels=8,
                                      aux_head=True, aux_channels=8, dropout=0.0,
                                      sync_batchnorm=synchronized)

    initial = build(True).get_weights()  # the same start for every run

    def run(strategy, synchronized):
        with strategy.scope():
            model = build(synchronized)
            model.set_weights(initial)
            optimizer = keras.optimizers.SGD(0.1)
        loss_fn = keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, reduction="sum")

        def step(x, y):
            with tf.GradientTape() as tape:
                out = model(x, training=True)
                loss = (loss_fn(y, out["logits"]) + 0.4 * loss_fn(y, out["aux_logits"]))
                loss = loss / (4 * 32 * 32)
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply(grads, model.trainable_variables)

        data = strategy.experimental_distribute_dataset(
            tf.data.Dataset.from_tensor_slices((images, labels)).batch(4))
        x, y = next(iter(data))
        tf.function(lambda x, y: strategy.run(step, (x, y)))(x, y)
        return {layer.name: [np.asarray(layer.moving_mean).tolist(),
                             np.asarray(layer.moving_variance).tolist()]
                for layer in model.layers
                if isinstance(layer, keras.layers.BatchNormalization)}

    mirrored = create_strategy("mirrored", cpu_replicas=2)
    assert mirrored.num_replicas_in_sync == 2
    print(json.dumps({
        "one_device": run(tf.distribute.OneDeviceStrategy("/cpu:0"), True),
        "synchronized": run(mirrored, True),
        "local": run(mirrored, False),
    }))
    """
)


@pytest.mark.slow
def test_sync_batchnorm_two_replicas_equal_one_device(tmp_path):
    script = tmp_path / "sync_bn.py"
    script.write_text(SYNC_BN)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=REPO)
    env.pop("TF_CONFIG", None)
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    stats = json.loads(done.stdout.strip().splitlines()[-1])
    one, synced, local = stats["one_device"], stats["synchronized"], stats["local"]
    assert set(one) == set(synced) and {"bn0", "bn4", "decode_head_conv_cat_bn"} <= set(one)
    worst_local = 0.0
    for name, (mean, variance) in one.items():
        np.testing.assert_allclose(synced[name][0], mean, rtol=1e-4, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(synced[name][1], variance, rtol=1e-4, atol=1e-5, err_msg=name)
        worst_local = max(worst_local, np.max(np.abs(np.subtract(local[name][1], variance))))
    # Per-replica statistics (synchronized=False) miss the spread between the halves.
    assert worst_local > 1e-2, worst_local
