"""Evaluation of models with dict outputs: auxiliary heads dropped, one score set per task.

Scores are checked against numpy confusion matrices of the models' own argmax and
the paper's formulas; mmseg's aAcc/mIoU/mAcc against the same numbers in percent;
slide inference (mmseg's Cityscapes 769x769 rows: crop 769, stride 513) against
whole-image inference on a per-pixel model (where the two must agree exactly) and
its windows against mmseg's own grid formula.
"""

from __future__ import annotations

import json
import math

import keras
import numpy as np
import pytest
from PIL import Image

from kfcn import evaluation
from kfcn.data import DatasetInfo

VOID = 255


def per_pixel_model(heads: dict[str, int], seed: int = 0, dilated: bool = False) -> keras.Model:
    """1x1 convolutions only (each pixel's logits depend on that pixel alone), so slide and
    whole inference agree exactly; `dilated` adds a dilated 3x3 trunk whose output is
    multiplied by zero, to give the graph a dilated FCN's ops without changing the logits."""
    images = keras.Input((None, None, 3))
    x = keras.layers.Rescaling(1 / 255.0)(images)
    trunk = keras.layers.Conv2D(
        3, 1, name="conv1", kernel_initializer=keras.initializers.GlorotUniform(seed)
    )(x)
    if dilated:
        context = keras.layers.Conv2D(3, 3, dilation_rate=4, padding="same", name="dilated")(x)
        context = keras.layers.Rescaling(0.0)(context)
        trunk = keras.layers.Add()([trunk, context])
    outputs = {
        name: keras.layers.Conv2D(
            n, 1, name=f"score_{name}", kernel_initializer=keras.initializers.GlorotUniform(i + 1)
        )(trunk)
        for i, (name, n) in enumerate(heads.items())
    }
    return keras.Model(images, outputs)


def numpy_scores(label, prediction, n):
    valid = label != VOID
    confusion = (
        np.bincount(n * label[valid].astype(np.int64) + prediction[valid], minlength=n * n)
        .reshape(n, n)
        .astype(np.float64)
    )
    t = confusion.sum(1)
    diag = np.diag(confusion)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = diag / (t + confusion.sum(0) - diag)
        accuracy = diag / t
    present = t > 0
    return {
        "pixel_accuracy": diag.sum() / t.sum(),
        "mean_accuracy": np.mean(accuracy[present]),
        "mean_iou": np.mean(iou[present]),
        "frequency_weighted_iou": (t[present] * iou[present]).sum() / t.sum(),
    }


def _multitask_data(model, sizes=((21, 30), (17, 25)), seed=4):
    rng = np.random.default_rng(seed)
    elements = []
    for height, width in sizes:
        image = rng.integers(0, 256, (height, width, 3)).astype(np.uint8)
        out = model(image[None].astype(np.float32))
        label = {}
        for task in ("sem", "geo"):
            predicted = np.asarray(out[task])[0].argmax(-1)
            n = out[task].shape[-1]
            noisy = np.where(
                rng.random((height, width)) < 0.5, predicted, rng.integers(0, n, (height, width))
            )
            noisy[:2] = VOID
            label[task] = noisy.astype(np.uint8)
        elements.append({"image": image, "label": label, "name": f"im{height}"})
    return elements


def test_multitask_evaluate_scores_each_task_and_drops_aux():
    model = per_pixel_model({"sem": 5, "geo": 3, "aux_sem": 5})
    elements = _multitask_data(model)
    info = DatasetInfo(
        name="siftflow",
        num_classes={"sem": 5, "geo": 3},
        ignore_label=VOID,
        class_names={"sem": tuple("abcde"), "geo": ("sky", "horizontal", "vertical")},
        num_examples=len(elements),
    )
    results = evaluation.evaluate(model, elements, info)
    assert {"sem", "geo"} <= set(results) and "aux_sem" not in results
    assert results["num_images"] == 2
    for task, n in (("sem", 5), ("geo", 3)):
        labels = np.concatenate([e["label"][task].ravel() for e in elements])
        predictions = np.concatenate(
            [
                np.asarray(model(e["image"][None].astype(np.float32))[task])[0].argmax(-1).ravel()
                for e in elements
            ]
        )
        want = numpy_scores(labels, predictions, n)
        for key, value in want.items():
            assert results[task][key] == pytest.approx(value, abs=1e-9), (task, key)
        assert results[task]["mIoU"] == round(100 * want["mean_iou"], 2)
        assert results[task]["aAcc"] == round(100 * want["pixel_accuracy"], 2)
        assert results[task]["mAcc"] == round(100 * want["mean_accuracy"], 2)
    assert list(results["geo"]["iou"]) == ["sky", "horizontal", "vertical"]
    text = evaluation.format_results(results)
    assert "task sem:" in text and "task geo:" in text
    assert f"mIoU {100 * results['geo']['mean_iou']:.2f}" in text
    # A tensor label for a multi-task model is refused, naming the tasks.
    bad = [{**elements[0], "label": elements[0]["label"]["sem"]}]
    with pytest.raises(ValueError, match=r"tasks \['geo', 'sem'\] need a dict label"):
        evaluation.evaluate(model, bad, info)


def test_msflip_softmax_is_per_task():
    model = per_pixel_model({"sem": 5, "geo": 3})
    image = np.random.default_rng(0).integers(0, 256, (15, 20, 3)).astype(np.uint8)
    forward = evaluation.traced(model)
    probabilities = evaluation.predict_msflip(forward, image, scales=(0.75, 1.0))
    assert probabilities.shape == (15, 20, 8)
    sums = np.asarray(probabilities)
    np.testing.assert_allclose(sums[..., :3].sum(-1), 1.0, atol=1e-5)  # geo first (sorted)
    np.testing.assert_allclose(sums[..., 3:].sum(-1), 1.0, atol=1e-5)


def _mmseg_windows(length, crop, stride):
    """mmseg's slide_inference grid (EncoderDecoder.slide_inference), an independent formula."""
    grids = max(length - crop + stride - 1, 0) // stride + 1
    starts = []
    for index in range(grids):
        start = index * stride
        end = min(start + crop, length)
        starts.append(max(end - crop, 0))
    return sorted(set(starts))


@pytest.mark.parametrize("length", [769, 770, 1024, 1025, 1282, 2048, 500])
def test_slide_windows_are_mmsegs(length):
    assert evaluation._window_starts(max(length, 769), 769, 513) == _mmseg_windows(
        max(length, 769), 769, 513
    )


def test_slide_769_513_on_a_dilated_aux_model_equals_whole():
    """Cityscapes 1024x2048 in 769x769 windows every 513: 2 x 4 windows, aux dropped."""
    model = per_pixel_model({"logits": 4, "aux_logits": 4}, dilated=True)
    image = np.random.default_rng(1).integers(0, 256, (1024, 2048, 3)).astype(np.uint8)
    forward = evaluation.traced(model)
    calls = []

    def counted(batch, training=False):
        calls.append(tuple(batch.shape))
        return forward(batch)

    slide = np.asarray(
        evaluation.predict_slide(counted, image, crop_size=769, stride=513, batch_size=8)
    )
    whole = np.asarray(evaluation.predict_whole(forward, image))
    assert calls == [(8, 769, 769, 3)]  # rows 0, 255 x columns 0, 513, 1026, 1279
    assert slide.shape == (1024, 2048, 4)
    np.testing.assert_allclose(slide, whole, atol=1e-5)


def test_kfcn_evaluate_on_an_aux_model_reports_mmseg_names(tmp_path, capsys):
    from kfcn.cli import main

    model = per_pixel_model({"logits": 3, "aux_logits": 3}, seed=2)
    rng = np.random.default_rng(5)
    lines, labels, predictions = [], [], []
    for index, (height, width) in enumerate(((19, 23), (16, 31))):
        image = rng.integers(0, 256, (height, width, 3)).astype(np.uint8)
        prediction = np.asarray(model(image[None].astype(np.float32))["logits"])[0].argmax(-1)
        label = np.where(
            rng.random((height, width)) < 0.6, prediction, rng.integers(0, 3, (height, width))
        )
        label[:1] = VOID
        Image.fromarray(image).save(tmp_path / f"i{index}.png")
        Image.fromarray(label.astype(np.uint8)).save(tmp_path / f"l{index}.png")
        lines.append(f"i{index}.png l{index}.png")
        labels.append(label.ravel())
        predictions.append(prediction.ravel())
    (tmp_path / "val.txt").write_text("\n".join(lines) + "\n")
    model.save(tmp_path / "aux.keras")
    code = main(
        [
            "evaluate",
            "--model",
            str(tmp_path / "aux.keras"),
            "--dataset",
            "folder",
            "--data_dir",
            str(tmp_path),
            "--num_classes",
            "3",
            "--output_json",
            str(tmp_path / "scores.json"),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    scores = json.load(open(tmp_path / "scores.json"))
    want = numpy_scores(np.concatenate(labels), np.concatenate(predictions), 3)
    assert scores["mean_iou"] == pytest.approx(want["mean_iou"], abs=1e-9)
    assert scores["mIoU"] == round(100 * want["mean_iou"], 2)
    assert not math.isnan(scores["aAcc"])
    assert f"mIoU {100 * want['mean_iou']:.2f}" in printed and "aAcc" in printed
