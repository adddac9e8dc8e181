"""Dict outputs in training: auxiliary heads and several tasks.

The loss of each output is checked against Keras' own cross-entropy (an
independent computation), the per-task validation against numpy confusion
matrices computed from the saved model's predictions, the per-task multi-worker
sum against hand-made worker matrices, and a multi-task run that resumes. The
2-replica equivalence of the auxiliary loss runs in a fresh process (logical
CPU devices must be set before TensorFlow starts), as in test_training_distributed.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from kfcn.training import TrainConfig, loop, outputs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _conv(filters, name, seed, kernel=1, activation=None):
    return keras.layers.Conv2D(
        filters,
        kernel,
        padding="same",
        activation=activation,
        name=name,
        kernel_initializer=keras.initializers.GlorotUniform(seed),
        bias_initializer=keras.initializers.RandomUniform(-0.1, 0.1, seed=seed + 100),
    )


def dict_model(heads: dict[str, int], seed: int = 0) -> keras.Model:
    """A BN-free stand-in with the models' contract: a dict of logits at the input size."""
    images = keras.Input((None, None, 3))
    x = keras.layers.Rescaling(1 / 255.0)(images)
    x = _conv(4, "conv1", seed, kernel=3, activation="relu")(x)
    return keras.Model(
        images,
        {
            name: _conv(n, f"score_{name}", seed + i + 1)(x)
            for i, (name, n) in enumerate(heads.items())
        },
    )


def _batch(n=4, size=6, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.uniform(0, 255, (n, size, size, 3)).astype(np.float32)
    sem = (images[..., 0] // 64).astype(np.int32)  # 0..3
    geo = (images[..., 1] // 86).astype(np.int32)  # 0..2
    sem[rng.uniform(size=sem.shape) < 0.25] = 255
    geo[rng.uniform(size=geo.shape) < 0.4] = 255
    return images, sem, geo


def _keras_ce(labels, logits, reduction):
    """Keras' sparse cross-entropy over the non-ignored pixels: mean or sum."""
    valid = labels != 255
    ce = keras.losses.sparse_categorical_crossentropy(
        np.where(valid, labels, 0), logits, from_logits=True
    )
    total = tf.reduce_sum(tf.where(valid, ce, 0.0))
    return total / valid.sum() if reduction == "mean" else total


def _one_step(model, optimizer, images, labels, **kwargs):
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    step = loop.make_train_step(strategy, model, optimizer, **kwargs)
    dataset = strategy.distribute_datasets_from_function(
        lambda ctx: tf.data.Dataset.from_tensors((images, labels)).repeat()
    )
    return step(iter(dataset))


@pytest.mark.parametrize("aux_loss_weight", [0.4, 0.5])
def test_aux_loss_is_the_weighted_sum_of_each_outputs_mean(aux_loss_weight):
    """loss = CE(logits) + w * CE(aux_logits), each a mean over its valid pixels; the SGD
    step follows the gradient of exactly that (Keras' CE, an independent computation)."""
    lr = 0.5
    images, sem, _ = _batch()
    with tf.distribute.OneDeviceStrategy("/cpu:0").scope():
        model = dict_model({"logits": 3, "aux_logits": 3})
        optimizer = keras.optimizers.SGD(lr)
    labels = np.where(sem == 3, 2, sem)  # one label tensor for both outputs, 3 classes
    reference = dict_model({"logits": 3, "aux_logits": 3})
    reference.set_weights(model.get_weights())
    with tf.GradientTape() as tape:
        out = reference(images)
        main = _keras_ce(labels, out["logits"], "mean")
        aux = _keras_ce(labels, out["aux_logits"], "mean")
        expected = main + aux_loss_weight * aux
    grads = tape.gradient(expected, reference.trainable_variables)

    loss, _, _, per_output = _one_step(
        model, optimizer, images, labels, aux_loss_weight=aux_loss_weight
    )
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    assert float(per_output["logits"]) == pytest.approx(float(main), rel=1e-5)
    assert float(per_output["aux_logits"]) == pytest.approx(float(aux), rel=1e-5)
    for got, variable, grad in zip(model.trainable_variables, reference.trainable_variables, grads):
        np.testing.assert_allclose(got.numpy(), variable.numpy() - lr * grad.numpy(), atol=1e-6)


def test_multitask_sum_reduction_with_task_weights():
    """Dict labels: output k on label k, aux_k on label k too; "sum" is unnormalised."""
    images, sem, geo = _batch(seed=1)
    with tf.distribute.OneDeviceStrategy("/cpu:0").scope():
        model = dict_model({"sem": 4, "geo": 3, "aux_sem": 4}, seed=3)
        optimizer = keras.optimizers.SGD(0.0)
    out = model(images)
    expected = (
        1.0 * _keras_ce(sem, out["sem"], "sum")
        + 2.5 * _keras_ce(geo, out["geo"], "sum")
        + 0.4 * _keras_ce(sem, out["aux_sem"], "sum")
    )
    loss, _, _, per_output = _one_step(
        model,
        optimizer,
        images,
        {"sem": sem, "geo": geo},
        task_loss_weights={"geo": 2.5},
        loss_reduction="sum",
    )
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    assert sorted(per_output) == ["aux_sem", "geo", "sem"]


def test_outputs_and_labels_must_pair_up():
    assert outputs.loss_weights(["aux_logits", "logits"], None) == {
        "aux_logits": (None, 0.4),
        "logits": (None, 1.0),
    }
    assert outputs.loss_weights(
        ["aux_sem", "geo", "sem"], ["geo", "sem"], aux_loss_weight=0.5, task_loss_weights={"sem": 2}
    ) == {"aux_sem": ("sem", 0.5), "geo": ("geo", 1.0), "sem": ("sem", 2.0)}
    with pytest.raises(ValueError, match=r"Outputs without a label: \['geo'\]"):
        outputs.loss_weights(["geo", "sem"], ["sem"])
    with pytest.raises(ValueError, match=r"labels without an output: \['depth'\]"):
        outputs.loss_weights(["sem"], ["sem", "depth"])
    with pytest.raises(ValueError, match="task_loss_weights"):
        outputs.loss_weights(["sem"], ["sem"], task_loss_weights={"aux_sem": 1})


def test_inference_outputs_and_selection_value():
    assert outputs.inference_outputs({"logits": 1, "aux_logits": 2}) == 1
    assert outputs.inference_outputs({"sem": 1, "geo": 2, "aux_sem": 3}) == {"sem": 1, "geo": 2}
    scores = {"sem": {"mean_iou": 0.5}, "geo": {"mean_iou": 0.8}, "num_images": 3}
    assert outputs.selection_value(scores, "mean_iou") == pytest.approx(0.65)
    assert outputs.selection_value(scores, "geo/mean_iou") == 0.8
    assert outputs.selection_value({"mean_iou": 0.3}, "mean_iou") == 0.3
    with pytest.raises(ValueError, match="selection_metric"):
        outputs.selection_value(scores, "depth/mean_iou")


def test_validation_sums_each_tasks_matrix_over_workers(monkeypatch):
    """Each task's matrix gets the other worker's matrix of the same task (one all-reduce)."""
    model = dict_model({"sem": 4, "geo": 3, "aux_sem": 4})
    images, sem, geo = _batch(n=2, size=5, seed=2)
    dataset = [
        (images[i : i + 1], {"sem": sem[i : i + 1], "geo": geo[i : i + 1]}, b"x") for i in range(2)
    ]
    local = loop.validate(model, dataset, num_classes={"sem": 4, "geo": 3})
    other = {"sem": np.arange(16).reshape(4, 4), "geo": 100 + np.arange(9).reshape(3, 3)}

    class Info:
        num_workers, worker_index, is_chief = 2, 0, True

    def fake_sum(strategy, info, array):  # the other worker's matrices, in task-name order
        return array + np.concatenate([other["geo"].ravel(), other["sem"].ravel(), [5]])

    monkeypatch.setattr(loop, "worker_info", lambda strategy: Info())
    monkeypatch.setattr(loop, "_sum_over_workers", fake_sum)
    summed = loop.validate(
        model, dataset, num_classes={"sem": 4, "geo": 3}, strategy=tf.distribute.get_strategy()
    )
    assert sorted(summed) == ["geo", "num_images", "sem"]  # aux_sem is not scored
    assert summed["num_images"] == 2 + 5
    for task in ("sem", "geo"):
        want = np.asarray(local[task]["confusion"]) + other[task]
        np.testing.assert_array_equal(summed[task]["confusion"], want)
        from kfcn import metrics

        assert summed[task]["mean_iou"] == pytest.approx(metrics.scores(want)["mean_iou"])


# --------------------------------------------------------------------------------------
# A multi-task run through fit(), resumed


VAL = 3


def _toy_data():
    """SIFT-Flow-like elements: image, label {"sem", "geo"}; learnable from the colours."""
    rng = np.random.default_rng(7)
    elements = []
    for i in range(8 + VAL):
        size = (16, 16) if i < 8 else (12 + 2 * (i - 8), 16)
        image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        sem = (image[..., 0] // 64).astype(np.uint8)
        geo = (image[..., 1] // 86).astype(np.uint8)
        sem[0] = 255
        elements.append((image, sem, geo, f"img{i}"))
    return elements[:8], elements[8:]


def _fake_loader(monkeypatch):
    from kfcn import data

    train, val = _toy_data()

    def load_dataset(name, split, data_dir=None, **kwargs):
        chosen = train if split == "train" else val

        def gen():
            for image, sem, geo, name_ in chosen:
                yield {"image": image, "label": {"sem": sem, "geo": geo}, "name": name_}

        signature = {
            "image": tf.TensorSpec((None, None, 3), tf.uint8),
            "label": {
                "sem": tf.TensorSpec((None, None), tf.uint8),
                "geo": tf.TensorSpec((None, None), tf.uint8),
            },
            "name": tf.TensorSpec((), tf.string),
        }
        info = data.DatasetInfo(
            name="siftflow",
            num_classes={"sem": 4, "geo": 3},
            ignore_label=255,
            class_names={"sem": ("a", "b", "c", "d"), "geo": ("sky", "h", "v")},
            num_examples=len(chosen),
        )
        return tf.data.Dataset.from_generator(gen, output_signature=signature), info

    monkeypatch.setattr(data, "load_dataset", load_dataset)
    return val


def _scalars(log_dir):
    tags = {}
    for path in glob.glob(os.path.join(log_dir, "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                number = tf.make_ndarray(value.tensor) if value.HasField("tensor") else None
                tags.setdefault(value.tag, []).append((event.step, float(number)))
    # A resumed run writes a second events file; glob's order is the file system's.
    return {tag: sorted(points) for tag, points in tags.items()}


def _numpy_mean_iou(truth, predicted, n):
    valid = truth != 255
    confusion = np.bincount(n * truth[valid] + predicted[valid], minlength=n * n).reshape(n, n)
    union = confusion.sum(0) + confusion.sum(1) - np.diag(confusion)
    present = union > 0
    return float(np.mean(np.diag(confusion)[present] / union[present]))


@pytest.mark.slow
def test_multitask_run_scores_each_task_and_resumes(tmp_path, monkeypatch):
    from kfcn.training import fit

    val = _fake_loader(monkeypatch)

    def model_fn(config, num_classes):
        assert num_classes == {"sem": 4, "geo": 3}
        return dict_model({**num_classes, "aux_sem": 4}, seed=5)

    def config(steps):
        return TrainConfig(
            str(tmp_path / "run"),
            dataset="siftflow",
            batch_size=2,
            crop_size=(16, 16),
            scale_range=(1.0, 1.0),
            steps=steps,
            learning_rate=0.05,
            momentum=0.9,
            weight_decay=0.0,
            eval_every=2,
            checkpoint_every=1,
            log_every=1,
            seed=0,
            task_loss_weights={"sem": 1.0, "geo": 0.5},
            num_overlays=0,
        )

    first = fit(config(2), model_fn=model_fn)
    assert (first.start_step, first.final_step) == (0, 2)
    second = fit(config(4), model_fn=model_fn)
    assert (second.start_step, second.final_step) == (2, 4)  # resumed from the checkpoint

    result = json.load(open(tmp_path / "run" / "result.json"))
    scores = result["validation"]
    assert sorted(scores) == ["geo", "num_images", "sem"] and scores["num_images"] == VAL
    # Independent: the saved model's predictions scored with numpy, per task.
    model = keras.saving.load_model(tmp_path / "run" / "model.keras")
    for task, n in (("sem", 4), ("geo", 3)):
        truth, predicted = [], []
        for image, sem, geo, _ in val:
            logits = model(image[None].astype(np.float32))[task][0].numpy()
            truth.append((sem if task == "sem" else geo).ravel().astype(np.int64))
            predicted.append(logits.argmax(-1).ravel())
        want = _numpy_mean_iou(np.concatenate(truth), np.concatenate(predicted), n)
        assert scores[task]["mean_iou"] == pytest.approx(want, abs=1e-6)
    # The best validation of the whole run (steps 2 and 4) on the tasks' mean mean IU.
    best = json.load(open(tmp_path / "run" / "best.json"))
    assert best["metric"] == "mean_iou" and best["step"] in (2, 4)
    final = (scores["sem"]["mean_iou"] + scores["geo"]["mean_iou"]) / 2
    assert best["value"] >= final - 1e-9
    if best["step"] == 4:
        assert best["value"] == pytest.approx(final)
    assert result["best"] == best
    again = fit(config(4), model_fn=model_fn)  # already complete: reports the recorded best
    assert again.already_complete and again.best == best
    assert os.path.exists(best["weights"])
    # TensorBoard: per-task scores at both validations, per-output losses.
    validation = _scalars(tmp_path / "run" / "logs" / "validation")
    assert [s for s, _ in validation["sem/mean_iou"]] == [2, 4]
    assert validation["geo/mean_iou"][-1][1] == pytest.approx(scores["geo"]["mean_iou"], abs=1e-6)
    assert {"loss_sem", "loss_geo", "loss_aux_sem"} <= set(
        _scalars(tmp_path / "run" / "logs" / "train")
    )


# --------------------------------------------------------------------------------------
# Two CPU replicas == one device, with an auxiliary output


EQUIVALENCE = textwrap.dedent(
    """
    import json
    from kfcn.training.strategy import configure_cpu_replicas, create_strategy
    configure_cpu_replicas(2)  # before any TensorFlow op
    import keras, numpy as np, tensorflow as tf
    from kfcn.training import loop

    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (8, 6, 6, 3)).astype(np.float32)
    labels = rng.integers(0, 3, (8, 6, 6)).astype(np.int32)
    # The two replicas of each global batch of 4 see very different valid-pixel counts.
    for start in range(0, 8, 4):
        labels[start:start + 2, 1:] = 255

    def conv(filters, seed, **kw):
        initializer = keras.initializers.GlorotUniform(seed)
        return keras.layers.Conv2D(filters, 1, kernel_initializer=initializer, **kw)

    def run(strategy):
        with strategy.scope():
            inputs = keras.Input((None, None, 3))
            x = keras.layers.Rescaling(1 / 255.0)(inputs)
            x = conv(5, 1, activation="relu")(x)
            model = keras.Model(inputs, {"logits": conv(3, 2)(x), "aux_logits": conv(3, 3)(x)})
            optimizer = keras.optimizers.SGD(0.5, momentum=0.9)
        step = loop.make_train_step(strategy, model, optimizer, aux_loss_weight=AUX)
        data = strategy.distribute_datasets_from_function(
            lambda ctx: tf.data.Dataset.from_tensor_slices((images, labels)).batch(
                ctx.get_per_replica_batch_size(4), drop_remainder=True))
        iterator = iter(data)
        losses = [float(step(iterator)[0]) for _ in range(2)]
        return {"replicas": strategy.num_replicas_in_sync, "losses": losses,
                "weights": [w.tolist() for w in model.get_weights()]}

    print(json.dumps({"mirrored": run(create_strategy("mirrored", cpu_replicas=2)),
                      "one_device": run(create_strategy("one_device"))}))
    """
)


@pytest.mark.slow
def test_aux_loss_on_two_cpu_replicas_equals_one_device():
    script = EQUIVALENCE.replace("AUX", "0.4")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=REPO)
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    runs = json.loads(done.stdout.strip().splitlines()[-1])
    assert runs["mirrored"]["replicas"] == 2 and runs["one_device"]["replicas"] == 1
    np.testing.assert_allclose(runs["mirrored"]["losses"], runs["one_device"]["losses"], rtol=1e-5)
    for a, b in zip(runs["mirrored"]["weights"], runs["one_device"]["weights"]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_build_model_passes_the_family_settings(monkeypatch):
    """TrainConfig -> kfcn.build_fcn / build_dilated_fcn keyword arguments (recorded)."""
    import kfcn
    from kfcn.training.job import build_model

    calls = []
    monkeypatch.setattr(kfcn, "build_fcn", lambda *a, **k: calls.append(("fcn", a, k)))
    monkeypatch.setattr(kfcn, "build_dilated_fcn", lambda *a, **k: calls.append(("dilated", a, k)))
    build_model(TrainConfig("m", dataset="siftflow", variant="fcn16s"), {"sem": 33, "geo": 3})
    build_model(TrainConfig("m", dataset="nyud", variant="fcn32s", modality="rgb+hha"), 40)
    build_model(TrainConfig("m", variant="fcn8s"), 11)
    build_model(
        TrainConfig(
            "m", variant="fcn_d6", backbone="resnet101_v1b", aux_head=True, head_channels=64
        ),
        19,
    )
    (_, args, first), (_, _, second), (_, _, third), (kind, _, fourth) = calls
    assert args == ("fcn16s",) and first["heads"] == {"sem": 33, "geo": 3}
    assert "num_classes" not in first  # the builder takes the classes from heads
    assert second["modality"] == "rgb+hha" and second["num_classes"] == 40
    assert "modality" not in third and "heads" not in third and third["num_classes"] == 11
    assert kind == "dilated"
    assert (fourth["output_stride"], fourth["head_dilation"]) == (16, 6)
    assert (fourth["backbone"], fourth["aux_head"], fourth["head_channels"]) == (
        "resnet101_v1b",
        True,
        64,
    )
    assert fourth["num_classes"] == 19 and fourth["sync_batchnorm"] is True


def test_pipeline_options_reach_train_pipeline(monkeypatch):
    """flip, photometric and cat_max_ratio go to kfcn.data.train_pipeline (recorded)."""
    from kfcn import data
    from kfcn.training import job

    _fake_loader(monkeypatch)
    seen = {}
    monkeypatch.setattr(data, "train_pipeline", lambda dataset, **kwargs: seen.update(kwargs))
    config = TrainConfig(
        "m", dataset="siftflow", val_split=None, seed=3, flip=False, photometric="mmseg"
    )
    inputs = job.Inputs(dataclasses.replace(config, cat_max_ratio=0.75), 1)
    inputs.train_dataset(None, 5)
    assert (seen["flip"], seen["photometric"], seen["cat_max_ratio"]) == (False, "mmseg", 0.75)
    assert seen["seed"] == 3 + 5  # reseeded by the resume step
    seen.clear()
    job.Inputs(config, 1).train_dataset(None, 0)
    assert "cat_max_ratio" not in seen  # off: the pipeline's own default (never re-draw)


def test_build_model_builds_fcn4s_from_the_config():
    from kfcn.training.job import build_model

    config = TrainConfig("m", variant="fcn4s", backbone="mobilenetv2", trainable_upsampling=True)
    model = build_model(config, 11)
    assert model.get_layer("score_pool2").kernel.shape == (1, 1, 144, 11)
    assert model.get_layer("upscore4").trainable
    assert model(np.zeros((1, 33, 47, 3), np.float32)).shape == (1, 33, 47, 11)
