"""Tests of kfcn.training in this process: schedules, config, checkpoints, train step, loop."""

from __future__ import annotations

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from kfcn import files
from kfcn.training import TrainConfig, averaging, checkpoints, job, loop, run_dir, schedules

# --------------------------------------------------------------------------------------
# Helpers


def tiny_model(num_classes: int = 3, seed: int = 0) -> keras.Model:
    """A BN-free stand-in with the builder's contract (0..255 images in, logits out)."""
    images = keras.Input((None, None, 3))
    x = keras.layers.Rescaling(1 / 255.0)(images)
    x = keras.layers.Conv2D(
        4,
        3,
        padding="same",
        activation="relu",
        name="conv1",
        kernel_initializer=keras.initializers.GlorotUniform(seed),
        bias_initializer=keras.initializers.RandomUniform(-0.1, 0.1, seed=seed + 1),
    )(x)
    x = keras.layers.Conv2D(
        num_classes,
        1,
        name="score",
        kernel_initializer=keras.initializers.GlorotUniform(seed + 2),
        bias_initializer=keras.initializers.RandomUniform(-0.1, 0.1, seed=seed + 3),
    )(x)
    return keras.Model(images, x)


def synthetic_batches(n: int = 8, size: int = 8, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = rng.uniform(0, 255, (n, size, size, 3)).astype(np.float32)
    labels = (images[..., 0] > 128).astype(np.int32) + (images[..., 1] > 200).astype(np.int32)
    labels[rng.uniform(size=labels.shape) < 0.2] = 255  # some ignored pixels
    return images, labels


# --------------------------------------------------------------------------------------
# Schedules


def test_poly_schedule_matches_formula():
    lr, total = 0.01, 1000
    schedule = schedules.learning_rate_schedule("poly", lr, total)
    for step in (0, 1, 250, 999, 1000, 1500):
        expected = lr * (1 - min(step, total) / total) ** 0.9
        assert float(schedule(step)) == pytest.approx(expected, rel=2e-4, abs=1e-12)


def test_poly_schedule_to_a_minimum_rate_is_mmsegs_polylr():
    """mmseg PolyLR: (lr - eta_min) * (1 - t / T) ** 0.9 + eta_min, held at eta_min after T."""
    lr, end, total = 0.01, 1e-4, 80000
    schedule = schedules.learning_rate_schedule("poly", lr, total, end_learning_rate=end)
    for step in (0, 1, 40000, 79999, 80000, 90000):
        expected = (lr - end) * (1 - min(step, total) / total) ** 0.9 + end
        assert float(schedule(step)) == pytest.approx(expected, rel=2e-4)
    with pytest.raises(ValueError, match="end_learning_rate=0.02"):
        schedules.learning_rate_schedule("poly", lr, total, end_learning_rate=0.02)


def test_fixed_schedule_and_errors():
    assert schedules.learning_rate_schedule("fixed", 1e-4, 10) == 1e-4
    with pytest.raises(ValueError, match="`schedule` must be one of 'poly', 'fixed'.*step"):
        schedules.learning_rate_schedule("step", 1e-4, 10)
    with pytest.raises(ValueError, match="total_steps=0"):
        schedules.learning_rate_schedule("poly", 1e-4, 0)


# --------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize(
    "changes, setting",
    [
        ({"strategy": "parameter_server"}, "strategy"),
        ({"strategy": "mirrored", "cpu_replicas": 2, "batch_size": 3}, "batch_size"),
        ({"cpu_replicas": 2}, "cpu_replicas"),
        ({"schedule": "cosine"}, "schedule"),
        ({"crop_size": (12, 0)}, "crop_size"),
        ({"batch_size": 0}, "batch_size"),
        ({"learning_rate": 0.0}, "learning_rate"),
        ({"ema_momentum": 1.0}, "ema_momentum"),
        ({"class_weighting": "inverse"}, "class_weighting"),
        ({"scale_range": (2.0, 1.0)}, "scale_range"),
        ({"float32_depthwise": True}, "float32_depthwise"),  # without mixed_precision
        ({"input_scale": 0.0}, "input_scale"),
        ({"input_scale": float("nan")}, "input_scale"),
        ({"logit_adjustment": 0.5}, "logit_adjustment"),  # without class weights
        ({"logit_adjustment": -1.0, "class_weighting": "median_frequency"}, "logit_adjustment"),
        ({"val_scales": ()}, "val_scales"),
        ({"val_mode": "msflip", "val_scales": (1.0, -0.5)}, "val_scales"),
        ({"input_scale": 1.25, "aux_head": True, "variant": "fcn_d8"}, "input_scale"),
        ({"input_scale": 1.25, "heads": {"sem": 33, "geo": 3}}, "input_scale"),
        ({"num_classes": 3}, "num_classes"),  # not a camvid setting
        ({"dataset": "folder", "list_file": "x.txt"}, "num_classes"),  # required for folder
        ({"dataset": "folder", "num_classes": 3}, "list_file"),  # no list, no data_dir
        (
            {"dataset": "folder", "num_classes": 3, "list_file": "x", "class_names": ("a",)},
            "class_names",
        ),
    ],
)
def test_config_validate_names_the_setting(changes, setting):
    config = TrainConfig(model_dir="/tmp/unused", **changes)
    with pytest.raises(ValueError, match=f"`{setting}`"):
        config.validate()


def test_config_round_trips_through_its_dict():
    config = TrainConfig(
        "m",
        dataset="folder",
        num_classes=2,
        class_names=["a", "b"],
        list_file="l.txt",
        crop_size=[3, 4],
        seed=5,
    )
    values = config.to_dict()
    assert values["crop_size"] == [3, 4] and values["class_names"] == ["a", "b"]
    assert TrainConfig.from_dict(values) == config
    assert config.crop_size == (3, 4) and config.class_names == ("a", "b")
    with pytest.raises(ValueError, match="Unknown training settings.*'crop'"):
        TrainConfig.from_dict({**values, "crop": 1})


def test_train_split_defaults_per_dataset():
    assert TrainConfig("m", dataset="sbd").resolved_train_split == "train_aug"
    assert TrainConfig("m", dataset="voc").resolved_train_split == "train"
    assert TrainConfig("m", dataset="sbd", train_split="train").resolved_train_split == "train"


def test_folder_dataset_arguments(tmp_path):
    config = TrainConfig(
        "m",
        dataset="folder",
        num_classes=2,
        list_file="t.txt",
        val_list_file="v.txt",
        ignore_label=9,
        class_names=("a", "b"),
    )
    assert config.dataset_kwargs() == {
        "num_classes": 2,
        "list_file": "t.txt",
        "ignore_label": 9,
        "class_names": ("a", "b"),
    }
    assert config.dataset_kwargs(validation=True)["list_file"] == "v.txt"
    assert config.has_validation
    assert not TrainConfig("m", dataset="folder", num_classes=2, list_file="t").has_validation
    assert not TrainConfig("m", val_split=None).has_validation
    folder = dict(dataset="folder", num_classes=2, data_dir=str(tmp_path))
    assert not TrainConfig("m", **folder).has_validation  # no val.txt: no validation
    (tmp_path / "val.txt").write_text("a.png a_mask.png\n")
    assert TrainConfig("m", **folder).has_validation
    assert TrainConfig("m", manual_dir="/d").dataset_kwargs() == {"manual_dir": "/d"}


# --------------------------------------------------------------------------------------
# The run directory


def test_seed_is_drawn_once_and_kept_on_resume(tmp_path):
    run = run_dir.RunDirectory(str(tmp_path))
    first = run.settle_seed(TrainConfig(str(tmp_path)))
    assert isinstance(first.seed, int)
    run.record_settings(first)
    again = run.settle_seed(TrainConfig(str(tmp_path)))
    assert again.seed == first.seed
    # The settings file reads back into the same config.
    assert TrainConfig.from_dict(run.previous_settings()) == first
    assert os.listdir(tmp_path) == ["config.yaml"]
    other = run_dir.RunDirectory(str(tmp_path / "other"), is_chief=False)
    other.record_settings(first)
    assert not os.path.exists(tmp_path / "other")  # only the chief writes


def test_run_is_complete_only_with_its_steps_and_model(tmp_path):
    run = run_dir.RunDirectory(str(tmp_path))
    assert run.checkpoint_step() == 0 and not run.is_complete(1)
    step = tf.Variable(0, dtype=tf.int64)
    checkpoints.TrainingCheckpoint(str(tmp_path), step=step).save(200)
    assert run.checkpoint_step() == 200
    assert not run.is_complete(60)  # no model.keras yet: the loop must still write it
    run.save_model(tiny_model())
    assert run.is_complete(60) and run.is_complete(200) and not run.is_complete(201)


# Atomic writes and checkpoints


class _FailingModel:
    """Writes part of the file, then fails, like a process dying mid-save."""

    def save(self, path, overwrite=True):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")


def test_save_model_atomically_keeps_previous_file(tmp_path):
    path = str(tmp_path / "model.keras")
    model = tiny_model()
    files.save_model_atomically(model, path)
    before = open(path, "rb").read()
    with pytest.raises(OSError, match="disk full"):
        files.save_model_atomically(_FailingModel(), path)
    assert open(path, "rb").read() == before
    assert sorted(os.listdir(tmp_path)) == ["model.keras"]  # no temporary file left
    reloaded = keras.saving.load_model(path)
    x = np.random.default_rng(0).uniform(0, 255, (1, 5, 7, 3)).astype(np.float32)
    np.testing.assert_allclose(reloaded(x), model(x), rtol=1e-6)
    with pytest.raises(ValueError, match="must end in '.keras'"):
        files.save_model_atomically(model, str(tmp_path / "model.h5"))


def test_write_json_atomically(tmp_path):
    path = str(tmp_path / "result.json")
    files.write_json_atomically({"b": 1, "a": [1, 2]}, path)
    assert json.load(open(path)) == {"a": [1, 2], "b": 1}
    assert os.listdir(tmp_path) == ["result.json"]


def test_checkpoint_ignores_half_written_save(tmp_path):
    step = tf.Variable(0, dtype=tf.int64)
    ckpt = checkpoints.TrainingCheckpoint(str(tmp_path), step=step)
    assert ckpt.restore() is None
    step.assign(7)
    ckpt.save(7)
    # A save killed before the state file was replaced leaves only data files behind.
    for name in ("ckpt-9.index", "ckpt-9.data-00000-of-00001"):
        (tmp_path / "checkpoints" / name).write_bytes(b"\0garbage")
    step.assign(0)
    fresh = checkpoints.TrainingCheckpoint(str(tmp_path), step=step)
    assert fresh.restore().endswith("ckpt-7")
    assert int(step.numpy()) == 7


def test_non_chief_writes_to_a_temporary_directory_it_deletes(tmp_path):
    step = tf.Variable(3, dtype=tf.int64)
    worker = checkpoints.TrainingCheckpoint(str(tmp_path), is_chief=False, task_id=1, step=step)
    assert worker.save(3) is None
    assert os.listdir(tmp_path) == []  # neither the chief's directory nor a leftover
    chief = checkpoints.TrainingCheckpoint(str(tmp_path), step=step)
    chief.save(3)
    step.assign(0)
    assert worker.restore().endswith(os.path.join("checkpoints", "ckpt-3"))  # chief's files
    assert int(step.numpy()) == 3


# --------------------------------------------------------------------------------------
# The train step against an independent computation


def test_train_step_matches_hand_computed_sgd_update():
    """One SGD step equals w - lr * (d mean_CE / dw + wd * w) with biases not decayed."""
    lr, wd = 0.5, 0.01
    images, labels = synthetic_batches(4, 6)
    class_weights = np.array([1.0, 2.0, 0.5], np.float32)
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    with strategy.scope():
        model = tiny_model()
        optimizer = keras.optimizers.SGD(lr)
    reference = tiny_model()
    reference.set_weights(model.get_weights())

    # Independent: Keras' sparse CE with per-pixel weights, mean over the weights' sum.
    valid = labels != 255
    pixel_weights = np.where(valid, class_weights[np.where(valid, labels, 0)], 0.0)
    with tf.GradientTape() as tape:
        logits = reference(images)
        ce = keras.losses.sparse_categorical_crossentropy(
            np.where(valid, labels, 0), logits, from_logits=True
        )
        data_loss = tf.reduce_sum(ce * pixel_weights) / pixel_weights.sum()
    grads = tape.gradient(data_loss, reference.trainable_variables)
    expected = []
    for variable, grad in zip(reference.trainable_variables, grads):
        decay = wd * variable.numpy() if variable.name == "kernel" else 0.0
        expected.append(variable.numpy() - lr * (grad.numpy() + decay))
    kernels = [v.numpy() for v in reference.trainable_variables if v.name == "kernel"]
    expected_l2 = 0.5 * wd * sum(float((k**2).sum()) for k in kernels)

    step = loop.make_train_step(
        strategy, model, optimizer, class_weights=class_weights, weight_decay=wd
    )
    dataset = strategy.distribute_datasets_from_function(
        lambda ctx: tf.data.Dataset.from_tensors((images, labels)).repeat()
    )
    loss, l2, grad_norm, _ = step(iter(dataset))
    assert float(loss) == pytest.approx(float(data_loss), rel=1e-5)
    assert float(l2) == pytest.approx(expected_l2, rel=1e-5)
    for got, want in zip(model.trainable_variables, expected):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------
# evaluate() against numpy


def _argmax_rgb_model() -> keras.Model:
    """Predicts the class of the largest of R, G, B (identity 1x1 conv)."""
    images = keras.Input((None, None, 3))
    conv = keras.layers.Conv2D(3, 1, use_bias=False)
    model = keras.Model(images, conv(images))
    conv.set_weights([np.eye(3, dtype=np.float32)[None, None]])
    return model


def test_evaluate_matches_numpy_scores():
    rng = np.random.default_rng(3)
    elements = []
    confusion = np.zeros((3, 3), np.int64)
    for shape in ((5, 7), (4, 4), (6, 3)):
        image = rng.uniform(0, 255, (1, *shape, 3)).astype(np.float32)
        label = rng.integers(0, 3, (1, *shape)).astype(np.int32)
        label[0, 0, :] = 255
        elements.append((image, label))
        pred = image.argmax(-1)
        for t, p in zip(label.ravel(), pred.ravel()):
            if t != 255:
                confusion[t, p] += 1
    dataset = tf.data.Dataset.from_generator(
        lambda: iter(elements),
        output_signature=(
            tf.TensorSpec([1, None, None, 3], tf.float32),
            tf.TensorSpec([1, None, None], tf.int32),
        ),
    )
    seen = []
    scores = loop.validate(
        _argmax_rgb_model(),
        dataset,
        num_classes=3,
        ignore_label=255,
        on_image=lambda n, name, image, label, prediction: seen.append(prediction.shape),
    )
    assert seen == [(5, 7), (4, 4), (6, 3)]
    iou = [
        confusion[c, c] / (confusion[c].sum() + confusion[:, c].sum() - confusion[c, c])
        for c in range(3)
    ]
    assert scores["confusion"] == confusion.tolist()
    assert scores["num_images"] == 3
    assert scores["mean_iou"] == pytest.approx(np.mean(iou))
    assert scores["pixel_accuracy"] == pytest.approx(np.trace(confusion) / confusion.sum())


# --------------------------------------------------------------------------------------
# The loop: resume and NaN


def _train(
    model_dir,
    total_steps,
    *,
    poison_from=None,
    lr=0.05,
    checkpoint_every=2,
    log_every=1,
    ema_momentum=0.0,
    eval_every=4,
    time_budget=None,
    on_built=None,
):
    """Trains `tiny_model` on synthetic batches of 2; returns (result, model, optimizer).

    With `time_budget` (seconds) the poly schedule reads its end from a horizon
    variable the loop moves (`kfcn.training.time_budget`); `on_built(model,
    optimizer, horizon)` runs before training (tests set a fake clock from it).
    """
    images, labels = synthetic_batches(16, 8)
    if poison_from is not None:
        images = images.copy()
        images[poison_from * 2 :] = np.nan  # batches of 2 from this step on are NaN
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    with strategy.scope():
        model = tiny_model()
        horizon = None
        if time_budget is not None:
            horizon = tf.Variable(total_steps, dtype=tf.float64)
        optimizer = keras.optimizers.SGD(
            schedules.learning_rate_schedule("poly", lr, total_steps, horizon=horizon),
            momentum=0.9,
        )
    if on_built is not None:
        on_built(model, optimizer, horizon)

    def train_fn(context, start_step):
        # Deterministic order that continues where the checkpoint left off.
        ds = tf.data.Dataset.from_tensor_slices((images, labels)).batch(2).repeat()
        return ds.skip(start_step % 8)

    def eval_fn(num_shards, index):
        return tf.data.Dataset.from_tensor_slices((images[:4, None], labels[:4, None]))

    result = loop.train(
        strategy=strategy,
        model=model,
        optimizer=optimizer,
        train_dataset_fn=train_fn,
        config=loop.LoopConfig(
            total_steps=total_steps,
            steps_per_epoch=8,
            global_batch_size=2,
            checkpoint_every=checkpoint_every,
            eval_every=eval_every,
            log_every=log_every,
            weight_decay=1e-4,
            ema_momentum=ema_momentum,
            time_budget=time_budget,
        ),
        model_dir=str(model_dir),
        num_classes=3,
        eval_dataset_fn=eval_fn,
        # A picture of the prediction: the image with class c painted grey level 100 * c.
        overlay_fn=lambda image, prediction: np.concatenate(
            [image, np.repeat((100 * prediction).astype(np.uint8)[..., None], 3, -1)], axis=1
        ),
        num_overlays=2,
        horizon=horizon,
    )
    return result, model, optimizer


def _summaries(directory) -> list:
    return [
        (event.step, value)
        for name in os.listdir(directory)
        for event in tf.compat.v1.train.summary_iterator(os.path.join(directory, name))
        for value in event.summary.value
    ]


def _scalar_tags(directory) -> set[str]:
    tags = set()
    for _, value in _summaries(directory):
        if value.metadata.plugin_data.plugin_name == "images":
            continue
        assert value.metadata.plugin_data.plugin_name == "scalars"
        assert tf.make_ndarray(value.tensor).shape == ()
        tags.add(value.tag)
    return tags


def test_loop_resumes_where_it_stopped(tmp_path):
    first, _, _ = _train(tmp_path / "resumed", 5)
    assert (first.start_step, first.final_step) == (0, 5)
    assert first.checkpoint.endswith("ckpt-5")
    assert first.metrics["num_images"] == 4
    second, model, optimizer = _train(tmp_path / "resumed", 9)
    assert (second.start_step, second.final_step) == (5, 9)
    assert int(optimizer.iterations.numpy()) == 9  # optimizer state came back too
    # TensorBoard scalars (the scalars plugin's events) were written by the chief.
    assert _scalar_tags(tmp_path / "resumed" / "logs" / "train") >= {
        "loss",
        "learning_rate",
        "l2",
        "images_per_second",
    }
    assert _scalar_tags(tmp_path / "resumed" / "logs" / "validation") >= {
        "mean_iou",
        "pixel_accuracy",
    }
    # Prediction overlays of the first 2 validation images at each validation.
    images = [
        (step, value)
        for step, value in _summaries(tmp_path / "resumed" / "logs" / "validation")
        if value.metadata.plugin_data.plugin_name == "images"
    ]
    assert sorted((step, value.tag) for step, value in images) == [
        (step, f"prediction_{i}") for step in (4, 5, 8, 9) for i in (0, 1)
    ]
    width, height, png = tf.make_ndarray(images[-1][1].tensor)
    assert (int(width), int(height)) == (16, 8)
    # The picture at step 9 shows the final model's prediction for its image.
    (last,) = [v for step, v in images if (step, v.tag) == (9, "prediction_0")]
    picture = tf.io.decode_png(tf.make_ndarray(last.tensor)[2]).numpy()
    expected = np.argmax(model(synthetic_batches(16, 8)[0][:1]), -1)[0]
    np.testing.assert_array_equal(picture[:, 8:, 0], 100 * expected)


def test_resume_equals_uninterrupted_run(tmp_path):
    """Stopping at step 4 (checkpoint) and resuming gives the uninterrupted result."""
    _, straight, _ = _train(tmp_path / "straight", 8, checkpoint_every=4)
    _train(tmp_path / "interrupted", 8, checkpoint_every=4)  # leaves ckpt-4 and ckpt-8
    os.remove(tmp_path / "interrupted" / "checkpoints" / "ckpt-8.index")
    # Point the state file back to ckpt-4, as if the process died before step 8.
    state = tmp_path / "interrupted" / "checkpoints" / "checkpoint"
    state.write_text('model_checkpoint_path: "ckpt-4"\nall_model_checkpoint_paths: "ckpt-4"\n')
    result, resumed, _ = _train(tmp_path / "interrupted", 8, checkpoint_every=4)
    assert result.start_step == 4
    for a, b in zip(straight.get_weights(), resumed.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_weight_average_is_the_warmed_up_exponential_average_of_the_weights(tmp_path):
    """The loop validates, keeps and returns a_t = d_t a_(t-1) + (1 - d_t) w_t from a_0 = w_0,
    d_t = min(m, t / (t + 9)) (tf.train.ExponentialMovingAverage with num_updates)."""
    m, total = 0.3, 3  # d_1 = 0.1, d_2 = 2/11, d_3 = 0.25: then m = 0.3 is not yet reached
    # w_0 and the trained weights w_1..w_3 of the same run without averaging (averaging
    # must not change training): tiny_model's seeded initialisation and each step's
    # checkpoint (the last 3 are kept).
    _train(tmp_path / "plain", total, checkpoint_every=1)
    trajectory = [[w.numpy() for w in tiny_model().trainable_weights]]
    for step in range(1, total + 1):
        restored = tiny_model(seed=7)
        tf.train.Checkpoint(model=restored).restore(
            str(tmp_path / "plain" / "checkpoints" / f"ckpt-{step}")
        ).expect_partial()
        trajectory.append([w.numpy() for w in restored.trainable_weights])
    averages = [trajectory[0]]
    for step in range(1, total + 1):
        d = min(m, step / (step + 9))
        averages.append([d * a + (1 - d) * w for a, w in zip(averages[-1], trajectory[step])])

    result, model, _ = _train(tmp_path / "ema", total, checkpoint_every=1, ema_momentum=m)
    for got, want in zip(model.trainable_weights, averages[-1]):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)
    # The checkpoint holds the trained weights (so resuming continues training them).
    trained = tiny_model(seed=7)
    tf.train.Checkpoint(model=trained).restore(result.checkpoint).expect_partial()
    for got, want in zip(trained.trainable_weights, trajectory[-1]):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(trajectory[-1][0], averages[-1][0], atol=1e-4)  # they differ
    # Validation (at the last step) saw the average: best.weights.h5 holds it.
    kept = tiny_model(seed=7)
    kept.load_weights(str(tmp_path / "ema" / "best.weights.h5"))
    for got, want in zip(kept.trainable_weights, averages[-1]):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)


def test_weight_average_survives_a_resume(tmp_path):
    """Stopped at step 4 and resumed, the average equals the uninterrupted run's."""
    _, straight, _ = _train(tmp_path / "straight", 8, checkpoint_every=4, ema_momentum=0.7)
    _train(tmp_path / "interrupted", 8, checkpoint_every=4, ema_momentum=0.7)
    os.remove(tmp_path / "interrupted" / "checkpoints" / "ckpt-8.index")
    state = tmp_path / "interrupted" / "checkpoints" / "checkpoint"
    state.write_text('model_checkpoint_path: "ckpt-4"\nall_model_checkpoint_paths: "ckpt-4"\n')
    result, resumed, _ = _train(tmp_path / "interrupted", 8, checkpoint_every=4, ema_momentum=0.7)
    assert result.start_step == 4
    for a, b in zip(straight.get_weights(), resumed.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_weight_average_swaps_in_and_back_and_checks_its_momentum():
    model = tiny_model()
    average = averaging.WeightAverage(model, 0.5)
    trained = [w.numpy() for w in model.trainable_weights]
    for variable in average.averages:
        variable.assign(np.full(variable.shape, 3.0, np.float32))
    with pytest.raises(RuntimeError, match="inside"):
        with average.swapped_in():
            for w in model.trainable_weights:
                np.testing.assert_array_equal(w.numpy(), 3.0)
            raise RuntimeError("inside")
    for w, want in zip(model.trainable_weights, trained):
        np.testing.assert_array_equal(w.numpy(), want)
    # Only the averages are its own variables: the model's are checkpointed with the model.
    assert len(average.variables) == len(model.trainable_weights) + 1  # and the update count
    with pytest.raises(ValueError, match=r"`momentum` must be in \(0, 1\). Received: momentum=1"):
        averaging.WeightAverage(model, 1)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    with pytest.raises(loop.NonFiniteLossError, match=r"Loss is .*nan.* at step 5: .*ckpt-4"):
        _train(tmp_path, 8, poison_from=4)
    assert tf.train.latest_checkpoint(str(tmp_path / "checkpoints")).endswith("ckpt-4")


def test_nan_found_between_logs_names_its_step(tmp_path):
    """Steps are read back only at logs, checkpoints and validations (no per-step
    host sync); a NaN in the middle of such a window is still reported at its step."""
    with pytest.raises(loop.NonFiniteLossError, match=r"Loss is .*nan.* at step 6: .*ckpt-4"):
        _train(tmp_path, 8, poison_from=5, checkpoint_every=4, log_every=8)
    assert tf.train.latest_checkpoint(str(tmp_path / "checkpoints")).endswith("ckpt-4")


def test_loop_config_errors():
    with pytest.raises(ValueError, match="total_steps=0"):
        loop.LoopConfig(total_steps=0, steps_per_epoch=1, global_batch_size=1, checkpoint_every=1)


def test_loss_scale_optimizer_step_equals_plain_step():
    """The float16 path (LossScaleOptimizer) scales and unscales exactly."""
    images, labels = synthetic_batches(2, 6)
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    results = []
    for scaled in (False, True):
        with strategy.scope():
            model = tiny_model()
            optimizer = keras.optimizers.SGD(0.5)
            if scaled:
                optimizer = keras.optimizers.LossScaleOptimizer(optimizer, initial_scale=1024.0)
        step = loop.make_train_step(strategy, model, optimizer, weight_decay=1e-3)
        data = strategy.distribute_datasets_from_function(
            lambda ctx: tf.data.Dataset.from_tensors((images, labels)).repeat()
        )
        iterator = iter(data)
        for _ in range(2):
            loss, _, grad_norm, _ = step(iterator)
        results.append(model.get_weights())
        if scaled:
            assert float(grad_norm) == 0.0  # overflow is the optimizer's business here
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert not np.allclose(results[0][0], tiny_model().get_weights()[0])


def test_jit_compiled_step_equals_plain_step():
    """`jit_compile=True` (XLA) trains the same weights as the plain step."""
    images, labels = synthetic_batches(2, 6)
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    results = []
    for jit in (False, True):
        with strategy.scope():
            model = tiny_model()
            optimizer = keras.optimizers.SGD(0.5, momentum=0.9)
        step = loop.make_train_step(strategy, model, optimizer, weight_decay=1e-3, jit_compile=jit)
        data = strategy.distribute_datasets_from_function(
            lambda ctx: tf.data.Dataset.from_tensors((images, labels)).repeat()
        )
        iterator = iter(data)
        losses = [float(step(iterator)[0]) for _ in range(3)]
        results.append((losses, model.get_weights()))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-4)
    for a, b in zip(results[0][1], results[1][1]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert not np.allclose(results[0][1][0], tiny_model().get_weights()[0])


def test_restore_into_a_different_setup_names_the_flags(tmp_path):
    saved = checkpoints.TrainingCheckpoint(str(tmp_path), weights=tf.Variable(tf.zeros([2])))
    saved.save(1)
    other = checkpoints.TrainingCheckpoint(str(tmp_path), weights=tf.Variable(tf.zeros([3])))
    with pytest.raises(checkpoints.CheckpointMismatchError, match="`backbone`.*new `model_dir`"):
        other.restore()


def test_set_batch_norm_momentum():
    images = keras.Input((None, None, 3))
    x = keras.layers.BatchNormalization(momentum=0.999)(images)
    inner = keras.Model(images, keras.layers.BatchNormalization(momentum=0.999)(x))
    outer = keras.Model(images, keras.layers.Conv2D(2, 1)(inner(images)))
    assert job.set_batch_norm_momentum(outer, 0.9) == 2
    layers = [layer for layer in inner.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert [layer.momentum for layer in layers] == [0.9, 0.9]
    # Inference statistics now follow the batches at the new rate: one update moves
    # the moving mean 10% of the way (not 0.1%).
    batch = np.full((2, 4, 4, 3), 10.0, np.float32)
    layers[0](batch, training=True)
    np.testing.assert_allclose(layers[0].moving_mean.numpy(), 1.0, rtol=1e-5)
