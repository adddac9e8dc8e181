"""`kfcn.precision.float32_depthwise`: MobileNetV2's depthwise layers kept in float32."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from bench import cases
from kfcn.precision import float32_depthwise


def test_float32_depthwise_keeps_weights_and_refuses_nets_without_depthwise():
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        model = cases.build_model("fcn8s:mobilenetv2", (32, 32, 3), 3)
    finally:
        keras.config.set_dtype_policy("float32")
    copy = float32_depthwise(model)
    dtypes = {layer.name: layer.compute_dtype for layer in copy.layers}
    assert dtypes["block_1_depthwise"] == dtypes["block_1_depthwise_BN"] == "float32"
    assert dtypes["block_1_depthwise_relu"] == "float32"
    assert dtypes["block_1_project"] == dtypes["block_1_expand"] == "bfloat16"
    for a, b in zip(model.weights, copy.weights):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    images = np.random.default_rng(0).uniform(0, 255, (1, 32, 32, 3)).astype("float32")
    assert np.isfinite(np.asarray(copy(images), np.float32)).all()
    plain = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(2, 3)])
    with pytest.raises(ValueError, match="no DepthwiseConv2D"):
        float32_depthwise(plain)


@pytest.mark.slow
def test_training_keeps_the_depthwise_layers_in_float32(tmp_path, caplog):
    """`kfcn train --mixed_precision --float32_depthwise`: trains, and saves float32."""
    import logging

    from kfcn import training
    from tests.test_cli_train import _write_folder

    _write_folder(tmp_path / "data")
    config = training.TrainConfig(
        model_dir=str(tmp_path / "run"),
        dataset="folder",
        data_dir=str(tmp_path / "data"),
        num_classes=3,
        backbone="mobilenetv2",
        weights=None,
        crop_size=(32, 32),
        scale_range=(1.0, 1.0),
        batch_size=2,
        steps=2,
        optimizer="adam",
        learning_rate=1e-3,
        mixed_precision=True,
        float32_depthwise=True,
        seed=0,
    )
    try:
        with caplog.at_level(logging.INFO, logger="kfcn.training.job"):
            result = training.fit(config)
    finally:
        keras.config.set_dtype_policy("float32")
    # MobileNetV2's 17 depthwise convolutions with their BN and ReLU6, and the input.
    assert "float32_depthwise: 52 of" in caplog.text, caplog.text[-2000:]
    assert result.run["dtype_policy"] == "mixed_bfloat16"
    import kfcn

    saved = kfcn.load_model(result.model_path, compile=False)
    assert {layer.compute_dtype for layer in saved.layers} == {"float32"}
