"""Tests for kfcn.evaluation and recipes/evaluate.py with analytically known stand-in models."""

import importlib.util
import json
import os
from dataclasses import dataclass

import keras
import numpy as np
import pytest
import tensorflow as tf

from kfcn import evaluation

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(REPO, "recipes", "evaluate.py")


@dataclass(frozen=True)
class Info:  # the fields of kfcn.data.DatasetInfo that evaluate() reads
    num_classes: int
    ignore_label: int
    class_names: tuple


def red_threshold_model(num_classes=2):
    """Logits: class 0 -> 0, class 1 -> R - 128, classes >= 2 -> -1000: predicts R > 128."""
    kernel = np.zeros((1, 1, 3, num_classes), np.float32)
    kernel[0, 0, 0, 1] = 1.0
    bias = np.full(num_classes, -1000.0, np.float32)
    bias[:2] = (0.0, -128.0)
    inputs = keras.Input((None, None, 3))
    outputs = keras.layers.Conv2D(
        num_classes,
        1,
        kernel_initializer=keras.initializers.Constant(kernel),
        bias_initializer=keras.initializers.Constant(bias),
    )(inputs)
    return keras.Model(inputs, outputs)


class WindowCoordinates(keras.layers.Layer):
    """Outputs (1, row in window, column in window): not translation-equivariant."""

    def call(self, x):
        shape = tf.shape(x)
        rows = tf.cast(tf.range(shape[1]), tf.float32)[tf.newaxis, :, tf.newaxis]
        cols = tf.cast(tf.range(shape[2]), tf.float32)[tf.newaxis, tf.newaxis, :]
        ones = tf.ones(shape[:3])
        return tf.stack([ones, ones * rows, ones * cols], axis=-1)


def coordinates_model():
    inputs = keras.Input((None, None, 3))
    return keras.Model(inputs, WindowCoordinates()(inputs))


def block_image(height, width, block, rng):
    """R is 255 or 0 on a checkerboard of `block` squares; G, B random."""
    rows = (np.arange(height) // block)[:, None]
    cols = (np.arange(width) // block)[None, :]
    cls = ((rows + cols) % 2).astype(np.uint8)
    image = rng.integers(0, 256, size=(height, width, 3)).astype(np.uint8)
    image[..., 0] = 255 * cls
    return image, cls


def test_predict_whole_shape_and_classes():
    rng = np.random.default_rng(0)
    image, cls = block_image(13, 17, 4, rng)
    logits = evaluation.predict_whole(red_threshold_model(), image)
    assert logits.shape == (13, 17, 2) and logits.dtype == tf.float32
    np.testing.assert_array_equal(tf.argmax(logits, -1).numpy(), cls)


def test_slide_covers_every_pixel_with_equal_window_weights():
    model = coordinates_model()
    image = np.zeros((5, 8, 3), np.uint8)
    out = evaluation.predict_slide(model, image, crop_size=3, stride=2, num_classes=3).numpy()
    # Windows (worked out by hand): rows start at 0, 2 (2 = 5 - 3 is flush with the
    # bottom); columns start at 0, 2, 4 and 5 (flush with the right edge, 8 - 3).
    row_starts, col_starts = (0, 2), (0, 2, 4, 5)

    def mean_offset(index, starts):
        offsets = [index - s for s in starts if s <= index < s + 3]
        assert offsets, "every pixel must be covered"
        return np.mean(offsets)

    expected_rows = np.array([mean_offset(i, row_starts) for i in range(5)])
    expected_cols = np.array([mean_offset(j, col_starts) for j in range(8)])
    # e.g. column 5 is in windows 4 (offset 1) and 5 (offset 0) -> 0.5;
    # column 4 is in windows 2 (offset 2) and 4 (offset 0) -> 1.
    assert expected_cols[5] == 0.5 and expected_cols[4] == 1.0
    np.testing.assert_allclose(out[..., 0], 1.0)  # the count map divides exactly
    np.testing.assert_allclose(out[..., 1], np.repeat(expected_rows[:, None], 8, 1))
    np.testing.assert_allclose(out[..., 2], np.repeat(expected_cols[None, :], 5, 0))


def test_slide_pads_images_smaller_than_the_window():
    seen = []
    inner = coordinates_model()

    def model(x, training=False):  # records the windows the model receives
        seen.append(np.asarray(x))
        return inner(x, training=training)

    image = np.full((2, 4, 3), 7, np.uint8)
    out = evaluation.predict_slide(model, image, crop_size=3, stride=2, batch_size=8).numpy()
    # Padded to 3 x 4: one row of windows; columns start at 0 and 1 (flush right).
    assert out.shape == (2, 4, 3)
    np.testing.assert_allclose(out[..., 2], [[0, 0.5, 1.5, 2]] * 2)
    np.testing.assert_allclose(out[..., 1], [[0] * 4, [1] * 4])
    windows = seen[-1]
    assert windows.shape == (2, 3, 3, 3)
    np.testing.assert_allclose(windows[:, :2], 7.0)
    np.testing.assert_allclose(windows[:, 2], np.broadcast_to(evaluation.PAD_RGB, (2, 3, 3)))
    # The one ImageNet mean: the colour the model's own PadToMultiple uses.
    from kfcn.layers import IMAGENET_MEAN_RGB, PadToMultiple

    assert evaluation.PAD_RGB == IMAGENET_MEAN_RGB == PadToMultiple().value


def test_msflip_averages_probabilities_over_scales_and_flips():
    # Mirror-sensitive model: logits (0, column in window). At one scale, mirrored,
    # the prediction mirrored back has logit W - 1 - j; averaged softmax by hand.
    model = coordinates_model()
    image = np.zeros((2, 3, 3), np.uint8)
    probs = evaluation.predict_msflip(model, image, scales=(1.0,), flip=True).numpy()

    def softmax(v):
        e = np.exp(v - np.max(v))
        return e / e.sum()

    for j in range(3):
        expected = (softmax([1.0, 0.0, j]) + softmax([1.0, 0.0, 2 - j])) / 2
        np.testing.assert_allclose(probs[0, j], expected, rtol=1e-5)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)


def _pixels_far_from_block_edges(height, width, block, margin):
    r = np.arange(height) % block
    c = np.arange(width) % block
    near_r = (r < margin) | (r >= block - margin)
    near_c = (c < margin) | (c >= block - margin)
    return ~(near_r[:, None] | near_c[None, :])


@pytest.mark.parametrize(
    "mode, kwargs",
    [
        ("whole", {}),
        ("slide", {"crop_size": (20, 24), "stride": (13, 16)}),
        ("msflip", {"scales": (0.5, 0.75, 1.0, 1.25, 1.5, 1.75), "flip": True}),
        ("msflip", {"scales": (0.5, 1.0), "flip": False, "crop_size": 24}),
    ],
)
def test_every_mode_is_perfect_on_a_per_pixel_rule(mode, kwargs):
    # The model's class is R > 128 pixel by pixel, so whole and slide must be
    # perfect everywhere; resizing in msflip blurs block edges, so there the
    # labels within 3 px of an edge are set to the ignore label.
    rng = np.random.default_rng(1)
    elements = []
    for height, width in ((40, 56), (33, 47)):
        image, cls = block_image(height, width, 8, rng)
        label = cls.copy()
        if mode == "msflip":
            label[~_pixels_far_from_block_edges(height, width, 8, 3)] = 255
        elements.append({"image": image, "label": label, "name": f"{height}x{width}"})
    info = Info(2, 255, ("dark", "red"))
    results = evaluation.evaluate(red_threshold_model(), elements, info, mode, **kwargs)
    assert results["num_images"] == 2
    for key in ("pixel_accuracy", "mean_accuracy", "mean_iou", "frequency_weighted_iou"):
        assert results[key] == 1.0, (key, results)
    assert results["iou"] == {"dark": 1.0, "red": 1.0}
    counted = sum(int((e["label"] != 255).sum()) for e in elements)
    assert np.sum(results["confusion_matrix"]) == counted


def test_evaluate_hand_known_confusion_matrix_over_a_tf_dataset():
    r = np.array([[[200, 0, 200], [0, 0, 255]], [[0, 255, 255], [0, 0, 0]]], np.uint8)
    images = np.zeros((2, 2, 3, 3), np.uint8)
    images[..., 0] = r
    # predictions (R > 128): image 0 [[1, 0, 1], [0, 0, 1]], image 1 [[0, 1, 1], [0, 0, 0]]
    labels = np.array([[[1, 1, 255], [0, 2, 1]], [[0, 1, 2], [255, 0, 0]]], np.uint8)
    # image 0 pairs (gt, pred): (1,1) (1,0) ignored (0,0) (2,0) (1,1)
    # image 1 pairs: (0,0) (1,1) (2,1) ignored (0,0) (0,0)
    expected = np.array(
        [
            [1 + 3, 0, 0],  # gt 0
            [1, 2 + 1, 0],  # gt 1
            [1, 1, 0],  # gt 2
        ]
    )
    dataset = tf.data.Dataset.from_tensor_slices(
        {"image": images, "label": labels, "name": np.array([b"a", b"b"])}
    )
    info = Info(3, 255, ("zero", "one", "two"))
    results = evaluation.evaluate(red_threshold_model(3), dataset, info)
    np.testing.assert_array_equal(results["confusion_matrix"], expected)
    # IU: class 0 = 4 / (4 + 6 - 4) = 4/6, class 1 = 3 / (4 + 4 - 3) = 3/5, class 2 = 0
    assert results["iou"] == pytest.approx({"zero": 4 / 6, "one": 3 / 5, "two": 0.0})
    assert results["mean_iou"] == pytest.approx((4 / 6 + 3 / 5) / 3)
    assert results["pixel_accuracy"] == pytest.approx(7 / 10)
    assert results["num_images"] == 2 and results["seconds"] >= 0

    first = evaluation.evaluate(red_threshold_model(3), dataset, info, max_images=1)
    np.testing.assert_array_equal(first["confusion_matrix"], [[1, 0, 0], [1, 2, 0], [1, 0, 0]])
    assert first["num_images"] == 1


def test_evaluate_rejects_class_count_mismatch_and_bad_mode():
    elements = [{"image": np.zeros((2, 2, 3), np.uint8), "label": np.zeros((2, 2), np.uint8)}]
    with pytest.raises(ValueError, match=r"outputs 2 classes.*num_classes=4"):
        evaluation.evaluate(red_threshold_model(2), elements, Info(4, 255, tuple("abcd")))
    with pytest.raises(ValueError, match="mode"):
        evaluation.evaluate(red_threshold_model(2), elements, Info(2, 255, ("a", "b")), "fast")
    with pytest.raises(ValueError, match="crop_size"):
        evaluation.evaluate(red_threshold_model(2), elements, Info(2, 255, ("a", "b")), "slide")


def test_results_json_writes_nan_as_null_and_table(tmp_path):
    info = Info(3, 255, ("a", "b", "c"))
    elements = [{"image": np.zeros((2, 2, 3), np.uint8), "label": np.zeros((2, 2), np.uint8)}]
    results = evaluation.evaluate(red_threshold_model(3), elements, info)
    assert np.isnan(results["iou"]["b"])  # class b absent from labels and predictions
    path = tmp_path / "sub" / "r.json"
    evaluation.write_results_json(results, path)
    loaded = json.loads(path.read_text())
    assert loaded["iou"] == {"a": 1.0, "b": None, "c": None}
    table = evaluation.format_results(results)
    assert "mean IU" in table and "100.00" in table and "n/a" in table


# ---------------------------------------------------------------------------
# recipes/evaluate.py


def _write_folder_dataset(root, count=3, size=(24, 32)):
    from PIL import Image

    rng = np.random.default_rng(2)
    lines = []
    for i in range(count):
        image, cls = block_image(*size, 8, rng)
        label = cls.copy()
        label[0, :5] = 255
        Image.fromarray(image).save(root / f"img{i}.png")
        Image.fromarray(label).save(root / f"lab{i}.png")
        lines.append(f"img{i}.png lab{i}.png")
    (root / "val.txt").write_text("\n".join(lines) + "\n")
    return count * (size[0] * size[1] - 5)


def _recipe():
    spec = importlib.util.spec_from_file_location("evaluate_recipe", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_recipe_in_process_perfect_scores_and_modes(tmp_path, capsys):
    counted = _write_folder_dataset(tmp_path)
    model_path = tmp_path / "red.keras"
    red_threshold_model().save(model_path)
    recipe = _recipe()
    common = ["--model", str(model_path), "--dataset", "folder", "--data_dir", str(tmp_path)]
    common += ["--num_classes", "2", "--class_names", "dark,red"]
    out = tmp_path / "whole.json"
    assert recipe.main(common + ["--output_json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["mean_iou"] == 1.0 and results["iou"] == {"dark": 1.0, "red": 1.0}
    assert results["num_images"] == 3 and np.sum(results["confusion_matrix"]) == counted
    printed = capsys.readouterr().out
    assert "mean IU" in printed and "dark" in printed

    out = tmp_path / "slide.json"
    args = ["--mode", "slide", "--crop_size", "16", "--max_images", "2", "--output_json", str(out)]
    assert recipe.main(common + args) == 0
    results = json.loads(out.read_text())
    assert results["mean_iou"] == 1.0 and results["num_images"] == 2
    assert results["crop_size"] == [16, 16] and results["mode"] == "slide"

    # The model has 2 outputs; the dataset claims 3 classes.
    bad = common[:-4] + ["--num_classes", "3", "--output_json", str(tmp_path / "x.json")]
    assert recipe.main(bad) == 1
    err = capsys.readouterr().err
    assert "--model" in err and "outputs 2 classes" in err and "num_classes=3" in err
    assert not (tmp_path / "x.json").exists()


def test_recipe_rejects_bad_model_paths(tmp_path, capsys):
    recipe = _recipe()
    rest = ["--dataset", "camvid", "--data_dir", str(tmp_path), "--output_json", "x.json"]
    assert recipe.main(["--model", str(tmp_path / "missing.keras")] + rest) == 2
    assert "--model" in capsys.readouterr().err
    not_keras = tmp_path / "notes.keras"
    not_keras.write_text("not a zip")
    assert recipe.main(["--model", str(not_keras)] + rest) == 1
    err = capsys.readouterr().err
    assert "--model" in err and "not a zip archive" in err
    folder = ["--model", str(not_keras), "--dataset", "folder", "--output_json", "x"]
    assert recipe.main(folder) == 2
    assert "--num_classes" in capsys.readouterr().err


def test_evaluate_accepts_eval_pipeline_batches():
    from kfcn.data.pipeline import eval_pipeline

    rng = np.random.default_rng(3)
    image, cls = block_image(16, 24, 8, rng)
    label = cls.copy()
    label[:, :8] = 0  # the left third is labelled dark whatever R says
    dataset = tf.data.Dataset.from_tensor_slices(
        {"image": image[None], "label": label[None], "name": np.array([b"one"])}
    )
    names = []
    results = evaluation.evaluate(
        red_threshold_model(),
        eval_pipeline(dataset),
        Info(2, 255, ("dark", "red")),
        progress=lambda done, name: names.append((done, name)),
    )
    # In columns 0-7 the checkerboard is class 0 on rows 0-7 and class 1 (R = 255) on
    # rows 8-15, so relabelling them 0 gives 8 * 8 = 64 pixels with gt 0 / prediction 1.
    confusion = np.array(results["confusion_matrix"])
    assert confusion[0, 1] == 64 and confusion[1, 0] == 0
    assert confusion.sum() == 16 * 24 and np.trace(confusion) == 16 * 24 - 64
    assert names == [(1, "one")]


def test_evaluate_hands_each_image_label_and_prediction_to_on_image():
    rng = np.random.default_rng(4)
    elements = []
    for name, (height, width) in (("a", (8, 16)), ("b", (16, 8))):
        image, cls = block_image(height, width, 4, rng)
        elements.append({"image": image, "label": cls, "name": name})
    seen, progress = [], []
    evaluation.evaluate(
        red_threshold_model(),
        elements,
        Info(2, 255, ("dark", "red")),
        progress=lambda done, name: progress.append((done, name)),
        on_image=lambda *args: seen.append(args),
    )
    assert progress == [(1, "a"), (2, "b")]
    assert [(done, name) for done, name, *_ in seen] == progress
    for (_, _, image, label, prediction), element in zip(seen, elements, strict=True):
        np.testing.assert_array_equal(image, element["image"])
        np.testing.assert_array_equal(label, element["label"])
        np.testing.assert_array_equal(prediction, element["label"])  # R > 128 is the class
