"""`kfcn train --input_scale --logit_adjustment --val_mode msflip`: validated as it ships.

One run of the installed command on a small `folder` dataset, then checks against
computations that do not use the run's code:
- the class weights: Eigen & Fergus's median frequencies counted in numpy from
  the mask files, and the saved offsets -tau * log w;
- the saved model.keras: its input scale and offsets, and its last validation
  recomputed by hand (numpy softmax of the model and of its mirrored input,
  averaged, argmax, confusion matrix, mean IU over present classes);
- that both settings move the scores: the plain net (scale 1, no offsets)
  scores differently, so a run that ignored them could not pass;
- best.weights.h5 holds the plain net and loads into it.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from tests.test_cli_train import CLASSES, _error_line, _run, _train_args

TAU = 4.0  # large: the random net's logits at 1.5x spread widely
SCALE = 1.5


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Unbalanced classes (about 70, 25 and 5 % of the pixels: weights far from 1).

    Class = thresholds of the red channel; PNG image/mask pairs of odd sizes.
    """
    root = tmp_path_factory.mktemp("data") / "roads"
    root.mkdir()
    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("val", 3)):
        lines = []
        for i in range(count):
            image = rng.integers(0, 256, (36 + 2 * i, 45, 3), dtype=np.uint8)
            mask = np.digitize(image[..., 0], (180, 243)).astype(np.uint8)
            mask[:2] = 255  # ignored
            Image.fromarray(image).save(root / f"{split}_{i}.png")
            Image.fromarray(mask, mode="L").save(root / f"{split}_{i}_mask.png")
            lines.append(f"{split}_{i}.png {split}_{i}_mask.png")
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return root


def _masks(folder, split):
    lines = (folder / f"{split}.txt").read_text().split("\n")
    pairs = [line.split() for line in lines if line.strip()]
    return [
        (np.asarray(Image.open(folder / image)), np.asarray(Image.open(folder / mask)))
        for image, mask in pairs
    ]


def _median_frequency(masks, num_classes):
    """Eigen & Fergus: freq(c) = pixels of c / labelled pixels of the images holding c."""
    class_pixels = np.zeros(num_classes)
    image_pixels = np.zeros(num_classes)
    for mask in masks:
        labelled = mask[mask != 255]
        for c in range(num_classes):
            n = np.sum(labelled == c)
            if n:
                class_pixels[c] += n
                image_pixels[c] += labelled.size
    freq = class_pixels / image_pixels
    return np.median(freq) / freq


def _softmax(logits):
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _flip_mean_iou(model, pairs, num_classes):
    confusion = np.zeros((num_classes, num_classes), np.int64)
    for image, mask in pairs:
        batch = image[None].astype(np.float32)
        probs = _softmax(np.asarray(model(batch))[0])
        mirrored = _softmax(np.asarray(model(batch[:, :, ::-1].copy()))[0])[:, ::-1]
        predicted = np.argmax(probs + mirrored, -1)
        keep = mask != 255
        np.add.at(confusion, (mask[keep], predicted[keep]), 1)
    tp = np.diag(confusion).astype(np.float64)
    union = confusion.sum(0) + confusion.sum(1) - tp
    present = union > 0  # kfcn.metrics and the paper: classes seen or predicted
    return float(np.mean(tp[present] / union[present]))


def _spread_scores_model(path, folder):
    """The run's FCN-8s MobileNetV2 with random score layers (logits of spread about 2).

    kfcn zero-initialises the score layers, and a few steps from scratch leave one
    class everywhere, which neither setting can change: `--init_from` this, with a
    tiny learning rate, so that both move the validation score.
    """
    import keras

    import kfcn

    model = kfcn.build_fcn("fcn8s", backbone="mobilenetv2", weights=None, num_classes=3)
    image = _masks(folder, "val")[0][0][None].astype(np.float32)
    # Moving statistics of an image's own batch statistics, so that the net's
    # inference pass is well scaled and a few training steps barely move it.
    norms = [la for la in model.layers if isinstance(la, keras.layers.BatchNormalization)]
    for layer in norms:
        layer.momentum = 0.0
    model(image, training=True)
    for layer in norms:
        layer.momentum = 0.999
    rng = np.random.default_rng(0)
    for name in ("score_fr", "score_pool4", "score_pool3"):
        kernel, bias = model.get_layer(name).get_weights()
        model.get_layer(name).set_weights([rng.normal(size=kernel.shape), bias])
    logits = np.asarray(model(image))[0]
    spread = float(np.std(logits - logits.mean((0, 1))))
    for name in ("score_fr", "score_pool4", "score_pool3"):
        kernel, bias = model.get_layer(name).get_weights()
        model.get_layer(name).set_weights([kernel * 2.0 / spread, bias])
    # Centre each class's logits (the fused score is the three layers' sum at the output).
    logits = np.asarray(model(image))[0]
    kernel, bias = model.get_layer("score_fr").get_weights()
    model.get_layer("score_fr").set_weights([kernel, bias - logits.mean((0, 1))])
    model.save(path)
    return path


@pytest.mark.slow
def test_train_validates_and_saves_the_test_time_model(tmp_path, folder):
    import kfcn
    from kfcn.input_scale import input_scale_of, with_input_scale
    from kfcn.logit_adjustment import offsets_of, with_logit_adjustment

    run_dir = tmp_path / "run"
    args = _train_args(folder, run_dir, steps=6) + [
        "--class_weighting=median_frequency",
        f"--input_scale={SCALE}",
        f"--logit_adjustment={TAU}",
        "--val_mode=msflip",
        "--val_scales=1.0",
        "--eval_every=3",
        f"--init_from={_spread_scores_model(tmp_path / 'init.keras', folder)}",
        "--learning_rate=1e-6",
        "--bn_momentum=0.9999",  # keep the moving statistics of the init model
        "--seed=0",
    ]
    process = _run(args, tmp_path)
    assert process.returncode == 0, process.stderr[-3000:]
    result = json.loads((run_dir / "result.json").read_text())

    weights = _median_frequency([m for _, m in _masks(folder, "train")], len(CLASSES))
    np.testing.assert_allclose(result["run"]["class_weights"], weights, rtol=1e-5)
    offsets = -TAU * np.log(weights)
    assert result["run"]["test_time"]["input_scale"] == SCALE
    np.testing.assert_allclose(
        result["run"]["test_time"]["logit_adjustment"]["offsets"], offsets, rtol=1e-5
    )

    model = kfcn.load_model(str(run_dir / "model.keras"), compile=False)
    assert input_scale_of(model) == SCALE
    np.testing.assert_allclose(offsets_of(model), offsets, rtol=1e-5)
    val = _masks(folder, "val")
    # model.keras is the last step's net; the last validation scored the view of it.
    assert result["final_step"] == 6
    expected = _flip_mean_iou(model, val, len(CLASSES))
    assert result["validation"]["mean_iou"] == pytest.approx(expected, abs=1e-6)

    # Each setting moves the validation score: without either, it would differ.
    assert min(weights) < 0.5 and max(weights) > 2, weights
    plain = with_logit_adjustment(with_input_scale(model, 1.0), None)
    scaled_only = with_input_scale(plain, SCALE)
    adjusted_only = with_logit_adjustment(plain, offsets)
    for other in (plain, scaled_only, adjusted_only):
        assert abs(_flip_mean_iou(other, val, len(CLASSES)) - expected) > 1e-4
    # best.weights.h5 is the plain net's: it loads into it.
    plain.load_weights(str(run_dir / "best.weights.h5"))


def test_logit_adjustment_without_class_weights_is_one_error_line(tmp_path, folder):
    args = _train_args(folder, tmp_path / "run", steps=1) + ["--logit_adjustment=0.5"]
    process = _run(args, tmp_path)
    assert process.returncode == 2
    line = _error_line(process)
    assert "--logit_adjustment" in line and "class_weighting" in line, line


def test_bad_input_scale_is_one_error_line(tmp_path, folder):
    args = _train_args(folder, tmp_path / "run", steps=1) + ["--input_scale=0"]
    process = _run(args, tmp_path)
    assert process.returncode == 2
    line = _error_line(process)
    assert "--input_scale" in line and "0" in line, line
    assert not os.path.exists(tmp_path / "run" / "checkpoints")
