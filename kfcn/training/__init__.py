"""Training: one custom loop for every distribution strategy, crash-safe checkpoints.

Modules:
    strategy: `--strategy` (one_device, mirrored, multi_worker_mirrored), logical CPU replicas.
    schedules: the poly and fixed learning-rate schedules.
    checkpoints: chief-only `tf.train.CheckpointManager` checkpoints, atomic model/JSON writes.
    loop: the distributed train step, validation (mean IoU) and the resumable loop.
    recipe: flags, data, model and final `model.keras` of `recipes/train_*.py`.

Submodules import TensorFlow; importing `kfcn.training` itself does not.
"""
