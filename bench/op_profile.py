"""Which TensorFlow ops a forward pass or training step spends its time in, per precision.

    python -m bench.op_profile [--model fcn8s:mobilenetv2] [--size 256x256] [--batch 8]
        [--mode forward|train] [--precisions float32,mixed_bfloat16] [--repeats 5]

Each precision runs in its own process (a `mixed_bfloat16` step can abort inside
oneDNN, see README): the model is built under that Keras dtype policy, the forward
pass (`training=False`) or kfcn's training step (`make_train_step`, SGD) is traced
and warmed up twice, then `--repeats` calls run under the TensorFlow profiler. The
profile (an XSpace protobuf) is read here: every op event on TensorFlow's executor
threads is summed by op type (the kernel that ran after TensorFlow's oneDNN graph
rewrite, e.g. `_MklNativeFusedConv2D` or a plain `DepthwiseConv2dNative` when no
oneDNN kernel exists) and divided by `--repeats`. The table puts each precision's
milliseconds per call side by side, so ops that get slower in bfloat16, `Cast`s and
layout conversions (`_MklToTf`, `Transpose`) show where the time goes. Op times on
the two cores can overlap, so the column sums may exceed the wall-clock time per
call, which is printed too.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if os.path.dirname(HERE) not in sys.path:
    sys.path.insert(0, os.path.dirname(HERE))

from bench import common  # noqa: E402

MARKER = "OP_PROFILE "


def op_times(xplane_path: str) -> dict[str, float]:
    """Seconds per op type summed over the executor threads of one XSpace file."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    space = xplane_pb2.XSpace()
    with open(xplane_path, "rb") as f:
        space.ParseFromString(f.read())
    totals: dict[str, float] = collections.defaultdict(float)
    for plane in space.planes:
        if plane.name != "/host:CPU":
            continue
        for line in plane.lines:
            if not line.name.startswith("tf_Compute"):
                continue
            for event in line.events:
                meta = plane.event_metadata[event.metadata_id]
                # Op events are named "<node name>:<op type>"; executor bookkeeping
                # ("ExecutorState::Process", "ThreadpoolListener::Record") is not.
                if ":" not in meta.name or "::" in meta.name:
                    continue
                op_type = meta.display_name or meta.name.rsplit(":", 1)[1]
                totals[op_type] += event.duration_ps * 1e-12
    return dict(totals)


def profile_one(args: argparse.Namespace, precision: str) -> dict:
    import keras
    import tensorflow as tf

    from bench.cases import _images, _set_policy, build_model
    from kfcn.training import loop
    from kfcn.training.sgd import SGD

    height, width = (int(v) for v in args.size.split("x"))
    _set_policy(precision)
    keras.utils.set_random_seed(0)
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    with strategy.scope():
        model = build_model(args.model, (height, width, 3), args.num_classes)
        optimizer = SGD(1e-10, momentum=0.9)
    images = tf.constant(_images(args.batch, height, width))
    if args.mode == "forward":
        forward = tf.function(lambda: model(images, training=False))

        def call():
            return forward().numpy()

    else:
        labels = tf.random.stateless_uniform(
            (args.batch, height, width), (0, 1), maxval=args.num_classes, dtype=tf.int32
        )
        step = loop.make_train_step(strategy, model, optimizer)
        iterator = iter(
            strategy.experimental_distribute_dataset(
                tf.data.Dataset.from_tensors((images, labels)).repeat()
            )
        )

        def call():
            return step(iterator)[0].numpy()

    call(), call()
    with tempfile.TemporaryDirectory() as logdir:
        tf.profiler.experimental.start(logdir)
        start = time.perf_counter()
        for _ in range(args.repeats):
            call()
        wall = (time.perf_counter() - start) / args.repeats
        tf.profiler.experimental.stop()
        paths = glob.glob(os.path.join(logdir, "plugins", "profile", "*", "*.xplane.pb"))
        if not paths:
            raise RuntimeError(f"The profiler wrote no .xplane.pb under {logdir}")
        totals = op_times(paths[0])
    return {
        "precision": precision,
        "wall_s_per_call": wall,
        "op_s_per_call": {k: v / args.repeats for k, v in totals.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="fcn8s:mobilenetv2")
    parser.add_argument("--size", default="256x256")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--num_classes", type=int, default=11)
    parser.add_argument("--mode", choices=("forward", "train"), default="forward")
    parser.add_argument("--precisions", default="float32,mixed_bfloat16")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--top", type=int, default=25, help="op types shown")
    parser.add_argument("--out", help="JSON file written")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a child process's precision
    args = parser.parse_args(argv)
    if args.one:
        print(MARKER + json.dumps(profile_one(args, args.one)), flush=True)
        return 0
    precisions = args.precisions.split(",")
    runs = []
    for precision in precisions:
        child = [a for a in (argv if argv is not None else sys.argv[1:]) if a]
        out = subprocess.run(
            [sys.executable, "-m", "bench.op_profile", *child, "--one", precision],
            capture_output=True,
            text=True,
            cwd=os.path.dirname(HERE),
        )
        lines = [x for x in out.stdout.splitlines() if x.startswith(MARKER)]
        if out.returncode != 0 or not lines:
            tail = out.stderr.strip().splitlines()[-3:]
            runs.append({"precision": precision, "error": f"exit {out.returncode}: {tail}"})
            continue
        runs.append(json.loads(lines[0][len(MARKER) :]))
    record = {
        "machine": common.machine(),
        "model": args.model,
        "size": args.size,
        "batch": args.batch,
        "mode": args.mode,
        "runs": runs,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)
    ok = [r for r in runs if "error" not in r]
    for r in runs:
        if "error" in r:
            print(f"{r['precision']}: {r['error']}")
    if not ok:
        return 1
    names = sorted(
        {k for r in ok for k in r["op_s_per_call"]},
        key=lambda k: -max(r["op_s_per_call"].get(k, 0.0) for r in ok),
    )
    print(
        f"{args.model} {args.mode} {args.size} batch {args.batch}, ms per call, "
        f"{common.cpu_model()}"
    )
    print("| op type | " + " | ".join(r["precision"] for r in ok) + " |")
    print("|---|" + "---:|" * len(ok))
    for name in names[: args.top]:
        cells = [f"{1e3 * r['op_s_per_call'].get(name, 0.0):.1f}" for r in ok]
        print(f"| {name} | " + " | ".join(cells) + " |")
    sums = [f"{1e3 * sum(r['op_s_per_call'].values()):.1f}" for r in ok]
    print("| all ops | " + " | ".join(sums) + " |")
    print("| wall clock | " + " | ".join(f"{1e3 * r['wall_s_per_call']:.1f}" for r in ok) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
