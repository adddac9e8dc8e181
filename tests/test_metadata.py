"""Class info: known datasets' names and colours; round trips through every model format."""

from __future__ import annotations

import json
import os
import zipfile

import numpy as np
import pytest
from export_fixtures import tiny_kfcn_model

from kfcn import metadata
from kfcn.metadata import ClassInfo

INFO = ClassInfo(
    names=["ground", "wall", "sky"],
    palette=[[10, 20, 30], [40, 50, 60], [70, 80, 90]],
    dataset="folder",
    ignore_label=255,
)
OTHER = ClassInfo(names=["a", "b", "c"], palette=[[1, 1, 1], [2, 2, 2], [3, 3, 3]])


def test_to_dict_from_dict_round_trip():
    document = json.loads(json.dumps(INFO.to_dict()))
    assert document["format"] == metadata.FORMAT
    assert ClassInfo.from_dict(document) == INFO
    assert INFO.num_classes == 3


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"names": ["a", "b"], "palette": [[0, 0, 0]]}, "palette"),
        ({"names": ["a", "a"], "palette": [[0, 0, 0]] * 2}, "unique"),
        ({"names": ["a"], "palette": [[0, 0, 256]]}, "0..255"),
        ({"names": [], "palette": []}, "empty"),
    ],
)
def test_class_info_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ClassInfo(**kwargs)
    with pytest.raises(ValueError, match="format"):
        ClassInfo.from_dict({"format": "other/9", "names": ["a"], "palette": [[0, 0, 0]]})


@pytest.mark.parametrize(
    "dataset, count, index, name, rgb",
    [
        ("voc", 21, 15, "person", [192, 128, 128]),
        ("sbd", 21, 1, "aeroplane", [128, 0, 0]),
        ("camvid", 11, 3, "Road", [128, 64, 128]),
        ("cityscapes", 19, 0, "road", [128, 64, 128]),
        ("cityscapes", 19, 13, "car", [0, 0, 142]),
        ("ade20k", 150, 0, "wall", [120, 120, 120]),
        ("ade20k", 150, 149, "flag", [92, 0, 255]),
    ],
)
def test_known_datasets(dataset, count, index, name, rgb):
    info = metadata.class_info_for_dataset(dataset, count)
    assert info.num_classes == count and len(info.palette) == count
    assert info.names[index] == name and info.palette[index] == rgb
    assert info.ignore_label == 255 and info.dataset == dataset


def test_folder_and_unknown_datasets():
    info = metadata.class_info_for_dataset("folder", 4)
    assert info.names == ["class_0", "class_1", "class_2", "class_3"]
    assert len({tuple(c) for c in info.palette}) == 4 and info.ignore_label is None
    named = metadata.class_info_for_dataset("roads", 2, ["bg", "road"], ignore_label=99)
    assert named.names == ["bg", "road"] and named.ignore_label == 99
    with pytest.raises(ValueError, match="class_names"):
        metadata.class_info_for_dataset("folder", 3, ["a"])
    longer = metadata.class_info_for_dataset("camvid", 12)  # e.g. void kept as a class
    assert longer.names[-1] == "class_11" and longer.names[0] == "Sky"


@pytest.fixture(scope="module")
def model():
    return tiny_kfcn_model(num_classes=3)


def _outputs(model, image):
    return np.asarray(model(image, training=False))


def test_keras_round_trip_loads_in_safe_mode(model, tmp_path):
    import keras

    path = str(tmp_path / "m.keras")
    model.save(path)
    assert metadata.read_class_info(path) is None
    metadata.write_class_info(INFO, path)
    assert metadata.read_class_info(path) == INFO
    metadata.write_class_info(OTHER, path)  # replaces, no second entry
    assert metadata.read_class_info(path) == OTHER
    assert zipfile.ZipFile(path).namelist().count(metadata.FILENAME) == 1
    image = np.random.default_rng(0).uniform(0, 255, (1, 9, 13, 3)).astype("float32")
    loaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(_outputs(loaded, image), _outputs(model, image), atol=1e-6)
    # Keras writes a new archive from the model: the entry is gone, and read says so.
    loaded.save(path)
    assert metadata.read_class_info(path) is None


def test_save_model_in_one_step(model, tmp_path):
    import keras

    path = str(tmp_path / "run" / "model.keras")
    metadata.save_model(model, path, INFO)
    assert metadata.read_class_info(path) == INFO
    keras.saving.load_model(path, safe_mode=True)
    assert [n for n in os.listdir(tmp_path / "run")] == ["model.keras"]  # no temporaries


def test_saved_model_round_trip(model, tmp_path):
    import tensorflow as tf

    from kfcn.export.saved_model import export_saved_model

    path = export_saved_model(model, tmp_path / "sm", verify=False)
    assert metadata.read_class_info(path) is None
    metadata.write_class_info(INFO, path)
    assert metadata.read_class_info(path) == INFO
    assert os.path.isfile(os.path.join(path, "assets.extra", "kfcn_classes.json"))
    serve = tf.saved_model.load(path).signatures["serving_default"]
    assert serve(images=tf.zeros([1, 5, 7, 3], tf.uint8))["class_ids"].shape == (1, 5, 7)


def test_tflite_round_trip_and_the_interpreter_still_runs(model, tmp_path):
    from kfcn.export.tflite import export_tflite, make_interpreter

    path = export_tflite(model, tmp_path / "m.tflite", (8, 12), gpu_check="off").path
    image = np.random.default_rng(1).uniform(0, 255, (1, 8, 12, 3)).astype("float32")

    def run():
        return make_interpreter(path).get_signature_runner()(images=image)["logits"]

    before, size = run(), os.path.getsize(path)
    assert metadata.read_class_info(path) is None
    metadata.write_class_info(INFO, path)
    assert metadata.read_class_info(path) == INFO
    metadata.write_class_info(INFO, path)  # rewriting reuses the entry's buffer
    assert metadata.read_class_info(path) == INFO
    grown = os.path.getsize(path) - size
    assert 0 < grown < len(json.dumps(INFO.to_dict())) + 200
    np.testing.assert_array_equal(run(), before)
    # Exporters embed the info in the bytes before writing the file.
    with open(path, "rb") as f:
        again = metadata.tflite_with_class_info(f.read(), OTHER)
    other_path = tmp_path / "other.tflite"
    other_path.write_bytes(again)
    assert metadata.read_class_info(other_path) == OTHER


def test_unknown_formats(tmp_path):
    text = tmp_path / "notes.keras"
    text.write_text("not a zip")
    empty_dir = tmp_path / "dir"
    empty_dir.mkdir()
    for path in (text, empty_dir, tmp_path / "missing.tflite"):
        assert metadata.read_class_info(path) is None
        assert metadata.model_format(path) is None
    with pytest.raises(ValueError, match="SavedModel"):
        metadata.write_class_info(INFO, text)
    with pytest.raises(FileNotFoundError):
        metadata.write_class_info(INFO, tmp_path / "missing.keras")
