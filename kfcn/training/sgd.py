"""SGD with momentum whose update is one fused kernel per variable.

Keras 3's `SGD.update_step` updates a variable with momentum as five
element-wise passes: `m * momentum`, `g * lr`, their difference assigned to
`m`, then `var += m`. Over VGG16's 134 M parameters (fc6 alone is 103 M)
these memory-bound passes cost about 50 ms of FCN-8s VGG16's 1.9 s training
step on the 2-core CPU (`python -m bench.train_step_breakdown`).
`ResourceApplyKerasMomentum` computes the same update in one pass:

    m = m * momentum - lr * g
    var += m                                  (nesterov: var += m * momentum - lr * g)

`SGD` is `keras.optimizers.SGD` with that kernel for dense gradients of
float variables: the same arguments, slots (so checkpoints of either load in
the other), config and results. Sparse gradients (`IndexedSlices`), plain
SGD without momentum and anything the kernel does not take go through
Keras's own `update_step`. The FCN reference solvers train with momentum 0.9
(Long, Shelhamer and Darrell, "Fully Convolutional Networks for Semantic
Segmentation", CVPR 2015, section 4.3).
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

_FUSED_DTYPES = ("float16", "bfloat16", "float32", "float64")


@keras.saving.register_keras_serializable(package="kfcn")
class SGD(keras.optimizers.SGD):
    """`keras.optimizers.SGD` whose momentum update is `ResourceApplyKerasMomentum`."""

    def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
        if self.momentum == 0 or isinstance(gradient, tf.IndexedSlices):
            return super().update_step(gradient, variable, learning_rate)
        var = variable.value if isinstance(variable, keras.Variable) else variable
        if keras.backend.standardize_dtype(var.dtype) not in _FUSED_DTYPES:
            return super().update_step(gradient, variable, learning_rate)
        m = self.momentums[self._get_variable_index(variable)]
        accumulator = m.value if isinstance(m, keras.Variable) else m
        # Under tf.distribute, `handle` is this device's copy inside `update()`.
        tf.raw_ops.ResourceApplyKerasMomentum(
            var=var.handle,
            accum=accumulator.handle,
            lr=tf.cast(learning_rate, var.dtype),
            grad=tf.cast(gradient, var.dtype),
            momentum=tf.cast(self.momentum, var.dtype),
            use_nesterov=bool(self.nesterov),
        )
        return None
