"""Train FCN-32s, FCN-16s and FCN-8s on generated data and show what they do.

    kfcn demo [--output_dir kfcn_demo] [--quick]

No dataset and no download needed: the demo draws a few hundred images of
textured materials with thin wires and small beads (kfcn.demo.synthetic), trains
FCN-32s, then FCN-16s from it and FCN-8s from that (the paper's staged training)
on the CPU, prints the paper's four metrics of each on the held-out images, and
writes into --output_dir:

  figure2.png          image | FCN-32s | FCN-16s | FCN-8s | ground truth
  confusion.png        FCN-8s confusion matrix on the held-out images
  training_curves.png  loss and validation scores of the three stages
  metrics.json         per variant, the scores of kfcn.metrics.scores
  saved_model/         the FCN-8s as a SavedModel
  fcn8s_fp16.tflite    the FCN-8s as a float16 TFLite file
  predictions/         kfcn predict's class maps with each export
  data/, runs/         the generated dataset (folder layout) and the three runs

and prints how often the exports' class maps agree with the Keras model's. About
2.5 minutes on two quiet CPU cores (4.5 on a busy machine); --quick runs the
same path on a few images in under a minute (its scores mean nothing).
--output_dir must be new, empty or an earlier demo's (whose files are replaced).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from kfcn.cli.args import add_bool
from kfcn.cli.errors import UsageError

HELP = "Train FCN-32s/16s/8s on generated data and show the results."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `kfcn demo`."""
    parser.add_argument(
        "--output_dir",
        default="kfcn_demo",
        help="Where everything goes (created if missing; default: kfcn_demo).",
    )
    add_bool(parser, "quick", False, "A few images and steps: the whole path in under a minute")
    add_bool(parser, "verbose", False, "Show the training and export log lines")


def run(args: argparse.Namespace) -> int:
    """Runs the demo and prints the table, the agreement and where everything went."""
    from tqdm import tqdm

    from kfcn.demo import run as demo

    try:
        demo.check_output_dir(args.output_dir)
    except ValueError as error:
        message = str(error).replace("`output_dir`", "--output_dir")
        raise UsageError(message.replace("output_dir=", "--output_dir=")) from error
    settings = demo.QUICK if args.quick else demo.FULL
    if not args.verbose:
        # Progress bars and the summary are the demo's output; log lines only on request.
        for handler in logging.getLogger().handlers:
            handler.setLevel(logging.WARNING)
        # TensorFlow's deprecation notices (e.g. reading event files) are not the user's.
        logging.getLogger("tensorflow").setLevel(logging.ERROR)
    bars: dict[str, tqdm] = {}

    def progress(task: str, done: int, total: int) -> None:
        bar = bars.get(task)
        if bar is None:
            close_bars()
            unit = "image" if task.startswith("score") else "step"
            bar = bars[task] = tqdm(total=total, desc=f"{task:<14}", unit=unit, file=sys.stderr)
        bar.update(done - bar.n)

    def close_bars() -> None:
        for bar in bars.values():
            bar.close()

    def on_stage(text: str) -> None:
        close_bars()
        print(text, file=sys.stderr, flush=True)

    try:
        result = demo.run_demo(args.output_dir, settings, progress=progress, on_stage=on_stage)
    finally:
        close_bars()

    print()
    print(f"Held-out scores (%) on {result.scores['fcn8s']['num_images']} images:")
    print(demo.format_table(result.scores))
    print()
    for name, fraction in result.agreement.items():
        print(
            f"kfcn predict with {name}: argmax agrees with Keras on {100 * fraction:.3f}% of pixels"
        )
    print()
    where = os.path.relpath if not os.path.isabs(args.output_dir) else (lambda p: p)
    width = max(len(name) for name in result.paths)
    print("Wrote:")
    for name, path in result.paths.items():
        print(f"  {name:<{width}}  {where(path)}")
    total = sum(result.seconds.values())
    timing = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in result.seconds.items())
    print(f"\nDone in {total:.0f} s ({timing}).")
    return 0
