"""The benchmark suite (bench/): FLOP counter against hand formulas, the plan, the JSON
schema of a toy run and the markdown report. Figures are not checked (they depend on
the machine); that the suite runs end to end and records what it claims is."""

import json
import os
import re
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench import cases, common, report, suite  # noqa: E402

# VGG16, configuration D of Simonyan & Zisserman (2015), Table 1: 3x3 'same' convolutions.
VGG16_D = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def vgg16_trunk_macs(height: int, width: int) -> int:
    """Multiply-adds of VGG16's 13 convolutions, by hand from the configuration table."""
    macs, channels, h, w = 0, 3, height, width
    for item in VGG16_D:
        if item == "M":
            h, w = h // 2, w // 2
        else:
            macs += h * w * 3 * 3 * channels * item
            channels = item
    return macs


def _flops(model, shape):
    return common.forward_flops(model, shape)


def test_conv_layers_against_hand_formulas():
    b, h, w = 2, 8, 10
    inputs = keras.Input((h, w, 3))
    x = keras.layers.Conv2D(4, 3, padding="same")(inputs)  # [2, 8, 10, 4]
    x = keras.layers.Conv2DTranspose(5, 4, strides=2, padding="same")(x)  # [2, 16, 20, 5]
    x = keras.layers.DepthwiseConv2D(3, depth_multiplier=2)(x)  # [2, 14, 18, 10]
    x = keras.layers.Dense(6)(x)  # [2, 14, 18, 6]
    counted = _flops(keras.Model(inputs, x), (b, h, w, 3))
    # 2 x multiply-adds: each output pixel of a conv sums kh*kw*in_c products per channel;
    # each INPUT pixel of a transposed conv scatters kh*kw*out_c products per channel.
    assert counted["by_op"]["Conv2D"] == 2 * b * h * w * (3 * 3 * 3) * 4
    assert counted["by_op"]["Conv2DBackpropInput"] == 2 * b * h * w * (4 * 4 * 4) * 5
    assert counted["by_op"]["DepthwiseConv2dNative"] == 2 * b * 14 * 18 * (3 * 3) * 5 * 2
    assert counted["by_op"]["MatMul"] == 2 * b * 14 * 18 * 10 * 6
    assert counted["by_op"]["BiasAdd"] == b * (h * w * 4 + 16 * 20 * 5 + 14 * 18 * 10 + 14 * 18 * 6)
    assert counted["total"] == sum(counted["by_op"].values())
    assert counted["unknown_shape_ops"] == []


def test_unknown_shapes_are_reported_not_guessed():
    layer = keras.layers.Conv2D(2, 3)
    fn = tf.function(lambda x: layer(x)).get_concrete_function(
        tf.TensorSpec((None, 8, 8, 3), tf.float32)
    )
    counted = common.graph_flops(fn)
    assert counted["total"] == 0
    assert any(
        "convolution" in name.lower() or "conv" in name.lower()
        for name in counted["unknown_shape_ops"]
    )


def test_vgg16_trunk_hand_formula_is_the_published_figure():
    # VGG16's convolutions at 224x224 are the widely quoted ~15.3-15.5 G multiply-adds
    # (15.47 G with the three fully connected layers).
    assert vgg16_trunk_macs(224, 224) == pytest.approx(15.35e9, rel=0.005)


@pytest.mark.slow
def test_fcn8s_vgg16_flops_are_the_trunk_scaled_plus_fc6_fc7():
    import kfcn

    size = 224
    model = kfcn.build_fcn8s(backbone="vgg16", num_classes=21, input_shape=(size, size, 3))
    counted = _flops(model, (1, size, size, 3))
    s = size // 32
    fc6_fc7 = s * s * (7 * 7 * 512 * 4096 + 4096 * 4096)
    trunk = vgg16_trunk_macs(size, size)
    conv_like = sum(v for k, v in counted["by_op"].items() if k != "BiasAdd")
    # The paper's trunk at 224 scaled to this size (here 1x), fc6/fc7 as convolutions;
    # the score layers and upsamplings add well under 1%.
    assert conv_like == pytest.approx(2 * (trunk + fc6_fc7), rel=0.01)
    assert conv_like > 2 * (trunk + fc6_fc7)
    # 512x512 (the benchmark's size): trunk multiply-adds scale with the area exactly.
    assert vgg16_trunk_macs(512, 512) == vgg16_trunk_macs(224, 224) * (512 * 512) // (224 * 224)


def test_summarize_against_numpy():
    seconds = [0.5, 0.1, 0.4, 0.2, 0.3, 1.0]
    summary = common.summarize(seconds)
    q1, q3 = np.percentile(seconds, [25, 75])
    assert summary["median_s"] == pytest.approx(0.35)
    assert summary["iqr_s"] == pytest.approx(q3 - q1)
    assert summary["repeats"] == 6
    with pytest.raises(ValueError, match="repeats"):
        common.time_calls(lambda: None, repeats=0)


def test_bfloat16_units_from_cpu_flags():
    assert common.has_bfloat16_units({"avx512f", "avx512_bf16"})
    assert common.has_bfloat16_units({"amx_bf16", "amx_tile"})
    assert not common.has_bfloat16_units({"avx512f", "avx2"})


def test_default_plan():
    args = suite.parser().parse_args([])
    with_bf16 = suite.plan(args, bfloat16_units=True)
    without = suite.plan(args, bfloat16_units=False)
    kinds = {c["kind"] for c in with_bf16}
    assert kinds == {
        "inference",
        "training",
        "pipeline",
        "litert",
        "peer_inference",
        "peer_training",
    }
    inference = [c for c in with_bf16 if c["kind"] == "inference" and not c.get("peer_comparison")]
    # 7 models x 2 sizes x 2 batches x (tf.function, predict) + 2 detail models x 2 x 2 x
    # (xla, bf16 tf.function, bf16 xla).
    assert len(inference) == 7 * 2 * 2 * 2 + 2 * 2 * 2 * 3
    assert {tuple(c["size"]) for c in inference} == {(512, 512), (360, 480)}
    assert not any(c.get("precision") == "mixed_bfloat16" for c in without)
    training = [c for c in with_bf16 if c["kind"] == "training" and not c.get("peer_comparison")]
    assert [(c["model"], c["precision"], c["replicas"]) for c in training] == [
        ("fcn8s:vgg16", "float32", 1),
        ("fcn8s:vgg16", "mixed_bfloat16", 1),
        ("fcn8s:vgg16", "float32", 1),
        ("fcn8s:mobilenetv2", "float32", 1),
        ("fcn8s:mobilenetv2", "mixed_bfloat16", 1),
        ("fcn8s:mobilenetv2", "float32", 1),
        ("fcn8s:mobilenetv2", "float32", 1),
        ("fcn8s:mobilenetv2", "float32", 2),
    ]
    assert [bool(c.get("jit_compile")) for c in training] == [0, 0, 1, 0, 0, 1, 0, 0]
    assert [c.get("batch_norm", "fused") for c in training].count("keras") == 1
    assert training[6]["batch_norm"] == "keras"
    no_xla = suite.plan(suite.parser().parse_args(["--no-train_xla"]), True)
    assert not any(c.get("jit_compile") for c in no_xla)
    # The peer alternates with kfcn's same model, size and batch, in separate processes.
    peer = [c for c in with_bf16 if c.get("peer_comparison") or c["kind"].startswith("peer_")]
    assert [c["kind"] for c in peer[:4]] == [
        "inference",
        "peer_inference",
        "training",
        "peer_training",
    ]
    assert len({(tuple(c["size"]), c["batch"]) for c in peer}) == 1
    with pytest.raises(ValueError, match="train_cases"):
        suite.plan(suite.parser().parse_args(["--train_cases", "fcn8s:vgg16"]), True)


def test_peer_without_its_venv_is_skipped(tmp_path):
    args = suite.parser().parse_args(["--peer_python", str(tmp_path / "none" / "python")])
    (record,) = suite._subprocess({"kind": "peer_inference"}, args)  # noqa: SLF001
    assert record["status"] == "skipped" and "peer_env.sh" in record["reason"]


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "results.json"
    suite.run(
        [
            "--quick",
            "--in_process",
            "--only",
            "inference,training",
            "--models",
            "fcn8s:mobilenetv2",
            "--detail_models",
            "",
            "--modes",
            "tf.function",
            "--sizes",
            "32x32",
            "--batches",
            "1",
            "--quick_size",
            "32x32",
            "--train_cases",
            "fcn8s:mobilenetv2@32x32/2",
            "--bf16",
            "never",
            "--no-train_xla",
            "--out",
            str(out),
        ]
    )
    with open(out) as f:
        return json.load(f)


@pytest.mark.slow
def test_toy_run_schema(toy_run):
    assert toy_run["schema"] == suite.SCHEMA
    assert toy_run["command"].startswith("python -m bench.suite --quick")
    for key in ("cpu", "usable_cores", "avx512_bf16", "amx_bf16", "tensorflow", "date"):
        assert key in toy_run["machine"]
    records = {r["name"]: r for r in toy_run["records"]}
    assert set(records) == {
        "inference FCN-8s mobilenetv2 32x32 b1 tf.function",
        "training FCN-8s mobilenetv2 32x32 b2",
        "training FCN-8s mobilenetv2 32x32 b2 keras batch norm",
        "training FCN-8s mobilenetv2 32x32 b2 mirrored x2",
    }
    assert records["training FCN-8s mobilenetv2 32x32 b2 mirrored x2"]["status"] == "skipped"
    for name in (
        "inference FCN-8s mobilenetv2 32x32 b1 tf.function",
        "training FCN-8s mobilenetv2 32x32 b2",
        "training FCN-8s mobilenetv2 32x32 b2 keras batch norm",
    ):
        r = records[name]
        assert r["status"] == "ok", r
        assert r["command"] == toy_run["command"] and r["machine"]["cpu"]
        stick = r["matmul"]["float32"]
        assert stick["n"] == 512 and stick["flop_per_s"] == pytest.approx(
            2 * 512**3 / stick["median_s"]
        )
        assert r["latency"]["repeats"] == 2
        assert r["images_per_s"] == pytest.approx(r["case"]["batch"] / r["latency"]["median_s"])
        assert r["peak_rss_mb"] > 100
    inference = records["inference FCN-8s mobilenetv2 32x32 b1 tf.function"]
    training = records["training FCN-8s mobilenetv2 32x32 b2"]
    # The recorded FLOPs are the graph count of the same model; training counts 3x forward.
    model = cases.build_model("fcn8s:mobilenetv2", (32, 32, 3), 21)
    assert inference["flops_per_image"] == _flops(model, (1, 32, 32, 3))["total"]
    assert inference["gflop_per_s"] * 1e9 == pytest.approx(
        inference["flops_per_image"] / inference["latency"]["median_s"]
    )
    assert inference["fraction_of_matmul_float32"] == pytest.approx(
        inference["gflop_per_s"] * 1e9 / inference["matmul"]["float32"]["flop_per_s"]
    )
    assert training["flops_per_step"] == 3 * 2 * training["flops_per_image"]
    assert training["strategy"] == "one_device" and training["replicas"] == 1
    assert training["batch_norm_layers"] == 52  # MobileNetV2's, fused or Keras's
    assert (
        records["training FCN-8s mobilenetv2 32x32 b2 keras batch norm"]["batch_norm_layers"] == 52
    )
    assert keras.config.dtype_policy().name == "float32"


@pytest.mark.slow
def test_report_tables(toy_run):
    text = report.render(toy_run)
    assert "### Inference" in text and "### Training step" in text
    assert "| fcn8s:mobilenetv2 | 32x32 | 1 | tf.function | float32 |" in text
    assert "| tf.function | keras (52) |" in text and "| tf.function | fused (52) |" in text
    assert "mirrored x2: skipped" in text
    assert "Machine: " in text and "float32 matmul 512^3" in text


def test_readme_bench_commands_parse():
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    lines = [
        line.split(" #", 1)[0].split()
        for line in text.splitlines()
        if line.startswith("python -m bench.")
    ]
    suite_lines = [words[3:] for words in lines if words[2] == "bench.suite"]
    assert len(suite_lines) >= 3
    for argv in suite_lines:
        args = suite.parser().parse_args(argv)
        assert set(args.only) <= set(suite.GROUPS)
    # The full default plan is the README's case count.
    (count,) = re.findall(r"# everything: (\d+) cases", text)
    assert len(suite.plan(suite.parser().parse_args([]), bfloat16_units=True)) == int(count)
    assert any(words[2] == "bench.report" for words in lines)


@pytest.mark.slow
def test_op_profile_reads_the_training_step_kernels(tmp_path):
    import subprocess

    out = tmp_path / "ops.json"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.op_profile",
            "--model",
            "fcn8s:mobilenetv2",
            "--size",
            "32x32",
            "--batch",
            "2",
            "--mode",
            "train",
            "--precisions",
            "float32",
            "--repeats",
            "1",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    with open(out) as f:
        (run,) = json.load(f)["runs"]
    ops = run["op_s_per_call"]
    # The step's convolutions and their gradients, and the builders' fused batch norm
    # (kfcn.batch_norm), not Keras's moments.
    assert any("Conv2DBackpropFilter" in name for name in ops), sorted(ops)
    assert any(name.endswith("FusedBatchNormGradV3") for name in ops), sorted(ops)
    assert "SquaredDifference" not in ops
    assert all(seconds >= 0 for seconds in ops.values()) and run["wall_s_per_call"] > 0


@pytest.mark.slow
def test_training_case_with_float32_depthwise_convolutions():
    """Under mixed_bfloat16 the depthwise layers (and their BN and ReLU6) run in float32."""
    base = {"kind": "training", "model": "fcn8s:mobilenetv2", "size": [32, 32], "batch": 2}
    base.update(precision="mixed_bfloat16", repeats=1, warmup=1, matmul_n=256, matmul_repeats=1)
    plain = cases.run_training(dict(base))[0]
    kept = cases.run_training(dict(base, depthwise_float32=True))[0]
    # MobileNetV2's 17 depthwise convolutions, each with its BN and ReLU6, plus the input.
    assert plain["float32_layers"] == 1 and kept["float32_layers"] == 1 + 17 * 3
    assert kept["flops_per_image"] == plain["flops_per_image"]
    assert keras.config.dtype_policy().name == "float32"


def test_conv_gradients_bench_checks_and_tables_every_vgg16_shape(capsys):
    from bench import conv_gradients
    from kfcn.conv_gradients import MIN_CHANNELS

    assert conv_gradients.main(["--size", "32", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    record = json.loads(out[: out.index("\n| map")])
    rows = record["rows"]
    # VGG16's 13 3x3 layers in 9 distinct shapes, each timed four ways.
    assert sum(row["layers"] for row in rows) == 13 and len(rows) == 9
    assert [row["switched"] for row in rows] == [row["channels"] >= MIN_CHANNELS for row in rows]
    assert all(len(row["ms"]) == 4 and min(row["ms"].values()) > 0 for row in rows)
    assert out.count("\n| ") == 1 + 9
