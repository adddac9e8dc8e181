"""Cityscapes through tfds' cityscapes/semantic_segmentation on tiny zips in the real layout."""

from __future__ import annotations

import os

import fixtures_tfds as fx
import numpy as np
import pytest
import tensorflow as tf

from kfcn.data import cityscapes
from kfcn.data.images import DataError

# trainId of label ids 0..33, typed from cityscapesScripts' helpers/labels.py for this test.
OFFICIAL_TRAIN_IDS = [255, 255, 255, 255, 255, 255, 255, 0, 1, 255, 255, 2, 3, 4, 255, 255, 255,
                      5, 255, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 255, 255, 16, 17, 18]  # fmt: skip


def _stripes() -> np.ndarray:
    """Label ids 0..33 and 255 in vertical stripes, one stripe per value."""
    values = list(range(34)) + [255]
    label = np.zeros((fx.CS_H, fx.CS_W), np.uint8)
    width = fx.CS_W // len(values)
    for k, v in enumerate(values):
        label[:, k * width : (k + 1) * width] = v
    return label


def _frames(train_label: np.ndarray | None = None) -> dict:
    road = np.full((fx.CS_H, fx.CS_W), 7, np.uint8)
    return {
        "train": [("aachen_000000_000019", _stripes() if train_label is None else train_label),
                  ("bochum_000000_000313", road)],
        "val": [("frankfurt_000000_000294", road)],
        "test": [("berlin_000000_000019", np.zeros((fx.CS_H, fx.CS_W), np.uint8))],
    }  # fmt: skip


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("cityscapes")
    fx.make_cityscapes(str(root / "manual"), _frames())
    return str(root / "tfds"), str(root / "manual")


def test_table_and_constants():
    assert cityscapes.NUM_CLASSES == 19 == len(cityscapes.CLASS_NAMES)
    assert cityscapes.IGNORE_LABEL == 255
    assert cityscapes.CLASS_NAMES[0] == "road" and cityscapes.CLASS_NAMES[18] == "bicycle"
    assert cityscapes.CLASS_NAMES[13] == "car"
    assert len([lab for lab in cityscapes.LABELS if lab.id >= 0]) == 34
    for label_id, train_id in enumerate(OFFICIAL_TRAIN_IDS):
        assert cityscapes.LABEL_ID_TO_TRAIN_ID[label_id] == train_id
    assert cityscapes.LABEL_ID_TO_TRAIN_ID[-1] == 255  # license plate


def test_splits_and_label_mapping(prepared):
    data_dir, manual = prepared
    counts = {s: int(cityscapes.load(s, data_dir, manual).cardinality()) for s in ("train", "val")}
    assert counts == {"train": 2, "val": 1}
    assert int(cityscapes.load("test", data_dir, manual).cardinality()) == 1

    got = {ex["name"].decode(): ex for ex in cityscapes.load("train", data_dir, manual)
           .as_numpy_iterator()}  # fmt: skip
    assert sorted(got) == ["aachen_000000_000019", "bochum_000000_000313"]
    ex = got["aachen_000000_000019"]
    assert ex["image"].shape == (fx.CS_H, fx.CS_W, 3) and ex["image"].dtype == np.uint8
    assert ex["label"].shape == (fx.CS_H, fx.CS_W) and ex["label"].dtype == np.uint8
    expected = np.array(OFFICIAL_TRAIN_IDS + [255], np.uint8)[
        np.minimum(_stripes(), 34)  # 255 is the 35th stripe value, expected 255
    ]
    np.testing.assert_array_equal(ex["label"], expected)
    # A few by hand: road 7 -> 0, car 26 -> 13, bicycle 33 -> 18, parking 9 -> ignore.
    width = fx.CS_W // 35
    for label_id, train_id in [(7, 0), (26, 13), (33, 18), (9, 255), (0, 255), (24, 11)]:
        assert ex["label"][5, label_id * width + 1] == train_id
    assert np.all(got["bochum_000000_000313"]["label"] == 0)
    # The image pixels written (PNG, lossless): red = 30 * index, green 128 in the top half.
    np.testing.assert_array_equal(ex["image"][0, 0], [0, 128, 0])
    np.testing.assert_array_equal(got["bochum_000000_000313"]["image"][-1, -1], [30, 0, 0])
    # tfds' own layout in data_dir, so plain tfds reads the same records.
    assert os.path.isdir(os.path.join(data_dir, "cityscapes", "semantic_segmentation", "1.0.0"))


def test_unknown_split():
    with pytest.raises(ValueError, match="split='extra'"):
        cityscapes.load("extra")


def test_missing_zips_are_named(tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    (manual / "leftImg8bit_trainvaltest.zip").write_bytes(b"")
    with pytest.raises(AssertionError, match="gtFine_trainvaltest.zip"):
        cityscapes.load("train", str(tmp_path / "tfds"), str(manual))


def test_bad_label_id_is_an_error_naming_the_file(tmp_path):
    bad = np.full((fx.CS_H, fx.CS_W), 7, np.uint8)
    bad[10, 10] = 40  # not a Cityscapes label id
    fx.make_cityscapes(str(tmp_path / "manual"), _frames(train_label=bad))
    with pytest.raises(DataError, match=r"aachen_000000_000019_gtFine_labelIds\.png.*40"):
        cityscapes.load("train", str(tmp_path / "tfds"), str(tmp_path / "manual"))


def test_bad_ids_in_records_prepared_without_checks_fail_when_read(tmp_path, monkeypatch):
    """Records written without validation (e.g. by plain tfds) are still checked on reading."""
    bad = np.full((fx.CS_H, fx.CS_W), 7, np.uint8)
    bad[0, :3] = 50
    fx.make_cityscapes(str(tmp_path / "manual"), _frames(train_label=bad))
    monkeypatch.setattr(cityscapes.images, "read_label", lambda path, *a, **k: bad)
    ds = cityscapes.load("train", str(tmp_path / "tfds"), str(tmp_path / "manual"))
    with pytest.raises(tf.errors.InvalidArgumentError, match="aachen_000000_000019.*50"):
        list(ds.as_numpy_iterator())
