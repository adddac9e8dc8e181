"""End-to-end test of recipes/train_camvid.py (a preset of `kfcn train`) with the real builder."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml
from test_training_distributed import _env, _write_camvid

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_train_camvid_recipe_mirrored_mixed_precision(tmp_path):
    """Two CPU replicas, bfloat16 compute, median-frequency weights, float32 model.keras."""
    data = tmp_path / "camvid"
    _write_camvid(data, num_train=4, num_val=2, size=64)
    model_dir = tmp_path / "run"
    command = [
        sys.executable,
        os.path.join(REPO, "recipes", "train_camvid.py"),
        f"--model_dir={model_dir}",
        f"--data_dir={data}",
        "--backbone=mobilenetv2",
        "--weights=none",
        "--variant=fcn8s",
        "--batch_size=2",
        "--crop_size=64x64",
        "--steps=2",
        "--strategy=mirrored",
        "--cpu_replicas=2",
        "--mixed_precision",
        "--optimizer=adam",
        "--learning_rate=1e-3",
        "--log_every=1",
    ]
    out = subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "2 replica(s) (mirrored), dtype policy mixed_bfloat16" in out.stderr
    assert "Class weights (median_frequency): Sky " in out.stderr

    result = json.load(open(model_dir / "result.json"))
    run = result["run"]
    assert run["num_replicas"] == 2 and run["total_steps"] == 2
    assert run["dtype_policy"] == "mixed_bfloat16"
    # Weights from the fixture's label counts: classes 0..3 occur, 4..10 never (weight 0).
    weights = np.array(run["class_weights"])
    assert weights.shape == (11,) and (weights[4:] == 0).all() and (weights[:4] > 0).all()
    assert result["final_step"] == 2 and result["validation"]["num_images"] == 2
    # The preset's defaults are in the run's settings (it is `kfcn train` underneath).
    settings = yaml.safe_load(open(model_dir / "config.yaml"))
    assert settings["class_weighting"] == "median_frequency" and settings["dataset"] == "camvid"
    assert settings["scale_range"] == [0.75, 1.5] and settings["mixed_precision"] is True

    import kfcn

    model = kfcn.load_model(str(model_dir / "model.keras"))
    assert model.dtype_policy.name == "float32"
    image = np.random.default_rng(0).integers(0, 256, (1, 50, 70, 3)).astype(np.float32)
    logits = model(image)
    assert logits.shape == (1, 50, 70, 11) and str(logits.dtype) == "<dtype: 'float32'>"
    assert np.isfinite(np.asarray(logits)).all()
