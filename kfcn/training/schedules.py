"""Learning-rate schedules of the `schedule` setting."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import keras

SCHEDULES = ("poly", "fixed")


def learning_rate_schedule(
    name: str, learning_rate: float, total_steps: int, *, power: float = 0.9
) -> float | keras.optimizers.schedules.LearningRateSchedule:
    """Returns the learning rate for the optimizer.

    "fixed" is the constant rate of the FCN paper (Long et al. 2015, Sec. 4.3);
    "poly" is `learning_rate * (1 - step / total_steps) ** power`, the schedule
    of later segmentation work (ParseNet, DeepLab), reaching 0 at `total_steps`.

    Args:
        name: one of `SCHEDULES`.
        learning_rate: the initial (or constant) rate, > 0.
        total_steps: number of training steps of the whole run, >= 1.
        power: exponent of the poly schedule.

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
    if name == "fixed":
        return float(learning_rate)
    import keras

    return keras.optimizers.schedules.PolynomialDecay(
        initial_learning_rate=learning_rate,
        decay_steps=total_steps,
        end_learning_rate=0.0,
        power=power,
    )
