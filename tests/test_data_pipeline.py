"""Tests of the tf.data training and evaluation pipelines."""

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from kfcn.data import load_dataset
from kfcn.data.pipeline import eval_pipeline, train_pipeline
from kfcn.layers import IMAGENET_MEAN_RGB

NUM_CLASSES = 5


def _position_image(height, width):
    """R = column, G = row, B = 7: every pixel says where it came from."""
    rows, cols = np.mgrid[0:height, 0:width]
    return np.stack([cols, rows, np.full_like(rows, 7)], axis=-1).astype(np.uint8)


def write_folder(root, images, labels):
    lines = []
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        Image.fromarray(image).save(root / f"img{i}.png")
        Image.fromarray(label, mode="L").save(root / f"lab{i}.png")
        lines.append(f"img{i}.png lab{i}.png")
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    dataset, _ = load_dataset("folder", "train", data_dir=str(root), num_classes=NUM_CLASSES)
    return dataset


def _take(pipeline, batches):
    return [(x.numpy(), y.numpy()) for x, y in pipeline.take(batches)]


def test_shapes_dtypes_and_label_range(tmp_path):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (20 + i, 30 - i, 3), dtype=np.uint8) for i in range(3)]
    labels = [rng.integers(0, NUM_CLASSES, im.shape[:2], dtype=np.uint8) for im in images]
    dataset = write_folder(tmp_path, images, labels)
    pipeline = train_pipeline(dataset, global_batch_size=4, crop_size=(16, 24), seed=1)
    assert pipeline.element_spec[0].shape.as_list() == [4, 16, 24, 3]
    assert pipeline.element_spec[0].dtype == tf.float32
    assert pipeline.element_spec[1].shape.as_list() == [4, 16, 24]
    assert pipeline.element_spec[1].dtype == tf.int32
    # 3 images, batches of 4 over 3 batches: the pipeline repeats.
    for x, y in _take(pipeline, 3):
        assert x.min() >= 0.0 and x.max() <= 255.0
        assert set(np.unique(y)) <= set(range(NUM_CLASSES)) | {255}


def test_padding_values_exact(tmp_path):
    image = _position_image(10, 12)
    label = ((np.arange(120) % NUM_CLASSES).reshape(10, 12)).astype(np.uint8)
    dataset = write_folder(tmp_path, [image], [label])
    pipeline = train_pipeline(
        dataset,
        global_batch_size=1,
        crop_size=(16, 20),
        scale_range=(1.0, 1.0),
        flip=False,
        ignore_label=250,
        seed=3,
    )
    offsets = set()
    for x, y in _take(pipeline, 6):
        x, y = x[0], y[0]
        inside = y != 250
        assert inside.sum() == 120  # the whole image, never cropped
        rows, cols = np.nonzero(inside)
        top, left = rows.min(), cols.min()
        offsets.add((top, left))
        np.testing.assert_array_equal(x[top : top + 10, left : left + 12], image.astype(np.float32))
        np.testing.assert_array_equal(y[top : top + 10, left : left + 12], label)
        # Padding is the colour the model itself pads with (PadToMultiple).
        mean = np.broadcast_to(np.float32(IMAGENET_MEAN_RGB), (200, 3))
        np.testing.assert_array_equal(x[~inside], mean)
    assert len(offsets) > 1  # the image is placed at random inside the padded crop


def test_crop_is_a_window_of_the_image(tmp_path):
    image = _position_image(30, 40)
    label = (image[..., 0] % NUM_CLASSES).astype(np.uint8)
    dataset = write_folder(tmp_path, [image], [label])
    pipeline = train_pipeline(
        dataset, global_batch_size=2, crop_size=(8, 10), scale_range=(1, 1), flip=False, seed=0
    )
    corners = set()
    for x, y in _take(pipeline, 4):
        for crop, crop_label in zip(x, y, strict=True):
            top, left = int(crop[0, 0, 1]), int(crop[0, 0, 0])
            corners.add((top, left))
            np.testing.assert_array_equal(crop, image[top : top + 8, left : left + 10])
            np.testing.assert_array_equal(crop_label, label[top : top + 8, left : left + 10])
    assert len(corners) > 3


def test_flip_applies_to_image_and_label_together(tmp_path):
    image = _position_image(6, 9)
    label = (image[..., 0] % NUM_CLASSES).astype(np.uint8)
    dataset = write_folder(tmp_path, [image], [label])
    pipeline = train_pipeline(
        dataset, global_batch_size=8, crop_size=(6, 9), scale_range=(1, 1), flip=True, seed=5
    )
    cols = np.arange(9, dtype=np.float32)
    flipped = 0
    for x, y in _take(pipeline, 2):
        for crop, crop_label in zip(x, y, strict=True):
            if crop[0, 0, 0] == 8:
                flipped += 1
                np.testing.assert_array_equal(crop[..., 0], np.broadcast_to(cols[::-1], (6, 9)))
            else:
                np.testing.assert_array_equal(crop[..., 0], np.broadcast_to(cols, (6, 9)))
            # The label moved with the pixels it belongs to.
            np.testing.assert_array_equal(crop_label, crop[..., 0].astype(np.int32) % NUM_CLASSES)
    assert 0 < flipped < 16


def test_scale_nearest_labels_and_bilinear_image(tmp_path):
    image = _position_image(5, 6) * 10
    label = np.array([0, 2, 4, 2, 0, 4], np.uint8)[None, :].repeat(5, axis=0)
    dataset = write_folder(tmp_path, [image], [label])
    # Exactly 2x: nearest upsampling repeats each label pixel 2x2 (half-pixel centres).
    pipeline = train_pipeline(
        dataset, global_batch_size=1, crop_size=(10, 12), scale_range=(2, 2), flip=False, seed=0
    )
    x, y = _take(pipeline, 1)[0]
    np.testing.assert_array_equal(y[0], label.repeat(2, axis=0).repeat(2, axis=1))
    # Bilinear with half-pixel centres: output column j samples input column (j + 0.5) / 2 - 0.5.
    src = image[..., 0].astype(np.float64)[0]
    for j, expected in [
        (0, src[0]),
        (1, 0.75 * src[0] + 0.25 * src[1]),
        (4, 0.25 * src[1] + 0.75 * src[2]),
    ]:
        assert x[0, 0, j, 0] == pytest.approx(expected, abs=1e-3)
    # Random scales keep every label value an original class (or the padding ignore value).
    pipeline = train_pipeline(dataset, global_batch_size=4, crop_size=(7, 9), seed=2)
    for _, y in _take(pipeline, 3):
        assert set(np.unique(y)) <= {0, 2, 4, 255}


def test_photometric_changes_only_the_image(tmp_path):
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    label = rng.integers(0, NUM_CLASSES, (12, 16), dtype=np.uint8)
    dataset = write_folder(tmp_path, [image], [label])
    kwargs = dict(global_batch_size=2, crop_size=(10, 10), seed=7)
    plain = _take(train_pipeline(dataset, **kwargs), 2)
    jittered = _take(train_pipeline(dataset, photometric=True, **kwargs), 2)
    for (x0, y0), (x1, y1) in zip(plain, jittered, strict=True):
        np.testing.assert_array_equal(y0, y1)
        assert not np.allclose(x0, x1)
        assert x1.min() >= 0.0 and x1.max() <= 255.0


def test_seed_reproducible_and_reshuffled_each_epoch(tmp_path):
    images = [np.full((4, 4, 3), 10 * i, np.uint8) for i in range(8)]
    labels = [np.zeros((4, 4), np.uint8)] * 8
    dataset = write_folder(tmp_path, images, labels)
    kwargs = dict(global_batch_size=8, crop_size=(4, 4), scale_range=(1, 1), flip=False, seed=11)
    run1 = [x[:, 0, 0, 0] for x, _ in _take(train_pipeline(dataset, **kwargs), 3)]
    run2 = [x[:, 0, 0, 0] for x, _ in _take(train_pipeline(dataset, **kwargs), 3)]
    np.testing.assert_array_equal(np.stack(run1), np.stack(run2))
    # One batch is one epoch: each holds every image once, in a new order.
    for epoch in run1:
        assert sorted(epoch.tolist()) == [10.0 * i for i in range(8)]
    assert not all(np.array_equal(run1[0], other) for other in run1[1:])


def _image_ids(pipeline, batches):
    return {int(v) for x, _ in _take(pipeline, batches) for v in x[:, 0, 0, 0]}


def test_sharding_disjoint_across_input_pipelines(tmp_path):
    images = [np.full((4, 4, 3), i, np.uint8) for i in range(6)]
    labels = [np.zeros((4, 4), np.uint8)] * 6
    dataset = write_folder(tmp_path, images, labels)
    seen = []
    for pipeline_id in range(2):
        context = tf.distribute.InputContext(
            num_input_pipelines=2, input_pipeline_id=pipeline_id, num_replicas_in_sync=2
        )
        pipeline = train_pipeline(
            dataset,
            global_batch_size=4,
            crop_size=(4, 4),
            scale_range=(1, 1),
            input_context=context,
            seed=0,
        )
        assert pipeline.element_spec[0].shape[0] == 2  # per-replica batch
        seen.append(_image_ids(pipeline, 6))
    assert seen[0].isdisjoint(seen[1])
    assert seen[0] | seen[1] == set(range(6))
    assert len(seen[0]) == len(seen[1]) == 3
    # Datasets without a file table (e.g. tfds) are sharded as elements.
    generic = tf.data.Dataset.from_tensor_slices(
        {"image": np.stack(images), "label": np.stack(labels), "name": [str(i) for i in range(6)]}
    )
    ids = [
        _image_ids(
            train_pipeline(
                generic,
                global_batch_size=4,
                crop_size=(4, 4),
                scale_range=(1, 1),
                input_context=tf.distribute.InputContext(2, i, 2),
            ),
            6,
        )
        for i in range(2)
    ]
    assert ids[0].isdisjoint(ids[1]) and ids[0] | ids[1] == set(range(6))
    with pytest.raises(ValueError, match="Cannot shard 6 examples over 8"):
        train_pipeline(
            dataset, global_batch_size=8, input_context=tf.distribute.InputContext(8, 0, 8)
        )


def test_eval_pipeline_native_size_in_order(tmp_path):
    rng = np.random.default_rng(2)
    images = [rng.integers(0, 256, (7 + i, 9 + 2 * i, 3), dtype=np.uint8) for i in range(3)]
    labels = [rng.integers(0, NUM_CLASSES, im.shape[:2], dtype=np.uint8) for im in images]
    dataset = write_folder(tmp_path, images, labels)
    outputs = list(eval_pipeline(dataset))
    assert len(outputs) == 3
    for i, (x, y, name) in enumerate(outputs):
        assert x.dtype == tf.float32 and y.dtype == tf.int32
        np.testing.assert_array_equal(x.numpy()[0], images[i].astype(np.float32))
        np.testing.assert_array_equal(y.numpy()[0], labels[i])
        assert name.numpy().tolist() == [f"img{i}".encode()]
    generic = dataset.take(2)  # no file table: the generic path
    assert [int(x.shape[1]) for x, _, _ in eval_pipeline(generic)] == [7, 8]


def test_argument_checks(tmp_path):
    dataset = write_folder(tmp_path, [_position_image(4, 4)], [np.zeros((4, 4), np.uint8)])
    with pytest.raises(ValueError, match="global_batch_size=0"):
        train_pipeline(dataset, global_batch_size=0)
    with pytest.raises(ValueError, match="crop_size"):
        train_pipeline(dataset, global_batch_size=1, crop_size=(0, 4))
    with pytest.raises(ValueError, match="scale_range"):
        train_pipeline(dataset, global_batch_size=1, scale_range=(2.0, 1.0))


def test_sharding_happens_before_decoding(tmp_path):
    """A pipeline never decodes another pipeline's files: a bad file only breaks its own shard."""
    images = [np.full((4, 4, 3), i, np.uint8) for i in range(4)]
    labels = [np.zeros((4, 4), np.uint8)] * 4
    labels[1] = np.full((4, 4), 99, np.uint8)  # not a class: fails when decoded
    write_folder(tmp_path, images, labels)
    # validate="none" leaves the label check to decoding time.
    dataset, _ = load_dataset(
        "folder", "train", data_dir=str(tmp_path), num_classes=NUM_CLASSES, validate="none"
    )

    def pipeline(pipeline_id):
        context = tf.distribute.InputContext(2, pipeline_id, 2)
        return train_pipeline(
            dataset,
            global_batch_size=2,
            crop_size=(4, 4),
            scale_range=(1, 1),
            input_context=context,
        )

    assert _image_ids(pipeline(0), 4) == {0, 2}
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"lab1\.png"):
        _image_ids(pipeline(1), 4)
