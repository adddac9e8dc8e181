"""A wall-clock budget for a training run (`kfcn train --time_budget MINUTES`).

"The best model this machine can train in an hour" is a question about time,
not steps: the same step count takes 51 minutes on one 2-core VM and 64 on
another (README's CamVid runs). With a budget the run decides its own length
while it trains. At every logging interval `TimeBudget` projects the step at
which the budget runs out from the pace so far (seconds per step since the
first interval, the periodic validations and checkpoints included, the
tracing of the first steps left out), keeping back the time the last
validation and checkpoint took for the final ones; the loop stops there and
`MovingHorizonPolyDecay` ends the "poly" learning rate on that step, so the
schedule anneals fully whatever the machine's speed. `--steps` (or
`--epochs`) still caps the run.

The time counted is the loop's own: from its start to the end of the final
validation, summed over resumed sessions (the time spent so far is part of
each checkpoint; work lost after the last checkpoint of an interrupted run is
done and counted again). Model building, the data's first read and writing
model.keras are outside it. A budgeted run is not repeatable step for step:
its length, and so its learning rates, depend on the machine's speed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import keras
import tensorflow as tf


class MovingHorizonPolyDecay(keras.optimizers.schedules.LearningRateSchedule):
    """The "poly" schedule with its last step read from a variable at every step.

    `(learning_rate - end) * (1 - min(step, h) / h) ** power + end` with `h`
    the variable's current value: Keras's `PolynomialDecay` with
    `decay_steps=h`, the schedule of ParseNet and DeepLab (mmsegmentation's
    `PolyLR`). The loop of a budgeted run sets `h` to the projected last step.

    Args:
        learning_rate: the initial rate.
        horizon: a scalar variable (any numeric dtype) holding the last step.
        end_learning_rate: the final rate.
        power: the exponent (0.9).
    """

    def __init__(
        self, learning_rate: float, horizon: tf.Variable, end_learning_rate: float, power: float
    ) -> None:
        self.learning_rate = float(learning_rate)
        self.horizon = horizon
        self.end_learning_rate = float(end_learning_rate)
        self.power = float(power)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        horizon = tf.maximum(tf.cast(self.horizon, tf.float32), 1.0)
        remaining = 1.0 - tf.minimum(step, horizon) / horizon
        span = self.learning_rate - self.end_learning_rate
        return span * tf.pow(remaining, self.power) + self.end_learning_rate

    def get_config(self) -> dict:
        return {
            "learning_rate": self.learning_rate,
            "horizon": float(self.horizon.numpy()),
            "end_learning_rate": self.end_learning_rate,
            "power": self.power,
        }


class TimeBudget:
    """Projects the last step of a run that must end within a wall-clock budget.

    Args:
        seconds: the budget, > 0.
        max_steps: the run's cap (`--steps`), >= 1.
        spent: seconds already spent by earlier sessions of the run.
        clock: monotonic seconds; default `time.monotonic`.

    Raises:
        ValueError: on a budget <= 0 (or not finite) or a cap < 1.
    """

    def __init__(
        self,
        seconds: float,
        max_steps: int,
        *,
        spent: float = 0.0,
        clock: Callable[[], float] | None = None,
    ) -> None:
        if not (math.isfinite(seconds) and seconds > 0):
            raise ValueError(f"`time_budget` must be > 0 seconds. Received: {seconds}")
        if max_steps < 1:
            raise ValueError(f"`max_steps` must be >= 1. Received: max_steps={max_steps}")
        self.seconds = float(seconds)
        self.max_steps = int(max_steps)
        self._clock = clock or time.monotonic
        self._spent_before = float(spent)
        self._session_start = self._clock()
        self._origin: tuple[float, int] | None = None

    def now(self) -> float:
        """The budget's clock (the loop times its validations and checkpoints with it)."""
        return self._clock()

    def spent(self) -> float:
        """Seconds spent by the run so far, earlier sessions included."""
        return self._spent_before + self._clock() - self._session_start

    def measure(self, step: int) -> tuple[float, float]:
        """`(spent seconds, seconds per step)` at `step`; the pace is 0 until known.

        The first call of a session sets the origin of the pace (the steps
        before it traced the step function); later calls average over
        everything since, pauses for validation and checkpoints included.
        """
        now = self._clock()
        if self._origin is None or step <= self._origin[1]:
            self._origin = self._origin or (now, step)
            return self.spent(), 0.0
        origin_time, origin_step = self._origin
        return self.spent(), (now - origin_time) / (step - origin_step)

    def last_step(
        self, step: int, spent: float, seconds_per_step: float, reserve: float, current: int
    ) -> int:
        """The step the run should end at, in [step, max_steps].

        Args:
            step: the step just done.
            spent: seconds spent (`measure`; averaged over workers).
            seconds_per_step: the pace (`measure`), 0 when not known yet.
            reserve: seconds kept back for the final validation and checkpoint.
            current: the last step projected so far (kept while the pace is unknown).
        """
        left = self.seconds - spent - reserve
        if left <= 0:
            return step
        if seconds_per_step <= 0:
            return max(step, min(current, self.max_steps))
        return max(step, min(self.max_steps, step + int(left // seconds_per_step)))
