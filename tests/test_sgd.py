"""Tests of kfcn.training.sgd: the fused momentum update against the formula."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from kfcn.training.sgd import SGD


def _run(optimizer, grads, start):
    variables = [keras.Variable(v) for v in start]
    optimizer.build(variables)
    for step_grads in grads:
        optimizer.apply_gradients(zip([tf.constant(g) for g in step_grads], variables))
    return [v.numpy() for v in variables]


@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_update_follows_the_formula(nesterov):
    """Three steps equal numpy's m = mu m - lr g; w += m (nesterov: w += mu m - lr g)."""
    rng = np.random.default_rng(0)
    start = [rng.normal(size=(3, 4)).astype(np.float32), rng.normal(size=(4,)).astype(np.float32)]
    grads = [[rng.normal(size=v.shape).astype(np.float32) for v in start] for _ in range(3)]
    lr, mu = 0.1, 0.9
    expected = [v.copy() for v in start]
    momenta = [np.zeros_like(v) for v in start]
    for step_grads in grads:
        for i, g in enumerate(step_grads):
            momenta[i] = mu * momenta[i] - lr * g
            expected[i] += mu * momenta[i] - lr * g if nesterov else momenta[i]
    got = _run(SGD(lr, momentum=mu, nesterov=nesterov), grads, start)
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_same_slots_and_results_as_keras_sgd_and_checkpoints_load_in_either(tmp_path):
    rng = np.random.default_rng(1)
    start = [rng.normal(size=(5, 2)).astype(np.float32)]
    grads = [[rng.normal(size=(5, 2)).astype(np.float32)] for _ in range(2)]
    ours, theirs = SGD(0.05, momentum=0.9), keras.optimizers.SGD(0.05, momentum=0.9)
    np.testing.assert_allclose(_run(ours, grads, start)[0], _run(theirs, grads, start)[0], 1e-6)
    assert [v.shape for v in ours.variables] == [v.shape for v in theirs.variables]
    path = tf.train.Checkpoint(optimizer=theirs).save(str(tmp_path / "ckpt"))
    fresh = SGD(0.05, momentum=0.9)
    fresh.build([keras.Variable(np.zeros((5, 2), np.float32))])
    tf.train.Checkpoint(optimizer=fresh).restore(path).assert_existing_objects_matched()
    for a, b in zip(fresh.variables, theirs.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_without_momentum_and_inside_a_tf_function():
    """Momentum 0 is plain SGD (Keras's path); the fused path traces in a tf.function."""
    w = [np.ones((2, 2), np.float32)]
    g = [[np.full((2, 2), 0.5, np.float32)]]
    np.testing.assert_allclose(_run(SGD(0.2), g, w)[0], 1 - 0.2 * 0.5)
    variable = keras.Variable(np.ones((2,), np.float32))
    optimizer = SGD(0.5, momentum=0.5)
    optimizer.build([variable])

    @tf.function
    def step():
        optimizer.apply_gradients([(tf.ones((2,)), variable)])

    step()
    step()
    # m1 = -0.5, w1 = 0.5; m2 = -0.25 - 0.5 = -0.75, w2 = -0.25.
    np.testing.assert_allclose(variable.numpy(), [-0.25, -0.25])
