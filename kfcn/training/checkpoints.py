"""Crash-safe checkpoints of the training state.

Checkpoints use `tf.train.CheckpointManager`: it writes the checkpoint's data and
index files first and only then replaces its `checkpoint` state file (atomically,
via a temporary file and a rename), so a process killed mid-save (SIGKILL
included) leaves the state file pointing at the last complete checkpoint.

Under multi-worker training every worker must call `save` (saving may run
collective ops), but only the chief writes into the model directory; the other
workers write into a temporary directory that they delete afterwards, as the
TensorFlow multi-worker guide recommends. All workers restore from the chief's
directory.
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any

import tensorflow as tf

logger = logging.getLogger(__name__)

CHECKPOINT_SUBDIR = "checkpoints"


class CheckpointMismatchError(ValueError):
    """The latest checkpoint does not fit the model/optimizer built from the current settings."""


class TrainingCheckpoint:
    """Saves and restores the training state of one worker.

    Args:
        model_dir: the run's directory; checkpoints go to `model_dir/checkpoints`.
        is_chief: whether this worker writes the real checkpoints.
        task_id: this worker's index, to name a non-chief's temporary directory.
        max_to_keep: number of recent checkpoints kept by the chief.
        **trackables: the objects to save, e.g. model=, optimizer=, step=.
    """

    def __init__(
        self,
        model_dir: str,
        *,
        is_chief: bool = True,
        task_id: int = 0,
        max_to_keep: int = 3,
        **trackables: Any,
    ) -> None:
        self.directory = os.path.join(model_dir, CHECKPOINT_SUBDIR)
        self.is_chief = is_chief
        self.checkpoint = tf.train.Checkpoint(**trackables)
        if is_chief:
            self._write_dir = self.directory
        else:
            self._write_dir = os.path.join(model_dir, f".worker_{task_id}_tmp_checkpoints")
        self._manager = tf.train.CheckpointManager(
            self.checkpoint, self._write_dir, max_to_keep=max_to_keep if is_chief else 1
        )

    @property
    def latest(self) -> str | None:
        """Path prefix of the chief's latest complete checkpoint, or None."""
        return tf.train.latest_checkpoint(self.directory)

    def restore(self) -> str | None:
        """Restores the chief's latest checkpoint, if any.

        Returns:
            The restored checkpoint's path prefix, or None when starting fresh.

        Raises:
            CheckpointMismatchError: if the checkpoint's variables do not fit.
        """
        path = self.latest
        if path is None:
            return None
        # Every saved object must find its counterpart: a mismatch means the
        # settings changed (other backbone/variant) and silently training a
        # half-restored model would be worse than failing.
        try:
            self.checkpoint.restore(path).assert_existing_objects_matched()
        except (ValueError, AssertionError, tf.errors.OpError) as e:
            raise CheckpointMismatchError(
                f"Cannot resume from {path}: it does not fit the model and optimizer built "
                f"from the current settings ({str(e).splitlines()[0][:300]}). Were `backbone`, "
                "`variant`, `optimizer`, `schedule` or `time_budget` changed since it was "
                "written? Rerun with the original settings (its config.yaml), or use a new "
                "`model_dir`."
            ) from e
        logger.info("Restored checkpoint %s", path)
        return path

    def save(self, step: int) -> str | None:
        """Saves the state as checkpoint number `step` (collective: call on all workers).

        Returns:
            The chief's checkpoint path prefix, or None on other workers.
        """
        path = self._manager.save(checkpoint_number=step)
        if not self.is_chief:
            shutil.rmtree(self._write_dir, ignore_errors=True)
            return None
        logger.info("Saved checkpoint %s", path)
        return path
