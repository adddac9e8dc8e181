"""LiteRT latency per image (float32, float16, int8) beside TensorFlow, in one run.

    python bench/tflite_latency.py --input_size 360x480
    python bench/tflite_latency.py --model fcn8s.keras --input_size 512x512 \
        --representative_data /work/shared/data/camvid/val --runs 30

Without --model, a mobilenetv2 FCN-8s (CamVid's 11 classes) with random weights
is built: latency does not depend on the weight values. The int8 file is
calibrated on --representative_data (JPEG/PNG folder), or on random images if
none is given. Every runtime sees the same image; the median and the 90th
percentile of --runs timed calls (after --warmup calls) are reported in ms.
With --parity_data, each file's per-pixel argmax agreement with the Keras model
on those images is reported too.
"""

import os
import sys
import tempfile
import time

# This folder is sys.path[0] when run as a script; keep it from shadowing modules.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from bench import common  # noqa: E402

MODEL = flags.DEFINE_string("model", None, "kfcn model (.keras); default: random mobilenetv2.")
BACKBONE = flags.DEFINE_string("backbone", "mobilenetv2", "Backbone when --model is not given.")
NUM_CLASSES = flags.DEFINE_integer("num_classes", 11, "Classes when --model is not given.")
INPUT_SIZE = flags.DEFINE_string("input_size", "360x480", "Input size HxW.")
REPRESENTATIVE_DATA = flags.DEFINE_string(
    "representative_data", None, "JPEG/PNG folder for int8 calibration and the timed image."
)
NUM_CALIBRATION = flags.DEFINE_integer("num_calibration_images", 100, "Images for int8.")
RUNS = flags.DEFINE_integer("runs", 20, "Timed calls per runtime.")
WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed calls per runtime.")
THREADS = flags.DEFINE_integer("threads", None, "LiteRT threads; default: all cores.")
QUANTIZATIONS = flags.DEFINE_list(
    "quantizations", ["none", "float16", "int8"], "TFLite variants to time."
)
PARITY_DATA = flags.DEFINE_string(
    "parity_data",
    None,
    "JPEG/PNG folder: also report the per-pixel argmax agreement of each "
    "TFLite file with the Keras model on these images (resized to cover, center-cropped).",
)
PARITY_IMAGES = flags.DEFINE_integer("parity_images", 101, "Images used for --parity_data.")


def _time(fn, runs, warmup):
    import numpy as np

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000.0)
    return float(np.median(times)), float(np.percentile(times, 90))


def main(argv):
    del argv
    import numpy as np
    import tensorflow as tf
    from tqdm import tqdm

    import kfcn
    from kfcn.cli.args import parse_size
    from kfcn.export import tflite as tflite_lib
    from kfcn.export.artifacts import load_segmentation_model

    height, width = parse_size(INPUT_SIZE.value, "input_size")
    if MODEL.value:
        model = load_segmentation_model(MODEL.value)
        name = os.path.basename(MODEL.value)
    else:
        model = kfcn.build_fcn8s(
            backbone=BACKBONE.value, num_classes=NUM_CLASSES.value, weights=None
        )
        name = f"{BACKBONE.value} FCN-8s (random weights)"
    threads = THREADS.value or os.cpu_count()

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = REPRESENTATIVE_DATA.value
        if data_dir:
            image = tflite_lib.representative_images(data_dir, (height, width), 1)[0]
        else:
            from PIL import Image

            data_dir = os.path.join(tmp, "calibration")
            os.makedirs(data_dir)
            rng = np.random.default_rng(0)
            for i in range(16):
                Image.fromarray(rng.integers(0, 256, (height, width, 3), np.uint8)).save(
                    os.path.join(data_dir, f"{i}.png")
                )
            image = np.asarray(Image.open(os.path.join(data_dir, "0.png")))
        batch = image[None].astype(np.float32)

        results = []
        serve = tf.function(lambda x: model(x, training=False))
        median, p90 = _time(lambda: serve(batch).numpy(), RUNS.value, WARMUP.value)
        results.append(("TensorFlow (Keras model, tf.function)", median, p90, None, None))
        parity_images = None
        if PARITY_DATA.value:
            parity_images = tflite_lib.representative_images(
                PARITY_DATA.value, (height, width), PARITY_IMAGES.value
            )

        for quantization in tqdm(QUANTIZATIONS.value, desc="export + time", file=sys.stderr):
            path = os.path.join(tmp, f"{quantization}.tflite")
            export = tflite_lib.export_tflite(
                model,
                path,
                (height, width),
                quantization=quantization,
                representative_data=data_dir if quantization == "int8" else None,
                num_calibration_images=NUM_CALIBRATION.value,
                gpu_check="warn",
            )
            interpreter = tflite_lib.make_interpreter(path, num_threads=threads)
            runner = interpreter.get_signature_runner()
            median, p90 = _time(
                lambda runner=runner: runner(images=batch), RUNS.value, WARMUP.value
            )
            agreement = None
            if parity_images:
                agreement = tflite_lib.pixel_agreement(model, path, parity_images)
            results.append((f"LiteRT {quantization}", median, p90, export.size_bytes, agreement))

    import ai_edge_litert

    print(f"\nModel: {name}, input 1x{height}x{width}x3")
    print(
        f"Machine: {common.cpu_model()}, {os.cpu_count()} cores; TensorFlow {tf.__version__}, "
        f"ai-edge-litert {getattr(ai_edge_litert, '__version__', '?')}, LiteRT threads "
        f"{threads}; {RUNS.value} runs after {WARMUP.value} warm-up"
    )
    if parity_images:
        print(
            f"Agreement: pixels whose argmax matches the Keras model, over "
            f"{len(parity_images)} images from {PARITY_DATA.value}"
        )
    print("\n| runtime | median ms/image | p90 ms | file MB | agreement |")
    print("|---|---:|---:|---:|---:|")
    for runtime, median, p90, size, agreement in results:
        size_text = f"{size / 1e6:.2f}" if size else "-"
        agreement_text = f"{agreement * 100:.3f}%" if agreement is not None else "-"
        print(f"| {runtime} | {median:.1f} | {p90:.1f} | {size_text} | {agreement_text} |")


if __name__ == "__main__":
    app.run(main)
