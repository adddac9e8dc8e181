"""Tests of the tf.data training and evaluation pipelines."""

import colorsys

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from kfcn.data import load_dataset
from kfcn.data.pipeline import (
    acceptable_crop,
    distortion_params,
    eval_pipeline,
    photometric_distortion,
    train_pipeline,
)
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


# --- Nested entries, cat_max_ratio and mmseg's photometric distortion -------------------------


def _generic(elements):
    """A dataset without a file table from a list of element dicts (numpy leaves)."""
    return tf.data.Dataset.from_tensor_slices(
        tf.nest.map_structure(lambda *leaves: np.stack(leaves), *elements)
    )


def _coords(height, width):
    rows, cols = np.mgrid[0:height, 0:width]
    return rows, cols


def test_nested_entries_share_scale_crop_and_flip():
    """Every entry encodes its pixel's coordinates; after augmentation they must agree."""
    rows, cols = _coords(30, 40)
    element = {
        "image": {
            "rgb": np.stack([cols * 5, rows * 5, np.full_like(rows, 7)], -1).astype(np.uint8),
            "hha": np.stack([rows * 3, cols * 3 + 20, np.full_like(rows, 200)], -1).astype(
                np.uint8
            ),
        },
        "label": {"sem": cols.astype(np.uint8), "geo": rows.astype(np.uint8)},
        "name": "a",
    }
    pipeline = train_pipeline(
        _generic([element]), global_batch_size=8, crop_size=(24, 28), scale_range=(0.5, 2), seed=3
    )
    spec = pipeline.element_spec
    assert spec[0]["hha"].shape.as_list() == [8, 24, 28, 3] and spec[1]["geo"].dtype == tf.int32
    flipped = padded = 0
    for images, labels in pipeline.take(4):
        rgb, hha = images["rgb"].numpy(), images["hha"].numpy()
        sem, geo = labels["sem"].numpy(), labels["geo"].numpy()
        inside = sem != 255
        np.testing.assert_array_equal(inside, geo != 255)
        # Bilinear resizing reproduces a linear function exactly: both images agree.
        col, row = rgb[..., 0] / 5, rgb[..., 1] / 5
        np.testing.assert_allclose((hha[..., 1] - 20)[inside] / 3, col[inside], atol=2e-3)
        np.testing.assert_allclose(hha[..., 0][inside] / 3, row[inside], atol=2e-3)
        # Nearest labels take the source pixel nearest the image's sampling point.
        assert np.abs(col - sem)[inside].max() <= 0.5 + 1e-3
        assert np.abs(row - geo)[inside].max() <= 0.5 + 1e-3
        # Padding: RGB the ImageNet mean, HHA 0.
        np.testing.assert_array_equal(
            rgb[~inside], np.broadcast_to(np.float32(IMAGENET_MEAN_RGB), (np.sum(~inside), 3))
        )
        np.testing.assert_array_equal(hha[~inside], 0)
        padded += int((~inside).any())
        flipped += int(np.sum(np.diff(sem[0][inside[0]].astype(int)) < 0) > 0)
    assert padded and flipped


def test_rgbd_uint16_and_mmseg_photometric_touch_only_rgb():
    rows, cols = _coords(20, 26)
    rng = np.random.default_rng(4)
    rgb = rng.integers(0, 256, (20, 26, 3))
    depth = 1000 + 100 * cols + rows  # raw depth values above 255
    element = {
        "image": np.concatenate([rgb, depth[..., None]], -1).astype(np.uint16),
        "label": {"sem": (cols % 5).astype(np.uint8), "geo": (rows % 3).astype(np.uint8)},
        "name": "a",
    }
    kwargs = dict(global_batch_size=6, crop_size=(24, 20), scale_range=(1, 1), seed=5)
    plain = list(train_pipeline(_generic([element]), **kwargs).take(2))
    distorted = list(train_pipeline(_generic([element]), photometric="mmseg", **kwargs).take(2))
    for (x0, y0), (x1, y1) in zip(plain, distorted, strict=True):
        x0, x1 = x0.numpy(), x1.numpy()
        for key in ("sem", "geo"):
            np.testing.assert_array_equal(y0[key], y1[key])  # labels never change
        np.testing.assert_array_equal(x0[..., 3], x1[..., 3])  # nor does depth
        assert not np.allclose(x0[..., :3], x1[..., :3])
        assert x1[..., :3].min() >= 0 and x1[..., :3].max() <= 255
        for image, sem, geo in zip(x0, y0["sem"].numpy(), y0["geo"].numpy(), strict=True):
            inside = sem != 255
            d = image[..., 3]
            # Unscaled: each pixel's depth says where it came from, as do both labels.
            col, row = (d[inside] - 1000) // 100, (d[inside] - 1000) % 100
            np.testing.assert_array_equal(col % 5, sem[inside])
            np.testing.assert_array_equal(row % 3, geo[inside])
            np.testing.assert_array_equal(
                image[..., :3][inside], rgb[row.astype(int), col.astype(int)]
            )
            # Height 20 < 24: padded, RGB with the mean, depth with 0.
            np.testing.assert_array_equal(d[~inside], 0)
            np.testing.assert_array_equal(image[..., :3][~inside][0], np.float32(IMAGENET_MEAN_RGB))


def test_eval_pipeline_keeps_nesting():
    element = {
        "image": {"rgb": np.zeros((5, 6, 3), np.uint8), "hha": np.ones((5, 6, 3), np.uint8)},
        "label": {"sem": np.zeros((5, 6), np.uint8), "geo": np.full((5, 6), 2, np.uint8)},
        "name": "x",
    }
    ((image, label, name),) = list(eval_pipeline(_generic([element])))
    assert image["hha"].dtype == tf.float32 and image["hha"].shape == (1, 5, 6, 3)
    assert label["geo"].dtype == tf.int32 and int(label["geo"][0, 0, 0]) == 2
    assert name.numpy().tolist() == [b"x"]


def _mmseg_acceptable(crop, ignore, ratio):
    """mmseg RandomCrop.crop_bbox's test, verbatim in numpy."""
    labels, cnt = np.unique(crop, return_counts=True)
    cnt = cnt[labels != ignore]
    return len(cnt) > 1 and np.max(cnt) / np.sum(cnt) < ratio


def test_acceptable_crop_matches_mmseg_criterion():
    rng = np.random.default_rng(0)
    cases = [
        np.array([[0, 0, 0, 1]]),  # exactly 0.75: rejected (strict <)
        np.array([[0, 0, 1, 1]]),
        np.array([[3, 3, 3, 3]]),  # one class
        np.full((2, 2), 255),  # only ignore
        np.array([[255, 255, 255, 0, 1]]),  # ignore excluded from the shares
        np.array([[255, 0, 0, 0, 1]]),
    ]
    cases += [rng.choice([0, 1, 2, 255], (6, 7), p=p) for p in rng.dirichlet([0.3] * 4, 40)]
    for crop in cases:
        for ratio in (0.5, 0.75, 0.9):
            got = bool(acceptable_crop(tf.constant(crop, tf.uint8), 255, ratio))
            assert got == _mmseg_acceptable(crop, 255, ratio), (crop, ratio)


def test_cat_max_ratio_redraws_up_to_ten_times():
    """Class 1 fills a 10x10 corner of a 40x40 map; a 16x16 crop passes mmseg's test only
    near that corner (probability p per draw, counted in numpy), so with up to 10 re-draws
    a fraction 1 - (1 - p)**11 of crops pass (the 11th draw is kept unchecked)."""
    label = np.zeros((40, 40), np.uint8)
    label[:10, :10] = 1
    windows = [label[y : y + 16, x : x + 16] for y in range(25) for x in range(25)]
    p = np.mean([_mmseg_acceptable(w, 255, 0.75) for w in windows])
    assert p == 10 / 625
    dataset = _generic([{"image": _position_image(40, 40), "label": label, "name": "a"}])
    n = 600
    rates = {}
    for ratio in (1.0, 0.75):
        pipeline = train_pipeline(
            dataset,
            global_batch_size=n,
            crop_size=(16, 16),
            scale_range=(1, 1),
            flip=False,
            cat_max_ratio=ratio,
            seed=2,
        )
        images, labels = next(iter(pipeline))
        passed = 0
        for image, crop in zip(images.numpy(), labels.numpy(), strict=True):
            top, left = int(image[0, 0, 1]), int(image[0, 0, 0])
            np.testing.assert_array_equal(crop, label[top : top + 16, left : left + 16])
            passed += _mmseg_acceptable(crop, 255, 0.75)
        rates[ratio] = passed / n
    expected = 1 - (1 - p) ** 11
    sigma = np.sqrt(expected * (1 - expected) / n)
    assert abs(rates[0.75] - expected) < 4 * sigma, (rates, expected)
    assert rates[1.0] < 0.05  # no re-draws: about p


def _hsv_reference(image, params):
    """mmseg's PhotoMetricDistortion in float with colorsys, from the drawn parameters."""
    x = np.clip(image + params["brightness"], 0, 255)
    if params["contrast_first"]:
        x = np.clip(x * params["contrast"], 0, 255)
    out = np.empty_like(x)
    for index in np.ndindex(x.shape[:2]):
        h, s, v = colorsys.rgb_to_hsv(*(x[index] / 255.0))
        h = (h + params["hue"] / 180.0) % 1.0
        s = min(max(s * params["saturation"], 0.0), 1.0)
        out[index] = np.array(colorsys.hsv_to_rgb(h, s, v)) * 255.0
    if not params["contrast_first"]:
        out = np.clip(out * params["contrast"], 0, 255)
    return out


def test_photometric_distortion_matches_an_independent_reference():
    image = np.random.default_rng(3).uniform(0, 255, (4, 5, 3)).astype(np.float32)
    seen = set()
    for i in range(24):
        seed = tf.constant([7, i], tf.int64)
        params = {k: v.numpy() for k, v in distortion_params(seed).items()}
        got = photometric_distortion(tf.constant(image), seed).numpy()
        np.testing.assert_allclose(got, _hsv_reference(image, params), atol=0.05)
        seen.add((bool(params["contrast_first"]), params["hue"] != 0, params["saturation"] != 1))
    assert len(seen) >= 6  # both contrast orders, with and without colour changes


SPEC = {k: tf.TensorSpec([], tf.float32) for k in ("brightness", "contrast", "saturation", "hue")}
SPEC["contrast_first"] = tf.TensorSpec([], tf.bool)


def test_photometric_distortion_ranges_and_probabilities():
    seeds = tf.stack([tf.fill([4000], tf.constant(1, tf.int64)), tf.range(4000, dtype=tf.int64)], 1)
    draw = tf.function(lambda s: tf.map_fn(distortion_params, s, fn_output_signature=SPEC))
    params = {k: v.numpy() for k, v in draw(seeds).items()}
    brightness, contrast = params["brightness"], params["contrast"]
    saturation, hue = params["saturation"], params["hue"]
    for applied in (brightness != 0, contrast != 1, saturation != 1, hue != 0):
        # Hue is drawn 0 with probability 1/36 when applied.
        assert 0.46 < applied.mean() < 0.54
    assert 0.46 < params["contrast_first"].mean() < 0.54
    assert -32 <= brightness.min() < -31 and 31 < brightness.max() <= 32
    assert 0.5 <= contrast.min() < 0.51 and 1.49 < contrast.max() < 1.5
    assert 0.5 <= saturation.min() < 0.51 and 1.49 < saturation.max() < 1.5
    assert set(np.unique(hue)) == set(range(-18, 18))  # numpy's randint(-18, 18)
    # A grey image stays grey: only brightness and contrast act, within their ranges.
    grey = tf.fill([2, 2, 3], 100.0)
    distort = tf.function(
        lambda s: tf.map_fn(
            lambda x: photometric_distortion(grey, x)[0, 0], s, fn_output_signature=tf.float32
        )
    )
    outs = distort(seeds[:400]).numpy()
    np.testing.assert_allclose(outs, outs[:, :1].repeat(3, 1), atol=1e-3)
    assert outs.min() >= (100 - 32) * 0.5 - 1e-3 and outs.max() <= (100 + 32) * 1.5 + 1e-3
    assert 0.15 < np.mean(np.abs(outs[:, 0] - 100) < 1e-3) < 0.4  # both off: 1/4


def test_new_argument_checks():
    dataset = _generic(
        [{"image": _position_image(4, 4), "label": np.zeros((4, 4), np.uint8), "name": "a"}]
    )
    with pytest.raises(ValueError, match="photometric='strong'"):
        train_pipeline(dataset, global_batch_size=1, photometric="strong")
    with pytest.raises(ValueError, match="cat_max_ratio=0"):
        train_pipeline(dataset, global_batch_size=1, cat_max_ratio=0)
