"""SIFT Flow loader on a tiny copy in the released layout (256x256 JPEGs, `S` label maps in .mat
files written with scipy.io.savemat: semantic 0..33 as double, geometric -1..3)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import scipy.io
import tensorflow as tf
from PIL import Image

from kfcn.data import siftflow
from kfcn.data.images import DataError

SIZE = 256
TRAIN = ["coast_bea1", "street_par3"]
TEST = ["forest_for114"]


def _dirs(root):
    return {
        kind: os.path.join(root, kind, siftflow.FOLDER)
        for kind in ("Images", "SemanticLabels", "GeoLabels")
    }


def _write(root, name, rng):
    dirs = _dirs(root)
    # Smooth colours, so that JPEG keeps them close.
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    shift = int(rng.integers(0, 64))
    image = np.stack([x, y, (x + y + shift) // 2], -1).astype(np.uint8)
    sem = rng.integers(0, 34, (SIZE, SIZE)).astype(np.float64)  # MATLAB double
    sem[0, :3] = [0, 1, 33]
    geo = rng.integers(-1, 4, (SIZE, SIZE)).astype(np.int16)
    geo[0, :5] = [-1, 0, 1, 2, 3]
    Image.fromarray(image).save(os.path.join(dirs["Images"], name + ".jpg"), quality=95)
    names = np.array([["awning"], ["balcony"]], dtype=object)
    scipy.io.savemat(
        os.path.join(dirs["SemanticLabels"], name + ".mat"), {"S": sem, "names": names}
    )
    scipy.io.savemat(os.path.join(dirs["GeoLabels"], name + ".mat"), {"S": geo})
    return {"image": image, "sem": sem, "geo": geo}


def _make(root, seed=0, lists=True):
    rng = np.random.default_rng(seed)
    for d in _dirs(root).values():
        os.makedirs(d, exist_ok=True)
    truth = {name: _write(root, name, rng) for name in TRAIN + TEST}
    if lists:
        for stem, ids in (("trainval", TRAIN), ("test", TEST)):
            with open(os.path.join(root, stem + ".txt"), "w") as f:
                f.write("\n".join(ids))  # the authors' lists end without a newline
    return truth


@pytest.fixture(scope="module")
def copy(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("siftflow"))
    return root, _make(root)


def _expected(sem, geo):
    # The authors' rule, written independently: unlabelled -> 255, class k -> k - 1.
    sem_out = np.where(sem == 0, 255, sem - 1).astype(np.uint8)
    geo_out = np.where(geo <= 0, 255, geo - 1).astype(np.uint8)
    return sem_out, geo_out


def test_elements_labels_and_info(copy):
    root, truth = copy
    for split, ids in (("trainval", TRAIN), ("train", TRAIN), ("test", TEST)):
        ds, info = siftflow.load_siftflow(split, root)
        got = list(ds.as_numpy_iterator())
        assert [e["name"].decode() for e in got] == ids
        assert info.num_examples == len(ids)
    assert info.name == "siftflow" and info.ignore_label == 255
    assert info.num_classes == {"sem": 33, "geo": 3}
    assert len(info.class_names["sem"]) == 33 and info.class_names["sem"][27] == "sky"
    assert info.class_names["geo"] == ("sky", "horizontal", "vertical")
    assert [len(info.palette[task]) for task in ("sem", "geo")] == [33, 3]
    (element,) = got
    t = truth[TEST[0]]
    assert element["image"].dtype == np.uint8 and element["image"].shape == (SIZE, SIZE, 3)
    # JPEG is lossy: the decoded image is the file's pixels, close to what was written.
    jpeg = os.path.join(_dirs(root)["Images"], TEST[0] + ".jpg")
    np.testing.assert_array_equal(element["image"], np.asarray(Image.open(jpeg)))
    assert np.abs(element["image"].astype(int) - t["image"]).mean() < 3
    sem, geo = _expected(t["sem"], t["geo"])
    assert set(element["label"]) == {"sem", "geo"}
    assert element["label"]["sem"].dtype == np.uint8 and element["label"]["geo"].dtype == np.uint8
    np.testing.assert_array_equal(element["label"]["sem"], sem)
    np.testing.assert_array_equal(element["label"]["geo"], geo)
    assert element["label"]["sem"][0, :3].tolist() == [255, 0, 32]
    assert element["label"]["geo"][0, :5].tolist() == [255, 255, 0, 1, 2]


def test_shipped_split_lists_are_the_authors():
    lists = {}
    for split in ("trainval", "test"):
        with open(siftflow.split_list(split)) as f:
            lists[split] = f.read().split()
    assert len(lists["trainval"]) == 2486 and len(lists["test"]) == 200
    assert len(set(lists["trainval"])) == 2486 and not set(lists["trainval"]) & set(lists["test"])
    # First and last ids of the authors' files; the unannotated images are in neither.
    assert (
        lists["trainval"][0] == "forest_for121" and lists["trainval"][-1] == "opencountry_land202"
    )
    assert lists["test"][0] == "coast_natu975" and lists["test"][-1] == "highway_gre141"
    for name in ("highway_bost181", "street_urb506"):
        assert name not in lists["trainval"] and name not in lists["test"]


def test_without_own_lists_the_shipped_ones_are_used(tmp_path):
    root = str(tmp_path / "sf")
    _make(root, lists=False)
    assert siftflow.split_list("test", root) == siftflow.split_list("test")
    # The tiny copy holds one real test id (forest_for114): the other 199 ids' three files
    # are missing, all counted in one error that names the list lines.
    with pytest.raises(DataError, match="597 file") as error:
        siftflow.load_siftflow("test", root)
    assert "test.txt:1" in str(error.value)


def test_errors_name_the_file(tmp_path):
    root = str(tmp_path / "sf")
    truth = _make(root, seed=1)
    dirs = _dirs(root)
    geo_path = os.path.join(dirs["GeoLabels"], "street_par3.mat")
    scipy.io.savemat(geo_path, {"G": truth["street_par3"]["geo"]})
    with pytest.raises(DataError, match="no variable 'S'") as error:
        siftflow.load_siftflow("trainval", root)
    assert geo_path in str(error.value) and "trainval.txt:2" in str(error.value)
    ds, info = siftflow.load_siftflow("trainval", root, on_error="skip")
    assert info.num_examples == 1
    assert [e["name"].decode() for e in ds.as_numpy_iterator()] == ["coast_bea1"]

    sem_path = os.path.join(dirs["SemanticLabels"], "forest_for114.mat")
    bad = truth["forest_for114"]["sem"].copy()
    bad[5, 5] = 34
    scipy.io.savemat(sem_path, {"S": bad})
    ds, _ = siftflow.load_siftflow("test", root)
    with pytest.raises(tf.errors.InvalidArgumentError, match="values 34") as error:
        list(ds.as_numpy_iterator())
    assert sem_path in str(error.value)
    scipy.io.savemat(sem_path, {"S": truth["forest_for114"]["sem"][:200]})
    with pytest.raises(DataError, match="different sizes") as error:
        siftflow.load_siftflow("test", root)
    assert sem_path in str(error.value)
    with pytest.raises(ValueError, match="split='val'"):
        siftflow.load_siftflow("val", root)


def test_registered_in_load_dataset(copy):
    from kfcn.data import DATASETS, load_dataset

    root, _ = copy
    assert "siftflow" in DATASETS
    ds, info = load_dataset("siftflow", "test", root)
    assert info.num_classes == {"sem": 33, "geo": 3}
    assert [e["name"].decode() for e in ds.as_numpy_iterator()] == TEST


def test_pipelines_keep_both_label_maps(copy):
    from kfcn.data import eval_pipeline, train_pipeline

    root, truth = copy
    ds, _ = siftflow.load_siftflow("test", root)
    sem, geo = _expected(truth[TEST[0]]["sem"], truth[TEST[0]]["geo"])
    images, labels = next(
        iter(train_pipeline(ds, global_batch_size=1, crop_size=(SIZE, SIZE), scale_range=(1, 1),
                            flip=False, seed=0))
    )  # fmt: skip
    assert images.shape == (1, SIZE, SIZE, 3) and sorted(labels) == ["geo", "sem"]
    assert labels["sem"].dtype == tf.int32
    np.testing.assert_array_equal(labels["sem"][0], sem)
    np.testing.assert_array_equal(labels["geo"][0], geo)
    image, label, _ = next(iter(eval_pipeline(ds)))
    assert image.shape == (1, SIZE, SIZE, 3)
    np.testing.assert_array_equal(label["geo"][0], geo)
