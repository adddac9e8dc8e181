"""Validation under MultiWorkerMirroredStrategy scores the whole split, not the chief's shard.

Two workers on 127.0.0.1 run the CamVid recipe (as `tests/test_training_distributed.py`
launches them) on a validation split of an odd number of images of different sizes, some of
their pixels void. The model is fixed: class = red // 64, whatever one tiny SGD step does,
so the test knows every prediction and computes the whole split's scores itself, from the
files it wrote. Each worker validates its own shard; if the workers' confusion matrices were
not summed, the chief would report the scores and image count of its shard alone, which
differ from the whole split's.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

PYTHON = sys.executable
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_CLASSES = 11  # CamVid
VOID = 11
# Odd count and different sizes: the shards differ in images and in pixels.
VAL_SIZES = ((24, 32), (32, 40), (16, 24), (40, 32), (32, 32))

# A preset of `kfcn train` like recipes/train_camvid.py whose model predicts class red // 64
# (0..3): a frozen 1x1 convolution gives logit_c = c * (red + 0.5) - 32 * c * (c + 1), so
# logit_c - logit_(c-1) = red + 0.5 - 64 c, with margins of at least 0.5; classes 4..10 get
# -1e4. A trainable, zero-initialised 1x1 convolution gives the optimizer something to move;
# at learning rate 1e-6 it cannot close those margins.
DRIVER = textwrap.dedent(
    """
    import functools, sys
    import keras, numpy as np
    import kfcn.cli
    from kfcn.cli import train

    def fixed_model(config, num_classes):
        kernel = np.zeros((1, 1, 3, num_classes), np.float32)
        bias = np.full(num_classes, -1e4, np.float32)
        for c in range(4):
            kernel[0, 0, 0, c] = c
            bias[c] = 0.5 * c - 32.0 * c * (c + 1)
        images = keras.Input((None, None, 3))
        fixed = keras.layers.Conv2D(
            num_classes, 1, name="fixed", trainable=False,
            kernel_initializer=keras.initializers.Constant(kernel),
            bias_initializer=keras.initializers.Constant(bias))(images)
        scaled = keras.layers.Rescaling(1 / 255.0)(images)
        learned = keras.layers.Conv2D(num_classes, 1, name="score", kernel_initializer="zeros")(
            scaled)
        return keras.Model(images, keras.layers.Add()([fixed, learned]))

    if __name__ == "__main__":
        train.run = functools.partial(train.run, model_fn=fixed_model)
        defaults = dict(dataset="camvid", backbone="fixed", batch_size=4, crop_size="32x32",
                        scale_range="1,1", optimizer="sgd", learning_rate=1e-6, log_every=1,
                        weights="none", seed=0)
        sys.exit(kfcn.cli.main(["train", *sys.argv[1:]], prog="driver.py", defaults=defaults))
    """
)


def _write_camvid(root):
    """CamVid layout; returns the validation (image, label) pairs as written."""
    rng = np.random.default_rng(0)
    val = []
    for split, sizes in (("train", [(32, 32)] * 4), ("val", VAL_SIZES)):
        os.makedirs(root / split)
        os.makedirs(root / f"{split}annot")
        lines = []
        for i, size in enumerate(sizes):
            image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            # The class the model predicts on a share of the pixels that varies from image
            # to image (so each shard scores differently), else any class; about 15% void.
            label = np.where(
                rng.random(size) < (0.9, 0.4, 0.8, 0.5, 0.7)[i % 5],
                image[..., 0] // 64,
                rng.integers(0, NUM_CLASSES, size),
            ).astype(np.uint8)
            label[rng.random(size) < 0.15] = VOID
            Image.fromarray(image).save(root / split / f"{i}.png")
            Image.fromarray(label, mode="L").save(root / f"{split}annot" / f"{i}.png")
            lines.append(f"{split}/{i}.png {split}annot/{i}.png")
            if split == "val":
                val.append((image, label))
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return val


def _expected_scores(pairs):
    """The paper's metrics from the pairs' pixels, class by class (independent of kfcn)."""
    labels = np.concatenate([label.ravel() for _, label in pairs]).astype(np.int64)
    preds = np.concatenate([image[..., 0].ravel() // 64 for image, _ in pairs]).astype(np.int64)
    kept = labels != VOID
    labels, preds = labels[kept], preds[kept]
    iou, accuracy = [], []
    for c in range(NUM_CLASSES):
        gt, pr = labels == c, preds == c
        accuracy.append((gt & pr).sum() / gt.sum() if gt.any() else np.nan)
        iou.append((gt & pr).sum() / (gt | pr).sum() if (gt | pr).any() else np.nan)
    iou, accuracy = np.array(iou), np.array(accuracy)
    counts = np.bincount(labels, minlength=NUM_CLASSES)
    return {
        "num_images": len(pairs),
        "num_pixels": int(labels.size),
        "pixel_accuracy": float((labels == preds).mean()),
        "mean_accuracy": float(np.nanmean(accuracy)),
        "mean_iou": float(np.nanmean(iou)),
        "frequency_weighted_iou": float(np.nansum(counts * iou) / labels.size),
        "iou": iou,
        "accuracy": accuracy,
    }


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _env(ports, index):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=REPO)
    env["TF_CONFIG"] = json.dumps(
        {
            "cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
            "task": {"type": "worker", "index": index},
        }
    )
    return env


@pytest.mark.slow
def test_chief_reports_the_whole_validation_split(tmp_path):
    root = tmp_path / "camvid"
    val = _write_camvid(root)
    whole = _expected_scores(val)
    # The set-up must be able to tell the whole split from either worker's shard
    # (tf.data's shard(2, i): images i, i + 2, ...), in images, pixels and every score.
    for index in (0, 1):
        shard = _expected_scores(val[index::2])
        assert shard["num_images"] != whole["num_images"]
        assert shard["num_pixels"] != whole["num_pixels"]
        for key in ("pixel_accuracy", "mean_accuracy", "mean_iou", "frequency_weighted_iou"):
            assert abs(shard[key] - whole[key]) > 1e-3, key
    assert 0 < whole["num_pixels"] < sum(h * w for h, w in VAL_SIZES)  # some void pixels

    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    model_dir = tmp_path / "run"
    command = [
        PYTHON,
        str(driver),
        f"--model_dir={model_dir}",
        f"--data_dir={root}",
        "--steps=1",
        "--strategy=multi_worker_mirrored",
        "--collective_timeout=60",
        "--step_timeout=120",
    ]
    ports = _free_ports(2)
    workers = [
        subprocess.Popen(
            command, stderr=subprocess.PIPE, text=True, env=_env(ports, i), cwd=tmp_path
        )
        for i in range(2)
    ]
    try:
        logs = [p.communicate(timeout=300)[1] for p in workers]
    finally:
        for p in workers:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, log in zip(workers, logs, strict=True):
        assert p.returncode == 0, log[-3000:]
    assert "2 replica(s) (multi_worker_mirrored)" in logs[0]

    validation = json.load(open(model_dir / "result.json"))["validation"]
    assert validation["num_images"] == len(VAL_SIZES)
    for key in ("pixel_accuracy", "mean_accuracy", "mean_iou", "frequency_weighted_iou"):
        assert validation[key] == pytest.approx(whole[key], rel=1e-9), key
    # Per class: the ratios of counts of the whole split (NaN for classes absent from it).
    np.testing.assert_allclose(np.array(validation["iou"], float), whole["iou"], rtol=1e-9)
    np.testing.assert_allclose(
        np.array(validation["accuracy"], float), whole["accuracy"], rtol=1e-9
    )
