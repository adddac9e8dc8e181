"""TFLite export: static builtin graph, GPU delegate check, LiteRT parity per quantization."""

import os
import subprocess
import sys

import numpy as np
import pytest
from export_fixtures import (
    HEIGHT,
    VARIANTS,
    WIDTH,
    cached_confident_model,
    synthetic_scenes,
    tiny_kfcn_model,
    write_images,
)

from kfcn.export import gpu_compat
from kfcn.export import tflite as tflite_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = f"{HEIGHT}x{WIDTH}"
# Minimum fraction of pixels whose class agrees with the Keras model.
AGREEMENT = {"none": 0.999, "float16": 0.995, "int8": 0.97}


# Every variant: the fixtures' outputs depend on every path (deep blocks, upscore2,
# upscore_pool4, skips), so a conversion bug in any of them breaks the agreement.
@pytest.fixture(scope="module", params=VARIANTS)
def model(request, tmp_path_factory):
    return cached_confident_model(tmp_path_factory, request.param)[0]


@pytest.fixture(scope="module")
def calibration_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("calibration")
    write_images(directory, synthetic_scenes(12, seed=101)[0], fmt="png")
    write_images(directory / "jpeg", synthetic_scenes(4, seed=102)[0], fmt="jpg")
    return directory


@pytest.fixture(scope="module")
def exports(model, calibration_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("tflite")
    return {
        q: tflite_lib.export_tflite(
            model,
            out / f"{model.name}_{q}.tflite",
            SIZE,
            quantization=q,
            representative_data=calibration_dir if q == "int8" else None,
        )
        for q in ("none", "float16", "int8")
    }


@pytest.fixture(scope="module")
def test_images():
    # Held out from calibration (different seed).
    return synthetic_scenes(6, seed=202)[0]


@pytest.mark.parametrize("quantization", ["none", "float16", "int8"])
def test_io_and_static_builtin_graph(exports, quantization):
    result = exports[quantization]
    interpreter = tflite_lib.make_interpreter(result.path)
    (inp,) = interpreter.get_input_details()
    (out,) = interpreter.get_output_details()
    assert list(inp["shape"]) == [1, HEIGHT, WIDTH, 3] and inp["dtype"] == np.float32
    assert list(out["shape"]) == [1, HEIGHT, WIDTH, 4] and out["dtype"] == np.float32
    assert interpreter.get_signature_list() == {
        "serving_default": {"inputs": ["images"], "outputs": ["logits"]}
    }
    static = gpu_compat.check_builtin_static(result.path)
    assert static.ok, static.format()
    assert not {"VAR_HANDLE", "READ_VARIABLE", "SHAPE", "PACK"} & set(static.ops)
    assert not any(op.custom for op in gpu_compat.read_operators(result.path))
    gpu = gpu_compat.check_gpu_compatibility(result.path)
    assert gpu.ok, gpu.format()
    assert result.gpu_report.ok and os.path.getsize(result.path) == result.size_bytes


@pytest.mark.parametrize("quantization", ["none", "float16", "int8"])
def test_litert_parity_with_keras(model, exports, test_images, quantization):
    agreement = tflite_lib.pixel_agreement(model, exports[quantization].path, test_images)
    assert agreement >= AGREEMENT[quantization], agreement


def test_float32_logits_match(model, exports, test_images):
    interpreter = tflite_lib.make_interpreter(exports["none"].path)
    ours = tflite_lib.tflite_logits(interpreter, test_images[0])
    reference = np.asarray(model(test_images[:1].astype(np.float32), training=False))[0]
    np.testing.assert_allclose(ours, reference, atol=1e-3 * np.abs(reference).max())


def test_fcn4s_exports_for_the_gpu_delegate_with_every_path_live(tmp_path, test_images):
    """FCN-4s's pool2 skip converts like the paper's skips: builtin ops, float32 parity."""
    import kfcn

    model = kfcn.build_fcn4s(backbone="mobilenetv2", num_classes=4)
    rng = np.random.default_rng(0)
    for layer in model.layers:
        if layer.name.startswith("score_"):
            weights = [rng.normal(0, 0.5, w.shape).astype(np.float32) for w in layer.weights]
            layer.set_weights(weights)
    image = test_images[:1].astype(np.float32)
    reference = np.asarray(model(image, training=False))[0]
    without_pool2 = [np.zeros(w.shape, np.float32) for w in model.get_layer("score_pool2").weights]
    saved = model.get_layer("score_pool2").get_weights()
    model.get_layer("score_pool2").set_weights(without_pool2)
    assert np.abs(np.asarray(model(image, training=False))[0] - reference).max() > 0.1
    model.get_layer("score_pool2").set_weights(saved)
    result = tflite_lib.export_tflite(model, tmp_path / "fcn4s.tflite", SIZE)  # GPU check: error
    assert not result.gpu_report.issues
    ours = tflite_lib.tflite_logits(tflite_lib.make_interpreter(result.path), test_images[0])
    np.testing.assert_allclose(ours, reference, atol=1e-3 * np.abs(reference).max())


def test_sizes_shrink_with_quantization(exports):
    full = exports["none"].size_bytes
    assert exports["float16"].size_bytes < 0.6 * full
    assert exports["int8"].size_bytes < 0.35 * full
    ops = gpu_compat.read_operators(exports["int8"].path)
    assert ops[0].name == "QUANTIZE" and ops[-1].name == "DEQUANTIZE"
    assert any(op.name == "CONV_2D" and op.inputs[0].dtype == "INT8" for op in ops)


def test_with_argmax_is_cpu_only(tmp_path_factory, test_images, tmp_path):
    model = cached_confident_model(tmp_path_factory, "fcn8s")[0]
    result = tflite_lib.export_tflite(model, tmp_path / "argmax.tflite", SIZE, with_argmax=True)
    assert [issue.op for issue in result.gpu_report.issues] == ["ARG_MAX"]
    runner = tflite_lib.make_interpreter(result.path).get_signature_runner()
    outputs = runner(images=test_images[:1].astype(np.float32))
    assert outputs["class_ids"].dtype == np.int32
    np.testing.assert_array_equal(outputs["class_ids"], outputs["logits"].argmax(-1))


def test_representative_images_cover_and_center_crop(tmp_path):
    from PIL import Image

    image = np.zeros((128, 400, 3), np.uint8)
    image[:, 190:210] = 255  # a vertical stripe at the centre
    Image.fromarray(image).save(tmp_path / "wide.png")
    Image.fromarray(image[..., 0]).save(tmp_path / "gray.png")  # grayscale -> RGB
    (tmp_path / "notes.txt").write_text("ignored")
    images = tflite_lib.representative_images(tmp_path, (64, 96))
    assert len(images) == 2
    for out in images:
        assert out.shape == (64, 96, 3) and out.dtype == np.uint8
        # scale 0.5 -> 64x200, crop columns 52..148: the stripe lands on columns 43..53.
        columns = np.flatnonzero(out[32, :, 0] > 127)
        assert abs(columns.mean() - 47.5) <= 1.0 and 8 <= len(columns) <= 12


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(input_size="0x0"), ValueError, "input_size"),
        (dict(input_size="512"), ValueError, "input_size"),
        (dict(input_size="64x96", quantization="int4"), ValueError, "quantization"),
        (dict(input_size="64x96", quantization="int8"), ValueError, "representative_data"),
        (dict(input_size="64x96", gpu_check="maybe"), ValueError, "gpu_check"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, error, message):
    with pytest.raises(error, match=message):
        tflite_lib.export_tflite(tiny_kfcn_model(), tmp_path / "m.tflite", **kwargs)
    assert os.listdir(tmp_path) == []


def test_empty_calibration_dir_and_existing_output(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no JPEG or PNG"):
        tflite_lib.export_tflite(
            tiny_kfcn_model(),
            tmp_path / "m.tflite",
            "32x32",
            quantization="int8",
            representative_data=tmp_path / "empty",
        )
    (tmp_path / "m.tflite").write_bytes(b"keep")
    with pytest.raises(FileExistsError, match="already exists"):
        tflite_lib.export_tflite(tiny_kfcn_model(), tmp_path / "m.tflite", "32x32")
    assert (tmp_path / "m.tflite").read_bytes() == b"keep"


def test_gpu_check_failure_leaves_no_file(tmp_path, monkeypatch):
    argmax_file = tflite_lib.convert(
        tflite_lib.rebuild_static(tiny_kfcn_model(), (16, 16)), with_argmax=True
    )
    monkeypatch.setattr(tflite_lib, "convert", lambda *args, **kwargs: argmax_file)
    with pytest.raises(ValueError, match="op #.* ARG_MAX"):
        tflite_lib.export_tflite(tiny_kfcn_model(), tmp_path / "m.tflite", "16x16")
    assert os.listdir(tmp_path) == []
    result = tflite_lib.export_tflite(
        tiny_kfcn_model(), tmp_path / "m.tflite", "16x16", gpu_check="warn"
    )
    assert not result.gpu_report.ok and os.listdir(tmp_path) == ["m.tflite"]


def test_script(tmp_path):
    model_path = tmp_path / "tiny.keras"
    tiny_kfcn_model().save(model_path)
    script = os.path.join(REPO, "export", "tflite.py")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    ok = subprocess.run(
        [
            sys.executable,
            script,
            "--model",
            str(model_path),
            "--output",
            str(tmp_path / "t.tflite"),
            "--input_size",
            "32x48",
            "--quantization",
            "float16",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "GPU delegate: all" in ok.stdout
    interpreter = tflite_lib.make_interpreter(tmp_path / "t.tflite")
    assert list(interpreter.get_input_details()[0]["shape"]) == [1, 32, 48, 3]
    bad = subprocess.run(
        [
            sys.executable,
            script,
            "--model",
            str(model_path),
            "--output",
            str(tmp_path / "u.tflite"),
            "--input_size",
            "32x48",
            "--quantization",
            "int8",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert bad.returncode != 0 and "representative_data" in bad.stderr
    assert not (tmp_path / "u.tflite").exists()


def test_layers_with_training_gradients_export_with_their_signature(tmp_path, test_images):
    """fc6/fc7's matmul gradients and the 3x3 nine-matmul ones are custom gradients
    in training only: a frozen custom gradient cost the .tflite file its signature."""
    import keras

    from kfcn.conv_gradients import MIN_CHANNELS, use_matmul_gradients
    from kfcn.layers import FullyConnectedConv2D, Preprocess

    inputs = keras.Input((None, None, 3))
    x = Preprocess("tf")(inputs)
    x = keras.layers.Conv2D(MIN_CHANNELS, 1, activation="relu")(x)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(x)
    x = FullyConnectedConv2D(8, 3, padding="same", activation="relu")(x)
    model = keras.Model(inputs, FullyConnectedConv2D(4, 1)(x))
    assert use_matmul_gradients(model) == 1
    result = tflite_lib.export_tflite(model, tmp_path / "m.tflite", SIZE)
    interpreter = tflite_lib.make_interpreter(result.path)
    assert interpreter.get_signature_list() == {
        "serving_default": {"inputs": ["images"], "outputs": ["logits"]}
    }
    ours = tflite_lib.tflite_logits(interpreter, test_images[0])
    reference = np.asarray(model(test_images[:1].astype(np.float32), training=False))[0]
    np.testing.assert_allclose(ours, reference, atol=1e-4 * np.abs(reference).max())
