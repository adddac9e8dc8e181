"""Batch normalization whose training pass is TensorFlow's fused kernel.

Keras 3's `BatchNormalization` trains with separate ops: `moments` (two
reductions and a squared difference), then a multiply and an add per element,
and their gradients as more element-wise ops, reductions and a `Tile`. On the
CPU these memory-bound ops took half of FCN-8s MobileNetV2's training step
(`python -m bench.op_profile --mode train --precisions float32`: 550 of 1094
op-milliseconds at 256x256, batch 8). `FusedBatchNormV3` does the same work in
one pass forward and one backward (oneDNN's `_MklFusedBatchNormV3` on CPU,
cuDNN's on GPU).

`FusedBatchNormalization` is `keras.layers.BatchNormalization` with that
kernel in training; inference, masks, renormalization, statistics synchronized
over several replicas and layouts the kernel cannot take (an axis other than the last of a 4-D
input, epsilon below the kernel's 1.001e-5) go through Keras's own code, so
exports and every other path are unchanged. `fuse_batch_norm` switches the
BatchNormalization layers of a built model (Keras Applications' included) to
it in place, or back: same weights, same config, same names.

Ioffe and Szegedy, "Batch Normalization", ICML 2015.
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

# FusedBatchNormV3 rejects a smaller epsilon (cuDNN's CUDNN_BN_MIN_EPSILON).
_MIN_EPSILON = 1.001e-5
_FUSED_DTYPES = ("float16", "bfloat16", "float32")


def _one_replica() -> bool:
    # Synchronized statistics over one replica are the replica's own (Keras's
    # all-reduce is then the identity): the fused kernel computes them.
    context = tf.distribute.get_replica_context()
    return context is None or context.num_replicas_in_sync == 1


@keras.saving.register_keras_serializable(package="kfcn")
class FusedBatchNormalization(keras.layers.BatchNormalization):
    """`keras.layers.BatchNormalization`, trained with the fused kernel.

    The same arguments, weights, config and results as Keras's layer: the
    normalization uses the batch's biased variance and the moving averages
    are updated as `moving = moving * momentum + batch * (1 - momentum)` with
    that biased variance (the kernel's Bessel-corrected variance is scaled
    back). Only `training=True` on a trainable layer with a 4-D channels-last
    input and no mask takes the fused kernel, and a `synchronized` layer only
    when one replica is in sync (its statistics are then its own).
    """

    def _fusable(self, inputs, training, mask) -> bool:
        axis = self.axis if self.axis >= 0 else self.axis + len(inputs.shape)
        return (
            bool(training)
            and self.trainable
            and mask is None
            and not self.renorm
            and (not self.synchronized or _one_replica())
            and len(inputs.shape) == 4
            and axis == 3
            and self.epsilon >= _MIN_EPSILON
            and keras.backend.standardize_dtype(inputs.dtype) in _FUSED_DTYPES
        )

    def call(self, inputs, training=None, mask=None):
        if not self._fusable(inputs, training, mask):
            return super().call(inputs, training=training, mask=mask)
        channels = inputs.shape[-1]
        gamma = tf.cast(self.gamma, "float32") if self.scale else tf.ones((channels,))
        beta = tf.cast(self.beta, "float32") if self.center else tf.zeros((channels,))
        outputs, mean, variance, _, _, _ = tf.raw_ops.FusedBatchNormV3(
            x=inputs,
            scale=gamma,
            offset=beta,
            mean=tf.constant([], "float32"),
            variance=tf.constant([], "float32"),
            epsilon=self.epsilon,
            data_format="NHWC",
            is_training=True,
        )
        # The kernel returns the unbiased variance n/(n-1) * biased (for its own
        # moving averages); Keras averages the biased one.
        shape = tf.shape(inputs)
        count = tf.cast(shape[0] * shape[1] * shape[2], "float32")
        variance = variance * tf.maximum(count - 1.0, 0.0) / tf.maximum(count, 1.0)
        mean = tf.stop_gradient(mean)
        variance = tf.stop_gradient(variance)
        momentum = self.momentum
        self.moving_mean.assign(
            tf.cast(self.moving_mean, "float32") * momentum + mean * (1.0 - momentum)
        )
        self.moving_variance.assign(
            tf.cast(self.moving_variance, "float32") * momentum + variance * (1.0 - momentum)
        )
        return tf.cast(outputs, self.compute_dtype)


def fuse_batch_norm(model: Any, fused: bool = True) -> int:
    """Switches the BatchNormalization layers of `model` to the fused one, or back.

    In place: each layer keeps its weights, config and name and becomes a
    `FusedBatchNormalization` (so a saved model names that class; `import kfcn`
    registers it). Nested models are searched too. kfcn's builders call this;
    `fused=False` turns their layers back into Keras's own (to compare, or to
    save a model that loads without kfcn's classes). Other subclasses of
    BatchNormalization are left alone.

    Args:
        model: A built Keras model (or layer).
        fused: True: Keras's layers become fused ones; False: the reverse.

    Returns:
        The number of layers switched.
    """
    source, target = keras.layers.BatchNormalization, FusedBatchNormalization
    if not fused:
        source, target = target, source
    switched = 0
    for layer in model._flatten_layers(include_self=True, recursive=True):
        if type(layer) is source:
            layer.__class__ = target
            switched += 1
    return switched
