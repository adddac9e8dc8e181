"""The offline GPU delegate / static-graph checker on small converted graphs and on kfcn."""

import numpy as np
import pytest
import tensorflow as tf
from test_cli_export import moving_fcn8s

from kfcn.export import gpu_compat
from kfcn.export.tflite import convert, rebuild_static


def _convert(fn, shape, select_tf_ops=False, int8=False):
    spec = tf.TensorSpec(shape, tf.float32)
    concrete = tf.function(fn, input_signature=[spec]).get_concrete_function()
    converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], tf.Module())
    if select_tf_ops:
        converter.target_spec.supported_ops = [
            tf.lite.OpsSet.TFLITE_BUILTINS,
            tf.lite.OpsSet.SELECT_TF_OPS,
        ]
    if int8:
        static = [d or 1 for d in shape]
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.representative_dataset = lambda: (
            [np.random.default_rng(i).normal(size=static).astype(np.float32)] for i in range(8)
        )
    return converter.convert()


def _issues(report):
    return [(issue.op, issue.reason) for issue in report.issues]


def test_op_table_uses_real_builtin_names():
    names = set(vars(gpu_compat._schema().BuiltinOperator))
    assert set(gpu_compat.GPU_SUPPORTED_OPS) <= names
    for op in (
        "ADD",
        "AVERAGE_POOL_2D",
        "CONCATENATION",
        "CONV_2D",
        "DEPTHWISE_CONV_2D",
        "TRANSPOSE_CONV",
        "RESIZE_BILINEAR",
        "RESIZE_NEAREST_NEIGHBOR",
        "PAD",
        "STRIDED_SLICE",
        "SOFTMAX",
        "MUL",
        "SUB",
        "DIV",
        "RELU",
        "RELU6",
        "HARD_SWISH",
        "LOGISTIC",
        "TANH",
        "MAX_POOL_2D",
        "MEAN",
        "RESHAPE",
        "FULLY_CONNECTED",
        "MAXIMUM",
        "MINIMUM",
        "QUANTIZE",
        "DEQUANTIZE",
    ):
        assert op in gpu_compat.GPU_SUPPORTED_OPS, op
    for op in ("ARG_MAX", "ARG_MIN", "SHAPE", "GATHER_ND", "TOPK_V2", "CUSTOM", "VAR_HANDLE"):
        assert op not in gpu_compat.GPU_SUPPORTED_OPS, op
    versions = [v for v in gpu_compat.GPU_SUPPORTED_OPS.values() if v is not None]
    assert all(isinstance(v, int) and v >= 1 for v in versions)


def test_flags_arg_max():
    report = gpu_compat.check_gpu_compatibility(
        _convert(lambda x: tf.argmax(x, -1, output_type=tf.int32), [1, 8, 8, 4])
    )
    assert report.ops == ("ARG_MAX",)
    assert [(i.index, i.op) for i in report.issues] == [(0, "ARG_MAX")]
    assert "not supported" in report.issues[0].reason
    assert not report.ok and "op #0 ARG_MAX" in report.format()


def test_flags_flex_op_in_both_checks():
    model = _convert(lambda x: tf.math.cumprod(x, axis=1) + 1.0, [1, 8, 8, 4], select_tf_ops=True)
    gpu = gpu_compat.check_gpu_compatibility(model)
    assert (
        "FlexCumprod",
        "Flex (Select TF) op 'Cumprod' runs only on the CPU with the Flex delegate.",
    ) in _issues(gpu)
    assert "ADD" in gpu.ops and "ADD" not in [op for op, _ in _issues(gpu)]
    static = gpu_compat.check_builtin_static(model)
    assert [op for op, _ in _issues(static)] == ["FlexCumprod"]


def test_flags_strided_slice_with_shrink_mask_only():
    shrink = _convert(lambda x: x[:, :, :, 0] + 1.0, [1, 8, 8, 4])
    report = gpu_compat.check_gpu_compatibility(shrink)
    assert _issues(report) == [
        ("STRIDED_SLICE", "Slice does not support shrink_axis_mask parameter.")
    ]
    plain = _convert(lambda x: x[:, 1:7, 2:8, :] + 1.0, [1, 8, 8, 4])
    assert "STRIDED_SLICE" in gpu_compat.read_operators(plain)[0].name
    assert gpu_compat.check_gpu_compatibility(plain).ok


def test_pad_4x2_passes():
    model = _convert(lambda x: tf.pad(x, [[0, 0], [1, 1], [2, 2], [0, 0]]), [1, 8, 8, 4])
    report = gpu_compat.check_gpu_compatibility(model)
    assert report.ops == ("PAD",) and report.ok


def test_dynamic_shapes_and_shape_ops_fail_static_check():
    model = _convert(lambda x: tf.reshape(x, [tf.shape(x)[0], -1]), [None, 8, 8, 4])
    report = gpu_compat.check_builtin_static(model)
    flagged = {op for op, _ in _issues(report)}
    assert "SHAPE" in flagged
    assert any(
        "unknown dimension" in reason or "run time" in reason for _, reason in _issues(report)
    )


def test_int8_model_needs_quantized_ops():
    model = _convert(lambda x: tf.nn.relu(x) * 2.0 + 1.0, [1, 8, 8, 4], int8=True)
    ops = gpu_compat.read_operators(model)
    assert ops[0].name == "QUANTIZE" and ops[-1].name == "DEQUANTIZE"
    assert gpu_compat.check_gpu_compatibility(model, allow_quant_ops=True).ok
    strict = gpu_compat.check_gpu_compatibility(model, allow_quant_ops=False)
    flagged = {op for op, _ in _issues(strict)}
    assert {"QUANTIZE", "DEQUANTIZE"} <= flagged


def test_rejects_non_tflite_bytes():
    with pytest.raises(ValueError, match="not a TFLite flatbuffer"):
        gpu_compat.read_operators(b"PK\x03\x04 zip, not tflite")


@pytest.mark.slow
def test_exported_kfcn_model_passes():
    model = moving_fcn8s()  # every score layer non-zero: nothing folds away
    for quantization in ("none", "float16"):
        flatbuffer = convert(rebuild_static(model, (64, 96)), quantization)
        gpu = gpu_compat.check_gpu_compatibility(flatbuffer)
        assert gpu.ok, gpu.format()
        assert gpu_compat.check_builtin_static(flatbuffer).ok
        counts = gpu_compat.op_counts(gpu.ops)
        # The FCN-8s graph: convolutions, the three upsamplings, skip fusions, crops.
        assert counts["TRANSPOSE_CONV"] == 3 and counts["STRIDED_SLICE"] >= 2
        assert {"CONV_2D", "DEPTHWISE_CONV_2D", "ADD"} <= set(counts)
    with_argmax = convert(rebuild_static(model, (64, 96)), "none", with_argmax=True)
    assert [i.op for i in gpu_compat.check_gpu_compatibility(with_argmax).issues] == ["ARG_MAX"]
