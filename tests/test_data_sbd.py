"""SBD builder and train_aug on tiny real-format copies (.mat structs, JPEGs, VOC palette PNGs)."""

from __future__ import annotations

import os
import shutil
import tarfile

import fixtures_tfds as fx
import numpy as np
import pytest
import scipy.io

from kfcn.data import sbd
from kfcn.data.images import DataError

SBD_TRAIN = ["2008_000001", "2008_000002", "2008_000003", "2008_000004"]
SBD_VAL = ["2008_000005", "2008_000006"]
VOC_TRAIN = ["2008_000003", "2007_000010"]  # one shared with SBD train, one VOC-only
VOC_VAL = ["2008_000005", "2007_000011"]  # one shared with SBD val
# SBD train + SBD val + VOC train - VOC val, worked out by hand.
TRAIN_AUG = ["2007_000010", "2008_000001", "2008_000002", "2008_000003", "2008_000004",
             "2008_000006"]  # fmt: skip


def _read_all(ds) -> dict[str, dict]:
    return {ex["name"].decode(): ex for ex in ds.as_numpy_iterator()}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("sbd")
    manual = str(root / "manual")
    sbd_labels = fx.make_sbd(manual, SBD_TRAIN, SBD_VAL)
    voc_labels = fx.make_voc(manual, {"train": VOC_TRAIN, "val": VOC_VAL})
    return str(root / "tfds"), manual, sbd_labels, voc_labels


def test_fixture_has_the_real_mat_layout(prepared):
    _, manual, sbd_labels, _ = prepared
    path = os.path.join(manual, "benchmark_RELEASE", "dataset", "cls", SBD_TRAIN[0] + ".mat")
    # The indexing commonly used on the real files.
    mat = scipy.io.loadmat(path)
    seg = mat["GTcls"][0]["Segmentation"][0]
    np.testing.assert_array_equal(seg, sbd_labels[SBD_TRAIN[0]])
    assert mat["GTcls"][0]["Boundaries"][0][3][0].toarray().shape == (fx.H, fx.W)
    np.testing.assert_array_equal(sbd.read_sbd_label(path), sbd_labels[SBD_TRAIN[0]])


def test_train_and_val(prepared):
    data_dir, manual, sbd_labels, _ = prepared
    train = sbd.load("train", data_dir=data_dir, manual_dir=manual)
    assert int(train.cardinality()) == len(SBD_TRAIN)
    got = _read_all(train)
    assert sorted(got) == SBD_TRAIN
    for name, ex in got.items():
        assert ex["image"].shape == (fx.H, fx.W, 3) and ex["image"].dtype == np.uint8
        assert ex["label"].dtype == np.uint8
        np.testing.assert_array_equal(ex["label"], sbd_labels[name])
        assert ex["label"].max() > 0
    assert sorted(_read_all(sbd.load("val", data_dir=data_dir, manual_dir=manual))) == SBD_VAL


def test_train_aug_membership_and_mask_sources(prepared):
    data_dir, manual, sbd_labels, voc_labels = prepared
    got = _read_all(sbd.load("train_aug", data_dir=data_dir, manual_dir=manual))
    assert sorted(got) == TRAIN_AUG
    for name in TRAIN_AUG:
        expected = voc_labels[name] if name in VOC_TRAIN else sbd_labels[name]
        np.testing.assert_array_equal(got[name]["label"], expected)
    # The VOC masks keep their 255 boundary band as ignore; SBD masks have none.
    assert 255 in got["2008_000003"]["label"]
    assert 255 not in got["2008_000001"]["label"]


def test_train_aug_without_voc_names_what_is_needed(tmp_path):
    manual = str(tmp_path / "manual")
    fx.make_sbd(manual, SBD_TRAIN, SBD_VAL)
    with pytest.raises(DataError, match="VOCdevkit/VOC2012"):
        sbd.load("train_aug", data_dir=str(tmp_path / "tfds"), manual_dir=manual)


def test_benchmark_tgz_is_accepted(tmp_path):
    src = str(tmp_path / "src")
    labels = fx.make_sbd(src, SBD_TRAIN[:2], SBD_VAL[:1])
    manual = tmp_path / "manual"
    manual.mkdir()
    with tarfile.open(manual / sbd.SBD_TGZ, "w:gz") as tar:
        tar.add(os.path.join(src, "benchmark_RELEASE"), arcname="benchmark_RELEASE")
    shutil.rmtree(src)
    got = _read_all(sbd.load("val", data_dir=str(tmp_path / "tfds"), manual_dir=str(manual)))
    assert list(got) == SBD_VAL[:1]
    np.testing.assert_array_equal(got[SBD_VAL[0]]["label"], labels[SBD_VAL[0]])


def test_unknown_split():
    with pytest.raises(ValueError, match="split='trainval'"):
        sbd.load("trainval")


def _cls(manual: str, name: str) -> str:
    return os.path.join(manual, "benchmark_RELEASE", "dataset", "cls", name + ".mat")


def test_missing_and_empty_inputs(tmp_path):
    manual = str(tmp_path / "manual")
    fx.make_sbd(manual, SBD_TRAIN, SBD_VAL)
    os.remove(_cls(manual, SBD_TRAIN[1]))
    os.remove(_cls(manual, SBD_VAL[0]))
    with pytest.raises(DataError) as e:
        sbd.load("train", data_dir=str(tmp_path / "tfds"), manual_dir=manual)
    assert SBD_TRAIN[1] + ".mat" in str(e.value)
    fx.write_list(os.path.join(manual, "benchmark_RELEASE", "dataset", "val.txt"), [])
    with pytest.raises(DataError, match=r"val\.txt is empty"):
        sbd.load("train", data_dir=str(tmp_path / "tfds"), manual_dir=manual)


@pytest.mark.parametrize("problem", ["garbage", "no_gtcls", "bad_value", "size"])
def test_bad_mat_is_named(tmp_path, problem):
    manual = str(tmp_path / "manual")
    fx.make_sbd(manual, SBD_TRAIN, SBD_VAL)
    path = _cls(manual, SBD_TRAIN[2])
    if problem == "garbage":
        with open(path, "wb") as f:
            f.write(b"this is not a MATLAB file" * 10)
        expected = "cannot read"
    elif problem == "no_gtcls":
        scipy.io.savemat(path, {"GTinst": {"Segmentation": np.zeros((fx.H, fx.W), np.uint8)}})
        expected = "GTcls"
    elif problem == "bad_value":
        seg = fx.label_for(0, cls=4, boundary=False)
        seg[1, 1] = 40
        fx.write_sbd_mat(path, seg)
        expected = "40"
    else:
        fx.write_sbd_mat(path, np.zeros((fx.H, fx.W + 1), np.uint8))
        expected = "different sizes"
    with pytest.raises(DataError, match=expected) as e:
        sbd.load("train", data_dir=str(tmp_path / "tfds"), manual_dir=manual)
    assert SBD_TRAIN[2] + ".mat" in str(e.value)
