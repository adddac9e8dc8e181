"""What every benchmark shares: the machine, the matmul yardstick, timing, memory, FLOPs.

Kept free of kfcn imports so that the peer's process (keras_segmentation in its own
venv, `bench/peer_keras_segmentation.py`) measures with exactly the same code.

- `machine()`: CPU model, cores, bfloat16 units (avx512_bf16, AMX), TensorFlow version,
  date and load average: the record every figure carries.
- `matmul_rate(dtype)`: the machine's practical limit in this process, FLOP/s of a
  square matmul (float32, or bfloat16 where the CPU has bfloat16 units).
- `time_calls(fn)`: median and spread (interquartile range) of timed calls after warm-up.
- `graph_flops(concrete_function)`: FLOPs counted on the traced graph (2 x multiply-adds
  of convolutions, transposed convolutions and matmuls, plus one per BiasAdd output).
- `peak_rss_bytes()`: this process's resident-set high-water mark.
"""

from __future__ import annotations

import datetime
import os
import platform
import resource
import time
from collections.abc import Callable
from typing import Any

# Prefix of the line on which a case's process prints its records (JSON).
RECORDS_MARKER = "BENCH_RECORDS "

# Op types whose FLOPs are counted, and how (see `op_flops`).
COUNTED_OPS = (
    "Conv2D",
    "Conv2DBackpropInput",
    "DepthwiseConv2dNative",
    "MatMul",
    "BatchMatMulV2",
    "BatchMatMulV3",
    "BiasAdd",
)


def cpu_flags() -> set[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where it does not exist)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else `platform.processor()`."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def has_bfloat16_units(flags: set[str] | None = None) -> bool:
    """Whether the CPU computes bfloat16 natively (AVX512-BF16 or AMX-BF16)."""
    flags = cpu_flags() if flags is None else flags
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def machine() -> dict[str, Any]:
    """Describes the machine and software a figure was measured on."""
    import tensorflow as tf

    flags = cpu_flags()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        import keras

        keras_version = keras.__version__
    except ImportError:  # pragma: no cover
        keras_version = None
    return {
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "avx512f": "avx512f" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
        "amx_tile": "amx_tile" in flags,
        "tensorflow": tf.__version__,
        "keras": keras_version,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def summarize(seconds: list[float]) -> dict[str, float]:
    """Median, quartiles and interquartile range (seconds) of timed calls."""
    import numpy as np

    values = np.asarray(seconds, dtype=np.float64)
    q1, median, q3 = np.percentile(values, [25, 50, 75])
    return {
        "median_s": float(median),
        "q1_s": float(q1),
        "q3_s": float(q3),
        "iqr_s": float(q3 - q1),
        "min_s": float(values.min()),
        "max_s": float(values.max()),
        "repeats": int(values.size),
    }


def time_calls(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> dict[str, float]:
    """Times `fn()` `repeats` times after `warmup` untimed calls (tracing, allocator).

    `fn` must block until its result exists (call `.numpy()` on a tensor result).
    """
    if repeats < 1:
        raise ValueError(f"`repeats` must be >= 1. Received: repeats={repeats}")
    for _ in range(warmup):
        fn()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return summarize(seconds)


def matmul_rate(dtype: str = "float32", n: int = 4096, repeats: int = 5) -> dict[str, Any]:
    """The machine's practical limit: FLOP/s of an n x n x n matmul in a `tf.function`.

    Args:
        dtype: "float32" or "bfloat16".
        n: matrix size; 4096 fills the caches' worth of work of an FCN layer.
        repeats: timed calls after one warm-up; the median is used.

    Returns:
        `{"dtype", "n", "flop_per_s", "gflop_per_s", **time_calls summary}`.
    """
    import tensorflow as tf

    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"`dtype` must be 'float32' or 'bfloat16'. Received: dtype={dtype!r}")
    a = tf.cast(tf.random.normal((n, n)), dtype)
    b = tf.cast(tf.random.normal((n, n)), dtype)
    # A scalar out so the host copy does not count.
    step = tf.function(lambda: tf.reduce_sum(tf.cast(tf.linalg.matmul(a, b)[0, 0], tf.float32)))
    timing = time_calls(lambda: step().numpy(), repeats=repeats)
    rate = 2 * n**3 / timing["median_s"]
    return {"dtype": dtype, "n": n, "flop_per_s": rate, "gflop_per_s": rate / 1e9, **timing}


def peak_rss_bytes() -> int:
    """This process's resident-set high-water mark (Linux reports KiB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if platform.system() == "Darwin" else peak * 1024)


def _dims(shape: Any) -> list[int] | None:
    dims = shape.as_list() if shape.rank is not None else None
    if dims is None or any(d is None for d in dims):
        return None
    return dims


def op_flops(op: Any) -> int | None:
    """FLOPs of one graph op; 0 for uncounted types, None when shapes are unknown.

    Convolutions and matmuls count 2 x multiply-adds (the convention of the matmul
    yardstick, 2 n^3); BiasAdd one addition per output element. Batch norm,
    activations, pooling and element-wise adds are not counted (they are memory-bound
    and a few percent of an FCN's work).
    """
    kind = op.type
    if kind not in COUNTED_OPS:
        return 0
    out = _dims(op.outputs[0].shape)
    if out is None:
        return None
    if kind == "BiasAdd":
        count = 1
        for d in out:
            count *= d
        return count
    if kind in ("Conv2D", "DepthwiseConv2dNative"):
        kernel = _dims(op.inputs[1].shape)
        if kernel is None:
            return None
        kh, kw, in_c, mult = kernel
        if op.get_attr("data_format") == b"NCHW":
            b, _, h, w = out
        else:
            b, h, w, _ = out
        if kind == "Conv2D":
            return 2 * b * h * w * kh * kw * in_c * mult
        return 2 * b * h * w * kh * kw * in_c * mult  # out channels = in_c * mult
    if kind == "Conv2DBackpropInput":
        # A transposed convolution's forward: every input pixel scatters a
        # kh x kw x out_c patch per input channel.
        kernel, grad = _dims(op.inputs[1].shape), _dims(op.inputs[2].shape)
        if kernel is None or grad is None:
            return None
        kh, kw, out_c, in_c = kernel
        if op.get_attr("data_format") == b"NCHW":
            b, _, h, w = grad
        else:
            b, h, w, _ = grad
        return 2 * b * h * w * kh * kw * in_c * out_c
    # MatMul / BatchMatMul: the contracted dimension from the first operand.
    a = _dims(op.inputs[0].shape)
    if a is None:
        return None
    if kind == "MatMul":
        k = a[0] if op.get_attr("transpose_a") else a[1]
    else:
        k = a[-2] if op.get_attr("adj_x") else a[-1]
    count = 2 * k
    for d in out:
        count *= d
    return count


def graph_flops(function: Any) -> dict[str, Any]:
    """FLOPs counted on a traced graph (a `tf.function`'s concrete function or a graph).

    Nested function bodies (tf.cond / while bodies, called functions) are walked too.

    Returns:
        `{"total": int, "by_op": {op type: FLOPs}, "unknown_shape_ops": [op names]}`.
    """
    graph = getattr(function, "graph", function)
    by_op: dict[str, int] = {}
    unknown: list[str] = []
    seen: set[int] = set()

    def walk(g: Any) -> None:
        if id(g) in seen:
            return
        seen.add(id(g))
        for op in g.get_operations():
            flops = op_flops(op)
            if flops is None:
                unknown.append(op.name)
            elif flops:
                by_op[op.type] = by_op.get(op.type, 0) + flops
        for fn in getattr(g, "_functions", {}).values():
            inner = getattr(fn, "graph", None)
            if inner is not None:
                walk(inner)

    walk(graph)
    return {"total": int(sum(by_op.values())), "by_op": by_op, "unknown_shape_ops": unknown}


def forward_flops(model: Any, input_shape: tuple[int, ...]) -> dict[str, Any]:
    """FLOPs of `model(x, training=False)` for a float32 input of `input_shape` (with batch)."""
    import tensorflow as tf

    spec = tf.TensorSpec(input_shape, tf.float32)
    concrete = tf.function(lambda x: model(x, training=False)).get_concrete_function(spec)
    return graph_flops(concrete)
