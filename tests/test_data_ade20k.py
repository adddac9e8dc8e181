"""ADE20K SceneParsing loader, on a tiny copy in the real layout (JPEG images, 8-bit PNGs)."""

import logging
import zlib

import numpy as np
import pytest
from PIL import Image

from kfcn import visualize
from kfcn.data import DataError, ade20k, load_dataset

ROOT = "ADEChallengeData2016"


def _write(base, split, name, raw, image_size=None):
    """Writes images/<split>/<name>.jpg and annotations/<split>/<name>.png; returns the image."""
    height, width = image_size or raw.shape
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    (base / "images" / split).mkdir(parents=True, exist_ok=True)
    (base / "annotations" / split).mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(base / "images" / split / f"{name}.jpg", quality=95)
    Image.fromarray(raw, mode="L").save(base / "annotations" / split / f"{name}.png")
    return image


def make_ade20k(tmp_path):
    """Two training and one validation pair; raw values span 0 (other) .. 150."""
    base = tmp_path / ROOT
    raws = {}
    for split, names in (
        ("training", ["ADE_train_00000002", "ADE_train_00000001"]),
        ("validation", ["ADE_val_00000001"]),
    ):
        for i, name in enumerate(names):
            raw = np.arange(12 * 13).reshape(12, 13) % 151
            raw = np.roll(raw, 7 * i).astype(np.uint8)
            _write(base, split, name, raw)
            raws[name] = raw
    return base, raws


def _elements(dataset):
    return [{k: v.numpy() for k, v in e.items()} for e in dataset]


def test_reduce_zero_label_and_info(tmp_path):
    base, raws = make_ade20k(tmp_path)
    # data_dir may be the parent of ADEChallengeData2016, as mmseg's data/ade.
    dataset, info = load_dataset("ade20k", "train", data_dir=str(tmp_path))
    elements = _elements(dataset)
    assert [e["name"].decode() for e in elements] == ["ADE_train_00000001", "ADE_train_00000002"]
    for element in elements:
        raw = raws[element["name"].decode()]
        # mmseg: 0 ("other") -> 255, k -> k-1, written out by hand.
        expected = np.where(raw == 0, 255, raw.astype(np.int64) - 1)
        np.testing.assert_array_equal(element["label"], expected)
        assert element["image"].shape == (12, 13, 3) and element["image"].dtype == np.uint8
    assert info.name == "ade20k" and info.num_classes == 150 and info.ignore_label == 255
    assert info.num_examples == 2
    assert len(info.class_names) == 150 and len(set(info.class_names)) == 150
    assert info.class_names[:3] == ("wall", "building", "sky")
    assert info.class_names[-1] == "flag"
    np.testing.assert_array_equal(np.asarray(info.palette), visualize.palette("ade20k"))
    assert info.palette[0] == (120, 120, 120) and info.palette[-1] == (92, 0, 255)
    val, val_info = load_dataset("ade20k", "val", data_dir=str(base))
    assert val_info.num_examples == 1 and len(_elements(val)) == 1
    assert ade20k.NUM_EXAMPLES == {"train": 20210, "val": 2000}


def test_missing_annotation_names_the_file(tmp_path):
    base, _ = make_ade20k(tmp_path)
    missing = base / "annotations" / "training" / "ADE_train_00000002.png"
    missing.unlink()
    with pytest.raises(DataError, match=r"ADE_train_00000002\.png") as error:
        load_dataset("ade20k", "train", data_dir=str(base))
    assert "ADE_train_00000002.jpg" in str(error.value)  # and the image it belongs to


def test_size_mismatch_names_both_files_and_skip_warns_once(tmp_path, caplog):
    base, _ = make_ade20k(tmp_path)
    _write(base, "training", "ADE_train_00000003", np.ones((12, 13), np.uint8), (10, 13))
    with pytest.raises(DataError, match=r"ADE_train_00000003\.jpg.*ADE_train_00000003\.png"):
        load_dataset("ade20k", "train", data_dir=str(base))
    with caplog.at_level(logging.WARNING):
        dataset, info = load_dataset("ade20k", "train", data_dir=str(base), on_error="skip")
    warnings = [r for r in caplog.records if "skipping 1 of 3" in r.getMessage()]
    assert len(warnings) == 1 and "ADE_train_00000003" in warnings[0].getMessage()
    assert info.num_examples == 2 and len(_elements(dataset)) == 2


def test_values_above_150_and_missing_root(tmp_path):
    base, _ = make_ade20k(tmp_path)
    _write(base, "validation", "ADE_val_00000002", np.full((12, 13), 151, np.uint8))
    with pytest.raises(DataError, match=r"ADE_val_00000002\.png: label values 151"):
        load_dataset("ade20k", "val", data_dir=str(base), validate="full")
    with pytest.raises(DataError, match=r"images/training"):
        load_dataset("ade20k", "train", data_dir=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="split='test'"):
        load_dataset("ade20k", "test", data_dir=str(base))
