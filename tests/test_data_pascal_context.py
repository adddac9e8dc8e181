"""PASCAL-Context loader (mmsegmentation's converter layout), 60 and 59 classes, on a tiny copy."""

import logging

import numpy as np
import pytest
from PIL import Image

from kfcn import visualize
from kfcn.data import DataError, load_dataset, pascal_context

IDS = {"train": ["2008_000002", "2008_000003"], "val": ["2008_000007"]}


def make_context(tmp_path):
    """VOCdevkit/VOC2010 with JPEGs, 8-bit PNGs of 0..59 and the split lists."""
    root = tmp_path / "VOCdevkit" / "VOC2010"
    for folder in ("JPEGImages", "SegmentationClassContext", "ImageSets/SegmentationContext"):
        (root / folder).mkdir(parents=True)
    rng = np.random.default_rng(0)
    raws = {}
    for split, ids in IDS.items():
        for i, image_id in enumerate(ids):
            raw = np.roll(np.arange(9 * 14).reshape(9, 14) % 60, 5 * i).astype(np.uint8)
            image = rng.integers(0, 256, (9, 14, 3), dtype=np.uint8)
            Image.fromarray(image).save(root / "JPEGImages" / f"{image_id}.jpg")
            Image.fromarray(raw, mode="L").save(
                root / "SegmentationClassContext" / f"{image_id}.png"
            )
            raws[image_id] = raw
        lines = "".join(f"{image_id}\n" for image_id in ids)
        (root / "ImageSets" / "SegmentationContext" / f"{split}.txt").write_text(lines)
    return root, raws


def _elements(dataset):
    return [{k: v.numpy() for k, v in e.items()} for e in dataset]


def test_60_classes_labels_as_stored(tmp_path):
    root, raws = make_context(tmp_path)
    dataset, info = load_dataset("pascal_context", "train", data_dir=str(tmp_path))
    elements = _elements(dataset)
    assert [e["name"].decode() for e in elements] == IDS["train"]  # list order
    for element in elements:
        np.testing.assert_array_equal(element["label"], raws[element["name"].decode()])
    assert (info.name, info.num_classes, info.ignore_label, info.num_examples) == (
        "pascal_context",
        60,
        255,
        2,
    )
    assert info.class_names[:3] == ("background", "aeroplane", "bag")
    assert info.class_names[-1] == "wood" and len(set(info.class_names)) == 60
    # mmseg's PascalContextDataset palette: ADE20K's first 60 colours.
    assert info.palette[0] == (120, 120, 120) and info.palette[59] == (31, 0, 255)
    np.testing.assert_array_equal(np.asarray(info.palette), visualize.palette("ade20k")[:60])
    assert pascal_context.NUM_EXAMPLES == {"train": 4996, "val": 5104}


def test_59_classes_background_ignored(tmp_path):
    root, raws = make_context(tmp_path)
    dataset, info = load_dataset("pascal_context59", "val", data_dir=str(root))
    (element,) = _elements(dataset)
    raw = raws["2008_000007"]
    np.testing.assert_array_equal(element["label"], np.where(raw == 0, 255, raw.astype(int) - 1))
    assert (info.name, info.num_classes, info.num_examples) == ("pascal_context59", 59, 1)
    assert info.class_names == pascal_context.CLASS_NAMES[1:]
    assert info.class_names[:2] == ("aeroplane", "bag")
    assert info.palette[0] == (180, 120, 120) and len(info.palette) == 59


def test_errors_name_the_file_and_list_line(tmp_path, caplog):
    root, _ = make_context(tmp_path)
    (root / "SegmentationClassContext" / "2008_000003.png").unlink()
    with pytest.raises(DataError, match=r"2008_000003\.png \(named at .*train\.txt:2\)"):
        load_dataset("pascal_context", "train", data_dir=str(root))
    with caplog.at_level(logging.WARNING):
        dataset, info = load_dataset(
            "pascal_context59", "train", data_dir=str(root), on_error="skip"
        )
    assert info.num_examples == 1 and len(_elements(dataset)) == 1
    assert len([r for r in caplog.records if "skipping 1 of 2" in r.getMessage()]) == 1
    # A size mismatch names both files; a value above 59 names the annotation.
    Image.fromarray(np.zeros((8, 14), np.uint8), mode="L").save(
        root / "SegmentationClassContext" / "2008_000003.png"
    )
    with pytest.raises(DataError, match=r"2008_000003\.jpg \(14x9\).*2008_000003\.png \(14x8\)"):
        load_dataset("pascal_context", "train", data_dir=str(root))
    Image.fromarray(np.full((9, 14), 60, np.uint8), mode="L").save(
        root / "SegmentationClassContext" / "2008_000007.png"
    )
    with pytest.raises(DataError, match=r"2008_000007\.png: label values 60"):
        load_dataset("pascal_context", "val", data_dir=str(root), validate="full")
    (root / "ImageSets" / "SegmentationContext" / "val.txt").write_text("2008_000007 extra\n")
    with pytest.raises(DataError, match=r"val\.txt:1: expected one image id per line"):
        load_dataset("pascal_context", "val", data_dir=str(root))
    with pytest.raises(DataError, match="SegmentationContext"):
        load_dataset("pascal_context", "val", data_dir=str(tmp_path / "nowhere"))
