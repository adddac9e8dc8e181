"""kfcn/files.py: the one atomic writer."""

import json
import math

import pytest

from kfcn import files


def test_json_writes_undefined_scores_as_null(tmp_path):
    path = tmp_path / "scores.json"
    files.write_json_atomically({"iou": [0.5, math.nan], "mean": math.inf, "n": 3}, path)
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"iou": [0.5, None], "mean": None, "n": 3}


def test_failed_write_leaves_the_previous_file(tmp_path):
    path = tmp_path / "result.json"
    files.write_json_atomically({"step": 1}, path)
    with pytest.raises(TypeError):
        files.write_json_atomically({"step": object()}, path)
    assert json.loads(path.read_text()) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_existing_output_without_overwrite(tmp_path):
    path = tmp_path / "model.tflite"
    path.write_bytes(b"old")
    with pytest.raises(FileExistsError, match="overwrite"):
        with files.atomic_output(path, overwrite=False):
            pass
    assert path.read_bytes() == b"old"
