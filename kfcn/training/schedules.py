"""Learning-rate schedules of the `schedule` setting."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import keras
    import tensorflow as tf

SCHEDULES = ("poly", "fixed")


def learning_rate_schedule(
    name: str,
    learning_rate: float,
    total_steps: int,
    *,
    power: float = 0.9,
    end_learning_rate: float = 0.0,
    horizon: tf.Variable | None = None,
) -> float | keras.optimizers.schedules.LearningRateSchedule:
    """Returns the learning rate for the optimizer.

    "fixed" is the constant rate of the FCN paper (Long et al. 2015, Sec. 4.3);
    "poly" is `(learning_rate - end) * (1 - step / total_steps) ** power + end`,
    the schedule of later segmentation work (ParseNet, DeepLab; mmsegmentation's
    `PolyLR` with `eta_min=1e-4`, `power=0.9`), reaching `end_learning_rate` at
    `total_steps` and staying there.

    Args:
        name: one of `SCHEDULES`.
        learning_rate: the initial (or constant) rate, > 0.
        total_steps: number of training steps of the whole run, >= 1.
        power: exponent of the poly schedule.
        end_learning_rate: the poly schedule's final rate (mmseg's `eta_min`), in
            [0, learning_rate).
        horizon: a scalar variable holding the step at which "poly" ends, for a
            run whose length is decided while it trains (`kfcn train
            --time_budget`: the loop moves it); None: `total_steps`.

    Returns:
        A float for "fixed", a `LearningRateSchedule` called with the
        optimizer's iteration count for "poly".

    Raises:
        ValueError: on an unknown `name` or out-of-range arguments.
    """
    if name not in SCHEDULES:
        raise ValueError(f"`schedule` must be one of 'poly', 'fixed'. Received: schedule={name!r}")
    if not learning_rate > 0:
        raise ValueError(f"`learning_rate` must be > 0. Received: learning_rate={learning_rate}")
    if total_steps < 1:
        raise ValueError(f"`total_steps` must be >= 1. Received: total_steps={total_steps}")
    if not 0 <= end_learning_rate < learning_rate:
        raise ValueError(
            f"`end_learning_rate` must be in [0, learning_rate={learning_rate}). "
            f"Received: end_learning_rate={end_learning_rate}"
        )
    if name == "fixed":
        return float(learning_rate)
    if horizon is not None:
        from kfcn.training.time_budget import MovingHorizonPolyDecay

        return MovingHorizonPolyDecay(learning_rate, horizon, end_learning_rate, power)
    import keras

    return keras.optimizers.schedules.PolynomialDecay(
        initial_learning_rate=learning_rate,
        decay_steps=total_steps,
        end_learning_rate=float(end_learning_rate),
        power=power,
    )
