"""PASCAL VOC segmentation builder on tiny real-format VOCdevkit copies (palette PNGs, JPEGs)."""

from __future__ import annotations

import os
import shutil
import tarfile

import fixtures_tfds as fx
import numpy as np
import pytest
from PIL import Image

from kfcn.data import voc
from kfcn.data.images import DataError

TRAIN = ["2007_000032", "2007_000039", "2008_000002"]
VAL = ["2007_000033", "2007_000042", "2009_000012"]


def _read_all(ds) -> dict[str, dict]:
    out = {}
    for ex in ds.as_numpy_iterator():
        out[ex["name"].decode()] = ex
    return out


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """VOC2012 train/val plus the authors' seg11valid.txt, prepared once into a data_dir."""
    root = tmp_path_factory.mktemp("voc")
    manual = str(root / "manual")
    labels = fx.make_voc(manual, {"train": TRAIN, "val": VAL, "trainval": TRAIN + VAL})
    fx.write_list(os.path.join(manual, "seg11valid.txt"), ["2007_000033", "2007_000042"])
    return str(root / "tfds"), manual, labels


def test_constants():
    assert voc.NUM_CLASSES == 21 == len(voc.CLASS_NAMES)
    assert voc.IGNORE_LABEL == 255
    assert voc.CLASS_NAMES[0] == "background"
    assert voc.CLASS_NAMES[15] == "person"
    assert voc.CLASS_NAMES[20] == "tvmonitor"


def test_train_val_counts_labels_and_names(prepared):
    data_dir, manual, labels = prepared
    train = voc.load("train", data_dir=data_dir, manual_dir=manual)
    assert int(train.cardinality()) == len(TRAIN)
    got = _read_all(train)
    assert sorted(got) == sorted(TRAIN)
    for name, ex in got.items():
        assert ex["image"].dtype == np.uint8 and ex["image"].shape == (fx.H, fx.W, 3)
        assert ex["label"].dtype == np.uint8 and ex["label"].shape == (fx.H, fx.W)
        # Palette indices come back unchanged, including the 255 boundary row.
        np.testing.assert_array_equal(ex["label"], labels[name])
        assert 255 in ex["label"]
        n = sorted(labels).index(name)
        # JPEG of a flat colour: decoded pixels within a few levels of the colour written.
        assert np.abs(ex["image"].astype(int) - fx.image_colour(n)).max() <= 3
    val = _read_all(voc.load("val", data_dir=data_dir, manual_dir=manual))
    assert sorted(val) == sorted(VAL)
    # Records live in the data_dir passed (tfds layout name/config/version).
    assert os.path.isdir(os.path.join(data_dir, "voc_segmentation", "voc2012", "1.0.0"))


def test_seg11valid_from_authors_list(prepared):
    data_dir, manual, labels = prepared
    got = _read_all(voc.load("seg11valid", data_dir=data_dir, manual_dir=manual))
    assert sorted(got) == ["2007_000033", "2007_000042"]
    np.testing.assert_array_equal(got["2007_000042"]["label"], labels["2007_000042"])


def test_prepared_data_is_reused_without_manual_dir(prepared):
    data_dir, manual, _ = prepared
    voc.load("train", data_dir=data_dir, manual_dir=manual)
    # Already prepared: the manual dir is not needed any more.
    ds = voc.load("train", data_dir=data_dir, manual_dir=os.path.join(manual, "nowhere"))
    assert int(ds.cardinality()) == len(TRAIN)


def test_seg11valid_derived_from_voc2011_val_minus_sbd_train(tmp_path):
    manual = str(tmp_path / "manual")
    fx.make_voc(manual, {"train": TRAIN, "val": VAL})
    # VOC2011 val list only (images come from VOC2012, which contains them).
    fx.write_list(
        os.path.join(manual, "VOCdevkit", "VOC2011", "ImageSets", "Segmentation", "val.txt"),
        ["2007_000033", "2007_000042", "2009_000012"],
    )
    fx.write_list(
        os.path.join(manual, "benchmark_RELEASE", "dataset", "train.txt"),
        ["2007_000042", "2008_000999"],
    )
    ds = voc.load("seg11valid", data_dir=str(tmp_path / "tfds"), manual_dir=manual)
    assert sorted(_read_all(ds)) == ["2007_000033", "2009_000012"]


def test_seg11valid_from_voc2011_alone(tmp_path):
    """The authors' layout: seg11valid.txt in VOC2011/ImageSets/Segmentation, no VOC2012."""
    manual = str(tmp_path / "manual")
    labels = fx.make_voc(
        manual, {"val": VAL, "seg11valid": ["2007_000042", "2009_000012"]}, year="VOC2011"
    )
    got = _read_all(voc.load("seg11valid", data_dir=str(tmp_path / "tfds"), manual_dir=manual))
    assert sorted(got) == ["2007_000042", "2009_000012"]
    np.testing.assert_array_equal(got["2009_000012"]["label"], labels["2009_000012"])


def test_seg11valid_without_sources_names_needed_files(tmp_path):
    manual = str(tmp_path / "manual")
    fx.make_voc(manual, {"train": TRAIN, "val": VAL})
    with pytest.raises(DataError) as e:
        voc.load("seg11valid", data_dir=str(tmp_path / "tfds"), manual_dir=manual)
    msg = str(e.value)
    assert "seg11valid.txt" in msg
    assert os.path.join("VOC2011", "ImageSets", "Segmentation", "val.txt") in msg
    assert os.path.join("benchmark_RELEASE", "dataset", "train.txt") in msg


def test_tfds_data_dir_default_manual_dir_and_tar(tmp_path, monkeypatch):
    """$TFDS_DATA_DIR is the data_dir and the tar in its downloads/manual (tfds' default)."""
    src = str(tmp_path / "src")
    labels = fx.make_voc(src, {"train": TRAIN[:2], "val": VAL[:1]})
    data_dir = tmp_path / "tfds"
    manual = data_dir / "downloads" / "manual"
    manual.mkdir(parents=True)
    with tarfile.open(manual / voc.VOC2012_TAR, "w") as tar:
        tar.add(os.path.join(src, "VOCdevkit"), arcname="VOCdevkit")
    shutil.rmtree(src)
    monkeypatch.setenv("TFDS_DATA_DIR", str(data_dir))
    got = _read_all(voc.load("train"))
    assert sorted(got) == TRAIN[:2]
    assert os.path.isdir(data_dir / "voc_segmentation" / "voc2012" / "1.0.0")
    np.testing.assert_array_equal(got[TRAIN[1]]["label"], labels[TRAIN[1]])


def test_unknown_split():
    with pytest.raises(ValueError, match="split='test'"):
        voc.load("test", data_dir="/nonexistent")


def _voc_root(manual: str) -> str:
    return os.path.join(manual, "VOCdevkit", "VOC2012")


def test_missing_files_are_all_reported(tmp_path):
    manual = str(tmp_path / "manual")
    fx.make_voc(manual, {"train": TRAIN, "val": VAL})
    root = _voc_root(manual)
    os.remove(os.path.join(root, "JPEGImages", TRAIN[0] + ".jpg"))
    os.remove(os.path.join(root, "SegmentationClass", TRAIN[2] + ".png"))
    with pytest.raises(DataError) as e:
        voc.load("train", data_dir=str(tmp_path / "tfds"), manual_dir=manual)
    msg = str(e.value)
    assert msg.startswith("2 file(s)")
    assert TRAIN[0] + ".jpg" in msg and TRAIN[2] + ".png" in msg


def test_empty_split_list_names_the_list(tmp_path):
    manual = str(tmp_path / "manual")
    fx.make_voc(manual, {"train": TRAIN, "val": VAL})
    fx.write_list(os.path.join(_voc_root(manual), "ImageSets", "Segmentation", "val.txt"), [])
    with pytest.raises(DataError, match=r"val\.txt is empty"):
        voc.load("train", data_dir=str(tmp_path / "tfds"), manual_dir=manual)


@pytest.mark.parametrize("broken", ["image", "mask"])
def test_corrupt_file_is_named(tmp_path, broken):
    manual = str(tmp_path / "manual")
    fx.make_voc(manual, {"train": TRAIN, "val": VAL})
    sub, ext = ("JPEGImages", ".jpg") if broken == "image" else ("SegmentationClass", ".png")
    path = os.path.join(_voc_root(manual), sub, TRAIN[1] + ext)
    with open(path, "r+b") as f:  # keep the header, cut the pixel data
        data = f.read()
        f.seek(0)
        f.truncate()
        f.write(data[: len(data) // 2])
    with pytest.raises(DataError, match=TRAIN[1] + ext.replace(".", r"\.")):
        voc.load("train", data_dir=str(tmp_path / "tfds"), manual_dir=manual)


def test_label_outside_classes_is_an_error(tmp_path):
    manual = str(tmp_path / "manual")
    fx.make_voc(manual, {"train": TRAIN, "val": VAL})
    bad = fx.label_for(0, cls=3)
    bad[2, 2] = 21  # neither a class (0..20) nor 255
    path = os.path.join(_voc_root(manual), "SegmentationClass", TRAIN[0] + ".png")
    fx.write_palette_png(path, bad)
    with pytest.raises(DataError, match=rf"{TRAIN[0]}\.png.*21"):
        voc.load("train", data_dir=str(tmp_path / "tfds"), manual_dir=manual)


def test_rgb_mask_is_rejected_not_converted(tmp_path):
    manual = str(tmp_path / "manual")
    fx.make_voc(manual, {"train": TRAIN, "val": VAL})
    path = os.path.join(_voc_root(manual), "SegmentationClass", TRAIN[0] + ".png")
    Image.open(path).convert("RGB").save(path)
    with pytest.raises(DataError, match="single-channel"):
        voc.load("train", data_dir=str(tmp_path / "tfds"), manual_dir=manual)


def test_size_mismatch_names_both_files(tmp_path):
    manual = str(tmp_path / "manual")
    fx.make_voc(manual, {"train": TRAIN, "val": VAL})
    image = os.path.join(_voc_root(manual), "JPEGImages", TRAIN[2] + ".jpg")
    fx.write_jpeg(image, (1, 2, 3), h=fx.H + 2, w=fx.W)
    with pytest.raises(DataError, match="different sizes") as e:
        voc.load("train", data_dir=str(tmp_path / "tfds"), manual_dir=manual)
    assert TRAIN[2] + ".jpg" in str(e.value) and TRAIN[2] + ".png" in str(e.value)


def test_through_the_dataset_registry(prepared):
    from kfcn.data import load_dataset

    data_dir, manual, _ = prepared
    ds, info = load_dataset("voc", "val", data_dir=data_dir, manual_dir=manual)
    assert (info.name, info.num_classes, info.ignore_label) == ("voc", 21, 255)
    assert info.class_names == voc.CLASS_NAMES
    assert info.num_examples == len(VAL)
    assert sorted(_read_all(ds)) == sorted(VAL)


def test_no_manual_data_gives_the_download_instructions(tmp_path):
    # tfds raises for an absent/empty manual dir and prints the builder's instructions.
    with pytest.raises(AssertionError, match=voc.VOC2012_TAR):
        voc.load("train", data_dir=str(tmp_path / "tfds"))
    (tmp_path / "manual").mkdir()
    (tmp_path / "manual" / "notes.txt").write_text("not VOC")
    with pytest.raises(DataError, match="No PASCAL VOC 2012 data"):
        voc.load("train", data_dir=str(tmp_path / "tfds"), manual_dir=str(tmp_path / "manual"))
