"""Tests of kfcn.training across processes: 2-replica all-reduce, SIGKILL + resume,
two workers on 127.0.0.1 (one killed mid-run, then both rerun), NaN and bad flags
through the command line (`kfcn train` with a tiny model, as a preset script).

Each test starts fresh Python processes: logical CPU devices and collective ops
must be configured before TensorFlow initializes, and a killed process is the
point of the resume tests.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import yaml
from PIL import Image

PYTHON = sys.executable
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A preset of `kfcn train` like recipes/train_camvid.py whose model is a tiny BN-free
# stand-in with the builder's contract; `--step_delay` makes each step take a while so
# that a test can kill the process mid-run.
DRIVER = textwrap.dedent(
    """
    import argparse, functools, sys, time
    import keras, tensorflow as tf
    import kfcn.cli
    from kfcn.cli import train

    own = argparse.ArgumentParser()
    own.add_argument("--step_delay", type=float, default=0.0)
    # This process's time-budget clock runs this many times faster than the real one.
    own.add_argument("--budget_clock_rate", type=float, default=1.0)
    options, argv = own.parse_known_args()
    if options.budget_clock_rate != 1.0:
        import types
        from kfcn.training import time_budget
        rate = options.budget_clock_rate
        time_budget.time = types.SimpleNamespace(monotonic=lambda: rate * time.monotonic())

    class Delay(keras.layers.Layer):
        def __init__(self, seconds=0.0, **kwargs):
            super().__init__(**kwargs)
            self.seconds = seconds

        def call(self, x):
            def sleep(v):
                time.sleep(self.seconds)
                return v
            y = tf.numpy_function(sleep, [x], x.dtype, stateful=True)
            return tf.ensure_shape(y, x.shape)

        def get_config(self):
            return {**super().get_config(), "seconds": self.seconds}

    def tiny_model(config, num_classes):
        images = keras.Input((None, None, 3))
        x = keras.layers.Rescaling(1 / 255.0)(images)
        x = Delay(options.step_delay)(x)
        x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv1")(x)
        return keras.Model(images, keras.layers.Conv2D(num_classes, 1, name="score")(x))

    if __name__ == "__main__":
        train.run = functools.partial(train.run, model_fn=tiny_model)
        defaults = dict(dataset="camvid", backbone="tiny", batch_size=4, crop_size="32x32",
                        scale_range="1,1", optimizer="sgd", learning_rate=0.01, log_every=1,
                        weights="none", num_overlays=0)
        sys.exit(kfcn.cli.main(["train", *argv], prog="driver.py", defaults=defaults))
    """
)

EQUIVALENCE = textwrap.dedent(
    """
    import json
    from kfcn.training.strategy import configure_cpu_replicas, create_strategy
    configure_cpu_replicas(2)  # before any TensorFlow op
    import keras, numpy as np, tensorflow as tf
    from kfcn.training import loop
    from kfcn.training.averaging import WeightAverage
    from kfcn.training.sgd import SGD

    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (12, 6, 6, 3)).astype(np.float32)
    labels = rng.integers(0, 3, (12, 6, 6)).astype(np.int32)
    # The two replicas of each global batch of 4 see very different valid-pixel
    # counts: a per-replica mean would weight their pixels differently.
    for start in range(0, 12, 4):
        labels[start:start + 2, 1:] = 255

    def model_and_optimizer(strategy):
        with strategy.scope():
            inputs = keras.Input((None, None, 3))
            x = keras.layers.Rescaling(1 / 255.0)(inputs)
            x = keras.layers.Conv2D(5, 3, padding="same", activation="relu",
                                    kernel_initializer=keras.initializers.GlorotUniform(1))(x)
            x = keras.layers.Conv2D(3, 1, kernel_initializer=keras.initializers.GlorotUniform(2))(x)
            # kfcn's fused SGD, as `kfcn train` uses: each replica updates its own copy.
            return keras.Model(inputs, x), SGD(0.5, momentum=0.9)

    def run(strategy):
        model, optimizer = model_and_optimizer(strategy)
        with strategy.scope():
            average = WeightAverage(model, 0.2)
        step = loop.make_train_step(strategy, model, optimizer, weight_decay=0.01,
                                    class_weights=[1.0, 2.0, 0.5], weight_average=average)
        data = strategy.distribute_datasets_from_function(
            lambda ctx: tf.data.Dataset.from_tensor_slices((images, labels)).batch(
                ctx.get_per_replica_batch_size(4), drop_remainder=True))
        iterator = iter(data)
        # Independent: the average in numpy from the weights after each step (the
        # model has no non-trainable weights), d_t = min(0.2, t / (t + 9)).
        expected = model.get_weights()
        losses = []
        for t in range(1, 4):
            losses.append(float(step(iterator)[0]))
            d = min(0.2, t / (t + 9))
            expected = [d * a + (1 - d) * w for a, w in zip(expected, model.get_weights())]
        with average.swapped_in():
            averaged = model.get_weights()
        return {"replicas": strategy.num_replicas_in_sync, "losses": losses,
                "devices": list(strategy.extended.worker_devices),
                "weights": [w.tolist() for w in model.get_weights()],
                "averaged": [w.tolist() for w in averaged],
                "expected_average": [w.tolist() for w in expected]}

    print(json.dumps({"mirrored": run(create_strategy("mirrored", cpu_replicas=2)),
                      "one_device": run(create_strategy("one_device"))}))
    """
)


def _write_camvid(root, num_train=8, num_val=4, size=32):
    """A CamVid-layout folder (SegNet lists, void label 11) of random images."""
    rng = np.random.default_rng(0)
    for split, count in (("train", num_train), ("val", num_val)):
        os.makedirs(root / split)
        os.makedirs(root / f"{split}annot")
        lines = []
        for i in range(count):
            image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            label = (image[..., 0] // 64).astype(np.uint8)  # classes 0..3, learnable
            label[:2] = 11  # void
            Image.fromarray(image).save(root / split / f"{i}.png")
            Image.fromarray(label, mode="L").save(root / f"{split}annot" / f"{i}.png")
            lines.append(f"{split}/{i}.png {split}annot/{i}.png")
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")


@pytest.fixture
def camvid(tmp_path):
    root = tmp_path / "camvid"
    _write_camvid(root)
    return root


@pytest.fixture
def driver(tmp_path):
    path = tmp_path / "driver.py"
    path.write_text(DRIVER)
    return str(path)


def _env(**extra):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=REPO)
    env.pop("TF_CONFIG", None)
    env.update(extra)
    return env


def _latest_step(model_dir):
    state = os.path.join(model_dir, "checkpoints", "checkpoint")
    if not os.path.exists(state):
        return 0
    match = re.search(r'^model_checkpoint_path: "ckpt-(\d+)"', open(state).read(), re.M)
    return int(match.group(1)) if match else 0


def _wait_for_checkpoint(model_dir, at_least, processes, timeout=120):
    deadline = time.monotonic() + timeout
    while _latest_step(model_dir) < at_least:
        for p in processes:
            if p.poll() is not None:
                raise AssertionError(f"process ended early:\n{p.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no checkpoint >= {at_least} within {timeout} s")
        time.sleep(0.1)


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _tf_config(ports, index):
    return json.dumps(
        {
            "cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
            "task": {"type": "worker", "index": index},
        }
    )


def _resumed_step(log):
    match = re.search(r"Resuming from step (\d+)", log)
    return int(match.group(1)) if match else None


@pytest.mark.slow
def test_mirrored_two_cpu_replicas_equal_one_device(tmp_path):
    """A real 2-replica all-reduce gives one device's result on the same global batch,
    and the weight average (updated on each replica's copy) follows its formula."""
    script = tmp_path / "equivalence.py"
    script.write_text(EQUIVALENCE)
    out = subprocess.run(
        [PYTHON, str(script)], capture_output=True, text=True, env=_env(), timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    mirrored, single = result["mirrored"], result["one_device"]
    assert mirrored["replicas"] == 2 and single["replicas"] == 1
    assert len(set(mirrored["devices"])) == 2  # two logical CPU devices
    np.testing.assert_allclose(mirrored["losses"], single["losses"], rtol=1e-5)
    for a, b in zip(mirrored["weights"], single["weights"]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    for run in (mirrored, single):
        for a, b in zip(run["averaged"], run["expected_average"]):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    # The weights moved: the comparison is not between two untouched initializations.
    assert single["losses"][0] != pytest.approx(single["losses"][-1], rel=1e-3)


VALIDATION = textwrap.dedent(
    """
    import json
    from kfcn.training.strategy import configure_cpu_replicas, create_strategy
    configure_cpu_replicas(2)  # before any TensorFlow op
    import keras, numpy as np, tensorflow as tf
    from kfcn.training import loop

    devices = []  # where each traced forward pass was placed

    class Where(keras.layers.Layer):
        def call(self, x):
            y = tf.identity(x)
            devices.append(y.device)
            return y

    strategy = create_strategy("mirrored", cpu_replicas=2)
    with strategy.scope():
        inputs = keras.Input((None, None, 3))
        x = Where()(keras.layers.Rescaling(1 / 255.0)(inputs))
        x = keras.layers.Conv2D(6, 3, padding="same", activation="relu",
                                kernel_initializer=keras.initializers.GlorotUniform(1))(x)
        model = keras.Model(inputs, keras.layers.Conv2D(
            4, 1, bias_initializer=keras.initializers.RandomNormal(0, 0.5, seed=3),
            kernel_initializer=keras.initializers.GlorotUniform(2))(x))
    rng = np.random.default_rng(0)
    # Five images of three sizes: the replicas get different shapes, the last pair is short.
    sizes = [(8, 10), (12, 6), (8, 10), (7, 9), (12, 6)]
    images = [rng.uniform(0, 255, (h, w, 3)).astype(np.float32) for h, w in sizes]
    labels = [rng.integers(0, 4, (h, w)).astype(np.int32) for h, w in sizes]
    labels[1][:3] = 255
    # Independent: each image alone through the model, argmax, numpy confusion.
    expected = np.zeros((4, 4), np.int64)
    for image, label in zip(images, labels):
        predicted = np.argmax(model(image[None], training=False).numpy()[0], -1)
        keep = label != 255
        np.add.at(expected, (label[keep], predicted[keep]), 1)
    del devices[:]
    seen = []
    dataset = [(image[None], label[None], f"img{i}") for i, (image, label)
               in enumerate(zip(images, labels))]
    scores = loop.validate(model, dataset, num_classes=4, strategy=strategy,
                           on_image=lambda n, name, *rest: seen.append(name))
    print(json.dumps({"confusion": scores["confusion"], "expected": expected.tolist(),
                      "num_images": scores["num_images"], "seen": seen,
                      "devices": devices,
                      "replica_devices": list(strategy.extended.worker_devices)}))
    """
)


def test_validation_spreads_whole_images_over_two_local_replicas(tmp_path):
    """validate() under MirroredStrategy runs on both devices and scores every image once."""
    script = tmp_path / "validation.py"
    script.write_text(VALIDATION)
    out = subprocess.run(
        [PYTHON, str(script)], capture_output=True, text=True, env=_env(), timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["num_images"] == 5
    assert result["seen"] == [f"img{i}" for i in range(5)]
    assert result["confusion"] == result["expected"]
    # Every traced forward pass ran on one of the two replica devices, and both were used.
    assert set(result["devices"]) == set(result["replica_devices"])
    assert len(result["replica_devices"]) == 2


@pytest.mark.slow
def test_sigkill_then_rerun_resumes_from_the_checkpoint(tmp_path, camvid, driver):
    model_dir = str(tmp_path / "run")
    command = [
        PYTHON,
        driver,
        f"--model_dir={model_dir}",
        f"--data_dir={camvid}",
        "--steps=40",
        "--checkpoint_every=3",
        "--step_delay=0.15",
        "--eval_every=20",
    ]
    first = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=_env())
    _wait_for_checkpoint(model_dir, 6, [first])
    first.send_signal(signal.SIGKILL)
    first.wait()
    first.stderr.close()
    saved = _latest_step(model_dir)
    assert 6 <= saved < 40
    second = subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert _resumed_step(second.stderr) == saved
    assert f"step {saved + 1}/40" in second.stderr
    result = json.load(open(os.path.join(model_dir, "result.json")))
    assert (result["start_step"], result["final_step"]) == (saved, 40)
    assert result["validation"]["num_images"] == 4
    assert os.path.exists(os.path.join(model_dir, "model.keras"))
    settings = yaml.safe_load(open(os.path.join(model_dir, "config.yaml")))
    assert settings["steps"] == 40 and settings["strategy"] == "one_device"
    assert result["run"]["total_steps"] == 40
    assert re.search(r"step \d+/40 epoch \d+/20: loss [\d.]+ .* images/s, ETA", second.stderr)


@pytest.mark.slow
def test_two_workers_train_survive_a_killed_worker_and_resume(tmp_path, camvid, driver):
    model_dir = str(tmp_path / "run")
    ports = _free_ports(2)
    command = [
        PYTHON,
        driver,
        f"--model_dir={model_dir}",
        f"--data_dir={camvid}",
        "--steps=40",
        "--checkpoint_every=3",
        "--step_delay=0.15",
        "--eval_every=20",
        "--strategy=multi_worker_mirrored",
        "--collective_timeout=30",
        "--step_timeout=60",
    ]

    def start():
        return [
            subprocess.Popen(
                command,
                stderr=subprocess.PIPE,
                text=True,
                env=_env(TF_CONFIG=_tf_config(ports, i)),
            )
            for i in range(2)
        ]

    chief, worker = start()
    try:
        _wait_for_checkpoint(model_dir, 6, [chief, worker])
        worker.send_signal(signal.SIGKILL)
        worker.wait()
        killed_at = time.monotonic()
        # The survivor must not hang: it exits with a clear error.
        chief.wait(timeout=150)
        waited = time.monotonic() - killed_at
        chief_log = chief.stderr.read()
    finally:
        for p in (chief, worker):
            if p.poll() is None:
                p.kill()
                p.wait()
    assert chief.returncode in (3, 4), chief_log[-3000:]
    assert "peer worker has probably died" in chief_log, chief_log[-3000:]
    assert waited < 150
    saved = _latest_step(model_dir)
    assert 6 <= saved < 40

    chief, worker = start()
    try:
        chief_log, worker_log = (p.communicate(timeout=300)[1] for p in (chief, worker))
    finally:
        for p in (chief, worker):
            if p.poll() is None:
                p.kill()
    assert chief.returncode == 0, chief_log[-3000:]
    assert worker.returncode == 0, worker_log[-3000:]
    assert _resumed_step(chief_log) == saved
    assert _resumed_step(worker_log) == saved  # restored from the chief's checkpoint
    assert "2 replica(s) (multi_worker_mirrored)" in chief_log
    result = json.load(open(os.path.join(model_dir, "result.json")))
    assert (result["start_step"], result["final_step"]) == (saved, 40)
    # Only the chief wrote into model_dir; the worker removed its temporary directory.
    assert sorted(os.listdir(model_dir)) == [
        "best.json",
        "best.weights.h5",
        "checkpoints",
        "config.yaml",
        "logs",
        "model.keras",
        "result.json",
        "training_curves.png",
    ]
    assert _latest_step(model_dir) == 40


@pytest.mark.slow
def test_two_workers_with_different_clocks_end_a_budgeted_run_at_the_same_step(
    tmp_path, camvid, driver
):
    """The workers average their budget clocks: the one whose clock runs 3x fast
    would, on its own, stop long before the other and leave it hanging in a
    collective."""
    model_dir = str(tmp_path / "run")
    ports = _free_ports(2)
    command = [
        PYTHON,
        driver,
        f"--model_dir={model_dir}",
        f"--data_dir={camvid}",
        "--steps=100000",
        "--time_budget=0.5",
        "--log_every=2",
        "--checkpoint_every=10",
        "--eval_every=20",
        "--step_delay=0.1",
        "--strategy=multi_worker_mirrored",
        "--collective_timeout=30",
        "--step_timeout=60",
    ]
    processes = [
        subprocess.Popen(
            [*command, f"--budget_clock_rate={rate}"],
            stderr=subprocess.PIPE,
            text=True,
            env=_env(TF_CONFIG=_tf_config(ports, i)),
        )
        for i, rate in enumerate((1.0, 3.0))
    ]
    try:
        logs = [p.communicate(timeout=300)[1] for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
    for p, log in zip(processes, logs):
        assert p.returncode == 0, log[-3000:]
    budget = json.load(open(os.path.join(model_dir, "result.json")))["time_budget"]
    assert budget["ended_by"] == "time_budget" and budget["last_step"] < 100000
    # result.json holds the chief's own clock; the mean of the two runs 2x faster,
    # so the budget ran out after about a quarter of a real minute.
    assert 0.1 < budget["spent_minutes"] < 0.5
    last = [re.findall(r"step (\d+)/(\d+) epoch", log)[-1] for log in logs]
    assert last[0] == last[1] == (str(budget["last_step"]),) * 2, last
    assert _latest_step(model_dir) == budget["last_step"]


@pytest.mark.slow
def test_nan_from_the_command_line_exits_nonzero_and_keeps_the_checkpoint(tmp_path, camvid, driver):
    model_dir = str(tmp_path / "run")
    out = subprocess.run(
        [
            PYTHON,
            driver,
            f"--model_dir={model_dir}",
            f"--data_dir={camvid}",
            "--steps=30",
            "--checkpoint_every=1",
            "--learning_rate=1e12",
            "--momentum=0",
        ],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
    )
    assert out.returncode == 1, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    (error,) = [line for line in out.stderr.splitlines() if line.startswith("driver.py: error:")]
    match = re.search(r"Loss is (\S+) \(l2 (\S+), gradient norm (\S+)\) at step (\d+)", error)
    assert match, out.stderr[-3000:]
    values = [float(v.rstrip(",")) for v in match.groups()[:3]]
    assert not all(np.isfinite(values))
    step = int(match.group(4))
    assert step >= 2
    assert _latest_step(model_dir) == step - 1  # the last good checkpoint is intact
    assert not os.path.exists(os.path.join(model_dir, "model.keras"))


def test_watchdog_ends_a_stuck_process(tmp_path):
    """A process blocked without progress (as in a collective with a dead peer) exits."""
    script = tmp_path / "stuck.py"
    script.write_text(
        textwrap.dedent(
            """
            import logging, time
            logging.basicConfig(level=logging.INFO)
            from kfcn.training import loop
            with loop._Watchdog(1.0, lambda: "at step 7"):
                time.sleep(60)
            """
        )
    )
    start = time.monotonic()
    out = subprocess.run(
        [PYTHON, str(script)], capture_output=True, text=True, env=_env(), timeout=120
    )
    assert out.returncode == 3, out.stderr[-2000:]
    assert "No training progress for" in out.stderr and "at step 7" in out.stderr
    assert time.monotonic() - start < 50


def test_train_voc_accepts_only_its_datasets(tmp_path):
    out = subprocess.run(
        [
            PYTHON,
            os.path.join(REPO, "recipes", "train_voc.py"),
            "--dataset=camvid",
            f"--model_dir={tmp_path / 'run'}",
        ],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
    )
    assert out.returncode == 2
    (error,) = out.stderr.strip().splitlines()
    assert error.startswith("train_voc.py: error: argument --dataset: invalid choice: 'camvid'")
    assert "'voc', 'sbd'" in error
