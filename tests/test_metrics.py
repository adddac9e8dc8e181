"""Tests for kfcn.metrics against confusion matrices and scores worked out by hand."""

import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from kfcn import metrics


def test_confusion_matrix_counts_pairs_and_drops_ignored_pixels():
    labels = np.array([[0, 0, 1, 255], [2, 1, 1, 3]])
    preds = np.array([[0, 1, 1, 2], [2, 2, 1, 0]])
    # Pairs (gt, pred) of kept pixels: (0,0) (0,1) (1,1) (2,2) (1,2) (1,1);
    # gt 255 is the ignore label and gt 3 is outside [0, 3): both dropped.
    expected = np.array(
        [
            [1, 1, 0],  # gt 0: one predicted 0, one predicted 1
            [0, 2, 1],  # gt 1: two predicted 1, one predicted 2
            [0, 0, 1],  # gt 2: one predicted 2
        ]
    )
    got = metrics.confusion_matrix(labels, preds, num_classes=3, ignore_label=255)
    np.testing.assert_array_equal(got, expected)
    assert got.dtype == np.int64


def test_confusion_matrix_ignore_label_inside_range_is_dropped():
    # ignore_label=0 means "background is not scored".
    got = metrics.confusion_matrix([0, 1, 2, 0], [1, 1, 0, 0], num_classes=3, ignore_label=0)
    np.testing.assert_array_equal(got, [[0, 0, 0], [0, 1, 0], [1, 0, 0]])


def test_confusion_matrix_bad_inputs():
    with pytest.raises(ValueError, match=r"predictions.*\[3\]"):
        metrics.confusion_matrix([0, 1], [0, 3], num_classes=3)
    with pytest.raises(ValueError, match="predictions"):
        metrics.confusion_matrix([0, 1], [-1, 0], num_classes=3)
    with pytest.raises(ValueError, match=r"\(2, 2\).*\(4,\)"):
        metrics.confusion_matrix(np.zeros((2, 2), int), np.zeros(4, int), num_classes=3)
    with pytest.raises(ValueError, match="num_classes"):
        metrics.confusion_matrix([0], [0], num_classes=0)


def test_scores_hand_computed():
    # rows = ground truth, columns = prediction
    hist = np.array(
        [
            [3, 1, 0],
            [2, 4, 0],
            [0, 0, 0],  # class 2 absent from ground truth and prediction
        ]
    )
    # t = (4, 6, 0), predicted totals = (5, 5, 0), n_ii = (3, 4, 0), total 10
    # pixel acc = (3 + 4) / 10
    # acc_0 = 3/4, acc_1 = 4/6, class 2 left out -> mean acc = (3/4 + 4/6) / 2
    # IU_0 = 3 / (4 + 5 - 3) = 3/6, IU_1 = 4 / (6 + 5 - 4) = 4/7, IU_2 undefined
    # mean IU = (3/6 + 4/7) / 2; fw IU = (4 * 3/6 + 6 * 4/7) / 10
    s = metrics.scores(hist)
    assert s["pixel_accuracy"] == pytest.approx(0.7)
    assert s["mean_accuracy"] == pytest.approx((3 / 4 + 4 / 6) / 2)
    assert s["mean_iou"] == pytest.approx((3 / 6 + 4 / 7) / 2)
    assert s["frequency_weighted_iou"] == pytest.approx((4 * 3 / 6 + 6 * 4 / 7) / 10)
    assert s["iou"][:2] == pytest.approx([3 / 6, 4 / 7])
    assert math.isnan(s["iou"][2])
    assert s["accuracy"][:2] == pytest.approx([3 / 4, 4 / 6])
    assert math.isnan(s["accuracy"][2])


def test_scores_class_predicted_but_absent_from_ground_truth():
    hist = np.array(
        [
            [2, 1, 1],
            [0, 3, 0],
            [0, 0, 0],  # class 2: no ground truth, but predicted once
        ]
    )
    # t = (4, 3, 0), predicted totals = (2, 4, 1), n_ii = (2, 3, 0)
    # IU_2 = 0 / (0 + 1 - 0) = 0 and counts in mean IU; acc_2 undefined (t_2 = 0)
    # mean IU = (2/(4+2-2) + 3/(3+4-3) + 0) / 3 = (1/2 + 3/4) / 3
    # mean acc = (2/4 + 3/3) / 2; fw IU = (4 * 1/2 + 3 * 3/4 + 0 * 0) / 7
    s = metrics.scores(hist)
    assert s["iou"] == pytest.approx([0.5, 0.75, 0.0])
    assert s["mean_iou"] == pytest.approx((0.5 + 0.75) / 3)
    assert s["mean_accuracy"] == pytest.approx((0.5 + 1.0) / 2)
    assert s["pixel_accuracy"] == pytest.approx(5 / 7)
    assert s["frequency_weighted_iou"] == pytest.approx((4 * 0.5 + 3 * 0.75) / 7)


def test_scores_from_pixels_with_ignore_and_perfect_prediction():
    labels = np.array([[1, 1, 255], [0, 255, 1]])
    hist = metrics.confusion_matrix(labels, np.where(labels == 255, 0, labels), 4)
    s = metrics.scores(hist)
    # Only classes 0 and 1 appear; both perfect; classes 2 and 3 undefined.
    assert s["pixel_accuracy"] == 1.0
    assert s["mean_iou"] == 1.0
    assert s["mean_accuracy"] == 1.0
    assert s["frequency_weighted_iou"] == 1.0
    assert [math.isnan(v) for v in s["iou"]] == [False, False, True, True]


def test_scores_empty_and_bad_matrix():
    s = metrics.scores(np.zeros((3, 3)))
    assert all(math.isnan(s[k]) for k in ("pixel_accuracy", "mean_iou", "mean_accuracy"))
    with pytest.raises(ValueError, match="square"):
        metrics.scores(np.zeros((2, 3)))


def _numpy_confusion(labels, preds, n, ignore):
    # Independent of kfcn: np.add.at over the kept pixels.
    hist = np.zeros((n, n), np.int64)
    keep = (labels != ignore) & (labels < n)
    np.add.at(hist, (labels[keep], preds[keep]), 1)
    return hist


def test_streaming_metric_matches_numpy_and_round_trips():
    import keras
    import tensorflow as tf

    rng = np.random.default_rng(0)
    n = 4
    metric = metrics.ConfusionMatrixMetric(n, ignore_label=255, name="miou")
    total = np.zeros((n, n), np.int64)
    for _ in range(3):
        labels = rng.integers(0, n, size=(2, 5, 6))
        labels[rng.random(labels.shape) < 0.2] = 255
        logits = rng.normal(size=(2, 5, 6, n)).astype(np.float32)
        preds = logits.argmax(-1)
        total += _numpy_confusion(labels, preds, n, 255)
        metric.update_state(tf.constant(labels, tf.int32), tf.constant(logits))
    np.testing.assert_array_equal(metric.confusion_matrix(), total)
    tp = np.diag(total)
    union = total.sum(0) + total.sum(1) - tp
    assert float(metric.result()) == pytest.approx(np.mean(tp / union), rel=1e-6)
    assert metric.scores()["mean_iou"] == pytest.approx(np.mean(tp / union))

    # Class ids instead of logits, and [b, h, w, 1] labels.
    metric.reset_state()
    metric.update_state(np.array([[[[0], [1]], [[1], [255]]]]), np.array([[[0, 1], [0, 3]]]))
    np.testing.assert_array_equal(
        metric.confusion_matrix(), [[1, 0, 0, 0], [1, 1, 0, 0], [0] * 4, [0] * 4]
    )

    clone = keras.metrics.deserialize(keras.metrics.serialize(metric))
    assert type(clone).__name__ == "ConfusionMatrixMetric"
    assert clone.get_config() == metric.get_config()
    assert (clone.num_classes, clone.ignore_label, clone.name) == (4, 255, "miou")


def _paper_scores(labels, preds, n, ignore):
    """The paper's four metrics from pixel sets, class by class (no confusion matrix).

    Classes absent from both ground truth and prediction are left out of mean IU, classes
    absent from the ground truth out of mean accuracy (the authors' np.nanmean).
    """
    labels, preds = np.asarray(labels).ravel(), np.asarray(preds).ravel()
    kept = (labels != ignore) & (labels < n)
    labels, preds = labels[kept], preds[kept]
    total = labels.size
    correct = int((labels == preds).sum())
    accuracies, ious, weighted = [], [], 0.0
    for c in range(n):
        gt, pr = labels == c, preds == c
        if gt.any():
            accuracies.append((gt & pr).sum() / gt.sum())
        if gt.any() or pr.any():
            iou = (gt & pr).sum() / (gt | pr).sum()
            ious.append(iou)
            weighted += gt.sum() * iou
    return {
        "pixel_accuracy": correct / total,
        "mean_accuracy": float(np.mean(accuracies)),
        "mean_iou": float(np.mean(ious)),
        "frequency_weighted_iou": weighted / total,
    }


def _absent_classes_case():
    """Six classes: 1 and 4 appear nowhere, 3 only in ground truth, 5 only in predictions."""
    rng = np.random.default_rng(7)
    labels = rng.choice([0, 2, 3], size=(8, 4, 5)).astype(np.int32)
    # Class 3 only in images 0 and 1: under a 2-replica strategy, in one replica's share.
    labels[2:] = np.where(labels[2:] == 3, 0, labels[2:])
    labels[rng.random(labels.shape) < 0.2] = 255
    preds = np.where(rng.random(labels.shape) < 0.6, labels, rng.choice([0, 2, 5], labels.shape))
    preds = np.where(preds == 255, 5, preds)  # ignored pixels: any prediction
    preds = np.where(preds == 3, 2, preds).astype(np.int32)  # 3 never predicted
    assert set(np.unique(labels)) == {0, 2, 3, 255} and set(np.unique(preds)) == {0, 2, 5}
    return labels, preds


def test_streaming_metric_result_leaves_out_absent_classes():
    import tensorflow as tf

    labels, preds = _absent_classes_case()
    expected = _paper_scores(labels, preds, 6, 255)
    # The means are over 4 IUs (0, 2, 3, 5) and 3 accuracies (0, 2, 3), not over 6 classes.
    metric = metrics.ConfusionMatrixMetric(6)
    assert float(metric.result()) == 0.0  # nothing counted yet
    for start in (0, 3, 6):  # streamed in uneven batches
        logits = tf.one_hot(preds[start : start + 3], 6) * 4.0 - 1.0
        metric.update_state(tf.constant(labels[start : start + 3]), logits)
    assert float(metric.result()) == pytest.approx(expected["mean_iou"], rel=1e-6)
    got = metric.scores()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-12), key
    assert [math.isnan(v) for v in got["iou"]] == [False, True, False, False, True, False]
    assert [math.isnan(v) for v in got["accuracy"]] == [False, True, False, False, True, True]


def test_streaming_metric_rejects_wrong_channels():
    with pytest.raises(ValueError, match="num_classes=3"):
        metrics.ConfusionMatrixMetric(3).update_state(np.zeros((1, 2, 2)), np.zeros((1, 2, 2, 5)))


def test_streaming_metric_in_compiled_model_evaluate():
    import keras

    # A 1x1 conv with fixed weights: logit_1 - logit_0 = R - 128, so class = (R > 128).
    inputs = keras.Input((None, None, 3))
    outputs = keras.layers.Conv2D(
        2,
        1,
        kernel_initializer=keras.initializers.Constant(
            np.array([[[[0.0, 1.0], [0, 0], [0, 0]]]], np.float32)
        ),
        bias_initializer=keras.initializers.Constant([0.0, -128.0]),
    )(inputs)
    model = keras.Model(inputs, outputs)
    metric = metrics.ConfusionMatrixMetric(2, name="mean_iou")
    from kfcn.losses import SegmentationCrossEntropy

    model.compile(loss=SegmentationCrossEntropy(), metrics=[metric])
    images = np.zeros((4, 3, 3, 3), np.float32)
    images[:, :, :2, 0] = 200.0  # class 1 in the first two columns
    labels = np.zeros((4, 3, 3), np.int32)
    labels[:, :, :2] = 1
    labels[0, 0, 2] = 1  # one wrong pixel: gt 1, predicted 0
    labels[1, 0, 0] = 255  # ignored
    model.evaluate(images, labels, batch_size=2, verbose=0)
    # gt1/pred1 = 4*6 - 1 ignored = 23; gt1/pred0 = 1; gt0/pred0 = 4*3 - 1 = 11
    np.testing.assert_array_equal(metric.confusion_matrix(), [[11, 0], [1, 23]])


def test_streaming_metric_under_xla():
    import tensorflow as tf

    metric = metrics.ConfusionMatrixMetric(3)

    @tf.function(jit_compile=True)
    def step(labels, predictions):
        metric.update_state(labels, predictions)

    step(np.array([[[0, 1, 255], [2, 2, 1]]]), np.array([[[0, 2, 1], [2, 0, 1]]]))
    # pairs: (0,0) (1,2) ignored (2,2) (2,0) (1,1)
    np.testing.assert_array_equal(metric.confusion_matrix(), [[1, 0, 0], [0, 1, 1], [1, 0, 1]])


def test_compiled_model_with_kfcn_loss_and_metric_saves_and_loads(tmp_path):
    import keras

    from kfcn.losses import SegmentationCrossEntropy

    inputs = keras.Input((None, None, 3))
    model = keras.Model(inputs, keras.layers.Conv2D(3, 1)(inputs))
    model.compile(
        optimizer="sgd",
        loss=SegmentationCrossEntropy(ignore_label=11, class_weights=[1.0, 2.0, 0.5]),
        metrics=[metrics.ConfusionMatrixMetric(3, ignore_label=11)],
    )
    x = np.zeros((2, 4, 4, 3), np.float32)
    y = np.zeros((2, 4, 4), np.int32)
    model.fit(x, y, verbose=0)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert loaded.loss.get_config() == model.loss.get_config()
    loaded.evaluate(x, y, verbose=0)
    restored = [m for m in loaded.metrics[-1].metrics if m.name == "mean_iou"][0]
    assert restored.ignore_label == 11
    np.testing.assert_array_equal(restored.confusion_matrix(), [[32, 0, 0], [0] * 3, [0] * 3])


_DISTRIBUTED_SCRIPT = textwrap.dedent(
    """
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from kfcn import metrics

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    assert strategy.num_replicas_in_sync == 2
    rng = np.random.default_rng(1)
    n = 3
    labels = rng.integers(0, n, size=(8, 4, 5)).astype(np.int32)
    labels[rng.random(labels.shape) < 0.25] = 255
    logits = rng.normal(size=(8, 4, 5, n)).astype(np.float32)
    with strategy.scope():
        metric = metrics.ConfusionMatrixMetric(n)
    dataset = tf.data.Dataset.from_tensor_slices((labels, logits)).batch(4)
    dist = strategy.experimental_distribute_dataset(dataset)

    @tf.function
    def step(y, p):
        strategy.run(metric.update_state, args=(y, p))

    seen = []
    for y, p in dist:
        seen.append(sum(int(tf.size(t)) for t in strategy.experimental_local_results(y)))
        step(y, p)
    # Both replicas received data, so a per-replica (unsummed) read would be wrong.
    assert len(seen) == 2, seen
    np.save("confusion.npy", metric.confusion_matrix())

    # The same through Model.evaluate under the strategy (global batch 4 -> 2 per replica).
    import keras
    from kfcn.losses import SegmentationCrossEntropy
    with strategy.scope():
        inputs = keras.Input((4, 5, n))
        model = keras.Model(inputs, keras.layers.Identity()(inputs))
        compiled_metric = metrics.ConfusionMatrixMetric(n, name="miou")
        model.compile(loss=SegmentationCrossEntropy(), metrics=[compiled_metric])
    model.evaluate(logits, labels, batch_size=4, verbose=0)
    np.save("confusion_evaluate.npy", compiled_metric.confusion_matrix())
    np.save("result.npy", np.float64(metric.result()))
    np.save("labels.npy", labels)
    np.save("preds.npy", logits.argmax(-1))

    # Absent classes (the test wrote the data): streamed per replica, and through evaluate.
    labels6 = np.load("absent_labels.npy")
    logits6 = np.eye(6, dtype=np.float32)[np.load("absent_preds.npy")] * 4.0 - 1.0
    with strategy.scope():
        absent = metrics.ConfusionMatrixMetric(6)
    dist6 = strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices((labels6, logits6)).batch(4))

    @tf.function
    def step6(y, p):
        strategy.run(absent.update_state, args=(y, p))

    for y, p in dist6:
        step6(y, p)
    keys = ("pixel_accuracy", "mean_accuracy", "mean_iou", "frequency_weighted_iou")
    np.save("absent_scores.npy", [absent.scores()[k] for k in keys])
    np.save("absent_result.npy", np.float64(absent.result()))
    with strategy.scope():
        inputs6 = keras.Input((4, 5, 6))
        model6 = keras.Model(inputs6, keras.layers.Identity()(inputs6))
        model6.compile(loss=SegmentationCrossEntropy(),
                       metrics=[metrics.ConfusionMatrixMetric(6, name="miou")])
    logs = model6.evaluate(logits6, labels6, batch_size=4, verbose=0, return_dict=True)
    np.save("absent_evaluate.npy", np.float64(logs["miou"]))
    """
)


def test_streaming_metric_sums_replicas_under_mirrored_strategy(tmp_path):
    # Logical devices must be configured before TensorFlow initialises, so the
    # body runs in a fresh interpreter.
    absent_labels, absent_preds = _absent_classes_case()
    np.save(tmp_path / "absent_labels.npy", absent_labels)
    np.save(tmp_path / "absent_preds.npy", absent_preds)
    proc = subprocess.run(
        [sys.executable, "-c", _DISTRIBUTED_SCRIPT],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    labels = np.load(tmp_path / "labels.npy")
    preds = np.load(tmp_path / "preds.npy")
    expected = _numpy_confusion(labels, preds, 3, 255)
    np.testing.assert_array_equal(np.load(tmp_path / "confusion.npy"), expected)
    np.testing.assert_array_equal(np.load(tmp_path / "confusion_evaluate.npy"), expected)
    tp = np.diag(expected)
    union = expected.sum(0) + expected.sum(1) - tp
    assert float(np.load(tmp_path / "result.npy")) == pytest.approx(np.mean(tp / union), 1e-6)

    # Absent classes: the replicas' summed matrix, scored over the classes present only.
    expected = _paper_scores(absent_labels, absent_preds, 6, 255)
    keys = ("pixel_accuracy", "mean_accuracy", "mean_iou", "frequency_weighted_iou")
    np.testing.assert_allclose(
        np.load(tmp_path / "absent_scores.npy"), [expected[k] for k in keys], rtol=1e-12
    )
    for name in ("absent_result.npy", "absent_evaluate.npy"):
        assert float(np.load(tmp_path / name)) == pytest.approx(expected["mean_iou"], rel=1e-6)
