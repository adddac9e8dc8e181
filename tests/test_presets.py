"""Shipped presets (`kfcn.presets`): packing, loading, the command, and the shipped card.

The packing tests use a tiny FCN-8s whose score layers get random non-zero
weights (kfcn's start at zero, which would hide a broken deep path) and whose
kernels are large enough to be stored as float16. The shipped preset's card is
checked against the file: its parameter count and SHA-256 always, and its
validation mean IU on the real CamVid copy at ../shared/data/camvid (skipped
when absent), so the card cannot drift from the weights.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from kfcn import presets

#: Every preset kfcn ships; each is checked against its card.
SHIPPED = ("camvid_fcn8s_mobilenetv2", "camvid_fcn4s_mobilenetv2")
REAL_CAMVID = os.environ.get(
    "KFCN_CAMVID",
    os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "camvid"),
)
NAMES = ["sky", "road", "car"]


def _tiny_fcn8s(seed: int = 0):
    import keras

    import kfcn

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((None, None, 3))
    x = keras.layers.Rescaling(1 / 127.5, -1)(inputs)
    for index, channels in enumerate((8, 16, 32, 48, 64)):  # strides 2..32
        x = keras.layers.Conv2D(
            channels, 3, strides=2, padding="same", activation="relu", name=f"down{index}"
        )(x)
    bn = keras.layers.BatchNormalization(name="bn")
    backbone = keras.Model(inputs, bn(x), name="tiny")
    rng = np.random.default_rng(seed)
    gamma, beta, mean, var = bn.get_weights()
    bn.set_weights([gamma, beta, rng.normal(0, 0.3, mean.shape), rng.uniform(0.5, 2, var.shape)])
    model = kfcn.build_fcn8s(backbone=backbone, num_classes=len(NAMES), dropout=0.0)
    for name in ("score_fr", "score_pool4", "score_pool3"):
        layer = model.get_layer(name)
        kernel, bias = layer.get_weights()
        layer.set_weights([rng.normal(0, 4.0, kernel.shape).astype("float32"), 0 * bias])
    return model


def _scene(height: int, width: int, seed: int) -> np.ndarray:
    """A batch of one image of coloured blocks with texture, so that classes vary."""
    rng = np.random.default_rng(seed)
    image = np.zeros((height, width, 3), np.float32)
    for _ in range(8):
        y, x = rng.integers(0, height), rng.integers(0, width)
        image[y:, x:] = rng.integers(0, 256, 3)
    image += rng.normal(0, 20, image.shape)
    return np.clip(image, 0, 255)[None]


def _card() -> dict:
    from kfcn.metadata import class_info_for_dataset

    info = class_info_for_dataset("folder", len(NAMES), NAMES)
    return {"name": "tiny", "description": "test", "class_info": info.to_dict()}


@pytest.fixture()
def packed(tmp_path, monkeypatch):
    """A preset "tiny" in a temporary PRESET_DIR, and the model it was packed from."""
    monkeypatch.setattr(presets, "PRESET_DIR", str(tmp_path / "preset_files"))
    monkeypatch.setenv("KFCN_CACHE_DIR", str(tmp_path / "cache"))
    model = _tiny_fcn8s()
    card = presets.write_preset(model, _card(), tmp_path / "preset_files" / "tiny")
    return model, card


def test_packed_preset_round_trips_with_float16_kernels(packed):
    import kfcn

    model, card = packed
    assert presets.preset_names() == ["tiny"]
    assert kfcn.list_presets()["tiny"]["weights"]["sha256"] == card["weights"]["sha256"]
    loaded = kfcn.from_preset("tiny")
    assert loaded.class_info.names == NAMES
    assert card["weights"]["parameters"] == model.count_params()
    halved = 0
    for original, restored in zip(model.weights, loaded.weights):
        assert original.path == restored.path
        value = original.numpy()
        if value.size >= presets.FLOAT16_MIN_SIZE:
            halved += 1
            expected = value.astype(np.float16).astype(np.float32)
        else:
            expected = value
        np.testing.assert_array_equal(restored.numpy(), expected)
    assert halved >= 3  # the large kernels really are stored as float16
    image = _scene(96, 128, seed=1)
    want = np.argmax(model.predict(image, verbose=0), -1)
    got = np.argmax(loaded.predict(image, verbose=0), -1)
    assert len(np.unique(want)) >= 2  # several classes appear: the test can see a swap
    assert (want == got).mean() > 0.99


def test_damaged_or_unknown_preset_is_refused(packed):
    import kfcn

    with pytest.raises(presets.PresetError, match="unknown preset 'nope'.*tiny"):
        kfcn.from_preset("nope")
    path = os.path.join(presets.PRESET_DIR, "tiny", presets.WEIGHTS_FILE)
    with open(path, "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(presets.PresetError, match="SHA-256"):
        kfcn.from_preset("tiny")


def test_preset_model_path_writes_a_kfcn_keras_file_once(packed):
    import kfcn
    from kfcn.metadata import read_class_info

    model, _ = packed
    path = presets.preset_model_path("tiny")
    assert path.startswith(os.environ["KFCN_CACHE_DIR"]) and path.endswith(".keras")
    assert read_class_info(path).names == NAMES
    assert kfcn.load_model(path, compile=False).class_info.names == NAMES
    stamp = os.stat(path).st_mtime_ns
    assert presets.preset_model_path("tiny") == path
    assert os.stat(path).st_mtime_ns == stamp
    loaded = kfcn.load_model(path, compile=False)
    image = np.random.default_rng(2).uniform(0, 255, (1, 64, 64, 3)).astype("float32")
    np.testing.assert_allclose(
        loaded.predict(image, verbose=0),
        kfcn.from_preset("tiny").predict(image, verbose=0),
        rtol=1e-5,
        atol=1e-5,
    )
    # A path that exists wins over a preset of the same name.
    assert presets.resolve_model(path) == path
    assert presets.resolve_model("tiny") == path


@pytest.mark.parametrize(
    "command,argv",
    [
        ("predict", ["--model", "tiny", "--output_dir", "out", "x.png"]),
        ("evaluate", ["--model", "tiny", "--dataset", "camvid"]),
        ("export", ["saved_model", "--model", "tiny", "--output", "o"]),
        ("train", ["--model_dir", "r", "--init_from", "tiny"]),
    ],
)
def test_every_model_flag_accepts_a_preset_name(packed, command, argv):
    from kfcn.cli import build_parser

    args = build_parser(command).parse_args(argv)
    value = args.init_from if command == "train" else args.model
    assert value == presets.preset_model_path("tiny")


def test_unknown_model_names_the_flag_and_the_presets(packed, capsys):
    from kfcn.cli import main

    assert main(["predict", "--model", "nope.keras", "--output_dir", "o", "x.png"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "--model" in err[0] and "nope.keras" in err[0] and "tiny" in err[0]


def test_predict_command_runs_a_preset(packed, tmp_path):
    from PIL import Image

    from kfcn.cli import main

    model, _ = packed
    image = np.random.default_rng(3).integers(0, 256, (48, 80, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "scene.png")
    out = tmp_path / "out"
    argv = ["predict", "--model", "tiny", "--output_dir", str(out), str(tmp_path / "scene.png")]
    assert main(argv) == 0
    written = sorted(os.listdir(out))
    assert any(name.endswith(".png") for name in written), written


def test_presets_command_lists_and_shows_cards(packed, capsys):
    from kfcn.cli import main

    assert main(["presets"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tiny ")
    assert main(["presets", "tiny", "--json"]) == 0
    card = json.loads(capsys.readouterr().out)
    assert card["class_info"]["names"] == NAMES and card["weights"]["sha256"]
    assert main(["presets", "tiny"]) == 0
    assert "classes (3): sky, road, car" in capsys.readouterr().out
    assert main(["presets", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope" in err[0] and "tiny" in err[0]


def test_a_card_input_scale_wraps_the_net_and_names_its_cache_file(tmp_path, monkeypatch, capsys):
    import kfcn
    from kfcn.cli import main
    from kfcn.input_scale import input_scale_of

    monkeypatch.setattr(presets, "PRESET_DIR", str(tmp_path / "preset_files"))
    monkeypatch.setenv("KFCN_CACHE_DIR", str(tmp_path / "cache"))
    net = _tiny_fcn8s()
    presets.write_preset(net, {**_card(), "input_scale": 1.5}, tmp_path / "preset_files" / "tiny")
    scaled, plain = kfcn.from_preset("tiny"), kfcn.from_preset("tiny", input_scale=1.0)
    assert input_scale_of(scaled) == 1.5 and input_scale_of(plain) == 1.0
    assert scaled.class_info.names == plain.class_info.names == NAMES
    assert [layer.name for layer in plain.layers] == [layer.name for layer in net.layers]
    image = _scene(64, 96, seed=4)
    height, width = image.shape[1:3]
    # The card's scale: the plain net on the 1.5x image, its logits back at 64 x 96.
    want = tf.image.resize(plain(tf.image.resize(image, (96, 144))), (height, width))
    np.testing.assert_allclose(np.asarray(scaled(image)), np.asarray(want), atol=1e-4)
    path = presets.preset_model_path("tiny")
    assert path.endswith("-x1.5.keras")
    assert presets.preset_model_path("tiny", input_scale=1.0).endswith(
        presets.model_card("tiny")["weights"]["sha256"][:12] + ".keras"
    )
    assert input_scale_of(kfcn.load_model(path, compile=False)) == 1.5
    with pytest.raises(ValueError, match="`input_scale` must be a finite number > 0"):
        kfcn.from_preset("tiny", input_scale=-2)
    assert main(["presets", "tiny"]) == 0
    assert "input scale: 1.5 (the net runs at 1.5x" in capsys.readouterr().out


def test_a_logit_adjusted_preset_keeps_its_offsets(tmp_path, monkeypatch, capsys):
    import kfcn
    from kfcn.cli import main
    from kfcn.logit_adjustment import offsets_of, with_logit_adjustment

    monkeypatch.setattr(presets, "PRESET_DIR", str(tmp_path / "preset_files"))
    monkeypatch.setenv("KFCN_CACHE_DIR", str(tmp_path / "cache"))
    net = with_logit_adjustment(_tiny_fcn8s(), [0.5, -0.25, 0.0])
    card = {**_card(), "logit_adjustment": {"tau": 0.5, "class_weighting": "test weights"}}
    presets.write_preset(net, card, tmp_path / "preset_files" / "tiny")
    loaded = kfcn.from_preset("tiny")
    np.testing.assert_allclose(offsets_of(loaded), [0.5, -0.25, 0.0])
    image = _scene(64, 96, seed=5)
    np.testing.assert_allclose(np.asarray(loaded(image)), np.asarray(net(image)), atol=2e-2)
    assert main(["presets", "tiny"]) == 0
    assert "logit adjustment: tau 0.5 (score_adjust adds" in capsys.readouterr().out


# --- the shipped preset ---------------------------------------------------------------


def _shipped_card(name: str) -> dict:
    if name not in presets.preset_names():
        pytest.fail(f"{name} is not in {presets.PRESET_DIR}")
    return presets.model_card(name)


def test_every_preset_folder_is_a_shipped_preset():
    assert sorted(presets.preset_names()) == sorted(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_preset_card_matches_its_files(name):
    import kfcn

    card = _shipped_card(name)
    folder = os.path.join(presets.PRESET_DIR, name)
    assert presets.folder_bytes(folder) <= presets.MAX_PRESET_BYTES
    for key in ("command", "data", "wall_clock_minutes", "machine", "date"):
        assert card["training"][key], key
    assert card["weights"]["float16_argmax_agreement"] >= 0.999
    model = kfcn.from_preset(name)
    assert model.count_params() == card["weights"]["parameters"]
    from kfcn.data.listfile import CAMVID_CLASS_NAMES

    assert model.class_info.names == list(CAMVID_CLASS_NAMES)
    assert model.class_info.dataset == "camvid"
    assert model.output_shape[-1] == len(CAMVID_CLASS_NAMES)


@pytest.mark.skipif(
    not os.path.isfile(os.path.join(REAL_CAMVID, "val.txt")),
    reason="the real CamVid copy (../shared/data/camvid) is absent",
)
@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_preset_scores_its_card_on_real_camvid_val(name):
    import kfcn
    from kfcn import evaluation
    from kfcn.data import load_dataset

    card = _shipped_card(name)
    dataset, info = load_dataset("camvid", "val", data_dir=REAL_CAMVID)
    results = evaluation.evaluate(kfcn.from_preset(name), dataset, info, mode="whole")
    assert results["num_images"] == 101
    assert results["mean_iou"] == pytest.approx(card["validation"]["mean_iou"], abs=5e-4)
    for cls, value in card["validation"]["whole"]["iou"].items():
        assert results["iou"][cls] == pytest.approx(value, abs=2e-3), cls
    native = card["validation"].get("native")
    if card.get("input_scale", 1.0) != 1.0:  # the plain net's figures, on the card too
        plain = kfcn.from_preset(name, input_scale=1.0)
        results = evaluation.evaluate(plain, dataset, info, mode="whole")
        assert results["mean_iou"] == pytest.approx(native["whole"]["mean_iou"], abs=5e-4)
    else:
        assert native is None
    print(json.dumps({"mean_iou": results["mean_iou"]}))


@pytest.mark.parametrize("name", SHIPPED)
def test_presets_command_shows_every_scored_mode_of_a_shipped_card(name, capsys):
    from kfcn.cli import main

    validation = _shipped_card(name)["validation"]
    assert main(["presets", name]) == 0
    out = capsys.readouterr().out
    for mode in ("whole", "flip", "scale_flip", "msflip"):
        if mode in validation:
            assert f"{mode}: mean IU {100 * validation[mode]['mean_iou']:.2f} %" in out, mode
            if "command" in validation[mode]:
                assert validation[mode]["command"] in out, mode


@pytest.mark.slow
@pytest.mark.skipif(
    not os.path.isfile(os.path.join(REAL_CAMVID, "val.txt")),
    reason="the real CamVid copy (../shared/data/camvid) is absent",
)
@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_preset_scores_its_multiscale_card_figures_on_real_camvid_val(name):
    """The flip and 5-scale figures, and the one-scale one (scale_flip) where the card has it."""
    import kfcn
    from kfcn import evaluation
    from kfcn.data import load_dataset

    validation = _shipped_card(name)["validation"]
    dataset, info = load_dataset("camvid", "val", data_dir=REAL_CAMVID)
    model = kfcn.from_preset(name)
    for key in ("flip", "msflip", "scale_flip"):
        if key not in validation:
            assert key != "msflip", f"{name}'s card has no msflip figure"
            continue
        card = validation[key]
        scales = (1.0,)
        if key != "flip":
            scales = tuple(float(s) for s in card["command"].split("--scales ")[1].split(","))
        results = evaluation.evaluate(model, dataset, info, mode="msflip", scales=scales, flip=True)
        assert results["mean_iou"] == pytest.approx(card["mean_iou"], abs=5e-4), key
        for cls, value in card["iou"].items():
            assert results["iou"][cls] == pytest.approx(value, abs=2e-3), (key, cls)
