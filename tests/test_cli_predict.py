"""`kfcn predict` as a user runs it: the installed script in subprocesses.

The model is an FCN-8s on a tiny strided-conv backbone whose three score layers
(`score_fr`, `score_pool4`, `score_pool3`) get random non-zero weights: kfcn's
score layers start at zero, which would make every prediction class 0 and let a
broken path pass. Its Keras argmax on the decoded input files is the reference;
sliding windows are checked against `kfcn.evaluation.predict_slide`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

NUM_CLASSES = 5
NAMES = ["sky", "road", "car", "tree", "person"]
TFLITE_SIZE = (64, 64)
KFCN = os.path.join(os.path.dirname(sys.executable), "kfcn")
# Minimum share of pixels whose class agrees with the Keras model (float models).
AGREEMENT = 0.999


def _tiny_fcn8s(seed: int = 0):
    import keras

    import kfcn

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((None, None, 3))
    x = keras.layers.Rescaling(1 / 127.5, -1)(inputs)
    for index, channels in enumerate((8, 8, 12, 16, 16)):  # strides 2..32
        x = keras.layers.Conv2D(
            channels, 3, strides=2, padding="same", activation="relu", name=f"down{index}"
        )(x)
    backbone = keras.Model(inputs, x, name="tiny")
    model = kfcn.build_fcn8s(backbone=backbone, num_classes=NUM_CLASSES, dropout=0.0)
    rng = np.random.default_rng(seed)
    for name in ("score_fr", "score_pool4", "score_pool3"):
        layer = model.get_layer(name)
        kernel, bias = layer.get_weights()
        layer.set_weights([rng.normal(0, 4.0, kernel.shape).astype("float32"), 0 * bias])
    return model


def _scene(height: int, width: int, seed: int) -> np.ndarray:
    """Blocks of colour with texture, so that several classes appear."""
    rng = np.random.default_rng(seed)
    image = np.zeros((height, width, 3), np.float32)
    for _ in range(6):
        y, x = rng.integers(0, height), rng.integers(0, width)
        image[y:, x:] = rng.integers(0, 256, 3)
    image += rng.normal(0, 20, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from kfcn import metadata
    from kfcn.export.saved_model import export_saved_model
    from kfcn.export.tflite import export_tflite

    root = tmp_path_factory.mktemp("predict")
    model = _tiny_fcn8s()
    info = metadata.class_info_for_dataset("folder", NUM_CLASSES, NAMES)
    paths = {"keras": str(root / "model.keras")}
    metadata.save_model(model, paths["keras"], info)
    paths["saved_model"] = export_saved_model(model, root / "saved_model")
    metadata.write_class_info(info, paths["saved_model"])
    paths["tflite"] = export_tflite(model, root / "model.tflite", TFLITE_SIZE, gpu_check="off").path
    metadata.write_class_info(info, paths["tflite"])

    images = root / "images"
    (images / "more").mkdir(parents=True)
    files = {
        "odd_png": (images / "odd_png.png", _scene(45, 61, 1)),
        "tall_jpg": (images / "tall_jpg.jpg", _scene(70, 33, 2)),
        "same_size": (images / "more" / "same_size.png", _scene(45, 61, 3)),  # batched with 1
        "gray": (images / "gray.png", _scene(37, 50, 4)[..., 0]),
    }
    decoded = {}
    for name, (path, array) in files.items():
        Image.fromarray(array).save(path, quality=90)
        with Image.open(path) as image:  # what kfcn predict reads, JPEG losses included
            decoded[name] = np.asarray(image.convert("RGB"))
    reference = {
        name: np.asarray(model(image[None].astype("float32"), training=False))[0]
        for name, image in decoded.items()
    }
    return {
        "model": model,
        "paths": paths,
        "images": images,
        "decoded": decoded,
        "reference": reference,
        "palette": np.asarray(info.palette, np.uint8),
    }


def run_kfcn(*args: str) -> subprocess.CompletedProcess:
    assert os.path.exists(KFCN), f"{KFCN} missing: run `.venv/bin/pip install -e .`"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    return subprocess.run(
        [KFCN, "predict", *map(str, args)], capture_output=True, text=True, env=env, timeout=300
    )


def _agreement(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape
    return float(np.mean(a == b))


def _check_outputs(out, setup, names, probabilities: bool):
    summary = json.loads((out / "summary.json").read_text())
    assert summary["class_names"] == NAMES
    assert summary["class_info_source"] == "model"
    assert summary["failed"] == []
    assert sorted(summary["images"]) == sorted(names)
    maps = {}
    for name in names:
        image = setup["decoded"][name]
        with Image.open(out / f"{name}.png") as png:
            assert png.mode == "P"
            assert png.size == (image.shape[1], image.shape[0])
            palette = np.asarray(png.getpalette()[: 3 * NUM_CLASSES]).reshape(-1, 3)
            class_map = np.asarray(png)
        np.testing.assert_array_equal(palette, setup["palette"])
        assert class_map.max() < NUM_CLASSES
        maps[name] = class_map
        with Image.open(out / f"{name}_overlay.jpg") as overlay:
            assert overlay.width > image.shape[1] and overlay.height >= image.shape[0]
        record = summary["images"][name]
        assert (record["height"], record["width"]) == image.shape[:2]
        counts = np.bincount(class_map.ravel(), minlength=NUM_CLASSES) / class_map.size
        expected = {NAMES[i]: c for i, c in enumerate(counts) if c > 0}
        assert list(record["fractions"]) == list(expected)  # class order
        np.testing.assert_allclose(
            list(record["fractions"].values()), list(expected.values()), atol=1e-6
        )
        probs_path = out / f"{name}_probs.npy"
        assert probs_path.exists() == probabilities
        if probabilities:
            probs = np.load(probs_path)
            assert probs.dtype == np.float16 and probs.shape == (*image.shape[:2], NUM_CLASSES)
            np.testing.assert_allclose(probs.astype(np.float32).sum(-1), 1.0, atol=5e-3)
            assert _agreement(probs.argmax(-1), class_map) > 0.99
    return maps


@pytest.mark.parametrize("kind", ["keras", "saved_model"])
def test_predict_matches_keras(setup, tmp_path, kind):
    images = setup["images"]
    args = [images / "odd_png.png", images / "tall_jpg.jpg", images / "more", images / "gray.png"]
    result = run_kfcn(
        "--model",
        setup["paths"][kind],
        "--output_dir",
        tmp_path,
        *args,
        "--probabilities",
        "--batch_size",
        "2",
    )
    assert result.returncode == 0, result.stderr
    maps = _check_outputs(tmp_path, setup, list(setup["decoded"]), probabilities=True)
    for name, class_map in maps.items():
        assert _agreement(class_map, setup["reference"][name].argmax(-1)) >= AGREEMENT, name
    # The fixture is not degenerate: several classes, in several images.
    assert len(np.unique(np.concatenate([m.ravel() for m in maps.values()]))) >= 3


def test_predict_tflite_fixed_size(setup, tmp_path):
    """45x61 is padded to the 64x64 input (as the Keras model pads it itself); 70x33 is
    tiled by 64x64 windows, which predict_slide computes independently."""
    from kfcn.evaluation import predict_slide

    images = setup["images"]
    result = run_kfcn(
        "--model",
        setup["paths"]["tflite"],
        "--output_dir",
        tmp_path,
        images / "odd_png.png",
        images / "tall_jpg.jpg",
    )
    assert result.returncode == 0, result.stderr
    maps = _check_outputs(tmp_path, setup, ["odd_png", "tall_jpg"], probabilities=False)
    whole = setup["reference"]["odd_png"].argmax(-1)
    assert _agreement(maps["odd_png"], whole) >= AGREEMENT
    slide = predict_slide(setup["model"], setup["decoded"]["tall_jpg"], TFLITE_SIZE)
    assert _agreement(maps["tall_jpg"], np.asarray(slide).argmax(-1)) >= AGREEMENT


def test_tile_matches_predict_slide_and_undecodable_images_are_skipped(setup, tmp_path):
    """--tile against predict_slide; a broken file among the inputs is skipped and named
    (one subprocess for both, to keep the suite short)."""
    from kfcn.evaluation import predict_slide

    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "out"
    tall = setup["images"] / "tall_jpg.jpg"
    args = ["--tile", "32x40", "--tile_stride", "16x24", tall, bad]
    result = run_kfcn("--model", setup["paths"]["keras"], "--output_dir", out, *args)
    _one_error_line(result, 1, "1 of 2 images", "broken.png")
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["images"]) == ["tall_jpg"] and summary["tile"] == [32, 40]
    assert summary["failed"][0]["input"] == str(bad)
    assert not (out / "broken.png").exists()
    with Image.open(out / "tall_jpg.png") as png:
        class_map = np.asarray(png)
    slide = predict_slide(setup["model"], setup["decoded"]["tall_jpg"], (32, 40), (16, 24))
    assert _agreement(class_map, np.asarray(slide).argmax(-1)) >= AGREEMENT
    # Windows change the answer here (less context), so the check above is not vacuous.
    assert _agreement(class_map, setup["reference"]["tall_jpg"].argmax(-1)) < 1.0


@pytest.mark.parametrize("kind", ["keras", "saved_model"])
def test_tile_scores_in_process(setup, kind):
    """The generic window code over each format against predict_slide, and equal to the
    whole-image result where it must be: one window the size the model pads to."""
    from kfcn import predict
    from kfcn.evaluation import predict_slide

    predictor = predict.load_predictor(setup["paths"][kind])
    image = setup["decoded"]["tall_jpg"]
    ours = predict.tile_scores(predictor.scores, image, (32, 24), (16, 16), batch_size=3)
    slide = np.asarray(predict_slide(setup["model"], image, (32, 24), (16, 16)))
    if kind == "keras":
        np.testing.assert_allclose(ours, slide, atol=1e-4)
    else:  # probabilities averaged instead of logits
        assert _agreement(ours.argmax(-1), slide.argmax(-1)) >= AGREEMENT
    odd = setup["decoded"]["odd_png"]  # 45x61: the model pads it to 64x64 itself
    whole = predictor.scores(odd[None].astype(np.float32))[0]
    for one_window in (
        predict.image_scores(predictor, odd, tile=(64, 64)),  # Keras: predict_slide
        predict.tile_scores(predictor.scores, odd, (64, 64)),
    ):
        # The SavedModel takes uint8: its padding is the mean colour rounded.
        np.testing.assert_allclose(one_window, whole, atol=1e-4 if kind == "keras" else 2e-3)
        assert _agreement(one_window.argmax(-1), whole.argmax(-1)) >= AGREEMENT


def test_a_tf_serving_model_directory_uses_its_latest_version(setup, tmp_path):
    import shutil

    from kfcn import predict

    for version in ("2", "10"):  # numerically, not alphabetically, latest
        shutil.copytree(setup["paths"]["saved_model"], tmp_path / "fcn" / version)
    (tmp_path / "fcn" / "notes").mkdir()
    predictor = predict.load_predictor(tmp_path / "fcn")
    assert predictor.kind == "saved_model"
    assert predictor.path == str(tmp_path / "fcn" / "10")
    assert predict.resolve_class_info(predictor)[1] == "model"  # its class names found


def test_same_names_from_two_folders_are_both_kept(tmp_path):
    from kfcn import predict

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for folder in ("a", "b"):
        Image.fromarray(_scene(8, 8, 0)).save(tmp_path / folder / "x.png")
    Image.fromarray(_scene(8, 8, 0)).save(tmp_path / "a" / "x.jpg")
    found = predict.find_images(
        [
            str(tmp_path / "a" / "x.png"),
            str(tmp_path / "b"),
            str(tmp_path / "a" / "*.jpg"),
            str(tmp_path / "a"),
        ]
    )
    assert [(os.path.relpath(i.path, tmp_path), i.name) for i in found] == [
        ("a/x.png", "x"),
        ("b/x.png", "x_2"),
        ("a/x.jpg", "x_3"),
    ]
    # Subfolders keep their path in the name; the output directory is not searched.
    (tmp_path / "a" / "sub").mkdir()
    (tmp_path / "a" / "out").mkdir()
    Image.fromarray(_scene(8, 8, 0)).save(tmp_path / "a" / "sub" / "y.png")
    Image.fromarray(_scene(8, 8, 0)).save(tmp_path / "a" / "out" / "x.png")
    found = predict.find_images([str(tmp_path / "a")], exclude_dir=str(tmp_path / "a" / "out"))
    assert [i.name for i in found] == ["x", "x_2", "sub/y"]  # x.jpg, x.png, sub/y.png


def _multiscale_flip_reference(model, image, scales):
    """Independent of kfcn: bilinear resizes, softmax, mirror, mean (mmseg's aug_test)."""
    import tensorflow as tf

    height, width = image.shape[:2]
    batch = image[None].astype(np.float32)
    total = np.zeros((height, width, NUM_CLASSES))
    for scale in scales:
        size = (round(height * scale), round(width * scale))
        resized = tf.image.resize(batch, size, "bilinear").numpy()
        for mirrored in (False, True):
            view = resized[:, :, ::-1] if mirrored else resized
            logits = np.asarray(model(view, training=False), np.float64)[0]
            probs = np.exp(logits - logits.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            if mirrored:
                probs = probs[:, ::-1]
            total += tf.image.resize(probs[None], (height, width), "bilinear").numpy()[0]
    return total / (2 * len(scales))


def test_test_time_scales_and_flip_average_the_probabilities(setup, tmp_path):
    """--scales --flip: class maps and probabilities against an independent computation."""
    out = tmp_path / "out"
    images = [setup["images"] / "odd_png.png", setup["images"] / "more" / "same_size.png"]
    result = run_kfcn(
        "--model",
        setup["paths"]["keras"],
        "--output_dir",
        out,
        "--scales",
        "0.75,1.5",
        "--flip",
        "--probabilities",
        *images,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scales"] == [0.75, 1.5] and summary["flip"] is True
    for name in ("odd_png", "same_size"):
        expected = _multiscale_flip_reference(setup["model"], setup["decoded"][name], (0.75, 1.5))
        with Image.open(out / f"{name}.png") as png:
            class_map = np.asarray(png)
        assert _agreement(class_map, expected.argmax(-1)) >= AGREEMENT
        probs = np.load(out / f"{name}_probs.npy").astype(np.float32)
        np.testing.assert_allclose(probs, expected, atol=2e-3)
        # Scales and mirroring change the answer here, so the checks are not vacuous.
        single = setup["reference"][name]
        single = np.exp(single - single.max(-1, keepdims=True))
        single /= single.sum(-1, keepdims=True)
        assert np.abs(single - expected).max() > 0.05
        assert _agreement(class_map, single.argmax(-1)) < 1.0


def _one_error_line(result, code: int, *needles: str) -> None:
    assert result.returncode == code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    # TensorFlow's C++ start-up lines (absl "I0000 ...", "E0000 ... cuInit") may precede it.
    errors = [line for line in result.stderr.splitlines() if line.startswith("kfcn predict:")]
    assert len(errors) == 1 and result.stderr.rstrip().endswith(errors[0]), result.stderr
    assert errors[0].startswith("kfcn predict: error: ")
    for needle in needles:
        assert needle in errors[0], errors[0]


def test_errors_before_any_work(setup, tmp_path):
    image = str(setup["images"] / "odd_png.png")
    keras_model = setup["paths"]["keras"]
    not_a_model = tmp_path / "notes.keras"
    not_a_model.write_text("hello")
    cases = [
        (
            ("--model", tmp_path / "missing.keras", "--output_dir", tmp_path, image),
            2,
            ["--model", "missing.keras", "does not exist"],
        ),
        (
            ("--model", not_a_model, "--output_dir", tmp_path, image),
            1,
            ["notes.keras", "not a model file"],
        ),
        (
            ("--model", tmp_path, "--output_dir", tmp_path / "o", image),
            1,
            ["without saved_model.pb"],
        ),
        (
            ("--model", keras_model, "--output_dir", tmp_path, tmp_path / "*.png"),
            2,
            ["matched no image"],
        ),
        (
            ("--model", keras_model, "--output_dir", tmp_path, tmp_path / "nope.png"),
            2,
            ["nope.png", "does not exist"],
        ),
        (
            ("--model", keras_model, "--output_dir", tmp_path, "--tile", "32y32", image),
            2,
            ["--tile", "HxW", "32y32"],
        ),
        (
            ("--model", keras_model, "--output_dir", tmp_path, "--tile", "0x5", image),
            2,
            ["--tile", "HxW"],
        ),
        (
            (
                "--model",
                keras_model,
                "--output_dir",
                tmp_path,
                "--tile",
                "8x8",
                "--tile_stride",
                "9x9",
                image,
            ),
            2,
            ["--tile_stride"],
        ),
        (
            (
                "--model",
                setup["paths"]["tflite"],
                "--output_dir",
                tmp_path,
                "--tile",
                "32x32",
                image,
            ),
            2,
            ["--tile 32x32", "64x64"],
        ),
        (
            ("--model", keras_model, "--output_dir", tmp_path, "--scales", "1.0,0", image),
            2,
            ["--scales", "positive numbers", "1.0,0"],
        ),
        (
            ("--model", setup["paths"]["tflite"], "--output_dir", tmp_path, "--flip", image),
            2,
            ["--scales/--flip", ".keras model", "tflite"],
        ),
    ]
    for args, code, needles in cases:
        _one_error_line(run_kfcn(*args), code, *needles)


def test_a_keras_model_that_is_not_kfcn(tmp_path):
    import keras

    inputs = keras.Input((None, None, 3))
    plain = keras.Model(inputs, keras.layers.Conv2D(2, 1)(inputs))
    plain.save(tmp_path / "plain.keras")
    Image.fromarray(_scene(8, 8, 0)).save(tmp_path / "x.png")
    result = run_kfcn(
        "--model", tmp_path / "plain.keras", "--output_dir", tmp_path / "o", tmp_path / "x.png"
    )
    _one_error_line(result, 1, "plain.keras", "not a kfcn model")
