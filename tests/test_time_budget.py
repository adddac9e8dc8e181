"""A wall-clock budget for training (`kfcn train --time_budget`, kfcn.training.time_budget).

The projection and the moving-horizon poly schedule against hand arithmetic;
the loop under a fake clock that ticks one second per optimizer step (so the
step the budget ends on is known exactly), including a resume; and the
installed command on a real clock.
"""

from __future__ import annotations

import json
import os
import types

import keras
import numpy as np
import pytest
import tensorflow as tf
from test_cli_train import _error_line, _run, _train_args, folder  # noqa: F401 (fixture)
from test_training import _summaries, _train

from kfcn.training import loop, schedules, time_budget


def _poly(lr: float, step: int, horizon: int, power: float = 0.9, end: float = 0.0) -> float:
    return (lr - end) * (1 - min(step, horizon) / horizon) ** power + end


def test_moving_horizon_poly_is_poly_with_the_variables_current_horizon():
    horizon = tf.Variable(1000.0, dtype=tf.float64)
    schedule = schedules.learning_rate_schedule("poly", 0.01, 1000, horizon=horizon)
    assert isinstance(schedule, time_budget.MovingHorizonPolyDecay)
    for step in (0, 10, 500):
        assert float(schedule(step)) == pytest.approx(_poly(0.01, step, 1000), rel=1e-5)
    horizon.assign(600)  # the loop moves it: the next call uses the new end
    for step in (10, 300, 599, 600, 900):
        assert float(schedule(step)) == pytest.approx(_poly(0.01, step, 600), rel=1e-4, abs=1e-9)
    floor = schedules.learning_rate_schedule(
        "poly", 0.01, 10, horizon=horizon, end_learning_rate=1e-4, power=1.0
    )
    assert float(floor(300)) == pytest.approx(_poly(0.01, 300, 600, 1.0, 1e-4), rel=1e-5)
    assert float(floor(700)) == pytest.approx(1e-4)
    # "fixed" ignores the horizon: the budget then only stops the run.
    assert schedules.learning_rate_schedule("fixed", 0.01, 10, horizon=horizon) == 0.01


def test_projection_from_the_pace_after_the_first_interval():
    now = [0.0]
    budget = time_budget.TimeBudget(100.0, 1000, spent=10.0, clock=lambda: now[0])
    now[0] = 25.0  # 20 steps, tracing included: sets the origin, no pace yet
    assert budget.measure(20) == (35.0, 0.0)
    assert budget.last_step(20, 35.0, 0.0, 0.0, current=1000) == 1000
    now[0] = 35.0  # 20 more steps in 10 s: 0.5 s per step
    spent, pace = budget.measure(40)
    assert (spent, pace) == (45.0, 0.5)
    # 100 - 45 - 5 (the last validation and checkpoint) = 50 s left: 100 more steps.
    assert budget.last_step(40, spent, pace, 5.0, current=1000) == 140
    assert budget.last_step(40, spent, pace, 5.0, current=1000) == 140
    assert budget.last_step(40, spent, pace, 0.0, current=1000) == 150
    capped = time_budget.TimeBudget(100.0, 120, clock=lambda: 0.0)
    assert capped.last_step(40, 45.0, 0.5, 5.0, current=120) == 120
    assert budget.last_step(40, 99.0, 0.5, 5.0, current=1000) == 40  # spent: stop now
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="`time_budget` must be > 0 seconds. Received"):
            time_budget.TimeBudget(bad, 10)
    with pytest.raises(ValueError, match="`time_budget` must be > 0 seconds"):
        loop.LoopConfig(4, 2, 2, 2, time_budget=0.0)


def _budget_run(model_dir, monkeypatch, *, budget_s, total_steps, checkpoint_every=10):
    """`test_training._train` with a budget whose clock reads 1 s per optimizer step."""

    built = {}

    def fake_clock(model, optimizer, horizon):
        clock = types.SimpleNamespace(monotonic=lambda: float(optimizer.iterations.numpy()))
        monkeypatch.setattr(time_budget, "time", clock)
        built["horizon"] = horizon

    result, _, _ = _train(
        model_dir,
        total_steps,
        checkpoint_every=checkpoint_every,
        log_every=5,
        eval_every=20,
        time_budget=budget_s,
        on_built=fake_clock,
    )
    return result, built["horizon"]


def _logged_learning_rates(model_dir) -> dict[int, float]:
    return {
        step: float(tf.make_ndarray(value.tensor))
        for step, value in _summaries(os.path.join(model_dir, "logs", "train"))
        if value.tag == "learning_rate"
    }


def test_loop_ends_where_the_budget_runs_out_and_anneals_to_that_step(tmp_path, monkeypatch):
    result, horizon = _budget_run(tmp_path / "run", monkeypatch, budget_s=30.0, total_steps=1000)
    # 1 s per step, validation and checkpoints free: origin at step 5, pace known at
    # step 10 (1.0 s per step, 10 s spent): 20 steps left, the run ends at step 30.
    assert (result.start_step, result.final_step) == (0, 30)
    assert float(horizon.numpy()) == 30
    assert result.time_budget == {
        "minutes": 0.5,
        "spent_minutes": 0.5,
        "last_step": 30,
        "ended_by": "time_budget",
    }
    assert result.checkpoint.endswith("ckpt-30") and result.metrics["num_images"] == 4
    rates = _logged_learning_rates(tmp_path / "run")
    assert sorted(rates) == [5, 10, 15, 20, 25, 30]
    assert rates[5] == pytest.approx(_poly(0.05, 5, 1000), rel=1e-5)  # before the projection
    for step in (10, 15, 20, 25):
        assert rates[step] == pytest.approx(_poly(0.05, step, 30), rel=1e-4)
    assert rates[30] == pytest.approx(0.0, abs=1e-9)  # annealed on the last step


def test_the_step_cap_ends_a_run_inside_its_budget(tmp_path, monkeypatch):
    result, horizon = _budget_run(tmp_path / "run", monkeypatch, budget_s=600.0, total_steps=25)
    assert result.final_step == 25 and float(horizon.numpy()) == 25
    assert result.time_budget["ended_by"] == "steps"
    assert result.time_budget["spent_minutes"] == pytest.approx(25 / 60)


def test_a_resumed_run_counts_the_time_spent_before(tmp_path, monkeypatch):
    run = tmp_path / "run"
    _budget_run(run, monkeypatch, budget_s=30.0, total_steps=1000)
    # Back to the checkpoint of step 20, as if the process had died before step 30.
    os.remove(run / "checkpoints" / "ckpt-30.index")
    state = run / "checkpoints" / "checkpoint"
    state.write_text('model_checkpoint_path: "ckpt-20"\nall_model_checkpoint_paths: "ckpt-20"\n')
    result, horizon = _budget_run(run, monkeypatch, budget_s=30.0, total_steps=1000)
    # 20 s were spent before (in the checkpoint) and the horizon came back with it.
    assert (result.start_step, result.final_step) == (20, 30)
    assert result.time_budget["spent_minutes"] == pytest.approx(0.5)
    assert float(horizon.numpy()) == 30
    # A run its budget ended is complete: nothing more to train.
    again, _ = _budget_run(run, monkeypatch, budget_s=30.0, total_steps=1000)
    assert (again.start_step, again.final_step) == (30, 30)


def test_time_budget_setting_errors():
    from kfcn.training import TrainConfig

    for bad in (0.0, -5.0, float("nan")):
        with pytest.raises(ValueError, match=r"`time_budget` must be a number of minutes > 0"):
            TrainConfig("runs/x", time_budget=bad).validate()


@pytest.mark.slow
def test_kfcn_train_time_budget_ends_the_run_on_a_real_clock(tmp_path, folder):  # noqa: F811
    run = tmp_path / "budget"
    args = [a for a in _train_args(folder, run, 100000) if not a.startswith("--log_every")]
    budget_minutes = 0.5
    trained = _run([*args, "--log_every=2", f"--time_budget={budget_minutes}"], cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    result = json.load(open(run / "result.json"))
    budget = result["time_budget"]
    assert budget["ended_by"] == "time_budget" and budget["minutes"] == budget_minutes
    assert budget["last_step"] == result["final_step"] < 100000
    # It used the budget, and kept to it within a logging interval and a validation.
    assert 0.6 * budget_minutes < budget["spent_minutes"] < budget_minutes + 0.3
    assert f"of the {budget_minutes:g}-minute time budget, which ended the run" in trained.stdout
    assert "Time budget: 0.5 minutes (0.0 spent)" in trained.stderr
    model = keras.models.load_model(run / "model.keras")
    assert model.output_shape[-1] == 3
    # The same command again: complete, nothing trained, the files left as they were.
    stamp = os.path.getmtime(run / "model.keras")
    again = _run([*args, "--log_every=2", f"--time_budget={budget_minutes}"], cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (
        f"is already complete: its time budget of {budget_minutes:g} minutes ended it at step "
        f"{budget['last_step']}; nothing to train" in again.stdout
    )
    assert os.path.getmtime(run / "model.keras") == stamp
    assert np.isfinite(result["validation"]["mean_iou"])


def test_kfcn_train_time_budget_usage_error(tmp_path, folder):  # noqa: F811
    bad = _run([*_train_args(folder, tmp_path / "x", 2), "--time_budget=0"], cwd=tmp_path)
    assert bad.returncode == 2
    assert "time_budget" in _error_line(bad) and "must be a number of minutes > 0" in bad.stderr
