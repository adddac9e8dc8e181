"""The 3x3 filter gradient per VGG16 layer: oneDNN's kernel against nine matmuls.

    python -m bench.conv_gradients [--size 512] [--batch 1] [--repeats 7]

In one process, after a float32 matmul yardstick, for each distinct 3x3 layer
shape of VGG16 at `--size` (the map sizes an FCN sees: 512, 256, ..., 32 at
512x512), times each `tf.function` (median of `--repeats`, taking turns):
the forward convolution, TensorFlow's `Conv2DBackpropInput` and
`Conv2DBackpropFilter` (oneDNN's kernels), and kfcn's filter gradient as nine
matmuls (`kfcn.conv_gradients`), checked against TensorFlow's to 1e-4. Each
is also a fraction of the matmul rate (same FLOPs for all four). The last
column says which layers `kfcn.conv_gradients` switches (input channels >=
`MIN_CHANNELS`): the threshold came from this table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if os.path.dirname(HERE) not in sys.path:
    sys.path.insert(0, os.path.dirname(HERE))

from bench import common  # noqa: E402

# VGG16's 3x3 layers: (map size divisor, input channels, output channels, how many).
VGG16_LAYERS = (
    (1, 3, 64, 1),
    (1, 64, 64, 1),
    (2, 64, 128, 1),
    (2, 128, 128, 1),
    (4, 128, 256, 1),
    (4, 256, 256, 2),
    (8, 256, 512, 1),
    (8, 512, 512, 2),
    (16, 512, 512, 3),
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)

    import numpy as np
    import tensorflow as tf

    from kfcn.conv_gradients import MIN_CHANNELS, _conv3x3

    matmul = common.matmul_rate("float32")["flop_per_s"]
    rng = np.random.default_rng(0)
    rows = []
    for divisor, channels, filters, count in VGG16_LAYERS:
        side = args.size // divisor
        x = tf.constant(rng.normal(size=(args.batch, side, side, channels)), tf.float32)
        kernel = tf.constant(rng.normal(size=(3, 3, channels, filters)) * 0.05, tf.float32)
        dy = tf.constant(rng.normal(size=(args.batch, side, side, filters)), tf.float32)

        def matmuls(x=x, kernel=kernel, dy=dy):
            with tf.GradientTape() as tape:
                tape.watch(kernel)
                y = _conv3x3(x, kernel)
            return tape.gradient(y, kernel, output_gradients=dy)

        calls = {
            "forward": tf.function(lambda x=x, k=kernel: tf.nn.conv2d(x, k, 1, "SAME")),
            "input gradient": tf.function(
                lambda x=x, k=kernel, dy=dy: tf.raw_ops.Conv2DBackpropInput(
                    input_sizes=tf.shape(x),
                    filter=k,
                    out_backprop=dy,
                    strides=[1, 1, 1, 1],
                    padding="SAME",
                )
            ),
            "filter gradient (oneDNN)": tf.function(
                lambda x=x, k=kernel, dy=dy: tf.raw_ops.Conv2DBackpropFilter(
                    input=x,
                    filter_sizes=tf.shape(k),
                    out_backprop=dy,
                    strides=[1, 1, 1, 1],
                    padding="SAME",
                )
            ),
            "filter gradient (nine matmuls)": tf.function(matmuls),
        }
        ours = calls["filter gradient (nine matmuls)"]().numpy()
        theirs = calls["filter gradient (oneDNN)"]().numpy()
        error = float(np.abs(ours - theirs).max() / np.abs(theirs).max())
        if error > 1e-4:
            raise AssertionError(f"nine matmuls differ from oneDNN by {error:.2e} at {side}")
        for fn in calls.values():
            fn().numpy()
        seconds = {name: [] for name in calls}
        for _ in range(args.repeats):
            for name, fn in calls.items():
                start = time.perf_counter()
                fn().numpy()
                seconds[name].append(time.perf_counter() - start)
        flops = 2 * args.batch * side * side * 9 * channels * filters
        medians = {name: common.summarize(s)["median_s"] for name, s in seconds.items()}
        rows.append(
            {
                "map": side,
                "channels": channels,
                "filters": filters,
                "layers": count,
                "switched": channels >= MIN_CHANNELS,
                "ms": {name: 1e3 * s for name, s in medians.items()},
                "of_f32_matmul": {name: flops / s / matmul for name, s in medians.items()},
            }
        )
    print(
        json.dumps(
            {
                "machine": common.machine(),
                "matmul_gflop_per_s": matmul / 1e9,
                "batch": args.batch,
                "rows": rows,
            },
            indent=1,
        )
    )
    names = list(rows[0]["ms"])
    print(f"| map, channels -> filters (layers) | {' | '.join(names)} | switched |")
    print("|---|" + "---:|" * len(names) + "---|")
    for row in rows:
        cells = [f"{row['ms'][n]:.1f} ms ({row['of_f32_matmul'][n]:.2f})" for n in names]
        print(
            f"| {row['map']}, {row['channels']} -> {row['filters']} ({row['layers']}) | "
            + " | ".join(cells)
            + f" | {'yes' if row['switched'] else 'no'} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
