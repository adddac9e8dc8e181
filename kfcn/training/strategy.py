"""Distribution strategies for training: one device, mirrored, multi-worker mirrored.

Every strategy is driven by the same custom training loop (`kfcn.training.loop`),
because Keras 3's `Model.fit` fails under `MultiWorkerMirroredStrategy`
(keras-team/keras#20585, tensorflow/tensorflow#72388).

On a machine without GPUs, `configure_cpu_replicas` splits the CPU into logical
devices so that `MirroredStrategy` runs a real multi-replica all-reduce on CPU.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import tensorflow as tf

# TensorFlow is imported inside the functions: the command reads STRATEGIES for
# its flags, and `kfcn train --help` should not wait for TensorFlow to load.
STRATEGIES = ("one_device", "mirrored", "multi_worker_mirrored")

logger = logging.getLogger(__name__)


def configure_cpu_replicas(num_replicas: int) -> None:
    """Splits the physical CPU into `num_replicas` logical devices.

    Must run before TensorFlow initializes its runtime (before any op or
    device query that creates a context), because logical devices cannot be
    changed afterwards. Does nothing when `num_replicas` is 1 or GPUs exist
    (GPUs are the replicas then).

    Args:
        num_replicas: number of logical CPU devices to create (>= 1).

    Raises:
        ValueError: if `num_replicas` < 1.
        RuntimeError: if the TensorFlow runtime is already initialized with a
            different number of logical CPU devices.
    """
    import tensorflow as tf

    if num_replicas < 1:
        raise ValueError(f"`cpu_replicas` must be >= 1. Received: cpu_replicas={num_replicas}")
    if num_replicas == 1 or tf.config.list_physical_devices("GPU"):
        return
    cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration() for _ in range(num_replicas)]
        )
    except RuntimeError as e:
        existing = len(tf.config.list_logical_devices("CPU"))
        if existing == num_replicas:
            return
        raise RuntimeError(
            f"`cpu_replicas={num_replicas}` must be set before TensorFlow initializes; the "
            f"runtime already has {existing} logical CPU device(s)."
        ) from e


@dataclasses.dataclass(frozen=True)
class WorkerInfo:
    """Where this process sits in the cluster.

    Attributes:
        task_type: "worker"/"chief" under multi-worker training, else None.
        task_id: index of this task within its type (0 when not multi-worker).
        worker_index: index of this process among all workers, chief first,
            in [0, num_workers); it selects this worker's validation shard.
        num_workers: number of worker processes training together.
        is_chief: whether this process writes checkpoints, summaries and the model.
    """

    task_type: str | None
    task_id: int
    worker_index: int
    num_workers: int
    is_chief: bool


def create_strategy(
    name: str, *, cpu_replicas: int = 1, collective_timeout: float | None = None
) -> tf.distribute.Strategy:
    """Creates the `tf.distribute.Strategy` named by the `strategy` setting.

    Args:
        name: one of `STRATEGIES`.
        cpu_replicas: replicas for "mirrored" on a machine without GPUs; the CPU
            must have been split with `configure_cpu_replicas` beforehand.
        collective_timeout: seconds after which a multi-worker collective
            (all-reduce) fails instead of waiting forever for a dead peer.

    Returns:
        The strategy. "multi_worker_mirrored" reads the cluster from `TF_CONFIG`.

    Raises:
        ValueError: on an unknown `name`.
    """
    import tensorflow as tf

    if name not in STRATEGIES:
        raise ValueError(
            f"`strategy` must be one of {', '.join(repr(s) for s in STRATEGIES)}. "
            f"Received: strategy={name!r}"
        )
    if name == "multi_worker_mirrored":
        # Created before anything lists devices: listing initializes the runtime,
        # and collective ops must be configured before that.
        if not os.environ.get("TF_CONFIG"):
            logger.warning("TF_CONFIG is not set: multi_worker_mirrored runs as a single worker.")
        options = tf.distribute.experimental.CommunicationOptions(
            timeout_seconds=collective_timeout
        )
        return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    gpus = tf.config.list_logical_devices("GPU")
    if name == "one_device":
        return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")
    if name == "mirrored":
        if gpus:
            return tf.distribute.MirroredStrategy()
        cpus = [d.name for d in tf.config.list_logical_devices("CPU")][:cpu_replicas]
        if len(cpus) < cpu_replicas:
            raise RuntimeError(
                f"`cpu_replicas={cpu_replicas}` but only {len(cpus)} logical CPU device(s) "
                "exist; call configure_cpu_replicas() before any TensorFlow op."
            )
    return tf.distribute.MirroredStrategy(devices=cpus)


def worker_info(strategy: tf.distribute.Strategy) -> WorkerInfo:
    """Returns this process's role, following the TF multi-worker guide's rule.

    The chief is the task of type "chief", or worker 0 when the cluster has no
    "chief" task, or the only process when training is not multi-worker.
    """
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return WorkerInfo(task_type=None, task_id=0, worker_index=0, num_workers=1, is_chief=True)
    cluster = resolver.cluster_spec().as_dict()
    task_type, task_id = resolver.task_type, int(resolver.task_id or 0)
    is_chief = task_type == "chief" or (
        task_type == "worker" and task_id == 0 and "chief" not in cluster
    )
    num_chiefs = len(cluster.get("chief", []))
    num_workers = num_chiefs + len(cluster.get("worker", []))
    worker_index = task_id if task_type == "chief" else num_chiefs + task_id
    return WorkerInfo(task_type, task_id, worker_index, max(num_workers, 1), is_chief)


def tf_config_for(cluster_ports: list[int], index: int) -> str:
    """Returns a `TF_CONFIG` JSON for worker `index` of a cluster on 127.0.0.1.

    A convenience for running several workers on one machine (tests, trials).
    """
    workers = [f"127.0.0.1:{port}" for port in cluster_ports]
    return json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}})
