"""The run directory's bookkeeping: settings, seed on resume, final model, results.

    model_dir/
        config.yaml    the complete settings of the run (`kfcn train --config` reads it)
        checkpoints/   `kfcn.training.checkpoints` (resume)
        logs/          TensorBoard: train/ and validation/
        model.keras    the final model (float32), with the dataset's class names and palette
        result.json    steps, validation scores, throughput and what the settings resolved to
        best.json, best.weights.h5   the best validation's step and score, and its weights

Only the chief writes; every file is put in place atomically (`kfcn.files`), so
a resumed run or a reader never sees a half-written one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import re
from typing import Any

import yaml

from kfcn import files
from kfcn.training.config import TrainConfig

logger = logging.getLogger(__name__)

SETTINGS_FILE = "config.yaml"
MODEL_FILE = "model.keras"
RESULT_FILE = "result.json"
LOGS_DIR = "logs"

_HEADER = (
    "# kfcn train settings of this run (written by kfcn.training.fit).\n"
    "# Repeat it in another directory: kfcn train --config {path} --model_dir NEW_DIR\n"
)


@dataclasses.dataclass
class FitResult:
    """What `kfcn.training.fit` did.

    Attributes:
        model_dir: the run directory.
        model_path: the final model (`model_dir/model.keras`).
        start_step: the step training resumed from (0 for a fresh run).
        final_step: the step reached.
        total_steps: the steps the settings ask for.
        already_complete: the run had reached `total_steps` before this call, so
            nothing was trained and the files were left as they were.
        validation: the last validation scores (`kfcn.metrics.scores` keys plus
            "num_images"), or None.
        images_per_second: training throughput, or None.
        best: the best validation (`{"step", "metric", "value", "weights"}`: the
            weights file `model_dir/best.weights.h5`), or None.
        run: what the settings resolved to (seed, replicas, steps per epoch,
            classes, dtype policy, class weights).
        time_budget: with `time_budget`, `{"minutes", "spent_minutes",
            "last_step", "ended_by"}` (`kfcn.training.loop.TrainResult`), else None.
        is_chief: whether this process wrote the files (not in result.json).
    """

    model_dir: str
    model_path: str
    start_step: int
    final_step: int
    total_steps: int
    already_complete: bool = False
    validation: dict[str, Any] | None = None
    images_per_second: float | None = None
    best: dict[str, Any] | None = None
    run: dict[str, Any] = dataclasses.field(default_factory=dict)
    time_budget: dict[str, Any] | None = None
    is_chief: bool = True

    def to_dict(self) -> dict[str, Any]:
        """The result as JSON values (as written to result.json)."""
        values = dataclasses.asdict(self)
        del values["is_chief"]
        return values


class RunDirectory:
    """The files of one training run (see the module docstring).

    Args:
        path: the run directory (`model_dir`).
        is_chief: whether this process writes (the others only read).
    """

    def __init__(self, path: str, is_chief: bool = True) -> None:
        self.path = os.fspath(path)
        self.is_chief = is_chief
        self.settings_path = os.path.join(self.path, SETTINGS_FILE)
        self.model_path = os.path.join(self.path, MODEL_FILE)
        self.result_path = os.path.join(self.path, RESULT_FILE)
        self.logs_dir = os.path.join(self.path, LOGS_DIR)

    def previous_settings(self) -> dict[str, Any] | None:
        """The settings an earlier run wrote here, or None."""
        if not os.path.exists(self.settings_path):
            return None
        with open(self.settings_path, encoding="utf-8") as f:
            return yaml.safe_load(f) or {}

    def checkpoint_step(self) -> int:
        """The step of the latest complete checkpoint (0 without one)."""
        import tensorflow as tf

        from kfcn.training.checkpoints import CHECKPOINT_SUBDIR

        latest = tf.train.latest_checkpoint(os.path.join(self.path, CHECKPOINT_SUBDIR))
        match = re.search(r"ckpt-(\d+)$", latest or "")
        return int(match.group(1)) if match else 0

    def settle_seed(self, config: TrainConfig) -> TrainConfig:
        """The config with its seed settled (nothing is written).

        A resumed run keeps the seed its first run recorded, so that `seed=None`
        draws once per run, not once per process start.
        """
        previous = self.previous_settings() or {}
        seed = config.seed
        if previous.get("seed") is not None:
            if seed is not None and seed != previous["seed"]:
                logger.warning(
                    "Keeping seed %s of the run in %s (received seed=%s)",
                    previous["seed"],
                    self.path,
                    seed,
                )
            seed = previous["seed"]
        if seed is None:
            seed = random.SystemRandom().randrange(2**31)
        return dataclasses.replace(config, seed=int(seed))

    def record_settings(self, config: TrainConfig) -> None:
        """Writes the complete settings to config.yaml (chief only); logs what changed."""
        settings = config.to_dict()
        previous = self.previous_settings()
        if previous is not None:
            changed = {k: (previous.get(k), v) for k, v in settings.items() if previous.get(k) != v}
            if changed:
                logger.warning(
                    "Settings differ from the previous run in %s (old, new): %s",
                    self.settings_path,
                    changed,
                )
        if self.is_chief:
            text = _HEADER.format(path=self.settings_path) + yaml.safe_dump(
                settings, sort_keys=False, default_flow_style=None
            )
            files.write_text_atomically(text, self.settings_path)

    def is_complete(self, total_steps: int) -> bool:
        """Whether a previous run reached its end and wrote its final model.

        Its end is `total_steps`, or the step where its time budget ended it
        (result.json's `time_budget`, at the latest checkpoint's step).
        """
        if not os.path.exists(self.model_path):
            return False
        step = self.checkpoint_step()
        budget = self.recorded_budget() or {}
        ended_by_budget = budget.get("ended_by") == "time_budget"
        return step >= total_steps or (ended_by_budget and budget.get("last_step") == step)

    def recorded_budget(self) -> dict[str, Any] | None:
        """The `time_budget` record of the result.json written here, or None."""
        if not os.path.exists(self.result_path):
            return None
        with open(self.result_path, encoding="utf-8") as f:
            return json.load(f).get("time_budget")

    def save_model(self, model: Any, class_info: Any = None) -> None:
        """Writes the final model with `class_info` inside, atomically (chief only).

        Args:
            model: the trained `keras.Model` (float32).
            class_info: a `kfcn.metadata.ClassInfo` (class names and palette), or None.
        """
        if not self.is_chief:
            return
        if class_info is None:
            files.save_model_atomically(model, self.model_path)
        else:
            from kfcn import metadata

            metadata.save_model(model, self.model_path, class_info)
        logger.info("Wrote %s", self.model_path)

    def write_result(self, result: FitResult) -> None:
        """Writes result.json (chief only); NaN scores become null."""
        if self.is_chief:
            files.write_json_atomically(result.to_dict(), self.result_path)
