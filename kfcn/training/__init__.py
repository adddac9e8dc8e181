"""Training: `fit(TrainConfig(...))`, one custom loop for every distribution strategy.

Modules:
    config: `TrainConfig`, every setting of a run (the `kfcn train` flags, same names).
    job: `fit(config)`, the run as its stages: strategy, inputs, model, loop, results.
    run_dir: the run directory: config.yaml, seed on resume, model.keras, result.json.
    loop: the distributed train step, validation and the resumable loop.
    checkpoints: chief-only `tf.train.CheckpointManager` checkpoints.
    strategy: one_device, mirrored, multi_worker_mirrored; logical CPU replicas.
    schedules: the poly and fixed learning-rate schedules.

Example:
    ```python
    from kfcn.training import TrainConfig, fit

    result = fit(TrainConfig("runs/camvid", dataset="camvid", data_dir="/data/camvid",
                             backbone="mobilenetv2", crop_size=(256, 256), steps=1000))
    ```

Importing `kfcn.training` (and `TrainConfig`) does not import TensorFlow; `fit` does.
"""

from __future__ import annotations

from typing import Any

from kfcn.training.config import TrainConfig

__all__ = ["FitResult", "TrainConfig", "fit"]


def __getattr__(name: str) -> Any:
    # `fit` imports TensorFlow when called, but its module is light; loaded on first use.
    if name == "fit":
        from kfcn.training.job import fit

        return fit
    if name == "FitResult":
        from kfcn.training.run_dir import FitResult

        return FitResult
    raise AttributeError(f"module 'kfcn.training' has no attribute {name!r}")
