"""Validation mean IU against wall-clock minutes of `kfcn train` runs (README's curves).

    python -m bench.curve /work/runs/camvid_mnv2_60 [more run dirs]

Reads each run's TensorBoard validation events (`logs/validation`, tag `mean_iou`,
with their wall times). Minutes count from the run's start, the moment
`config.yaml` was written (before the model is built), so they include start-up,
checkpoints and validation: the wall clock a user waits. Prints one Markdown table
row per validation and, per run, the minutes to its end (`result.json` written).
"""

from __future__ import annotations

import argparse
import glob
import os
import sys


def validation_points(run_dir: str, tag: str = "mean_iou") -> list[tuple[int, float, float]]:
    """`[(step, wall_time, value)]` of the run's validation scalar `tag`, by step."""
    import tensorflow as tf

    points = {}
    pattern = os.path.join(run_dir, "logs", "validation", "events.out.tfevents.*")
    for path in glob.glob(pattern):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.tag == tag and value.HasField("tensor"):
                    number = float(tf.make_ndarray(value.tensor))
                    points[event.step] = (event.step, event.wall_time, number)
    return [points[step] for step in sorted(points)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+")
    args = parser.parse_args(argv)
    print("| run | step | minutes | val mean IU |")
    print("|---|---:|---:|---:|")
    for run_dir in args.run_dirs:
        config = os.path.join(run_dir, "config.yaml")
        if not os.path.isfile(config):
            sys.exit(f"{run_dir}: no config.yaml; is it a kfcn train run directory?")
        start = os.path.getmtime(config)
        name = os.path.basename(os.path.normpath(run_dir))
        for step, wall_time, value in validation_points(run_dir):
            print(f"| {name} | {step} | {(wall_time - start) / 60:.1f} | {100 * value:.1f} |")
        result = os.path.join(run_dir, "result.json")
        if os.path.isfile(result):
            minutes = (os.path.getmtime(result) - start) / 60
            print(f"| {name} | end | {minutes:.1f} | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
