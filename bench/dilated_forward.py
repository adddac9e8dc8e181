"""Forward time and peak memory of mmseg's FCNs beside kfcn's FCN-8s VGG16, in one run.

FCN R-18-D8, FCN R-50-D8 and FCN-D6 R-50-D16 (`kfcn.build_dilated_fcn`, 19 classes,
inference model: no auxiliary head) and the paper's FCN-8s VGG16 (`kfcn.build_fcn8s`,
21 classes), at 512x1024 (Cityscapes' crop), batch 1, through a `tf.function`.

Each model runs in a fresh Python process (`--child`), so its peak RSS is its own,
and times a float32 4096^3 matmul just before the model: the model's FLOP/s
(counted on the traced graph, `bench.common.graph_flops`) is also given as a
fraction of that matmul rate, and its time as a multiple of that matmul's time,
so runs on a loaded machine stay comparable. The load average is recorded with
every row.

    python bench/dilated_forward.py [--size 512x1024] [--repeats 5] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:  # `python bench/dilated_forward.py` as well as `python -m ...`
    sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from bench import common  # noqa: E402

#: Row label -> builder keywords ("fcn8s" builds kfcn's FCN-8s VGG16).
MODELS = {
    "FCN R-18-D8": dict(
        backbone="resnet18_v1c", output_stride=8, head_channels=128, aux_channels=64
    ),
    "FCN R-50-D8": dict(backbone="resnet50_v1c", output_stride=8),
    "FCN-D6 R-50-D16": dict(backbone="resnet50_v1c", output_stride=16, head_dilation=6),
    "FCN-8s VGG16": "fcn8s",
}


def build(label: str, height: int, width: int) -> Any:
    import kfcn

    spec = MODELS[label]
    if spec == "fcn8s":
        return kfcn.build_fcn8s(backbone="vgg16", num_classes=21, input_shape=(height, width, 3))
    model = kfcn.build_dilated_fcn(
        num_classes=19, input_shape=(height, width, 3), sync_batchnorm=False, **spec
    )
    return kfcn.inference_model(model)


def measure(label: str, height: int, width: int, repeats: int) -> dict[str, Any]:
    """One model in this process: matmul yardstick, build, FLOPs, timed forward calls."""
    import keras
    import numpy as np
    import tensorflow as tf

    matmul = common.matmul_rate("float32", 4096, repeats)
    rss_before = common.peak_rss_bytes()
    keras.utils.set_random_seed(0)
    model = build(label, height, width)
    flops = common.forward_flops(model, (1, height, width, 3))["total"]
    images = np.random.default_rng(0).uniform(0, 255, (1, height, width, 3)).astype("float32")
    images = tf.constant(images)
    forward = tf.function(lambda x: model(x, training=False))
    timing = common.time_calls(lambda: forward(images).numpy(), repeats=repeats)
    rate = flops / timing["median_s"]
    return {
        "model": label,
        "size": [height, width],
        "parameters": int(model.count_params()),
        "gflop": flops / 1e9,
        "latency": timing,
        "gflop_per_s": rate / 1e9,
        "matmul_gflop_per_s": matmul["gflop_per_s"],
        "fraction_of_matmul": rate / matmul["flop_per_s"],
        # The forward's time in units of one 4096^3 matmul timed in this process.
        "time_in_matmuls": timing["median_s"] / matmul["median_s"],
        "peak_rss_mb": common.peak_rss_bytes() / 2**20,
        "rss_before_model_mb": rss_before / 2**20,
        "machine": common.machine(),
    }


def _child(label: str, height: int, width: int, repeats: int) -> dict[str, Any]:
    command = [sys.executable, os.path.abspath(__file__), "--child", label,
               "--size", f"{height}x{width}", "--repeats", str(repeats)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    for line in done.stdout.splitlines():
        if line.startswith(common.RECORDS_MARKER):
            return json.loads(line[len(common.RECORDS_MARKER) :])
    raise RuntimeError(f"{label} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")


def table(records: list[dict[str, Any]]) -> str:
    rows = [
        "| model | GFLOP | median ms | IQR ms | GFLOP/s | of matmul | matmuls | peak RSS MB "
        "| load |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in records:
        t = r["latency"]
        load = ", ".join(f"{v:.1f}" for v in r["machine"]["load_average"])
        rows.append(
            f"| {r['model']} | {r['gflop']:.0f} | {t['median_s'] * 1e3:.0f} | "
            f"{t['iqr_s'] * 1e3:.0f} | {r['gflop_per_s']:.1f} | {r['fraction_of_matmul']:.2f} | "
            f"{r['time_in_matmuls']:.2f} | {r['peak_rss_mb']:.0f} | {load} |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="512x1024", help="HxW")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated labels")
    parser.add_argument("--out", default=None, help="write the records as JSON")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    height, width = (int(v) for v in args.size.lower().split("x"))
    if args.child:
        record = measure(args.child, height, width, args.repeats)
        print(common.RECORDS_MARKER + json.dumps(record), flush=True)
        return
    labels = [label.strip() for label in args.models.split(",")]
    unknown = [label for label in labels if label not in MODELS]
    if unknown:
        parser.error(f"--models: unknown {unknown}; choose from {list(MODELS)}")
    records = []
    for label in labels:
        records.append(_child(label, height, width, args.repeats))
        print(f"{label}: {records[-1]['latency']['median_s'] * 1e3:.0f} ms", flush=True)
    machine = records[0]["machine"]
    print(f"{machine['cpu']}, {machine['usable_cores']} usable cores, TF {machine['tensorflow']}")
    print(f"{height}x{width}, batch 1, tf.function, float32, {args.repeats} timed calls each")
    print(table(records))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()
