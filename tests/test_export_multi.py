"""Exports of RGB-D, RGB-HHA and multi-task models: SavedModel, TF Serving, TFLite, ONNX, predict.

Each fixture model has tiny random trunks and large random score layers, so its
logits have real margins (random images, few near-ties), and the fixture asserts
that every input and head moves the argmax: the depth channel, the HHA stream (and
the RGB one), and each head's own score layers. An export that dropped the depth
channel, swapped or zeroed a stream, or returned one head's scores for the other
would change more pixels than any parity test below allows.
"""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
from PIL import Image

import kfcn
from kfcn import metadata
from kfcn.export import model_io, onnx, saved_model, serving, tflite

HEIGHT, WIDTH = 40, 56
HEADS = {"sem": 5, "geo": 3}
# Pixels a path must flip (a broken path then fails the parity checks, which allow 1%).
MIN_FLIPPED = 0.05
MIN_AGREEMENT = 0.99


def _tiny_backbone(channels=3, seed=0):
    inputs = keras.Input((None, None, channels))
    x = inputs
    init = keras.initializers.HeNormal(seed=seed)
    for i in range(5):
        x = keras.layers.Conv2D(
            6 + 2 * i, 3, strides=2, padding="same", kernel_initializer=init, name=f"down{i}"
        )(x)
        x = keras.layers.ReLU(name=f"relu{i}")(x)
    return keras.Model(inputs, x, name="tiny")


def _score_randomly(model, seed=0):
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        base = layer.name.removeprefix("rgb_").removeprefix("hha_")
        if base.startswith("score_") and layer.weights:
            layer.set_weights([rng.normal(size=w.shape).astype("float32") for w in layer.weights])


def _blocks(rng, shape, low, high, dtype):
    """Random 8x8-pixel blocks: content at the trunks' strides (noise averages out)."""
    batch, height, width, channels = shape
    coarse = rng.integers(low, high, (batch, -(-height // 8), -(-width // 8), channels))
    return np.repeat(np.repeat(coarse, 8, 1), 8, 2)[:, :height, :width].astype(dtype)


def _inputs(kind, seed=0, batch=1, height=HEIGHT, width=WIDTH):
    """uint8 colour (uint16 depth, 500..8000 mm) inputs, as the SavedModel takes them."""
    rng = np.random.default_rng(seed)
    shape = (batch, height, width, 3)
    rgb = _blocks(rng, shape, 0, 256, np.uint8)
    if kind == "rgbd":
        depth = _blocks(rng, (batch, height, width, 1), 500, 8000, np.uint16)
        return {"rgb": rgb, "depth": depth}
    if kind == "rgb+hha":
        return {"rgb": rgb, "hha": _blocks(rng, shape, 0, 256, np.uint8)}
    return {"images": rgb}


def _keras_inputs(kind, inputs):
    """The Keras model's view of `_inputs`: float32, depth as the 4th channel."""
    if kind == "rgbd":
        return np.concatenate([inputs["rgb"], inputs["depth"]], -1).astype(np.float32)
    if kind == "rgb+hha":
        return {k: v.astype(np.float32) for k, v in inputs.items()}
    return inputs["images"].astype(np.float32)


def _logits(model, kind, inputs) -> dict:
    out = model(_keras_inputs(kind, inputs), training=False)
    return (
        {k: np.asarray(v) for k, v in out.items()}
        if isinstance(out, dict)
        else {None: np.asarray(out)}
    )


def _flipped(a: dict, b: dict) -> dict:
    return {k: float(np.mean(a[k].argmax(-1) != b[k].argmax(-1))) for k in a}


def _build(kind):
    keras.utils.set_random_seed(0)
    if kind == "rgbd":
        model = kfcn.build_fcn16s(backbone=_tiny_backbone(4), modality="rgbd", num_classes=4)
        # The log depth spans a few units, the colours hundreds: weight depth up so it
        # counts as much as colour in the first layer.
        conv = model.get_layer("down0")
        kernel, bias = conv.get_weights()
        kernel[:, :, 3] *= 100.0
        conv.set_weights([kernel, bias])
    elif kind == "rgb+hha":
        model = kfcn.build_fcn16s(
            backbone=_tiny_backbone(), modality="rgb+hha", num_classes=4, dropout=0.0
        )
    else:
        model = kfcn.build_fcn8s(backbone=_tiny_backbone(), heads=HEADS)
    _score_randomly(model)
    _center_logits(model, kind)
    return model


def _center_logits(model, kind):
    """Subtracts each class's mean logit (through score_fr's bias), so no class wins
    everywhere: the trunks' ReLU features are all positive, so one class would."""
    logits = _logits(model, kind, _inputs(kind, seed=99, batch=4))
    for task, values in logits.items():
        mean = values.mean(axis=(0, 1, 2))
        for layer in model.layers:
            if layer.name.removeprefix("rgb_").removeprefix("hha_") == model_io.output_name(
                "score_fr", task
            ):
                kernel, bias = layer.get_weights()
                layer.set_weights([kernel, bias - mean])


def _check_paths(model, kind) -> dict:
    """Fraction of pixels each path flips; asserts each flips more than MIN_FLIPPED."""
    inputs = _inputs(kind, seed=7)
    base = _logits(model, kind, inputs)
    flipped = {}
    if kind == "rgbd":
        flat = dict(inputs, depth=np.full_like(inputs["depth"], 2500))
        flipped["depth"] = _flipped(base, _logits(model, kind, flat))[None]
    elif kind == "rgb+hha":
        other = _inputs(kind, seed=8)
        for stream in ("rgb", "hha"):
            moved = dict(inputs, **{stream: other[stream]})
            flipped[stream] = _flipped(base, _logits(model, kind, moved))[None]
    else:
        rng = np.random.default_rng(3)
        for task in HEADS:
            for layer_name in (f"score_fr_{task}", f"score_pool4_{task}", f"score_pool3_{task}"):
                layer = model.get_layer(layer_name)
                saved = layer.get_weights()
                layer.set_weights(
                    [rng.permutation(saved[0].ravel()).reshape(saved[0].shape)] + saved[1:]
                )
                changed = _flipped(base, _logits(model, kind, inputs))
                layer.set_weights(saved)
                flipped[layer_name] = changed[task]
                other = next(t for t in HEADS if t != task)
                assert changed[other] == 0.0, f"{layer_name} moved the {other!r} head"
    weak = {path: f for path, f in flipped.items() if f <= MIN_FLIPPED}
    assert not weak, f"{kind}: these paths move too few pixels: {weak}"
    return flipped


@pytest.fixture(scope="module", params=["rgbd", "rgb+hha", "multitask"])
def fixture(request):
    kind = request.param
    model = _build(kind)
    _check_paths(model, kind)
    return kind, model


def _agreement(ids, logits) -> float:
    return float(np.mean(np.asarray(ids) == logits.argmax(-1)))


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.slow
def test_saved_model_and_serving_match_keras(fixture, tmp_path):
    import tensorflow as tf

    kind, model = fixture
    info = (
        metadata.class_info_for_tasks("siftflow", HEADS)
        if kind == "multitask"
        else metadata.class_info_for_dataset("nyud", 4)
    )
    # The serving export below verifies the two-input kinds (reload, every signature,
    # warmup replay); the multi-task one is verified here.
    path = saved_model.export_saved_model(
        model, tmp_path / "sm", class_info=info, verify=kind == "multitask"
    )
    loaded = tf.saved_model.load(path)
    signature = loaded.signatures["serving_default"]
    expected_inputs = {"rgbd": {"rgb", "depth"}, "rgb+hha": {"rgb", "hha"}}.get(kind, {"images"})
    assert set(signature.structured_input_signature[1]) == expected_inputs
    assert (saved_model.SIGNATURE_BYTES in loaded.signatures) == (kind == "multitask")
    inputs = _inputs(kind, seed=1, batch=2)
    outputs = signature(**{k: tf.constant(v) for k, v in inputs.items()})
    for task, logits in _logits(model, kind, inputs).items():
        ids = outputs[model_io.output_name("class_ids", task)].numpy()
        assert ids.shape == logits.shape[:3]
        assert _agreement(ids, logits) >= MIN_AGREEMENT
        probabilities = outputs[model_io.output_name("probabilities", task)].numpy()
        np.testing.assert_allclose(probabilities, _softmax(logits), atol=5e-5)
    assert metadata.read_class_info(path) == info
    if kind == "multitask":
        assert sorted(outputs) == [
            "class_ids_geo", "class_ids_sem", "probabilities_geo", "probabilities_sem",
        ]  # fmt: skip
        return
    # TF Serving layout with warmup requests of the two inputs (replayed by the export).
    export = serving.export_for_serving(
        model, tmp_path / "serving", "nyud", warmup_sizes=((24, 40),), class_info=info
    )
    from tensorflow_serving.apis import prediction_log_pb2

    records = list(tf.data.TFRecordDataset(export.warmup_file))
    request = prediction_log_pb2.PredictionLog.FromString(records[0].numpy()).predict_log.request
    assert set(request.inputs) == expected_inputs
    if kind == "rgbd":
        assert request.inputs["depth"].dtype == tf.uint16.as_datatype_enum
        # Wrong depth shape: the graph's check answers, naming the input.
        with pytest.raises(tf.errors.InvalidArgumentError, match="`depth`"):
            signature(rgb=tf.constant(inputs["rgb"]), depth=tf.constant(inputs["depth"][:, :8]))


@pytest.mark.slow
def test_tflite_matches_keras(fixture, tmp_path):
    kind, model = fixture
    result = tflite.export_tflite(model, tmp_path / "m.tflite", (HEIGHT, WIDTH), gpu_check="warn")
    runner = tflite.make_interpreter(result.path).get_signature_runner()
    inputs = _inputs(kind, seed=2)
    feeds = _keras_inputs(kind, inputs)
    feeds = feeds if isinstance(feeds, dict) else {"images": feeds}
    outputs = runner(**feeds)
    for task, logits in _logits(model, kind, inputs).items():
        ours = outputs[model_io.output_name("logits", task)]
        np.testing.assert_allclose(ours, logits, rtol=1e-4, atol=1e-3 * np.abs(logits).max())
        assert _agreement(ours.argmax(-1), logits) >= MIN_AGREEMENT
    if kind != "multitask":
        with pytest.raises(ValueError, match=r"TFLite int8 export cannot take model .*calibration"):
            tflite.export_tflite(model, tmp_path / "q.tflite", (32, 32), quantization="int8")


@pytest.mark.slow
def test_onnx_matches_keras(fixture, tmp_path):
    pytest.importorskip("tf2onnx")
    pytest.importorskip("onnxruntime")
    kind, model = fixture
    info = metadata.class_info_for_tasks("siftflow", HEADS) if kind == "multitask" else None
    result = onnx.export_onnx(model, tmp_path / "m.onnx", verify=False, class_info=info)
    inputs = _inputs(kind, seed=3, height=45, width=77)  # not a multiple of 32
    ours = onnx.onnx_logits(result.path, _keras_inputs(kind, inputs))
    ours = ours if isinstance(ours, dict) else {"logits": ours}
    for task, logits in _logits(model, kind, inputs).items():
        got = ours[model_io.output_name("logits", task)]
        np.testing.assert_allclose(got, logits, rtol=1e-4, atol=1e-3 * np.abs(logits).max())
    if info is not None:
        assert onnx.read_onnx_class_info(result.path) == info


def test_predict_refuses_two_input_models_and_picks_a_task(fixture, tmp_path):
    from kfcn import predict

    kind, model = fixture
    path = tmp_path / "m.keras"
    if kind != "multitask":
        model.save(path)
        with pytest.raises(predict.ModelError, match=r"kfcn predict cannot take model .*RGB"):
            predict.load_predictor(path)
        return
    info = metadata.class_info_for_tasks("siftflow", HEADS)
    metadata.save_model(model, path, info)
    assert json.loads(json.dumps(metadata.read_class_info(path).to_dict()))["tasks"]["geo"]
    images = _inputs(kind, seed=4)["images"].astype(np.float32)
    logits = _logits(model, kind, {"images": images})
    default = predict.load_predictor(path)
    assert default.task == "sem" and default.num_classes == 5
    geo = predict.load_predictor(path, task="geo")
    np.testing.assert_allclose(geo.scores(images), logits["geo"], rtol=1e-5, atol=1e-5)
    class_info, source = predict.resolve_class_info(geo)
    assert source == "model" and class_info.names == ["sky", "horizontal", "vertical"]
    with pytest.raises(predict.ModelError, match=r"tasks \['sem', 'geo'\].*task='depth'"):
        predict.load_predictor(path, task="depth")

    # The command: `kfcn predict --task geo` writes the geo class map with geo's names.
    from kfcn.cli import main

    image = np.clip(images[0], 0, 255).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "scene.png")
    out = tmp_path / "out"
    argv = ["predict", str(tmp_path / "scene.png"), "--model", str(path), "--output_dir", str(out)]
    assert main([*argv, "--task", "geo"]) == 0
    written = np.asarray(Image.open(out / "scene.png"))
    assert _agreement(written, logits["geo"][0]) > MIN_AGREEMENT
    summary = json.loads((out / "summary.json").read_text())
    assert "vertical" in json.dumps(summary)
    assert main([*argv, "--task", "depth"]) == 1
