"""NYUDv2 loader on a tiny copy in the FCN authors' layout (8-bit RGB/HHA PNGs, 16-bit depth
PNGs, `segmentation` .mat files written with scipy.io.savemat as uint8 0..40)."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import scipy.io
import tensorflow as tf
from PIL import Image

from kfcn.data import nyud
from kfcn.data.images import DataError

H, W = 12, 16
SPLITS = {"train": ["5001", "5003"], "val": ["5010"], "test": ["6001"]}


def _write_example(root, name, rng, *, size=(H, W)):
    h, w = size
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    hha = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    # Millimetres, above 8 bit so that a reduction to 8 bit would show.
    depth = rng.integers(500, 10000, (h, w), dtype=np.uint16)
    raw = rng.integers(0, 41, (h, w), dtype=np.uint8)
    raw[0, :4] = [0, 1, 40, 0]  # void and both ends of the class range in every example
    Image.fromarray(rgb).save(os.path.join(root, "data", "images", f"img_{name}.png"))
    Image.fromarray(hha).save(os.path.join(root, "data", "hha", f"img_{name}.png"))
    Image.fromarray(depth).save(os.path.join(root, "data", "depth", f"img_{name}.png"))
    scipy.io.savemat(os.path.join(root, "segmentation", f"img_{name}.mat"), {"segmentation": raw})
    return {"rgb": rgb, "hha": hha, "depth": depth, "raw": raw}


def _make_nyud(root, seed=0):
    rng = np.random.default_rng(seed)
    for folder in ("data/images", "data/depth", "data/hha", "segmentation"):
        os.makedirs(os.path.join(root, folder), exist_ok=True)
    truth = {}
    for split, ids in SPLITS.items():
        with open(os.path.join(root, f"{split}.txt"), "w") as f:
            f.write("\n".join(ids) + "\n")
        for name in ids:
            truth[name] = _write_example(root, name, rng)
    return truth


@pytest.fixture(scope="module")
def nyud_copy(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("nyud"))
    return root, _make_nyud(root)


def _expected_label(raw):
    # The authors' rule, written independently: void 0 -> 255, class k -> k - 1.
    return np.where(raw == 0, 255, raw.astype(np.int64) - 1).astype(np.uint8)


def _elements(ds):
    return list(ds.as_numpy_iterator())


def test_fixture_is_the_real_format(nyud_copy):
    root, _ = nyud_copy
    depth = Image.open(os.path.join(root, "data", "depth", "img_5001.png"))
    assert depth.mode.startswith("I;16")
    mat = scipy.io.loadmat(os.path.join(root, "segmentation", "img_5001.mat"))
    assert mat["segmentation"].dtype == np.uint8 and mat["segmentation"].shape == (H, W)


@pytest.mark.parametrize("validate", ["header", "full"])
def test_rgb_elements_and_label_offset(nyud_copy, validate):
    root, truth = nyud_copy
    ds, info = nyud.load_nyud("train", root, validate=validate)
    assert (info.name, info.num_classes, info.ignore_label, info.num_examples) == (
        "nyud", 40, 255, 2,
    )  # fmt: skip
    assert len(info.class_names) == 40 and info.class_names[0] == "wall"
    assert info.class_names[-1] == "otherprop"
    assert len(info.palette) == 40 and len(set(info.palette)) == 40
    got = _elements(ds)
    assert [e["name"].decode() for e in got] == SPLITS["train"]
    for element in got:
        name = element["name"].decode()
        assert element["image"].dtype == np.uint8 and element["image"].shape == (H, W, 3)
        np.testing.assert_array_equal(element["image"], truth[name]["rgb"])
        assert element["label"].dtype == np.uint8
        np.testing.assert_array_equal(element["label"], _expected_label(truth[name]["raw"]))
        assert element["label"][0, :4].tolist() == [255, 0, 39, 255]


def test_modalities(nyud_copy):
    root, truth = nyud_copy
    t = truth["6001"]
    (hha,) = _elements(nyud.load_nyud("test", root, modality="hha")[0])
    np.testing.assert_array_equal(hha["image"], t["hha"])
    (rgbd,) = _elements(nyud.load_nyud("test", root, modality="rgbd")[0])
    assert rgbd["image"].dtype == np.uint16 and rgbd["image"].shape == (H, W, 4)
    np.testing.assert_array_equal(rgbd["image"][..., :3], t["rgb"])
    np.testing.assert_array_equal(rgbd["image"][..., 3], t["depth"])  # raw millimetres
    (two,) = _elements(nyud.load_nyud("test", root, modality="rgb+hha")[0])
    assert sorted(two["image"]) == ["hha", "rgb"]
    np.testing.assert_array_equal(two["image"]["rgb"], t["rgb"])
    np.testing.assert_array_equal(two["image"]["hha"], t["hha"])
    for element in (hha, rgbd, two):
        np.testing.assert_array_equal(element["label"], _expected_label(t["raw"]))


def test_trainval_is_train_plus_val_without_its_list(nyud_copy):
    root, _ = nyud_copy
    ds, info = nyud.load_nyud("trainval", root)
    assert info.num_examples == 3
    assert [e["name"].decode() for e in _elements(ds)] == SPLITS["train"] + SPLITS["val"]


def test_argument_errors(nyud_copy):
    root, _ = nyud_copy
    with pytest.raises(ValueError, match="modality='depth'"):
        nyud.load_nyud("train", root, modality="depth")
    with pytest.raises(ValueError, match="split='training'"):
        nyud.load_nyud("training", root)
    with pytest.raises(ValueError, match="on_error='ignore'"):
        nyud.load_nyud("train", root, on_error="ignore")


@pytest.fixture
def broken(tmp_path):
    root = str(tmp_path / "nyud")
    truth = _make_nyud(root, seed=1)
    return root, truth


def test_missing_depth_names_the_file_and_list_line(broken):
    root, _ = broken
    missing = os.path.join(root, "data", "depth", "img_5003.png")
    os.remove(missing)
    nyud.load_nyud("train", root)  # RGB does not need depth
    with pytest.raises(DataError) as error:
        nyud.load_nyud("train", root, modality="rgbd")
    assert missing in str(error.value) and "train.txt:2" in str(error.value)


def test_mat_without_the_key_names_the_file(broken):
    root, truth = broken
    path = os.path.join(root, "segmentation", "img_5010.mat")
    scipy.io.savemat(path, {"labels": truth["5010"]["raw"]})
    for validate in ("header", "full"):
        with pytest.raises(DataError, match="no variable 'segmentation'") as error:
            nyud.load_nyud("val", root, validate=validate)
        assert path in str(error.value) and "labels" in str(error.value)


def test_size_mismatch_between_image_and_label_names_both(broken):
    root, truth = broken
    path = os.path.join(root, "segmentation", "img_5010.mat")
    scipy.io.savemat(path, {"segmentation": truth["5010"]["raw"][:, :-2]})
    image = os.path.join(root, "data", "images", "img_5010.png")
    with pytest.raises(DataError, match="different sizes") as error:
        nyud.load_nyud("val", root)
    assert path in str(error.value) and image in str(error.value)
    # Without up-front checks the decoder still refuses, naming the files.
    ds, _ = nyud.load_nyud("val", root, validate="none")
    with pytest.raises(tf.errors.InvalidArgumentError, match="different sizes") as error:
        _elements(ds)
    assert path in str(error.value)


def test_bad_label_values_8bit_depth_and_gray_hha(broken):
    root, truth = broken
    raw = truth["6001"]["raw"].copy()
    raw[3, 3] = 41
    label = os.path.join(root, "segmentation", "img_6001.mat")
    scipy.io.savemat(label, {"segmentation": raw})
    ds, _ = nyud.load_nyud("test", root)  # values are checked while decoding
    with pytest.raises(tf.errors.InvalidArgumentError, match="values 41") as error:
        _elements(ds)
    assert label in str(error.value)
    depth = os.path.join(root, "data", "depth", "img_5010.png")
    Image.fromarray(np.full((H, W), 3, np.uint8)).save(depth)
    with pytest.raises(DataError, match="16-bit single-channel") as error:
        nyud.load_nyud("val", root, modality="rgbd")
    assert depth in str(error.value)
    hha = os.path.join(root, "data", "hha", "img_5003.png")
    Image.fromarray(np.full((H, W), 3, np.uint8)).save(hha)  # gray: not an HHA encoding
    with pytest.raises(DataError, match="HHA must be an 8-bit 3-channel") as error:
        nyud.load_nyud("train", root, modality="rgb+hha")
    assert hha in str(error.value)


def test_skip_drops_bad_examples_with_one_warning(broken, caplog):
    root, _ = broken
    os.remove(os.path.join(root, "data", "images", "img_5001.png"))
    with caplog.at_level(logging.WARNING, logger="kfcn.data.idlist"):
        ds, info = nyud.load_nyud("train", root, on_error="skip")
    assert info.num_examples == 1
    assert [e["name"].decode() for e in _elements(ds)] == ["5003"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "img_5001.png" in warnings[0].getMessage()


def test_registered_in_load_dataset(nyud_copy):
    from kfcn.data import DATASETS, load_dataset

    root, truth = nyud_copy
    assert "nyud" in DATASETS
    ds, info = load_dataset("nyud", "test", root, modality="rgbd")
    assert info.name == "nyud" and info.num_examples == 1
    (element,) = _elements(ds)
    np.testing.assert_array_equal(element["image"][..., 3], truth["6001"]["depth"])


def test_pipelines_keep_depth_and_both_streams(nyud_copy):
    from kfcn.data import eval_pipeline, train_pipeline

    root, truth = nyud_copy
    t = truth["6001"]
    expected = _expected_label(t["raw"])
    rgbd, _ = nyud.load_nyud("test", root, modality="rgbd")
    # Whole-image crops without scaling or flipping return the element itself, as float32.
    same = dict(global_batch_size=1, crop_size=(H, W), scale_range=(1, 1), flip=False, seed=0)
    images, labels = next(iter(train_pipeline(rgbd, **same)))
    assert images.dtype == tf.float32 and images.shape == (1, H, W, 4)
    np.testing.assert_array_equal(images[0, ..., :3], t["rgb"].astype(np.float32))
    np.testing.assert_array_equal(images[0, ..., 3], t["depth"].astype(np.float32))
    np.testing.assert_array_equal(labels[0], expected)
    # Padding: RGB gets the ImageNet mean, depth 0, the label 255 (4 whole rows here).
    padded = dict(same, crop_size=(H + 4, W))
    images, labels = next(iter(train_pipeline(rgbd, **padded)))
    pad_rows = np.all(images[0, ..., 3].numpy() == 0, axis=1)
    assert pad_rows.sum() == 4
    np.testing.assert_allclose(images[0][pad_rows][..., :3], np.broadcast_to(
        np.float32([123.68, 116.779, 103.939]), (4, W, 3)), rtol=1e-6)  # fmt: skip
    assert np.all(labels[0].numpy()[pad_rows] == 255)

    two, _ = nyud.load_nyud("test", root, modality="rgb+hha")
    images, labels = next(iter(train_pipeline(two, **same)))
    np.testing.assert_array_equal(images["rgb"][0], t["rgb"].astype(np.float32))
    np.testing.assert_array_equal(images["hha"][0], t["hha"].astype(np.float32))
    image, label, name = next(iter(eval_pipeline(two)))
    assert sorted(image) == ["hha", "rgb"] and image["hha"].shape == (1, H, W, 3)
    np.testing.assert_array_equal(label[0], expected)
    assert name.numpy().tolist() == [b"6001"]
