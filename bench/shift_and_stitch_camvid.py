"""Dense output three ways on CamVid: bilinear, shift-and-stitch, learned upsampling.

Long, Shelhamer, Darrell (TPAMI 2017), sections 3.2-3.3 and 4.2: from a net
with output stride 32, dense predictions come from (a) interpolating the coarse
scores, (b) shift-and-stitch (the net on ``f**2`` shifted inputs, outputs
interlaced: stride ``32 / f``, then interpolated), or (c) in-network upsampling
learned end to end (FCN-32s's own deconvolution `upscore`, initialised
bilinear), and, with `--fcn8s_steps`, FCN-8s (learned upsampling with skips,
trained from the FCN-32s as the paper's staged training). This script trains one
small FCN-32s from scratch on CamVid (`kfcn.training.fit`, the demo's VGG-style
trunk, learned `upscore`) and scores each way on the val split: mean IU
(`kfcn.metrics`) and forward time per image (model, interpolation and argmax in
one `tf.function`, median over the images). A finished run in `--model_dir` is
reused, not retrained.

Interpolation places each score at the centre of its receptive field
(`kfcn.geometry`: stride and offset of `score_fr`), so (a) and (b) are aligned
with the image exactly as the learned path's crop is.

    python bench/shift_and_stitch_camvid.py --data_dir /work/shared/data/camvid \
        --model_dir /tmp/sns --steps 400 --fcn8s_steps 400 --factor 4 --eval_scale 0.5
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import kfcn  # noqa: E402
from kfcn import geometry, metrics  # noqa: E402

# Training of the FCN-32s (short, from scratch: the demo trunk, Adam as the demo).
CROP = (256, 256)
BATCH = 8
LEARNING_RATE = 1e-3
SHIFT_VALUE = 116.0  # the shifted copies' padding: about the ImageNet mean grey


def build_model(config, num_classes: int) -> keras.Model:
    """`kfcn.training.fit`'s model_fn: the FCN on the demo trunk, upsampling learned."""
    from kfcn.demo.backbone import build_backbone

    return kfcn.build_fcn(
        config.variant,
        backbone=build_backbone(),
        num_classes=num_classes,
        dropout=config.dropout,
        trainable_upsampling=True,
        init_from=config.init_from,
    )


def train(
    model_dir: str, data_dir: str, steps: int, seed: int, variant="fcn32s", init_from=None
) -> str:
    """Trains (or finds the finished run in `model_dir`); returns the model file."""
    from kfcn.training import TrainConfig, fit

    path = os.path.join(model_dir, "model.keras")
    if os.path.exists(path):
        return path
    config = TrainConfig(
        model_dir=model_dir,
        dataset="camvid",
        data_dir=data_dir,
        backbone="demo_vgg",
        variant=variant,
        init_from=init_from,
        trainable_upsampling=True,
        dropout=0.1,
        bn_momentum=0.9,
        batch_size=BATCH,
        crop_size=CROP,
        scale_range=(0.5, 1.0),
        steps=steps,
        optimizer="adam",
        learning_rate=LEARNING_RATE,
        weight_decay=0.0,
        eval_every=steps,  # validate once, at the end (the bench scores the val split itself)
        max_eval_images=10,
        checkpoint_every=steps,
        log_every=25,
        seed=seed,
    )
    return fit(config, model_fn=build_model).model_path


def aligned_resize(scores, stride: float, offset: tuple[float, float], size) -> tf.Tensor:
    """Bilinear interpolation of a score map whose entry i sits on pixel offset + stride * i."""
    out = scores
    for axis, (length, off) in enumerate(zip(size, offset), start=1):
        n = tf.shape(out)[axis]
        position = (tf.range(length, dtype=tf.float32) - off) / stride
        position = tf.clip_by_value(position, 0.0, tf.cast(n - 1, tf.float32))
        low = tf.cast(tf.floor(position), tf.int32)
        high = tf.minimum(low + 1, n - 1)
        weight = position - tf.cast(low, tf.float32)
        weight = tf.reshape(weight, [-1 if a == axis else 1 for a in range(4)])
        out = (
            tf.gather(out, low, axis=axis) * (1 - weight) + tf.gather(out, high, axis=axis) * weight
        )
    return out


def methods(model: keras.Model, factor: int, fcn8s: keras.Model | None) -> dict:
    """name -> tf.function(image batch) -> class map at the image's size."""
    records = geometry.trace(model)
    score_fr = next(r for r in records if r[0].name == "score_fr")
    stride, offset = score_fr[2].stride[0], score_fr[2].offset
    scores = keras.Model(model.inputs, score_fr[1], name="score_fr_model")
    stitched = kfcn.shift_and_stitch(scores, factor, value=SHIFT_VALUE)

    def interpolated(net, net_stride):
        @tf.function(reduce_retracing=True)
        def forward(images):
            logits = aligned_resize(
                net(images), net_stride, offset, (tf.shape(images)[1], tf.shape(images)[2])
            )
            return tf.argmax(logits, axis=-1)

        return forward

    @tf.function(reduce_retracing=True)
    def learned(images):
        return tf.argmax(model(images), axis=-1)

    runs = {
        "bilinear": interpolated(scores, stride),
        f"shift_and_stitch_x{factor}": interpolated(stitched, stride / factor),
        "learned_upscore": learned,
    }
    if fcn8s is not None:

        @tf.function(reduce_retracing=True)
        def learned_skips(images):
            return tf.argmax(fcn8s(images), axis=-1)

        runs["learned_fcn8s"] = learned_skips
    return runs


def evaluate(model, fcn8s, data_dir: str, factor: int, scale: float, limit: int | None) -> dict:
    from kfcn.data.listfile import load_camvid

    dataset, info = load_camvid("val", data_dir)
    runs = methods(model, factor, fcn8s)
    confusion = {name: np.zeros((info.num_classes,) * 2, np.int64) for name in runs}
    seconds = {name: [] for name in runs}
    for index, element in enumerate(dataset):
        if limit is not None and index >= limit:
            break
        image = tf.cast(element["image"], tf.float32)[None]
        label = element["label"].numpy()
        if scale != 1.0:
            size = [round(s * scale) for s in label.shape]
            image = tf.image.resize(image, size, antialias=True)
            label = tf.image.resize(label[None, :, :, None], size, "nearest").numpy()[0, :, :, 0]
        for name, forward in runs.items():
            if index == 0:
                forward(image)  # trace and warm up
            start = time.perf_counter()
            prediction = forward(image).numpy()[0]
            seconds[name].append(time.perf_counter() - start)
            keep = label != info.ignore_label
            confusion[name] += metrics.confusion_matrix(
                label[keep], prediction[keep], info.num_classes
            )
    return {
        name: {
            "mean_iou": metrics.scores(confusion[name])["mean_iou"],
            "pixel_accuracy": metrics.scores(confusion[name])["pixel_accuracy"],
            "seconds_per_image": float(np.median(seconds[name])),
            "images": len(seconds[name]),
        }
        for name in runs
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data_dir", required=True, help="CamVid root (SegNet layout)")
    parser.add_argument("--model_dir", required=True, help="training run directory")
    parser.add_argument("--steps", type=int, default=400, help="training steps of FCN-32s")
    parser.add_argument(
        "--fcn8s_steps", type=int, default=0, help="FCN-8s steps from the FCN-32s (0: none)"
    )
    parser.add_argument("--factor", type=int, default=4, help="shift-and-stitch factor")
    parser.add_argument("--eval_scale", type=float, default=0.5, help="val image scale")
    parser.add_argument("--eval_images", type=int, default=None, help="val images (all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="JSON file (default model_dir/...)")
    args = parser.parse_args()

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    keras.utils.set_random_seed(args.seed)
    start = time.time()
    path = train(args.model_dir, args.data_dir, args.steps, args.seed)
    fcn8s = None
    if args.fcn8s_steps:
        fcn8s_dir = os.path.join(args.model_dir, "fcn8s")
        fcn8s_path = train(fcn8s_dir, args.data_dir, args.fcn8s_steps, args.seed, "fcn8s", path)
        fcn8s = kfcn.load_model(fcn8s_path)
    train_seconds = time.time() - start
    model = kfcn.load_model(path)
    results = evaluate(model, fcn8s, args.data_dir, args.factor, args.eval_scale, args.eval_images)
    report = {
        "settings": {**vars(args), "crop": CROP, "batch": BATCH, "lr": LEARNING_RATE},
        "training_seconds_this_run": round(train_seconds, 1),
        "results": results,
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor()},
        "load_average": os.getloadavg(),
    }
    output = args.output or os.path.join(args.model_dir, "shift_and_stitch_camvid.json")
    with open(output, "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
