"""`kfcn export` (and the export/*.py presets) run as a user runs them: subprocesses.

One small FCN-8s (MobileNetV2 trunk) whose three score layers are all non-zero,
so the FCN-32s path and both skips each move the output (checked), is exported
to every format. Each export is checked against the Keras model, and for the
class names and colours the model carries.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_CLASSES = 3
CLASS_NAMES = ("sky", "road", "car")
# TensorFlow's C++ start-up lines, written to stderr before absl logging is set up
# (TF_CPP_MIN_LOG_LEVEL does not reach them in TF 2.21): not kfcn's output.
_TF_CHATTER = re.compile(r"^(WARNING: All log messages before absl|[IWE]\d{4} \d\d:\d\d:)")


def kfcn_executable() -> str:
    """The installed `kfcn` console script (installs the package if it is missing)."""
    found = shutil.which("kfcn", path=os.path.dirname(sys.executable))
    if found is None:
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "-e", REPO], check=True, timeout=600
        )
        found = shutil.which("kfcn", path=os.path.dirname(sys.executable))
    assert found, "the kfcn console script is not installed"
    return found


def run(args: list, cwd=None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Runs a command (the first item `kfcn` means the console script)."""
    command = [kfcn_executable() if args[0] == "kfcn" else args[0], *map(str, args[1:])]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    return subprocess.run(
        command, capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout
    )


def error_lines(process: subprocess.CompletedProcess) -> list[str]:
    """stderr without TensorFlow's C++ start-up lines."""
    return [line for line in process.stderr.splitlines() if not _TF_CHATTER.match(line)]


def assert_one_line_error(process: subprocess.CompletedProcess, code: int, *needles: str):
    lines = error_lines(process)
    assert process.returncode == code, process.stderr[-3000:]
    assert "Traceback" not in process.stderr, process.stderr[-3000:]
    assert len(lines) == 1, lines
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def moving_fcn8s(seed: int = 0):
    """A MobileNetV2 FCN-8s whose score_fr, score_pool4 and score_pool3 all matter.

    A fresh net's features shrink layer after layer (BatchNormalization starts at
    unit variance), and the score layers start at zero; each score layer gets
    random weights scaled to its input's spread, so every path moves the logits.
    """
    import keras

    import kfcn

    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    model = kfcn.build_fcn8s(
        backbone="mobilenetv2", num_classes=NUM_CLASSES, weights=None, dropout=0.0
    )
    images = rng.integers(0, 256, (2, 37, 53, 3)).astype(np.float32)
    for name in ("score_fr", "score_pool4", "score_pool3"):
        layer = model.get_layer(name)
        features = np.asarray(keras.Model(model.input, layer.input)(images))
        spread = float(np.std(features - features.mean(axis=(0, 1, 2)))) + 1e-30
        kernel, bias = layer.get_weights()
        scale = 1.0 / (spread * np.sqrt(kernel.shape[2]))
        layer.set_weights([rng.normal(0, scale, kernel.shape).astype(np.float32), bias * 0])
    return model


def check_every_path_moves(model, images) -> None:
    reference = np.asarray(model(images)).argmax(-1)
    for name in ("score_fr", "score_pool4", "score_pool3"):
        layer = model.get_layer(name)
        weights = layer.get_weights()
        layer.set_weights([np.zeros_like(w) for w in weights])
        changed = np.mean(np.asarray(model(images)).argmax(-1) != reference)
        layer.set_weights(weights)
        assert changed > 0.05, (name, changed)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    from kfcn import metadata

    model = moving_fcn8s()
    images = np.random.default_rng(5).integers(0, 256, (2, 45, 77, 3)).astype(np.float32)
    check_every_path_moves(model, images)
    info = metadata.class_info_for_dataset("folder", NUM_CLASSES, CLASS_NAMES)
    path = tmp_path_factory.mktemp("model") / "fcn8s.keras"
    metadata.save_model(model, path, info)
    return model, path, info


@pytest.fixture(scope="module")
def odd_images():
    return np.random.default_rng(7).integers(0, 256, (2, 45, 77, 3)).astype(np.uint8)


def test_saved_model(model_file, odd_images, tmp_path):
    import tensorflow as tf

    from kfcn import metadata

    model, path, info = model_file
    out = tmp_path / "sm"
    process = run(["kfcn", "export", "saved_model", "--model", path, "--output", out])
    assert process.returncode == 0, process.stderr[-3000:]
    assert "SavedModel written to" in process.stdout and "sky, road, car" in process.stdout
    serve = tf.saved_model.load(str(out)).signatures["serving_default"]
    class_ids = serve(images=tf.constant(odd_images))["class_ids"].numpy()
    expected = np.asarray(model(odd_images.astype(np.float32))).argmax(-1)
    assert np.mean(class_ids == expected) >= 0.999
    assert metadata.read_class_info(out) == info


def test_serving(model_file, tmp_path):
    from kfcn import metadata

    _, path, info = model_file
    base = tmp_path / "models"
    args = ["kfcn", "export", "serving", "--model", path, "--base_path", base]
    process = run([*args, "--model_name", "fcn", "--warmup_sizes", ""])  # no warmup: faster
    assert process.returncode == 0, process.stderr[-3000:]
    assert sorted(os.listdir(base / "fcn")) == ["1"]
    assert (base / "models.config").is_file() and (base / "batching_parameters.txt").is_file()
    assert metadata.read_class_info(base / "fcn" / "1") == info
    assert os.listdir(base / "fcn" / "1" / "assets.extra") == ["kfcn_classes.json"]


def test_tflite_from_another_folder(model_file, tmp_path):
    from kfcn import metadata
    from kfcn.export import tflite as tflite_lib

    model, path, info = model_file
    out = tmp_path / "m.tflite"
    args = ["--model", path, "--output", out, "--input_size", "45x77", "--gpu_check", "warn"]
    process = run(["kfcn", "export", "tflite", *args], cwd=tmp_path)
    assert process.returncode == 0, process.stderr[-3000:]
    assert metadata.read_class_info(out) == info
    interpreter = tflite_lib.make_interpreter(out)
    assert list(interpreter.get_input_details()[0]["shape"]) == [1, 45, 77, 3]
    image = np.random.default_rng(9).integers(0, 256, (45, 77, 3)).astype(np.float32)
    logits = tflite_lib.tflite_logits(interpreter, image)
    reference = np.asarray(model(image[None]))[0]
    np.testing.assert_allclose(logits, reference, atol=1e-3 * max(1.0, np.abs(reference).max()))


@pytest.mark.parametrize("script", ["saved_model.py", "serving.py", "tflite.py"])
def test_presets_answer_help_from_any_folder(script, tmp_path):
    # From the repository root the script's folder `export/` sits beside the package
    # `kfcn` (whose `kfcn.export` it is not); tests/test_export_*.py run real exports.
    for cwd in (REPO, tmp_path):
        process = run([sys.executable, os.path.join(REPO, "export", script), "--help"], cwd=cwd)
        assert process.returncode == 0, process.stderr
        assert "--model" in process.stdout and "--overwrite" in process.stdout


def test_onnx_agrees_with_keras_at_odd_sizes(model_file, odd_images, tmp_path):
    pytest.importorskip("tf2onnx", reason="the onnx extra: pip install 'kfcn[onnx]'")
    onnxruntime = pytest.importorskip("onnxruntime")
    from kfcn.export.onnx import read_onnx_class_info

    model, path, info = model_file
    out = tmp_path / "m.onnx"
    process = run(["kfcn", "export", "onnx", "--model", path, "--output", out])
    assert process.returncode == 0, process.stderr[-3000:]
    assert read_onnx_class_info(out) == info
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for images in (odd_images.astype(np.float32), odd_images[:1, :33, :50].astype(np.float32)):
        (logits,) = session.run(["logits"], {"images": images})
        reference = np.asarray(model(images))
        assert logits.shape == reference.shape
        np.testing.assert_allclose(logits, reference, atol=1e-4 * max(1.0, np.abs(reference).max()))


def test_errors_are_one_line(model_file, tmp_path):
    _, path, _ = model_file
    export = ["kfcn", "export", "tflite", "--output", tmp_path / "x.tflite"]
    missing = run([*export, "--model", tmp_path / "missing.keras"])
    assert_one_line_error(missing, 2, "--model", "missing.keras", "does not exist")

    notes = tmp_path / "notes.keras"
    notes.write_text("not a model")
    assert_one_line_error(run([*export, "--model", notes]), 1, "--model", "not a zip")

    bad_size = run([*export, "--model", path, "--input_size", "12y3"])
    assert_one_line_error(bad_size, 2, "--input_size", "12y3")

    existing = tmp_path / "existing.tflite"
    existing.write_bytes(b"keep")
    process = run(["kfcn", "export", "tflite", "--model", path, "--output", existing])
    assert_one_line_error(process, 2, "--output", "already exists", "--overwrite")
    assert existing.read_bytes() == b"keep"
    assert sorted(os.listdir(tmp_path)) == ["existing.tflite", "notes.keras"]


def test_a_keras_model_that_is_not_kfcn_is_refused(tmp_path):
    import keras

    inputs = keras.Input((None, None, 3))
    keras.Model(inputs, keras.layers.Conv2D(3, 1)(inputs)).save(tmp_path / "plain.keras")
    process = run(
        ["kfcn", "export", "saved_model", "--model", tmp_path / "plain.keras", "--output",
         tmp_path / "sm"]
    )  # fmt: skip
    assert_one_line_error(process, 1, "--model", "not a kfcn model")
    assert not (tmp_path / "sm").exists()
