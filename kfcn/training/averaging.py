"""Exponential moving average of the trained weights (Polyak averaging).

The average `a` of each trainable variable `w` follows TensorFlow's
`tf.train.ExponentialMovingAverage` with `num_updates`: after optimizer step t
(t = 1, 2, ...)

    a_t = d_t * a_(t-1) + (1 - d_t) * w_t,   d_t = min(momentum, t / (t + 9)),

from `a_0 = w_0`, the initial weights. The warm-up `t / (t + 9)` keeps the
average of a short or young run close to its recent weights (at step 500 the
random initialisation weighs 0.998^500 = 37 % in a plain average, 2e-11 % with
the warm-up); the average spans about the last t / 9 steps until that horizon
reaches `1 / (1 - momentum)` steps.

Batch-norm statistics are not averaged: the average is validated with the
moving statistics of the trained weights (the TF Model Garden's default,
`trainable_weights_only=True`).

Reference: B. T. Polyak and A. B. Juditsky, "Acceleration of stochastic
approximation by averaging", SIAM J. Control Optim. 30(4), 1992.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import keras
import tensorflow as tf

#: The warm-up's offset: d_t = min(momentum, t / (t + WARMUP)).
WARMUP = 9


class _Refs:
    """Holds objects a `tf.Module` must not track (the model's own variables)."""

    def __init__(self, strategy: tf.distribute.Strategy, variables: list) -> None:
        self.strategy = strategy
        self.variables = variables


class WeightAverage(tf.Module):
    """The average of a model's trainable weights, kept beside them.

    Create it in the strategy's scope (the averages are mirrored like the
    weights), call `update()` once per optimizer step in cross-replica context
    (the train step's `tf.function`, after `strategy.run`), and checkpoint it
    with the model so a resumed run continues the same average.

    Args:
        model: the model whose `trainable_variables` are averaged.
        momentum: the largest d_t, in (0, 1), e.g. 0.998.

    Raises:
        ValueError: if `momentum` is not in (0, 1).
    """

    def __init__(self, model: keras.Model, momentum: float) -> None:
        super().__init__(name="weight_average")
        if not 0 < momentum < 1:
            raise ValueError(f"`momentum` must be in (0, 1). Received: momentum={momentum}")
        self.momentum = float(momentum)
        # The model's variables are checkpointed with the model, not here.
        self._refs = _Refs(tf.distribute.get_strategy(), list(model.trainable_variables))
        self.averages = [
            tf.Variable(variable.value, trainable=False, name=f"average_{index}")
            for index, variable in enumerate(self._refs.variables)
        ]
        self.updates = tf.Variable(0, dtype=tf.int64, trainable=False, name="updates")

    def update(self) -> None:
        """Folds the current weights into the average (one optimizer step)."""
        strategy = self._refs.strategy
        step = tf.cast(self.updates + 1, tf.float32)
        decay = tf.minimum(self.momentum, step / (step + WARMUP))

        def fold(average: tf.Variable, value: tf.Tensor) -> Any:
            decay_here = tf.cast(decay, average.dtype)
            return average.assign(decay_here * average + (1 - decay_here) * value)

        for average, variable in zip(self.averages, self._refs.variables):
            strategy.extended.update(average, fold, args=(variable.value,))
        self.updates.assign_add(1)

    def _swap(self) -> None:
        for average, variable in zip(self.averages, self._refs.variables):
            trained = variable.numpy()
            variable.assign(average.numpy())
            average.assign(trained)

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Puts the average into the model for the `with` block, then the trained weights back.

        The trained weights come back also when the block raises.
        """
        self._swap()
        try:
            yield
        finally:
            self._swap()

    def assign_to_model(self) -> None:
        """Overwrites the model's weights with the average (the end of training)."""
        for average, variable in zip(self.averages, self._refs.variables):
            variable.assign(average.numpy())
