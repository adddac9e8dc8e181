"""One benchmark case of kfcn, run in the current process: `run_case(case) -> records`.

A case is a plain dict (JSON-serialisable, so `bench.suite` can pass it to a fresh
process whose peak RSS is the case's own); `run_case` returns a list of records, each
with the case, its figures, the matmul yardstick of this process and the machine.

Kinds:
- "inference": `model(x, training=False)` timed per call through `tf.function`
  ("tf.function"), XLA ("xla", `jit_compile=True`) or `model.predict` ("predict"), in
  float32 or under Keras' `mixed_bfloat16` policy (then with the argmax agreement with
  the float32 model of the same weights).
- "training": kfcn's own train step (`kfcn.training.loop.make_train_step`, what
  `kfcn train` runs) on a synthetic batch, one_device or mirrored over CPU replicas;
  `"batch_norm": "keras"` times it with Keras's own BatchNormalization instead of the
  fused one kfcn's builders use (`kfcn.batch_norm`); `"depthwise_float32": true`
  keeps the depthwise convolutions in float32 under `mixed_bfloat16`
  (`kfcn.precision.float32_depthwise`).
- "pipeline": `kfcn.data.train_pipeline` on CamVid (skipped when the copy is absent).
- "litert": the same model through LiteRT float32 / float16 / int8 and TensorFlow.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from typing import Any

from bench import common

logger = logging.getLogger(__name__)

CAMVID_DIR = os.environ.get("KFCN_CAMVID", "/work/shared/data/camvid")
KINDS = ("inference", "training", "pipeline", "litert")
INFERENCE_MODES = ("tf.function", "predict", "xla")
PRECISIONS = ("float32", "mixed_bfloat16")


def model_label(spec: str) -> str:
    """ "fcn8s:vgg16" -> "FCN-8s vgg16"; "dilated:resnet50_v1c" -> "FCN-D8 resnet50_v1c"."""
    variant, backbone = spec.split(":", 1)
    names = {
        "fcn32s": "FCN-32s",
        "fcn16s": "FCN-16s",
        "fcn8s": "FCN-8s",
        "dilated": "FCN-D8",
        "dilated_d16": "FCN-D6 D16",
    }
    return f"{names.get(variant, variant)} {backbone}"


def build_model(spec: str, input_shape: tuple[int, int, int], num_classes: int) -> Any:
    """Builds the model named "<variant>:<backbone>" with random weights.

    `variant` is "fcn32s", "fcn16s", "fcn8s" (`kfcn.build_fcn`), "dilated"
    (`kfcn.build_dilated_fcn`: mmseg's FCN R-xx-D8) or "dilated_d16" (FCN-D6
    R-xx-D16: output stride 16, head dilation 6), without the auxiliary head and,
    for ResNet-18/34, mmseg's 128-channel head (as `bench/dilated_forward.py`).
    """
    import kfcn

    if ":" not in spec:
        raise ValueError(
            f"A model must be '<variant>:<backbone>' (e.g. 'fcn8s:vgg16'). Received: {spec!r}"
        )
    variant, backbone = spec.split(":", 1)
    if variant in ("dilated", "dilated_d16"):
        options = {"output_stride": 16, "head_dilation": 6} if variant == "dilated_d16" else {}
        if backbone.startswith(("resnet18", "resnet34")):
            options["head_channels"] = 128
        model = kfcn.build_dilated_fcn(
            backbone,
            num_classes=num_classes,
            input_shape=input_shape,
            sync_batchnorm=False,
            **options,
        )
        return kfcn.inference_model(model)
    return kfcn.build_fcn(
        variant, backbone=backbone, num_classes=num_classes, input_shape=input_shape
    )


def _images(batch: int, height: int, width: int, seed: int = 0) -> Any:
    import numpy as np

    rng = np.random.default_rng(seed)
    return rng.uniform(0, 255, (batch, height, width, 3)).astype("float32")


def _yardsticks(case: dict[str, Any], bfloat16: bool) -> dict[str, Any]:
    n, repeats = case.get("matmul_n", 4096), case.get("matmul_repeats", 5)
    sticks = {"float32": common.matmul_rate("float32", n, repeats)}
    if bfloat16:
        sticks["bfloat16"] = common.matmul_rate("bfloat16", n, repeats)
    return sticks


def _rates(record: dict[str, Any], flops_per_call: float, seconds: float) -> None:
    """Adds GFLOP/s and the fractions of the matmul rates measured in this process."""
    rate = flops_per_call / seconds
    record["gflop_per_s"] = rate / 1e9
    for dtype, stick in record["matmul"].items():
        record[f"fraction_of_matmul_{dtype}"] = rate / stick["flop_per_s"]


def _set_policy(precision: str) -> None:
    import keras

    if precision not in PRECISIONS:
        raise ValueError(f"`precision` must be one of {PRECISIONS}. Received: {precision!r}")
    keras.config.set_dtype_policy(precision)


def run_inference(case: dict[str, Any]) -> list[dict[str, Any]]:
    import keras
    import numpy as np
    import tensorflow as tf

    height, width = case["size"]
    batch, mode, precision = case["batch"], case["mode"], case["precision"]
    if mode not in INFERENCE_MODES:
        raise ValueError(f"`mode` must be one of {INFERENCE_MODES}. Received: mode={mode!r}")
    record: dict[str, Any] = {"matmul": _yardsticks(case, precision != "float32")}
    rss_before = common.peak_rss_bytes()
    _set_policy(precision)
    try:
        keras.utils.set_random_seed(0)
        model = build_model(case["model"], (height, width, 3), case.get("num_classes", 21))
    finally:
        _set_policy("float32")
    counted = common.forward_flops(model, (batch, height, width, 3))
    images = tf.constant(_images(batch, height, width))
    if mode == "predict":
        call = lambda: model.predict(images, batch_size=batch, verbose=0)  # noqa: E731
    else:
        forward = tf.function(lambda x: model(x, training=False), jit_compile=(mode == "xla"))
        call = lambda: forward(images).numpy()  # noqa: E731
    timing = common.time_calls(call, case.get("repeats", 5), case.get("warmup", 1))
    record.update(
        flops_per_image=counted["total"] / batch,
        flops_by_op={k: v / batch for k, v in counted["by_op"].items()},
        latency=timing,
        images_per_s=batch / timing["median_s"],
        peak_rss_mb=common.peak_rss_bytes() / 2**20,
        rss_before_model_mb=rss_before / 2**20,
    )
    _rates(record, counted["total"], timing["median_s"])
    if precision != "float32":
        # The same weights in float32: how often does the bfloat16 argmax agree?
        reference = build_model(case["model"], (height, width, 3), case.get("num_classes", 21))
        reference.set_weights(model.get_weights())
        low = np.argmax(np.asarray(model(images, training=False), np.float32), -1)
        high = np.argmax(np.asarray(reference(images, training=False)), -1)
        record["argmax_agreement"] = float(np.mean(low == high))
    return [record]


def run_training(case: dict[str, Any]) -> list[dict[str, Any]]:
    import keras
    import tensorflow as tf

    from kfcn.batch_norm import fuse_batch_norm
    from kfcn.precision import float32_depthwise
    from kfcn.training import loop
    from kfcn.training import strategy as strategy_lib
    from kfcn.training.sgd import SGD

    height, width = case["size"]
    batch, precision = case["batch"], case["precision"]
    replicas = case.get("replicas", 1)
    name = "mirrored" if replicas > 1 else "one_device"
    if replicas > 1:
        # Must precede every TensorFlow op of this process (a fresh process per case).
        strategy_lib.configure_cpu_replicas(replicas)
    strategy = strategy_lib.create_strategy(name, cpu_replicas=replicas)
    record: dict[str, Any] = {"matmul": _yardsticks(case, precision != "float32")}
    rss_before = common.peak_rss_bytes()
    num_classes = case.get("num_classes", 11)
    _set_policy(precision)
    try:
        keras.utils.set_random_seed(0)
        with strategy.scope():
            model = build_model(case["model"], (height, width, 3), num_classes)
            if case.get("depthwise_float32"):
                model = float32_depthwise(model)
            optimizer = SGD(1e-3, momentum=0.9)
        # "keras": Keras's own BatchNormalization, which kfcn's builders replace.
        fuse_batch_norm(model, fused=case.get("batch_norm", "fused") == "fused")
        record["float32_layers"] = sum(layer.compute_dtype == "float32" for layer in model.layers)
        record["batch_norm_layers"] = sum(
            isinstance(layer, keras.layers.BatchNormalization)
            for layer in model._flatten_layers(include_self=False, recursive=True)
        )
        step = loop.make_train_step(
            strategy, model, optimizer, ignore_label=255, jit_compile=case.get("jit_compile", False)
        )
        counted = common.forward_flops(model, (batch, height, width, 3))
        images = tf.constant(_images(batch, height, width))
        labels = tf.random.stateless_uniform(
            (batch, height, width), (0, 1), maxval=num_classes, dtype=tf.int32
        )
        dataset = tf.data.Dataset.from_tensors((images, labels)).repeat()
        iterator = iter(strategy.experimental_distribute_dataset(dataset))
        # The first call traces and builds the optimizer's slots: two warm-ups.
        timing = common.time_calls(
            lambda: step(iterator)[0].numpy(), case.get("repeats", 5), case.get("warmup", 2)
        )
    finally:
        _set_policy("float32")
    record.update(
        strategy=name,
        replicas=strategy.num_replicas_in_sync,
        flops_per_image=counted["total"] / batch,
        flops_by_op={k: v / batch for k, v in counted["by_op"].items()},
        # Backward = 2x forward (input and weight gradients): the usual 3x rule.
        flops_per_step=3 * counted["total"],
        latency=timing,
        images_per_s=batch / timing["median_s"],
        peak_rss_mb=common.peak_rss_bytes() / 2**20,
        rss_before_model_mb=rss_before / 2**20,
    )
    _rates(record, 3 * counted["total"], timing["median_s"])
    return [record]


def run_pipeline(case: dict[str, Any]) -> list[dict[str, Any]]:
    data_dir = case.get("data_dir", CAMVID_DIR)
    if not os.path.isdir(data_dir):
        return [{"status": "skipped", "reason": f"no CamVid copy at {data_dir}"}]
    from kfcn.data import load_dataset
    from kfcn.data.pipeline import train_pipeline

    height, width = case["size"]
    batch = case["batch"]
    train, info = load_dataset("camvid", "train", data_dir=data_dir)
    pipeline = train_pipeline(
        train,
        global_batch_size=batch,
        crop_size=(height, width),
        photometric=case.get("photometric", False),
        ignore_label=info.ignore_label,
    )
    iterator = iter(pipeline)
    timing = common.time_calls(
        lambda: next(iterator), case.get("repeats", 20), case.get("warmup", 3)
    )
    return [
        {
            "latency": timing,
            "images_per_s": batch / timing["median_s"],
            "peak_rss_mb": common.peak_rss_bytes() / 2**20,
        }
    ]


def _calibration_dir(tmp: str, height: int, width: int) -> str:
    train_dir = os.path.join(CAMVID_DIR, "train")
    if os.path.isdir(train_dir):
        return train_dir
    import numpy as np
    from PIL import Image

    folder = os.path.join(tmp, "calibration")
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (height, width, 3), np.uint8)).save(
            os.path.join(folder, f"{i}.png")
        )
    return folder


def run_litert(case: dict[str, Any]) -> list[dict[str, Any]]:
    import keras
    import numpy as np
    import tensorflow as tf

    from kfcn.export import tflite as tflite_lib

    height, width = case["size"]
    repeats, warmup = case.get("repeats", 20), case.get("warmup", 3)
    keras.utils.set_random_seed(0)
    model = build_model(case["model"], (height, width, 3), case.get("num_classes", 11))
    counted = common.forward_flops(model, (1, height, width, 3))
    sticks = _yardsticks(case, False)
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = _calibration_dir(tmp, height, width)
        image = tflite_lib.representative_images(data_dir, (height, width), 1)[0]
        batch = np.asarray(image, np.float32)[None]
        forward = tf.function(lambda x: model(x, training=False))
        reference = np.asarray(forward(batch))
        timing = common.time_calls(lambda: forward(batch).numpy(), repeats, warmup)
        records.append({"runtime": "tensorflow", "latency": timing})
        for quantization in case.get("quantizations", ("none", "float16", "int8")):
            path = os.path.join(tmp, f"{quantization}.tflite")
            export = tflite_lib.export_tflite(
                model,
                path,
                (height, width),
                quantization=quantization,
                representative_data=data_dir if quantization == "int8" else None,
                num_calibration_images=case.get("calibration_images", 16),
                gpu_check="warn",
            )
            interpreter = tflite_lib.make_interpreter(path, num_threads=os.cpu_count())
            runner = interpreter.get_signature_runner()
            logits = runner(images=batch)["logits"]
            timing = common.time_calls(lambda runner=runner: runner(images=batch), repeats, warmup)
            records.append(
                {
                    "runtime": f"litert_{'float32' if quantization == 'none' else quantization}",
                    "latency": timing,
                    "file_mb": export.size_bytes / 1e6,
                    "argmax_agreement": float(
                        np.mean(np.argmax(logits, -1) == np.argmax(reference, -1))
                    ),
                }
            )
    for record in records:
        record.update(
            matmul=sticks,
            flops_per_image=counted["total"],
            images_per_s=1 / record["latency"]["median_s"],
        )
        _rates(record, counted["total"], record["latency"]["median_s"])
    return records


RUNNERS = {
    "inference": run_inference,
    "training": run_training,
    "pipeline": run_pipeline,
    "litert": run_litert,
}


def run_case(case: dict[str, Any]) -> list[dict[str, Any]]:
    """Runs one case in this process; returns its records (status "ok" unless skipped)."""
    if case["kind"] not in RUNNERS:
        raise ValueError(f"`kind` must be one of {tuple(RUNNERS)}. Received: {case['kind']!r}")
    records = RUNNERS[case["kind"]](case)
    for record in records:
        record.setdefault("status", "ok")
    return records


if __name__ == "__main__":  # pragma: no cover - used by bench.suite's subprocesses
    import json

    logging.basicConfig(level=logging.WARNING)
    records = run_case(json.loads(sys.argv[1]))
    for record in records:
        record["machine"] = common.machine()
    print(common.RECORDS_MARKER + json.dumps(records), flush=True)
