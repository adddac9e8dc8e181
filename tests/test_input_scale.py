"""kfcn.with_input_scale: a net run at a multiple of its input's resolution.

The reference is computed here without kfcn's layers: numpy's bilinear resize
with half-pixel centres (TensorFlow's and PyTorch's align_corners=False rule),
the size rule round(s * H) x round(s * W), the plain net in between.
"""

import json
import os

import numpy as np
import pytest
from PIL import Image
from test_cli_export import NUM_CLASSES, moving_fcn8s

from kfcn.input_scale import input_scale_of, with_input_scale

IMAGE = np.random.default_rng(5).integers(0, 256, (2, 37, 53, 3)).astype(np.float32)


def numpy_resize(batch: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of [N, H, W, C] with half-pixel centres, in float64."""

    def taps(size_in: int, size_out: int):
        position = (np.arange(size_out) + 0.5) * size_in / size_out - 0.5
        low = np.floor(position)
        weight = position - low
        low = low.astype(int)
        return np.clip(low, 0, size_in - 1), np.clip(low + 1, 0, size_in - 1), weight

    batch = batch.astype(np.float64)
    top, bottom, wy = taps(batch.shape[1], height)
    rows = (
        batch[:, top] * (1 - wy)[None, :, None, None] + batch[:, bottom] * wy[None, :, None, None]
    )
    left, right, wx = taps(batch.shape[2], width)
    return (
        rows[:, :, left] * (1 - wx)[None, None, :, None]
        + rows[:, :, right] * wx[None, None, :, None]
    )


def reference(net, images: np.ndarray, scale: float) -> np.ndarray:
    height, width = images.shape[1:3]
    scaled = numpy_resize(images, round(height * scale), round(width * scale))
    logits = np.asarray(net(scaled.astype(np.float32)), np.float64)
    return numpy_resize(logits, height, width)


@pytest.fixture(scope="module")
def net():
    return moving_fcn8s(seed=2)


@pytest.mark.parametrize("scale", [1.25, 0.75, 1.5])
def test_scaled_model_is_resize_net_resize(net, scale):
    model = with_input_scale(net, scale)
    got = np.asarray(model(IMAGE))
    want = reference(net, IMAGE, scale)
    assert got.shape == IMAGE.shape[:3] + (NUM_CLASSES,)
    spread = np.abs(want).max()
    np.testing.assert_allclose(got, want, atol=1e-4 * spread)
    # The scale matters: the plain net's logits differ from the scaled ones.
    assert np.abs(np.asarray(net(IMAGE)) - got).max() > 0.05 * spread
    assert input_scale_of(model) == scale and input_scale_of(net) == 1.0


def test_size_rule_rounds_half_to_even_like_predict_msflip(net):
    # 38 x 54 at 1.25: 47.5 x 67.5 -> 48 x 68 (Python's round, as predict_msflip).
    images = np.random.default_rng(6).integers(0, 256, (1, 38, 54, 3)).astype(np.float32)
    got = np.asarray(with_input_scale(net, 1.25)(images))
    np.testing.assert_allclose(got, reference(net, images, 1.25), atol=1e-4 * np.abs(got).max())
    layer = with_input_scale(net, 1.25).get_layer("input_scale")
    assert layer.compute_output_shape((1, 38, 54, 3)) == (1, 48, 68, 3)


def test_rescaling_replaces_the_scale_and_one_gives_the_plain_net(net):
    scaled = with_input_scale(net, 1.25)
    assert [layer.name for layer in scaled.layers][1] == "input_scale"
    assert scaled.layers[-1].name == "output_resize"
    again = with_input_scale(scaled, 1.5)
    assert sum(layer.name == "input_scale" for layer in again.layers) == 1
    np.testing.assert_allclose(
        np.asarray(again(IMAGE)), np.asarray(with_input_scale(net, 1.5)(IMAGE)), atol=1e-5
    )
    plain = with_input_scale(scaled, 1.0)
    assert [layer.name for layer in plain.layers] == [layer.name for layer in net.layers]
    np.testing.assert_array_equal(np.asarray(plain(IMAGE)), np.asarray(net(IMAGE)))
    assert plain.count_params() == net.count_params() == scaled.count_params()


def test_weights_are_copied_not_shared(net):
    scaled = with_input_scale(net, 1.25)
    before = np.asarray(scaled(IMAGE))
    layer = net.get_layer("score_fr")
    kernel, bias = layer.get_weights()
    layer.set_weights([kernel * 2, bias])
    try:
        np.testing.assert_array_equal(np.asarray(scaled(IMAGE)), before)
    finally:
        layer.set_weights([kernel, bias])


def test_keras_file_round_trip(net, tmp_path):
    import kfcn

    scaled = with_input_scale(net, 1.25)
    path = tmp_path / "scaled.keras"
    scaled.save(path)
    loaded = kfcn.load_model(path, compile=False)
    assert input_scale_of(loaded) == 1.25
    np.testing.assert_allclose(np.asarray(loaded(IMAGE)), np.asarray(scaled(IMAGE)), atol=1e-6)


@pytest.mark.parametrize("scale", [0, -1.0, float("nan"), float("inf"), "big"])
def test_bad_scale_names_the_argument(net, scale):
    with pytest.raises(ValueError, match="`scale` must be a finite number > 0"):
        with_input_scale(net, scale)


def test_models_it_cannot_rescale_are_refused(net):
    import keras

    two = keras.Model(net.input, [net.output, net.get_layer("score_fr").output])
    with pytest.raises(ValueError, match="one image input and one logits output"):
        with_input_scale(two, 1.25)
    inputs = keras.Input((None, None, 3))
    taken = keras.Model(inputs, keras.layers.Conv2D(2, 1, name="input_scale")(inputs))
    with pytest.raises(ValueError, match=r"layers named \['input_scale'\]"):
        with_input_scale(taken, 1.25)


@pytest.mark.slow
def test_tflite_export_runs_both_resizes_on_the_gpu_delegate(net):
    import tensorflow as tf

    from kfcn.export import gpu_compat
    from kfcn.export.tflite import convert, rebuild_static

    scaled = with_input_scale(net, 1.25)
    flatbuffer = convert(rebuild_static(scaled, (37, 53)), "none")
    gpu = gpu_compat.check_gpu_compatibility(flatbuffer)
    assert gpu.ok, gpu.format()
    assert gpu_compat.op_counts(gpu.ops)["RESIZE_BILINEAR"] == 2
    interpreter = tf.lite.Interpreter(model_content=flatbuffer)
    interpreter.allocate_tensors()
    (given,) = interpreter.get_input_details()
    interpreter.set_tensor(given["index"], IMAGE[:1])
    interpreter.invoke()
    output = interpreter.get_output_details()[0]
    got = interpreter.get_tensor(output["index"])
    want = reference(net, IMAGE[:1], 1.25)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-3 * np.abs(want).max())


# ------------------------------------------------------------------ the command line


@pytest.fixture(scope="module")
def folder(tmp_path_factory, net):
    """A 2-image folder dataset labelled by the scaled net on most pixels, and the net's file."""
    from kfcn import metadata

    root = tmp_path_factory.mktemp("scaled_folder")
    rng = np.random.default_rng(4)
    lines = []
    for index in range(2):
        image = rng.integers(0, 256, (37 + 4 * index, 53, 3)).astype(np.uint8)
        label = reference(net, image[None].astype(np.float32), 1.25)[0].argmax(-1)
        noise = rng.random(label.shape) < 0.3
        label = np.where(noise, rng.integers(0, NUM_CLASSES, label.shape), label).astype(np.uint8)
        Image.fromarray(image).save(root / f"img{index}.png")
        Image.fromarray(label).save(root / f"lab{index}.png")
        lines.append(f"img{index}.png lab{index}.png")
    (root / "val.txt").write_text("\n".join(lines) + "\n")
    path = root / "net.keras"
    names = tuple(f"c{i}" for i in range(NUM_CLASSES))
    metadata.save_model(net, path, metadata.class_info_for_dataset("folder", NUM_CLASSES, names))
    return root, path


def _numpy_mean_iou(root, net, scale) -> float:
    confusion = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
    for index in range(2):
        image = np.asarray(Image.open(root / f"img{index}.png"), np.float32)[None]
        label = np.asarray(Image.open(root / f"lab{index}.png")).astype(np.int64)
        prediction = reference(net, image, scale)[0].argmax(-1)
        confusion += np.bincount(
            NUM_CLASSES * label.ravel() + prediction.ravel(), minlength=NUM_CLASSES**2
        ).reshape(NUM_CLASSES, NUM_CLASSES)
    diag = np.diag(confusion).astype(np.float64)
    union = confusion.sum(0) + confusion.sum(1) - diag
    return float(np.mean(diag[union > 0] / union[union > 0]))


def test_evaluate_command_runs_the_net_at_input_scale(folder, net, tmp_path, monkeypatch):
    from kfcn.cli import main

    root, path = folder
    monkeypatch.setenv("KFCN_CACHE_DIR", str(tmp_path / "cache"))
    scores = {}
    for scale in (1.25, None):
        out = tmp_path / f"scores_{scale}.json"
        argv = ["evaluate", "--model", str(path), "--dataset", "folder", "--data_dir", str(root)]
        argv += ["--num_classes", str(NUM_CLASSES), "--split", "val", "--output_json", str(out)]
        argv += [] if scale is None else ["--input_scale", str(scale)]
        assert main(argv) == 0
        scores[scale] = json.loads(out.read_text())
    assert scores[1.25]["input_scale"] == 1.25 and scores[None]["input_scale"] == 1.0
    assert scores[1.25]["mean_iou"] == pytest.approx(_numpy_mean_iou(root, net, 1.25), abs=1e-6)
    assert scores[None]["mean_iou"] == pytest.approx(_numpy_mean_iou(root, net, 1.0), abs=1e-6)
    assert scores[1.25]["mean_iou"] > scores[None]["mean_iou"] + 0.05  # labels follow 1.25x
    cached = os.listdir(tmp_path / "cache" / "scaled")
    assert len(cached) == 1 and cached[0].endswith("-x1.25.keras")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--input_scale", "0"], "--input_scale: `input_scale` must be a finite number > 0"),
        (["--input_scale", "nan"], "--input_scale: `input_scale` must be a finite number > 0"),
    ],
)
def test_bad_input_scale_is_one_line(folder, tmp_path, monkeypatch, capsys, extra, message):
    from kfcn.cli import main

    root, path = folder
    monkeypatch.setenv("KFCN_CACHE_DIR", str(tmp_path / "cache"))
    argv = ["predict", str(root / "img0.png"), "--model", str(path)]
    argv += ["--output_dir", str(tmp_path / "out"), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_a_tflite_file_cannot_be_rescaled(folder, tmp_path, monkeypatch, capsys):
    from kfcn.cli import main

    root, _ = folder
    fake = tmp_path / "model.tflite"
    fake.write_bytes(b"\x1c\x00\x00\x00TFL3" + b"\0" * 64)
    monkeypatch.setenv("KFCN_CACHE_DIR", str(tmp_path / "cache"))
    argv = ["export", "tflite", "--model", str(fake), "--output", str(tmp_path / "o.tflite")]
    assert main([*argv, "--input_scale", "1.25"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--input_scale: a model is rescaled from a .keras file or a preset" in err, err
    assert len(err.splitlines()) == 1
