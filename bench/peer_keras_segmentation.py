"""The peer: keras_segmentation's `fcn_8_vgg` (PyPI keras-segmentation 0.3.0), one case.

Runs in the peer's own venv (`bash bench/peer_env.sh`), never in kfcn's, with
`TF_USE_LEGACY_KERAS=1` and tf-keras importable as `keras`; `bench.suite` starts it
as a separate process alternating with kfcn's, and it measures its own matmul
yardstick with the same code (`bench.common`, which does not import kfcn).

    TF_USE_LEGACY_KERAS=1 .venv-peer/bin/python -m bench.peer_keras_segmentation \
        '{"kind": "peer_inference", "mode": "tf.function", "size": [512, 512], "batch": 1}'

- "peer_inference": the forward pass through `tf.function` (`model(x, training=False)`)
  or `model.predict`, what its `predict_segmentation` calls;
- "peer_training": one `train_on_batch` step as its `model.train` compiles it
  (`categorical_crossentropy` on one-hot labels [b, h*w, classes], adadelta).

The VGG16 encoder is built with `pretrained=None`: its default downloads ImageNet
weights, which the timing does not need.
"""

from __future__ import annotations

import functools
import json
import sys
from typing import Any

from bench import common


def build_peer(num_classes: int, height: int, width: int) -> Any:
    """keras_segmentation's fcn_8_vgg with random weights (the encoder not downloaded)."""
    from keras_segmentation.models import fcn
    from keras_segmentation.models.vgg16 import get_vgg_encoder

    model = fcn.fcn_8(
        num_classes,
        functools.partial(get_vgg_encoder, pretrained=None),
        input_height=height,
        input_width=width,
    )
    model.model_name = "fcn_8_vgg"
    return model


def run(case: dict[str, Any]) -> list[dict[str, Any]]:
    import numpy as np
    import tensorflow as tf

    height, width = case["size"]
    batch = case["batch"]
    num_classes = case.get("num_classes", 21)
    record: dict[str, Any] = {
        "matmul": {
            "float32": common.matmul_rate(
                "float32", case.get("matmul_n", 4096), case.get("matmul_repeats", 5)
            )
        }
    }
    rss_before = common.peak_rss_bytes()
    tf.keras.utils.set_random_seed(0)
    model = build_peer(num_classes, height, width)
    counted = common.forward_flops(model, (batch, height, width, 3))
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (batch, height, width, 3)).astype("float32")
    # keras_segmentation feeds images scaled by its own get_image_array: the values do
    # not change the time.
    images = images / 127.5 - 1
    repeats, warmup = case.get("repeats", 5), case.get("warmup", 1)
    flops_per_call = counted["total"]
    if case["kind"] == "peer_inference":
        if case["mode"] == "predict":
            call = lambda: model.predict(images, batch_size=batch, verbose=0)  # noqa: E731
        else:
            tensor = tf.constant(images)
            forward = tf.function(lambda x: model(x, training=False))
            call = lambda: forward(tensor).numpy()  # noqa: E731
    elif case["kind"] == "peer_training":
        model.compile(loss="categorical_crossentropy", optimizer="adadelta", metrics=["accuracy"])
        classes = rng.integers(0, num_classes, (batch, model.output_height * model.output_width))
        labels = np.eye(num_classes, dtype="float32")[classes]
        call = lambda: model.train_on_batch(images, labels)  # noqa: E731
        warmup = max(warmup, 2)
        flops_per_call = 3 * counted["total"]
    else:
        raise ValueError(
            f"`kind` must be 'peer_inference' or 'peer_training'. Received: {case['kind']!r}"
        )
    timing = common.time_calls(call, repeats, warmup)
    rate = flops_per_call / timing["median_s"]
    record.update(
        status="ok",
        flops_per_image=counted["total"] / batch,
        flops_by_op={k: v / batch for k, v in counted["by_op"].items()},
        latency=timing,
        images_per_s=batch / timing["median_s"],
        gflop_per_s=rate / 1e9,
        fraction_of_matmul_float32=rate / record["matmul"]["float32"]["flop_per_s"],
        peak_rss_mb=common.peak_rss_bytes() / 2**20,
        rss_before_model_mb=rss_before / 2**20,
        peer={"package": "keras-segmentation", "version": _version(), "model": "fcn_8_vgg"},
    )
    return [record]


def _version() -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version("keras-segmentation")
    except importlib.metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    records = run(json.loads(sys.argv[1]))
    for record in records:
        record["machine"] = common.machine()
    print(common.RECORDS_MARKER + json.dumps(records), flush=True)
