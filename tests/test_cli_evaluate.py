"""`kfcn evaluate` run as a user runs it (a subprocess), on a folder dataset written here.

The scores are checked against an independent numpy computation: the confusion
matrix of the model's own argmax (bincount over ground truth / prediction pairs,
void pixels left out) and the paper's four formulas (FCN, CVPR 2015, section 5).
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
from PIL import Image
from test_cli_export import NUM_CLASSES, assert_one_line_error, moving_fcn8s, run

CLASS_NAMES = ("sky", "road", "car")
SIZES = ((37, 53), (45, 77), (29, 40))
VOID = 255


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A model carrying class names, a 3-image folder dataset with void pixels."""
    from kfcn import metadata

    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(11)
    model = moving_fcn8s(seed=3)
    lines, images, labels = [], [], []
    for index, (height, width) in enumerate(SIZES):
        image = rng.integers(0, 256, (height, width, 3)).astype(np.uint8)
        # Labels agree with the model on about half the pixels, so scores differ per image.
        prediction = np.asarray(model(image[None].astype(np.float32)))[0].argmax(-1)
        label = np.where(
            rng.random((height, width)) < 0.3 + 0.2 * index,
            prediction,
            rng.integers(0, NUM_CLASSES, (height, width)),
        ).astype(np.uint8)
        label[:2, : 3 + index] = VOID
        Image.fromarray(image).save(root / f"img{index}.png")
        Image.fromarray(label).save(root / f"lab{index}.png")
        lines.append(f"img{index}.png lab{index}.png")
        images.append(image)
        labels.append(label)
    (root / "val.txt").write_text("\n".join(lines) + "\n")
    info = metadata.class_info_for_dataset("folder", NUM_CLASSES, CLASS_NAMES)
    model_path = root / "model.keras"
    metadata.save_model(model, model_path, info)
    return model, model_path, root, images, labels


def numpy_confusion(model, image, label):
    prediction = np.asarray(model(image[None].astype(np.float32)))[0].argmax(-1)
    valid = label != VOID
    pairs = NUM_CLASSES * label[valid].astype(np.int64) + prediction[valid]
    return np.bincount(pairs, minlength=NUM_CLASSES**2).reshape(NUM_CLASSES, NUM_CLASSES)


def paper_metrics(n):
    """FCN section 5: n[i, j] = pixels of class i predicted j, t_i = sum_j n[i, j]."""
    n = n.astype(np.float64)
    t = n.sum(1)
    diag = np.diag(n)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = diag / (t + n.sum(0) - diag)
        accuracy = diag / t
    present = t > 0
    return {
        "pixel_accuracy": diag.sum() / t.sum(),
        "mean_accuracy": np.nanmean(accuracy),
        "mean_iou": np.nanmean(iou),
        "frequency_weighted_iou": (t[present] * iou[present]).sum() / t.sum(),
        "iou": iou,
    }


def test_scores_pictures_and_json(setup, tmp_path):
    model, model_path, root, images, labels = setup
    out, json_path = tmp_path / "eval", tmp_path / "scores.json"
    process = run(
        ["kfcn", "evaluate", "--model", model_path, "--dataset", "folder", "--data_dir", root,
         "--split", "val", "--num_classes", NUM_CLASSES, "--output_json", json_path,
         "--output_dir", out, "--num_examples", 1]
    )  # fmt: skip
    assert process.returncode == 0, process.stderr[-3000:]
    assert "mean IU" in process.stdout and "road" in process.stdout

    per_image = [numpy_confusion(model, i, lab) for i, lab in zip(images, labels, strict=True)]
    expected = paper_metrics(sum(per_image))
    results = json.loads(json_path.read_text())
    np.testing.assert_array_equal(results["confusion_matrix"], sum(per_image))
    for key in ("pixel_accuracy", "mean_accuracy", "mean_iou", "frequency_weighted_iou"):
        assert results[key] == pytest.approx(expected[key], abs=1e-12), key
    # Class names come from the model (the folder dataset has none).
    assert list(results["iou"]) == list(CLASS_NAMES)
    assert list(results["iou"].values()) == pytest.approx(list(expected["iou"]))
    assert results["num_images"] == 3 and results["mode"] == "whole"
    assert json.loads((out / "results.json").read_text()) == results

    image_iou = [paper_metrics(n)["mean_iou"] for n in per_image]
    written = json.loads((out / "per_image.json").read_text())
    assert [r["name"] for r in written] == [f"img{i}" for i in range(3)]
    assert [r["mean_iou"] for r in written] == pytest.approx(image_iou)
    worst, best = int(np.argmin(image_iou)), int(np.argmax(image_iou))
    assert worst != best
    pictures = sorted(name for name in os.listdir(out) if name.endswith(".png"))
    assert pictures == sorted(["confusion_matrix.png", f"worst_1_img{worst}.png",
                               f"best_1_img{best}.png"])  # fmt: skip
    for name in pictures:
        with Image.open(out / name) as picture:
            picture.verify()
    with Image.open(out / f"worst_1_img{worst}.png") as picture:
        # ground truth | gap | prediction with its legend: wider than two images.
        assert picture.height >= SIZES[worst][0] and picture.width > 2 * SIZES[worst][1]


def test_recipe_is_a_preset_with_its_old_flags(setup, tmp_path):
    _, model_path, root, _, _ = setup
    out = tmp_path / "slide.json"
    # "H,W" sizes and --no-flip, as the recipe took them before it became a preset;
    # run from another folder.
    recipe = os.path.join(os.path.dirname(os.path.dirname(__file__)), "recipes", "evaluate.py")
    process = run(
        [sys.executable, recipe, "--model", model_path, "--dataset", "folder", "--data_dir",
         root, "--num_classes", 3, "--mode", "slide", "--crop_size", "32,40", "--stride",
         "16,20", "--no-flip", "--max_images", 2, "--output_json", out],
        cwd=tmp_path,
    )  # fmt: skip
    assert process.returncode == 0, process.stderr[-3000:]
    assert "mean IU" in process.stdout
    results = json.loads(out.read_text())
    assert results["crop_size"] == [32, 40] and results["stride"] == [16, 20]
    assert results["num_images"] == 2


def test_errors_are_one_line(setup, tmp_path):
    _, model_path, root, _, _ = setup
    folder = ["--dataset", "folder", "--data_dir", root, "--num_classes", 3]
    evaluate = ["kfcn", "evaluate", "--model", model_path]

    missing = run(["kfcn", "evaluate", "--model", tmp_path / "none.keras", *folder])
    assert_one_line_error(missing, 2, "--model", "none.keras", "does not exist")

    unknown = run([*evaluate, "--dataset", "kitti", "--data_dir", root])
    assert_one_line_error(unknown, 2, "--dataset", "kitti")

    (tmp_path / "camvid").mkdir()
    absent = run([*evaluate, "--dataset", "camvid", "--data_dir", tmp_path / "camvid"])
    assert_one_line_error(absent, 1, "--dataset camvid", "val.txt", "downloaded")

    bad_size = run([*evaluate, *folder, "--mode", "slide", "--crop_size", "12y3"])
    assert_one_line_error(bad_size, 2, "--crop_size", "12y3")

    no_crop = run([*evaluate, *folder, "--mode", "slide"])
    assert_one_line_error(no_crop, 2, "--crop_size")

    notes = tmp_path / "notes.keras"
    notes.write_text("not a model")
    not_model = run(["kfcn", "evaluate", "--model", notes, *folder])
    assert_one_line_error(not_model, 1, "--model", "not a zip")

    wrong_classes = run([*evaluate, *folder[:-1], 4])
    assert_one_line_error(wrong_classes, 1, "outputs 3 classes", "num_classes=4")
