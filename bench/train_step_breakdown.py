"""Where a training step's time goes: forward, forward + gradients, and the whole kfcn step.

    python -m bench.train_step_breakdown [--model fcn8s:vgg16] [--size 512x512] [--batch 1]

In one process, after a float32 matmul yardstick, times (median of `--repeats` after
two warm-ups, each a `tf.function`; the rows take turns, one call each per round):

1. the forward pass (training=True) and the loss;
2. (1) plus the gradients of every trainable variable (`GradientTape`), no update;
3. kfcn's whole step (`make_train_step`: (2), the weight-decay term, the gradient
   norm, the SGD momentum update, the cross-replica reductions), without and with
   weight decay;
4. the same step with one of kfcn's faster parts replaced by what TensorFlow and
   Keras do: fc6/fc7's 1x1 products differentiated by oneDNN's convolution
   gradients instead of kfcn's matmuls (`kfcn.layers.pointwise_conv`); the 3x3
   filter gradients by oneDNN's `Conv2DBackpropFilter` instead of nine matmuls
   (`kfcn.conv_gradients`); Keras's SGD update instead of kfcn's fused one
   (`kfcn.training.sgd`); then all three at once: what each buys.

Each row is also a fraction of the matmul rate, counting the forward FLOPs once for
(1) and three times for the others (input and weight gradients). The differences
between rows are what the optimizer update, the L2 term and the norm cost.
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="fcn8s:vgg16")
    parser.add_argument("--size", default="512x512")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--num_classes", type=int, default=21)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    height, width = (int(v) for v in args.size.split("x"))

    import keras
    import tensorflow as tf

    from bench.cases import _images, build_model
    from kfcn.losses import pixel_cross_entropy
    from kfcn.training import loop
    from kfcn.training.sgd import SGD

    matmul = common.matmul_rate("float32")
    keras.utils.set_random_seed(0)
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    with strategy.scope():
        model = build_model(args.model, (height, width, 3), args.num_classes)
    images = tf.constant(_images(args.batch, height, width))
    labels = tf.random.stateless_uniform(
        (args.batch, height, width), (0, 1), maxval=args.num_classes, dtype=tf.int32
    )
    flops = common.forward_flops(model, (args.batch, height, width, 3))["total"]
    variables = model.trainable_variables

    @tf.function
    def forward():
        loss, weight = pixel_cross_entropy(labels, model(images, training=True))
        return loss / weight

    @tf.function
    def gradients():
        with tf.GradientTape() as tape:
            loss, weight = pixel_cross_entropy(labels, model(images, training=True))
            loss = loss / weight
        grads = tape.gradient(loss, variables)
        return loss + tf.add_n([tf.reduce_sum(g[..., :1]) * 0.0 for g in grads])

    import kfcn.layers
    from kfcn.conv_gradients import use_matmul_gradients

    def convolution(x, kernel):
        # The alternative to kfcn.layers.pointwise_conv: oneDNN's gradients.
        return tf.nn.conv2d(x, tf.cast(tf.convert_to_tensor(kernel), x.dtype), 1, "VALID")

    rows = [("forward + loss", forward, 1), ("forward + gradients", gradients, 3)]
    # (name, weight decay, fc6/fc7 gradients by matmul, 3x3 filter gradients by
    # matmul, kfcn's fused SGD update): each row changes one thing from kfcn's step.
    steps = [
        ("kfcn step, weight_decay 0", 0.0, True, True, True),
        ("kfcn step, weight_decay 0.0005", 5e-4, True, True, True),
        ("  fc6/fc7 gradients by oneDNN's convolution", 5e-4, False, True, True),
        ("  3x3 filter gradients by oneDNN (kfcn.conv_gradients off)", 5e-4, True, False, True),
        ("  Keras's SGD update (five passes per variable)", 5e-4, True, True, False),
        ("  all three of oneDNN's and Keras's", 5e-4, False, False, False),
    ]
    matmul_gradients = kfcn.layers.pointwise_conv
    for name, decay, pointwise, conv3x3, fused_sgd in steps:
        with strategy.scope():
            optimizer = (SGD if fused_sgd else keras.optimizers.SGD)(1e-10, momentum=0.9)
        step = loop.make_train_step(strategy, model, optimizer, weight_decay=decay)
        dataset = tf.data.Dataset.from_tensors((images, labels)).repeat()
        iterator = iter(strategy.experimental_distribute_dataset(dataset))
        kfcn.layers.pointwise_conv = matmul_gradients if pointwise else convolution
        use_matmul_gradients(model, conv3x3)
        try:
            step(iterator)  # traced with this row's gradients
        finally:
            kfcn.layers.pointwise_conv = matmul_gradients
            use_matmul_gradients(model, True)
        rows.append((name, lambda s=step, i=iterator: s(i)[0], 3))
    # Round robin: one call of each row per round, so that a slow spell of the
    # machine falls on every row alike.
    for _, fn, _ in rows:
        fn().numpy()
        fn().numpy()
    seconds: dict[str, list[float]] = {name: [] for name, _, _ in rows}
    for _ in range(args.repeats):
        for name, fn, _ in rows:
            start = time.perf_counter()
            fn().numpy()
            seconds[name].append(time.perf_counter() - start)
    results = []
    for name, _, multiple in rows:
        timing = common.summarize(seconds[name])
        rate = multiple * flops / timing["median_s"]
        results.append(
            {
                "what": name,
                "median_s": timing["median_s"],
                "iqr_s": timing.get("iqr_s"),
                "of_f32_matmul": rate / matmul["flop_per_s"],
            }
        )
    record = {
        "machine": common.machine(),
        "model": args.model,
        "size": [height, width],
        "batch": args.batch,
        "forward_gflop": flops / 1e9,
        "matmul_gflop_per_s": matmul["flop_per_s"] / 1e9,
        "rows": results,
    }
    print(json.dumps(record, indent=1))
    print(f"| what | s median | of f32 matmul ({matmul['flop_per_s'] / 1e9:.0f} GFLOP/s) |")
    print("|---|---:|---:|")
    for row in results:
        print(f"| {row['what']} | {row['median_s']:.3f} | {row['of_f32_matmul']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
