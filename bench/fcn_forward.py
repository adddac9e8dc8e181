"""FCN-8s forward speed on the CPU, as a fraction of this machine's matmul rate.

Measures, in one run: a large float32 matmul (the machine's practical peak),
then the FCN-8s VGG16 forward pass at 512x512 (batch 1), eagerly through
`model.predict`, through a `tf.function`, and through an XLA-compiled
`tf.function`, and the same under Keras' `mixed_bfloat16` policy (bfloat16
compute, float32 weights and logits; CPUs with AMX or AVX512-BF16 run it on
their bfloat16 units). The FCN's FLOPs are counted from its layers (2 *
multiply-adds of every convolution and transposed convolution), so the achieved
FLOP/s can be compared with the float32 matmul's.

    python bench/fcn_forward.py [--size 512] [--repeats 5] [--backbone vgg16]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import kfcn  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import common  # noqa: E402


def conv_flops(model: keras.Model) -> int:
    """2 x multiply-adds of every convolution-like layer, from static shapes."""
    total = 0
    for layer in model.layers:
        if not layer._inbound_nodes or isinstance(layer, keras.layers.InputLayer):  # noqa: SLF001
            continue
        # Trunk layers are shared with the throwaway trunk model: use this model's node.
        node = layer._inbound_nodes[-1]  # noqa: SLF001
        in_shape, out_shape = node.input_tensors[0].shape, node.outputs[0].shape
        if isinstance(layer, keras.layers.Conv2DTranspose):
            _, h, w, _ = in_shape
            kh, kw, out_c, in_c = layer.kernel.shape
            total += 2 * h * w * kh * kw * in_c * out_c
        elif isinstance(layer, keras.layers.DepthwiseConv2D):
            _, h, w, c = out_shape
            kh, kw, _, mult = layer.kernel.shape
            total += 2 * h * w * kh * kw * c
        elif isinstance(layer, keras.layers.Conv2D):
            _, h, w, _ = out_shape
            kh, kw, in_c, out_c = layer.kernel.shape
            total += 2 * h * w * kh * kw * in_c * out_c
    return int(total)


def best_seconds(fn, repeats: int) -> float:
    """Median seconds of `repeats` calls after one warm-up (`bench.common.time_calls`)."""
    return common.time_calls(fn, repeats=repeats)["median_s"]


def matmul_rate(n: int = 4096, repeats: int = 5) -> float:
    """The float32 matmul yardstick of the suite (`bench.common.matmul_rate`), FLOP/s."""
    return common.matmul_rate("float32", n, repeats)["flop_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backbone", default="vgg16")
    args = parser.parse_args()

    model = kfcn.build_fcn8s(backbone=args.backbone, input_shape=(args.size, args.size, 3))
    flops = conv_flops(model)
    images = np.random.default_rng(0).uniform(0, 255, (1, args.size, args.size, 3))
    images = tf.constant(images.astype("float32"))

    peak = matmul_rate(repeats=args.repeats)
    graph = tf.function(lambda x: model(x, training=False))
    xla = tf.function(lambda x: model(x, training=False), jit_compile=True)
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    bf16_model = kfcn.build_fcn8s(backbone=args.backbone, input_shape=(args.size, args.size, 3))
    keras.mixed_precision.set_global_policy("float32")
    bf16_model.set_weights(model.get_weights())
    bf16 = tf.function(lambda x: bf16_model(x, training=False))
    runs = {
        "model.predict": lambda: model.predict(images, verbose=0),
        "tf.function": lambda: graph(images).numpy(),
        "tf.function(jit_compile=True)": lambda: xla(images).numpy(),
        "tf.function, mixed_bfloat16": lambda: bf16(images).numpy(),
    }
    # fc6 alone: Keras' Conv2D (TensorFlow's CPU convolution) against kfcn's GEMM form.
    pool5 = tf.random.normal((1, args.size // 32, args.size // 32, 512))
    fc6_conv = keras.layers.Conv2D(4096, 7, padding="same")
    fc6_gemm = kfcn.layers.FullyConnectedConv2D(4096, 7, padding="same")
    fc6_conv.build(pool5.shape)
    fc6_gemm.build(pool5.shape)
    fc6_gemm.set_weights(fc6_conv.get_weights())
    conv_fn = tf.function(lambda x: fc6_conv(x))
    gemm_fn = tf.function(lambda x: fc6_gemm(x))
    fc6_seconds = {
        "fc6 as keras Conv2D": best_seconds(lambda: conv_fn(pool5).numpy(), args.repeats),
        "fc6 as FullyConnectedConv2D": best_seconds(lambda: gemm_fn(pool5).numpy(), args.repeats),
    }
    fc6_flops = 2 * (args.size // 32) ** 2 * 7 * 7 * 512 * 4096

    print(f"machine: {platform.machine()}, {os.cpu_count()} logical CPUs, TF {tf.__version__}")
    print(f"matmul 4096^3 float32: {peak / 1e9:.1f} GFLOP/s")
    print(f"FCN-8s {args.backbone} {args.size}x{args.size}: {flops / 1e9:.1f} GFLOP per image")
    for name, seconds in fc6_seconds.items():
        rate = fc6_flops / seconds
        print(
            f"{name:32s} {seconds * 1e3:8.1f} ms  {rate / 1e9:6.1f} GFLOP/s  "
            f"{rate / peak:5.2f} of matmul"
        )
    for name, fn in runs.items():
        seconds = best_seconds(fn, args.repeats)
        rate = flops / seconds
        print(
            f"{name:32s} {seconds * 1e3:8.1f} ms  {rate / 1e9:6.1f} GFLOP/s  "
            f"{rate / peak:5.2f} of matmul"
        )


if __name__ == "__main__":
    main()
