"""Measures the input pipeline's throughput (images/s) on CamVid.

The training input pipeline must never be the bottleneck: it has to deliver well above the
training step rate (an FCN-8s on a MobileNetV2 trains at a few images/s on 2 CPU cores at
360x480). This script times `train_pipeline` (decode, random scale, pad, crop, flip, batch) and
`eval_pipeline` (decode at native size) after a warm-up, and prints the machine's core count.

Usage:
    python bench/pipeline_throughput.py --data_dir /work/shared/data/camvid \
        --crop 360 480 --batch 8 --train_images 320 --photometric
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import tensorflow as tf

from kfcn.data import load_dataset
from kfcn.data.pipeline import eval_pipeline, train_pipeline


def _time(iterator, batches: int) -> tuple[float, float]:
    """Returns (wall seconds, process CPU seconds) for `batches` elements.

    CPU seconds per image do not depend on what else runs on a shared machine; wall-clock
    images/s do.
    """
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(batches):
        next(iterator)
    return time.perf_counter() - start, time.process_time() - cpu_start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", default="/work/shared/data/camvid")
    parser.add_argument("--crop", type=int, nargs=2, default=(360, 480), metavar=("H", "W"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--warmup_batches", type=int, default=5)
    parser.add_argument("--train_images", type=int, default=320, help="timed, after warm-up")
    parser.add_argument("--eval_images", type=int, default=101, help="timed (val split)")
    parser.add_argument("--photometric", action="store_true", help="also colour jitter")
    args = parser.parse_args()

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(
        f"machine: {platform.processor() or platform.machine()}, {cores} usable cores "
        f"(os.cpu_count()={os.cpu_count()}), TensorFlow {tf.__version__}"
    )

    start = time.perf_counter()
    train, info = load_dataset("camvid", "train", data_dir=args.data_dir)
    val, val_info = load_dataset("camvid", "val", data_dir=args.data_dir)
    print(
        f"dataset construction + validation (train {info.num_examples}, val "
        f"{val_info.num_examples} pairs): {time.perf_counter() - start:.2f} s"
    )

    pipeline = train_pipeline(
        train,
        global_batch_size=args.batch,
        crop_size=tuple(args.crop),
        photometric=args.photometric,
        ignore_label=info.ignore_label,
    )
    iterator = iter(pipeline)
    _time(iterator, args.warmup_batches)
    batches = max(1, args.train_images // args.batch)
    seconds, cpu = _time(iterator, batches)
    images = batches * args.batch
    print(
        f"train_pipeline: crop {args.crop[0]}x{args.crop[1]}, batch {args.batch}, "
        f"scale 0.5-2.0, flip, photometric={args.photometric}: "
        f"{images / seconds:.1f} images/s ({images} images, {seconds:.2f} s wall); "
        f"{1000 * cpu / images:.1f} CPU-ms per image = {images / cpu:.1f} images per CPU-second"
    )

    del iterator, pipeline  # stop the training pipeline's background threads
    evaluation = iter(eval_pipeline(val))
    next(evaluation)  # warm-up: builds the graph and fills the prefetch buffer
    count = min(args.eval_images, val_info.num_examples - 1)
    seconds, cpu = _time(evaluation, count)
    print(
        f"eval_pipeline: native 360x480, one image per batch: {count / seconds:.1f} images/s "
        f"({count} images, {seconds:.2f} s wall); {1000 * cpu / count:.1f} CPU-ms per image"
    )


if __name__ == "__main__":
    main()
