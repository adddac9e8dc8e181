"""Tests for kfcn.losses against numpy formulas written out here."""

import logging

import keras
import numpy as np
import pytest
import tensorflow as tf

from kfcn import losses


def _numpy_pixel_ce(labels, logits, ignore, weights=None):
    # -log softmax by hand: log-sum-exp with the max subtracted.
    logits = logits.astype(np.float64)
    m = logits.max(-1, keepdims=True)
    log_softmax = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
    loss_sum = 0.0
    weight_sum = 0.0
    n = logits.shape[-1]
    for idx in np.ndindex(labels.shape):
        y = labels[idx]
        if y == ignore or y < 0 or y >= n:
            continue
        w = 1.0 if weights is None else weights[y]
        loss_sum += -w * log_softmax[idx][y]
        weight_sum += w
    return loss_sum, weight_sum


@pytest.fixture
def batch():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=(2, 4, 5)).astype(np.int32)
    labels[0, 0, :3] = 255
    labels[1, 2, 2] = 255
    logits = rng.normal(scale=3.0, size=(2, 4, 5, 3)).astype(np.float32)
    return labels, logits


def test_two_pixel_case_by_hand():
    # Pixel 1: logits (0, ln 3) label 1 -> p = 3/4 -> loss ln(4/3).
    # Pixel 2: label 255 (ignored). Pixel 3: logits (0, 0), label 0 -> ln 2.
    labels = np.array([[[1, 255, 0]]])
    logits = np.array([[[[0.0, np.log(3.0)], [5.0, -5.0], [0.0, 0.0]]]], np.float32)
    loss_sum, weight_sum = losses.pixel_cross_entropy(labels, logits)
    assert float(weight_sum) == 2.0
    assert float(loss_sum) == pytest.approx(np.log(4 / 3) + np.log(2), rel=1e-6)
    # Class weights (2, 0.5): 0.5 * ln(4/3) + 2 * ln 2 over weight 2.5.
    loss_sum, weight_sum = losses.pixel_cross_entropy(labels, logits, class_weights=[2.0, 0.5])
    assert float(weight_sum) == 2.5
    assert float(loss_sum) == pytest.approx(0.5 * np.log(4 / 3) + 2 * np.log(2), rel=1e-6)


def test_pixel_cross_entropy_matches_numpy(batch):
    labels, logits = batch
    weights = np.array([0.5, 2.0, 1.25], np.float32)
    for w in (None, weights):
        loss_sum, weight_sum = losses.pixel_cross_entropy(labels, logits, class_weights=w)
        ref_sum, ref_weight = _numpy_pixel_ce(labels, logits, 255, w)
        assert loss_sum.dtype == tf.float32 and weight_sum.dtype == tf.float32
        assert float(loss_sum) == pytest.approx(ref_sum, rel=1e-5)
        assert float(weight_sum) == pytest.approx(ref_weight, rel=1e-6)


def test_half_precision_logits_are_computed_in_float32(batch):
    labels, logits = batch
    for dtype in (tf.float16, tf.bfloat16):
        cast = tf.cast(logits, dtype)
        loss_sum, _ = losses.pixel_cross_entropy(labels, cast)
        assert loss_sum.dtype == tf.float32
        ref = _numpy_pixel_ce(labels, cast.numpy().astype(np.float32), 255)[0]
        assert float(loss_sum) == pytest.approx(ref, rel=1e-5)
    # Large logits that overflow float16's softmax if computed naively stay finite.
    big = tf.constant([[[[60000.0, -60000.0]]]], tf.float16)
    loss_sum, _ = losses.pixel_cross_entropy(np.array([[[1]]]), big)
    assert float(loss_sum) == pytest.approx(120000.0, rel=1e-3)


def test_ignore_label_never_indexes_the_weight_table():
    # On CPU an out-of-range tf.gather raises; the ignore value must never reach it.
    labels = np.full((1, 2, 2), 255, np.int32)
    labels[0, 0, 0] = 1
    logits = np.zeros((1, 2, 2, 2), np.float32)
    loss_sum, weight_sum = losses.pixel_cross_entropy(labels, logits, class_weights=[1.0, 3.0])
    assert float(weight_sum) == 3.0
    assert float(loss_sum) == pytest.approx(3.0 * np.log(2), rel=1e-6)
    # All pixels ignored: zero loss, zero weight, and a finite mean.
    loss = losses.SegmentationCrossEntropy(class_weights=[1.0, 3.0])
    assert float(loss(np.full((1, 2, 2), 255), logits)) == 0.0


def test_nan_logits_at_ignored_pixels_do_not_leak():
    labels = np.array([[[0, 255]]])
    logits = np.array([[[[0.0, 0.0], [np.nan, np.inf]]]], np.float32)
    loss_sum, weight_sum = losses.pixel_cross_entropy(labels, logits)
    assert float(loss_sum) == pytest.approx(np.log(2), rel=1e-6)
    assert float(weight_sum) == 1.0


def test_keras_loss_mean_and_sum(batch):
    labels, logits = batch
    ref_sum, ref_weight = _numpy_pixel_ce(labels, logits, 255)
    mean = losses.SegmentationCrossEntropy()
    total = losses.SegmentationCrossEntropy(reduction_mode="sum")
    assert float(mean(labels, logits)) == pytest.approx(ref_sum / ref_weight, rel=1e-5)
    assert float(total(labels, logits)) == pytest.approx(ref_sum, rel=1e-5)
    # Per-image sample weights [b] weight every pixel of that image.
    sw = np.array([1.0, 3.0], np.float32)
    s0, w0 = _numpy_pixel_ce(labels[:1], logits[:1], 255)
    s1, w1 = _numpy_pixel_ce(labels[1:], logits[1:], 255)
    got = float(mean(labels, logits, sample_weight=sw))
    assert got == pytest.approx((s0 + 3 * s1) / (w0 + 3 * w1), rel=1e-5)
    with pytest.raises(ValueError, match="reduction_mode"):
        losses.SegmentationCrossEntropy(reduction_mode="batch")


def test_keras_loss_serialization_round_trip():
    loss = losses.SegmentationCrossEntropy(
        ignore_label=11, class_weights=np.array([0.5, 2.0]), reduction_mode="sum"
    )
    clone = keras.losses.deserialize(keras.losses.serialize(loss))
    assert isinstance(clone, losses.SegmentationCrossEntropy)
    assert clone.get_config() == loss.get_config()
    assert (clone.ignore_label, clone.class_weights, clone.reduction_mode) == (
        11,
        [0.5, 2.0],
        "sum",
    )


def test_loss_trains_a_compiled_model():
    # The gradient of the mean loss flows: one SGD step lowers it.
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 6, 6, 3)).astype(np.float32)
    y = (x[..., 0] > 0).astype(np.int32)
    y[0, 0, 0] = 255
    model = keras.Sequential([keras.Input((6, 6, 3)), keras.layers.Conv2D(2, 1)])
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss=losses.SegmentationCrossEntropy())
    before = model.evaluate(x, y, verbose=0)
    model.fit(x, y, epochs=3, verbose=0)
    assert model.evaluate(x, y, verbose=0) < before


def test_summed_loss_gradient_is_n_valid_times_mean_gradient(batch):
    # The basis of the learning-rate correspondence in the module docstring.
    labels, logits = batch
    n_valid = float(np.sum(labels != 255))
    var = tf.Variable(logits)
    with tf.GradientTape(persistent=True) as tape:
        s = losses.SegmentationCrossEntropy(reduction_mode="sum")(labels, var)
        m = losses.SegmentationCrossEntropy()(labels, var)
    np.testing.assert_allclose(
        tape.gradient(s, var).numpy(), n_valid * tape.gradient(m, var).numpy(), rtol=1e-5
    )


def test_median_frequency_weights_by_hand(caplog):
    # Three 2x2 label maps, 4 classes, class 3 never present, 255 ignored.
    labels = [
        np.array([[0, 0], [1, 255]]),  # 3 labelled pixels: class 0 x2, class 1 x1
        np.array([[0, 2], [2, 2]]),  # 4 labelled pixels: class 0 x1, class 2 x3
        np.array([[1, 1], [1, 1]]),  # 4 labelled pixels: class 1 x4
    ]
    # freq(0) = 3 / (3 + 4) = 3/7; freq(1) = 5 / (3 + 4) = 5/7; freq(2) = 3 / 4
    # median(3/7, 5/7, 3/4) = 5/7 -> weights (5/7)/(3/7) = 5/3, 1, (5/7)/(3/4) = 20/21, 0
    counts = losses.count_class_pixels(labels, num_classes=4, ignore_label=255)
    np.testing.assert_array_equal(counts.class_pixels, [3, 5, 3, 0])
    np.testing.assert_array_equal(counts.image_pixels, [7, 7, 4, 0])
    assert counts.num_images == 3
    with caplog.at_level(logging.WARNING, logger="kfcn.losses"):
        weights = losses.median_frequency_weights(labels, num_classes=4, ignore_label=255)
    assert "[3]" in caplog.text
    assert weights.dtype == np.float32
    np.testing.assert_allclose(weights, [5 / 3, 1.0, 20 / 21, 0.0], rtol=1e-6)
    np.testing.assert_array_equal(losses.median_frequency_weights(counts, 4, 255), weights)


def test_sqrt_median_frequency_weights_by_hand():
    # The same maps as above: weights (5/3, 1, 20/21, 0) before the square root.
    labels = [np.array([[0, 0], [1, 255]]), np.array([[0, 2], [2, 2]]), np.array([[1, 1], [1, 1]])]
    weights = losses.median_frequency_weights(labels, num_classes=4, power=0.5)
    np.testing.assert_allclose(weights, [(5 / 3) ** 0.5, 1.0, (20 / 21) ** 0.5, 0.0], rtol=1e-6)
    with pytest.raises(ValueError, match=r"`power` must be positive. Received: power=0"):
        losses.median_frequency_weights(labels, num_classes=4, power=0)


def test_median_frequency_weights_from_tf_dataset_of_element_dicts():
    labels = np.array([[[0, 1], [1, 1]], [[0, 0], [0, 11]]], np.uint8)
    # freq(0) = (1 + 3) / (4 + 3) = 4/7, freq(1) = 3 / 4; median = (4/7 + 3/4) / 2
    ds = tf.data.Dataset.from_tensor_slices(
        {
            "image": np.zeros((2, 2, 2, 3), np.uint8),
            "label": labels,
            "name": np.array([b"a", b"b"]),
        }
    )
    weights = losses.median_frequency_weights(ds, num_classes=2, ignore_label=11)
    med = (4 / 7 + 3 / 4) / 2
    np.testing.assert_allclose(weights, [med / (4 / 7), med / (3 / 4)], rtol=1e-6)
