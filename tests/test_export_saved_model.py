"""SavedModel export: signatures, reload without kfcn, saved_model_cli, bad inputs, errors."""

import os
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pytest
import tensorflow as tf
from export_fixtures import (
    HEIGHT,
    VARIANTS,
    WIDTH,
    cached_confident_model,
    synthetic_scenes,
    tiny_kfcn_model,
)

from kfcn.export import saved_model as sm
from kfcn.export.artifacts import check_segmentation_model, load_segmentation_model

VENV_BIN = os.path.dirname(sys.executable)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Softmax outputs of two float32 graphs: the fixtures' logits pass through every path
# (~60 layers), whose rounding differs by up to ~1e-5 between the graphs.
PROBABILITY_ATOL = 5e-5


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _keras_reference(model, images):
    logits = np.asarray(model(np.asarray(images, np.float32), training=False), np.float64)
    top2 = np.sort(logits, -1)[..., -2:]
    return logits.argmax(-1), _softmax(logits), top2[..., 1] - top2[..., 0]


def _assert_same_class_map(class_ids, reference, margin):
    """Equal everywhere the Keras top-2 margin is not a near tie, and on >= 99.9% overall."""
    class_ids = np.asarray(class_ids)
    assert class_ids.shape == reference.shape
    clear = margin > 1e-3
    np.testing.assert_array_equal(class_ids[clear], reference[clear])
    assert np.mean(class_ids == reference) >= 0.999


# Every variant: the fixtures' outputs depend on every path (deep blocks, upscore2,
# upscore_pool4, skips), so a conversion bug in any of them breaks the agreement. Tests of
# loading mechanics rather than of the graph run on FCN-8s only (`_FCN8S_ONLY`).
@pytest.fixture(scope="module", params=VARIANTS)
def exported(request, tmp_path_factory):
    model, model_path = cached_confident_model(tmp_path_factory, request.param)
    export_dir = tmp_path_factory.mktemp("saved_model") / request.param
    result = sm.export_saved_model(model, export_dir)
    return model, result


_FCN8S_ONLY = pytest.mark.parametrize("exported", ["fcn8s"], indirect=True)


@pytest.fixture(scope="module")
def loaded(exported):
    return tf.saved_model.load(exported[1])


@pytest.fixture(scope="module")
def images():
    return synthetic_scenes(2, seed=7)[0]


@_FCN8S_ONLY
def test_signatures_and_specs(loaded):
    assert set(loaded.signatures) == {"serving_default", "serving_bytes"}
    images_spec = loaded.signatures["serving_default"].structured_input_signature[1]["images"]
    assert images_spec.dtype == tf.uint8 and images_spec.shape.rank == 4
    assert images_spec.shape[1] is None and images_spec.shape[2] is None  # dynamic H, W
    bytes_spec = loaded.signatures["serving_bytes"].structured_input_signature[1]["image_bytes"]
    assert bytes_spec.dtype == tf.string and bytes_spec.shape.as_list() == [None]
    for name in ("serving_default", "serving_bytes"):
        outputs = loaded.signatures[name].structured_outputs
        assert outputs["class_ids"].dtype.is_integer
        assert outputs["probabilities"].dtype == tf.float32


def test_images_signature_matches_keras_at_two_sizes(exported, loaded, images):
    model, _ = exported
    for batch in (images, images[:, 5:53, 7:87]):  # 64x96 and 48x80
        ids, probs, margin = _keras_reference(model, batch)
        out = loaded.signatures["serving_default"](images=tf.constant(batch))
        _assert_same_class_map(out["class_ids"].numpy(), ids, margin)
        assert out["probabilities"].shape == batch.shape[:3] + (4,)
        np.testing.assert_allclose(out["probabilities"].numpy(), probs, atol=PROBABILITY_ATOL)


def test_bytes_signature_png_and_jpeg(exported, loaded, images):
    model, _ = exported
    png = [tf.io.encode_png(im).numpy() for im in images]
    out = loaded.signatures["serving_bytes"](image_bytes=tf.constant(png))
    ids, _, margin = _keras_reference(model, images)
    _assert_same_class_map(out["class_ids"].numpy(), ids, margin)
    # JPEG is lossy: compare with Keras on the decoded pixels, decoded independently.
    jpeg = tf.io.encode_jpeg(images[0], quality=90).numpy()
    decoded = tf.io.decode_jpeg(jpeg, channels=3).numpy()[None]
    out = loaded.signatures["serving_bytes"](image_bytes=tf.constant([jpeg]))
    ids, _, margin = _keras_reference(model, decoded)
    _assert_same_class_map(out["class_ids"].numpy(), ids, margin)


def test_grayscale_and_rgba_png_become_rgb(exported, loaded, images):
    model, _ = exported
    gray = images[0].mean(-1).astype(np.uint8)
    out = loaded.signatures["serving_bytes"](
        image_bytes=tf.constant([tf.io.encode_png(gray[..., None]).numpy()])
    )
    ids, _, margin = _keras_reference(model, np.repeat(gray[None, ..., None], 3, -1))
    _assert_same_class_map(out["class_ids"].numpy(), ids, margin)

    alpha = np.random.default_rng(0).integers(0, 256, (HEIGHT, WIDTH, 1), np.uint8)
    rgba = np.concatenate([images[1], alpha], -1)
    out = loaded.signatures["serving_bytes"](
        image_bytes=tf.constant([tf.io.encode_png(rgba).numpy()])
    )
    ids, _, margin = _keras_reference(model, images[1:2])  # alpha dropped, RGB kept
    _assert_same_class_map(out["class_ids"].numpy(), ids, margin)


@_FCN8S_ONLY
def test_loads_with_tensorflow_only_in_a_fresh_process(exported, images, tmp_path):
    model, export_dir = exported
    np.save(tmp_path / "images.npy", images)
    script = textwrap.dedent(
        f"""
        import sys
        import numpy as np
        import tensorflow as tf
        loaded = tf.saved_model.load({str(export_dir)!r})
        images = np.load({str(tmp_path / "images.npy")!r})
        out = loaded.signatures["serving_default"](images=tf.constant(images))
        np.save({str(tmp_path / "class_ids.npy")!r}, out["class_ids"].numpy())
        assert not any(m == "kfcn" or m.startswith("kfcn.") for m in sys.modules), "kfcn imported"
        """
    )
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    # Run from an empty directory so the repository's kfcn is not importable by accident.
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ids, _, margin = _keras_reference(model, images)
    _assert_same_class_map(np.load(tmp_path / "class_ids.npy"), ids, margin)


@_FCN8S_ONLY
def test_saved_model_cli_run(exported, images, tmp_path):
    model, export_dir = exported
    np.save(tmp_path / "images.npy", images)
    out_dir = tmp_path / "cli_out"
    cli = os.path.join(VENV_BIN, "saved_model_cli")
    result = subprocess.run(
        [
            cli,
            "run",
            "--dir",
            str(export_dir),
            "--tag_set",
            "serve",
            "--signature_def",
            "serving_default",
            "--inputs",
            f"images={tmp_path / 'images.npy'}",
            "--outdir",
            str(out_dir),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ids, probs, margin = _keras_reference(model, images)
    _assert_same_class_map(np.load(out_dir / "class_ids.npy"), ids, margin)
    np.testing.assert_allclose(np.load(out_dir / "probabilities.npy"), probs, atol=PROBABILITY_ATOL)


@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    """A tiny kfcn-contract model exported with max_pixels=64*64 and no probabilities."""
    export_dir = tmp_path_factory.mktemp("limited") / "tiny"
    sm.export_saved_model(
        tiny_kfcn_model(), export_dir, max_pixels=64 * 64, include_probabilities=False
    )
    return tf.saved_model.load(str(export_dir))


def test_without_probabilities(limited):
    out = limited.signatures["serving_default"](images=tf.zeros([1, 8, 8, 3], tf.uint8))
    assert set(out) == {"class_ids"}
    assert out["class_ids"].shape == (1, 8, 8)


def _png(height, width, channels=3):
    return tf.io.encode_png(tf.zeros([height, width, channels], tf.uint8)).numpy()


@pytest.mark.parametrize(
    "signature, value, message",
    [
        ("serving_bytes", [b"this is not an image"], "not a JPEG or PNG"),
        ("serving_bytes", [b""], "empty string"),
        ("serving_bytes", [_png(65, 64)], "max_pixels=4096"),
        ("serving_bytes", [_png(8, 8), _png(8, 9)], "same height and width"),
        ("serving_default", np.zeros((1, 8, 8, 1), np.uint8), "must be RGB"),
        ("serving_default", np.zeros((1, 8, 8, 4), np.uint8), "must be RGB"),
        ("serving_default", np.zeros((1, 0, 8, 3), np.uint8), "0-pixel"),
        ("serving_default", np.zeros((1, 8, 0, 3), np.uint8), "0-pixel"),
        ("serving_default", np.zeros((1, 65, 64, 3), np.uint8), "max_pixels=4096"),
        ("serving_default", np.zeros((0, 8, 8, 3), np.uint8), "at least one image"),
        ("serving_bytes", np.zeros((0,), object), "at least one image"),
    ],
)
def test_bad_requests_fail_with_invalid_argument(limited, signature, value, message):
    key = "image_bytes" if signature == "serving_bytes" else "images"
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        limited.signatures[signature](**{key: tf.constant(value)})


def test_pixel_limit_is_inclusive(limited):
    out = limited.signatures["serving_bytes"](image_bytes=tf.constant([_png(64, 64)]))
    assert out["class_ids"].shape == (1, 64, 64)


def test_existing_output_is_an_error_and_left_untouched(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already exists"):
        sm.export_saved_model(tiny_kfcn_model(), target)
    assert os.listdir(target) == ["keep.txt"]


def test_failed_export_leaves_nothing(tmp_path, monkeypatch):
    def broken(model, directory, **kwargs):
        with open(os.path.join(directory, "half_written.pb"), "w") as f:
            f.write("partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(sm, "write_saved_model", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        sm.export_saved_model(tiny_kfcn_model(), tmp_path / "out")
    assert os.listdir(tmp_path) == []


def test_not_a_kfcn_model(tmp_path):
    import keras

    inputs = keras.Input((32, 32, 3))
    classifier = keras.Model(
        inputs, keras.layers.Dense(10)(keras.layers.GlobalAveragePooling2D()(inputs))
    )
    with pytest.raises(ValueError, match="not a kfcn segmentation model"):
        check_segmentation_model(classifier)
    classifier.save(tmp_path / "classifier.keras")
    with pytest.raises(ValueError, match="not a kfcn segmentation model"):
        load_segmentation_model(tmp_path / "classifier.keras")
    (tmp_path / "notes.keras").write_text("not a model")
    with pytest.raises(ValueError, match="not a zip archive"):
        load_segmentation_model(tmp_path / "notes.keras")
    with zipfile.ZipFile(tmp_path / "empty.keras", "w") as archive:
        archive.writestr("readme.txt", "nothing")
    with pytest.raises(ValueError, match="Could not load"):
        load_segmentation_model(tmp_path / "empty.keras")
    with pytest.raises(FileNotFoundError):
        load_segmentation_model(tmp_path / "missing.keras")
    # A segmentation-shaped model without kfcn layers is not a kfcn model either.
    seg_in = keras.Input((None, None, 3))
    plain = keras.Model(seg_in, keras.layers.Conv2D(3, 1)(seg_in))
    with pytest.raises(ValueError, match="no kfcn layers"):
        check_segmentation_model(plain)


def test_script_exports_and_rejects(tmp_path):
    model_path = tmp_path / "tiny.keras"
    tiny_kfcn_model().save(model_path)
    script = os.path.join(REPO, "export", "saved_model.py")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    out = tmp_path / "sm"
    ok = subprocess.run(
        [
            sys.executable,
            script,
            "--model",
            str(model_path),
            "--output",
            str(out),
            "--noprobabilities",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert (out / "saved_model.pb").exists()
    again = subprocess.run(
        [sys.executable, script, "--model", str(model_path), "--output", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert again.returncode != 0 and "already exists" in again.stderr
    assert sorted(os.listdir(tmp_path)) == ["sm", "tiny.keras"]
