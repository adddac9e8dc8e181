"""Offline checks of a .tflite file: builtin-only static graph, GPU delegate support.

`tf.lite.experimental.Analyzer.analyze(..., gpu_compatibility=True)` reports
nothing in TF 2.21, so this module reads the flatbuffer itself and applies the
rules of the LiteRT GPU delegate:

- the op table and per-op constraints of `CheckGpuDelegateCompatibility` in
  tensorflow/lite/tools/versioning/gpu_compatibility.cc (strided-slice masks,
  padding shapes, softmax beta, fused activations, broadcasting, ...), where the
  delegate's `IsSupported` checks now live;
- the maximum op versions the `*OperationParser::IsSupported` methods of
  tensorflow/lite/delegates/gpu/common/model_builder.cc accept, and its special
  case of float16 weights (DEQUANTIZE of fp16 constants is folded, any version);
- `IsAllAllowedTensors` of model_builder.cc: every non-constant input and output
  of a delegated op is float32 or float16 (int8/uint8 too when quantized ops are
  allowed, which the delegate's default options do).

The detailed shape rules of a few rarely used ops (BATCH_MATMUL, CUMSUM, GATHER,
ONE_HOT, SELECT_V2, DYNAMIC_UPDATE_SLICE, EMBEDDING_LOOKUP, LSTM) are not
reproduced; their tensor types are checked.

Ops outside the table (ARG_MAX, SHAPE, GATHER_ND, every Flex/custom op except the
delegate's three custom kernels, ...) are reported as unsupported: the delegate
would leave them, and everything after them, to the CPU.

Example:
    >>> report = check_gpu_compatibility("fcn8s.tflite")
    >>> report.ok
    True
    >>> print(report.format())
"""

from __future__ import annotations

import collections
import dataclasses
import os
from collections.abc import Iterable

# Ops of `CheckGpuDelegateCompatibility` (gpu_compatibility.cc), with the maximum
# op version the parser of model_builder.cc accepts where it checks one (None: no
# version check known).
GPU_SUPPORTED_OPS: dict[str, int | None] = {
    "ABS": 2,
    "ADD": 2,
    "ADD_N": None,
    "ATAN2": None,
    "AVERAGE_POOL_2D": 2,
    "BATCH_MATMUL": None,
    "CAST": None,
    "CEIL": None,
    "CONCATENATION": 2,
    "CONV_2D": 5,
    "COS": 2,
    "CUMSUM": None,
    "DENSIFY": None,
    "DEPTHWISE_CONV_2D": 6,
    "DEPTH_TO_SPACE": None,
    "DEQUANTIZE": 2,
    "DIV": 2,
    "DYNAMIC_UPDATE_SLICE": None,
    "ELU": 2,
    "EMBEDDING_LOOKUP": None,
    "EQUAL": None,
    "EXP": 2,
    "FLOOR": None,
    "FLOOR_DIV": None,
    "FLOOR_MOD": None,
    "FULLY_CONNECTED": 9,
    "GATHER": None,
    "GELU": None,
    "GREATER": None,
    "GREATER_EQUAL": None,
    "HARD_SWISH": None,
    "LEAKY_RELU": 2,
    "LESS": None,
    "LESS_EQUAL": None,
    "LOG": 2,
    "LOGICAL_AND": None,
    "LOGISTIC": 2,
    "LSTM": 4,
    "MAXIMUM": 2,
    "MAX_POOL_2D": 2,
    "MEAN": None,
    "MINIMUM": 2,
    "MIRROR_PAD": 2,
    "MUL": 3,
    "NEG": 2,
    "NOT_EQUAL": None,
    "ONE_HOT": None,
    "PACK": None,
    "PAD": 2,
    "PADV2": 2,
    "POW": 2,
    "PRELU": 1,
    "QUANTIZE": 2,
    "REDUCE_MAX": None,
    "REDUCE_MIN": None,
    "REDUCE_PROD": None,
    "RELU": 2,
    "RELU6": 2,
    "RELU_N1_TO_1": None,
    "RESHAPE": 1,
    "RESIZE_BILINEAR": 3,
    "RESIZE_NEAREST_NEIGHBOR": 3,
    "RSQRT": 2,
    "SELECT": None,
    "SELECT_V2": None,
    "SIGN": None,
    "SIN": 2,
    "SLICE": 2,
    "SOFTMAX": 2,
    "SPACE_TO_DEPTH": 2,
    "SPLIT": None,
    "SPLIT_V": None,
    "SQRT": 2,
    "SQUARE": 2,
    "SQUARED_DIFFERENCE": 2,
    "STABLEHLO_CLAMP": None,
    "STRIDED_SLICE": 2,
    "SUB": 2,
    "SUM": None,
    "TANH": 2,
    "TILE": None,
    "TRANSPOSE": 2,
    "TRANSPOSE_CONV": 3,
}
# Custom ops the delegate has its own kernels for (custom_parsers.cc).
GPU_SUPPORTED_CUSTOM_OPS = (
    "Convolution2DTransposeBias",
    "MaxPoolingWithArgmax2D",
    "MaxUnpooling2D",
)
_ONE_ARG_ELEMENTWISE = (
    "ABS",
    "CEIL",
    "COS",
    "ELU",
    "EXP",
    "FLOOR",
    "GELU",
    "LOG",
    "LOGISTIC",
    "NEG",
    "RSQRT",
    "SIGN",
    "SIN",
    "SQRT",
    "SQUARE",
    "TANH",
)
_TWO_ARG_ELEMENTWISE = (
    "ATAN2",
    "DIV",
    "EQUAL",
    "FLOOR_DIV",
    "FLOOR_MOD",
    "GREATER",
    "GREATER_EQUAL",
    "LOGICAL_AND",
    "LESS",
    "LESS_EQUAL",
    "MAXIMUM",
    "MINIMUM",
    "NOT_EQUAL",
    "POW",
    "SQUARED_DIFFERENCE",
    "SUB",
)
_LOGICAL_OUTPUT = (
    "EQUAL",
    "GREATER",
    "GREATER_EQUAL",
    "LESS",
    "LESS_EQUAL",
    "LOGICAL_AND",
    "NOT_EQUAL",
)
# Ops that betray unfrozen variables or shapes computed at run time.
_VARIABLE_OPS = ("VAR_HANDLE", "READ_VARIABLE", "ASSIGN_VARIABLE", "CALL_ONCE")
_DYNAMIC_SHAPE_OPS = ("SHAPE", "PACK", "RANK", "WHILE", "IF")


@dataclasses.dataclass(frozen=True)
class OpIssue:
    """One operator the target cannot run.

    Attributes:
        index: Position of the operator in subgraph 0's execution order.
        op: Builtin operator name, or the custom code of a custom/Flex op.
        reason: Why it is rejected, in the delegate's words where it has them.
    """

    index: int
    op: str
    reason: str

    def __str__(self) -> str:
        return f"op #{self.index} {self.op}: {self.reason}"


@dataclasses.dataclass(frozen=True)
class CompatibilityReport:
    """Result of a check over one .tflite model.

    Attributes:
        ops: Operator names in execution order.
        issues: Unsupported operators, in execution order.
        target: What was checked, e.g. "GPU delegate" or "builtin static graph".
    """

    ops: tuple[str, ...]
    issues: tuple[OpIssue, ...]
    target: str

    @property
    def ok(self) -> bool:
        return not self.issues

    def format(self) -> str:
        """A human-readable summary, one line per issue."""
        if self.ok:
            return f"{self.target}: all {len(self.ops)} ops supported."
        lines = [f"{self.target}: {len(self.issues)} of {len(self.ops)} ops unsupported:"]
        lines += [f"  {issue}" for issue in self.issues]
        return "\n".join(lines)


def _schema():
    # The flatbuffer schema ships with TensorFlow and with ai-edge-litert.
    try:
        from tensorflow.lite.python import schema_py_generated
    except ImportError:  # pragma: no cover - TF-less environments
        from ai_edge_litert import schema_py_generated
    return schema_py_generated


def _enum_names(enum_class) -> dict[int, str]:
    return {v: k for k, v in vars(enum_class).items() if not k.startswith("_")}


@dataclasses.dataclass
class TensorInfo:
    """A tensor as an operator sees it: index, shape, shape signature, type name, constness."""

    id: int
    shape: tuple[int, ...]
    signature: tuple[int, ...]
    dtype: str
    is_const: bool


@dataclasses.dataclass
class Operator:
    """One operator of subgraph 0: builtin name (or custom code), version, options, tensors."""

    index: int
    name: str
    version: int
    options: object
    inputs: list[TensorInfo | None]
    outputs: list[TensorInfo]
    custom: bool


def read_operators(model: str | os.PathLike | bytes) -> list[Operator]:
    """Parses a .tflite flatbuffer into a list of operators of subgraph 0.

    Args:
        model: Path to a .tflite file, or its bytes.

    Returns:
        Operators in execution order, each with its name, version, builtin options
        and input/output tensors (shape, shape signature, type, constness).

    Raises:
        ValueError: If `model` is not a TFLite flatbuffer.
    """
    schema = _schema()
    if isinstance(model, bytes | bytearray):
        buf = bytes(model)
    else:
        with open(model, "rb") as f:
            buf = f.read()
    if len(buf) < 8 or buf[4:8] != b"TFL3":
        raise ValueError(
            "`model` is not a TFLite flatbuffer (file identifier 'TFL3' missing). "
            f"Received {len(buf)} bytes starting with {buf[:8]!r}"
        )
    m = schema.ModelT.InitFromPackedBuf(buf, 0)
    op_names = _enum_names(schema.BuiltinOperator)
    type_names = _enum_names(schema.TensorType)
    subgraph = m.subgraphs[0]

    def const(tensor) -> bool:
        if tensor.buffer <= 0 or tensor.buffer >= len(m.buffers):
            return False
        buffer = m.buffers[tensor.buffer]
        has_data = buffer.data is not None and len(buffer.data) > 0
        return has_data or buffer.size > 0

    def tensor(i: int) -> TensorInfo | None:
        if i < 0:  # optional input left out
            return None
        t = subgraph.tensors[i]
        shape = tuple(int(d) for d in (t.shape if t.shape is not None else ()))
        signature = shape
        if t.shapeSignature is not None:
            signature = tuple(int(d) for d in t.shapeSignature)
        return TensorInfo(i, shape, signature, type_names.get(t.type, str(t.type)), const(t))

    ops = []
    for index, op in enumerate(subgraph.operators or ()):
        code = m.operatorCodes[op.opcodeIndex]
        # Codes above 127 live in `builtinCode`; older files use the deprecated byte.
        builtin = max(code.builtinCode, code.deprecatedBuiltinCode)
        name = op_names.get(builtin, f"BUILTIN_{builtin}")
        custom = name == "CUSTOM"
        if custom:
            custom_code = code.customCode
            name = custom_code.decode() if isinstance(custom_code, bytes) else str(custom_code)
        ops.append(
            Operator(
                index=index,
                name=name,
                version=int(code.version),
                options=op.builtinOptions,
                inputs=[tensor(int(i)) for i in (op.inputs if op.inputs is not None else ())],
                outputs=[tensor(int(i)) for i in (op.outputs if op.outputs is not None else ())],
                custom=custom,
            )
        )
    return ops


def _is_fp16_weight_dequantize(op: Operator) -> bool:
    # float16 weights: FP16GraphPartitionHelper drops DEQUANTIZE nodes of fp16
    # constants (whatever their version) and feeds the constants to their consumers.
    if op.name != "DEQUANTIZE" or not op.inputs or op.inputs[0] is None:
        return False
    return op.inputs[0].dtype == "FLOAT16" and op.inputs[0].is_const


def _runtime_inputs(op: Operator) -> list[TensorInfo]:
    return [t for t in op.inputs if t is not None and not t.is_const]


def _activation_reason(options) -> str | None:
    activation = getattr(options, "fusedActivationFunction", 0)
    if activation == _schema().ActivationFunctionType.SIGN_BIT:
        return "Fused activation SIGN_BIT is not supported."
    return None


def _broadcast_reason(a: TensorInfo, b: TensorInfo) -> str | None:
    # gpu_compatibility.cc: with enhanced broadcast (the offline default), any
    # numpy-broadcastable pair of ranks > 1 is accepted.
    if len(a.shape) > 1 and len(b.shape) > 1 and len(a.shape) != len(b.shape):
        longer, shorter = (a.shape, b.shape) if len(a.shape) >= len(b.shape) else (b.shape, a.shape)
        for x, y in zip(longer[::-1], shorter[::-1]):
            if x != y and x != 1 and y != 1:
                return (
                    f"Doesn't support broadcasting - input0: {list(a.shape)}, "
                    f"input1: {list(b.shape)}"
                )
    return None


def _op_reason(op: Operator, allow_quant_ops: bool) -> str | None:
    """The delegate's reason to reject `op`, or None if it runs it."""
    name, o = op.name, op.options
    if _is_fp16_weight_dequantize(op):
        return None
    if op.custom:
        if name.startswith("Flex"):
            return f"Flex (Select TF) op {name[4:]!r} runs only on the CPU with the Flex delegate."
        if name not in GPU_SUPPORTED_CUSTOM_OPS:
            return f"Not supported custom op {name}."
        return None
    if name not in GPU_SUPPORTED_OPS:
        return f"Operation {name} is not supported by the GPU delegate."
    max_version = GPU_SUPPORTED_OPS[name]
    if max_version is not None and op.version > max_version:
        return f"Max version supported: {max_version}. Requested version {op.version}."
    runtime = _runtime_inputs(op)

    if name == "DEQUANTIZE":
        source = op.inputs[0]
        if not allow_quant_ops:
            return "DEQUANTIZE of non-float16 tensors needs quantized ops enabled."
        if source is not None and source.dtype == "INT16":
            return "Unsupported dequantization type int16."
        return None
    if name == "QUANTIZE":
        if not allow_quant_ops:
            return "QUANTIZE needs quantized ops enabled."
        return None if len(runtime) == 1 else "Expected 1 runtime input."
    if name in ("ADD", "MUL"):
        if len(op.inputs) != 2:
            return f"{name} requires two input tensors."
        a, b = op.inputs
        if name == "MUL" and len(a.shape) == len(b.shape):
            a_smaller = any(x < y for x, y in zip(a.shape, b.shape))
            b_smaller = any(y < x for x, y in zip(a.shape, b.shape))
            if a_smaller and b_smaller:
                return "MUL requires one tensor that not less than second in all dimensions."
        else:
            reason = _broadcast_reason(a, b)
            if reason:
                return reason
        return _activation_reason(o)
    if name in ("AVERAGE_POOL_2D", "MAX_POOL_2D"):
        if len(runtime) != 1 or len(op.outputs) != 1:
            return "Expected 1 runtime input and 1 output."
        if o.filterHeight <= 0 or o.filterWidth <= 0:
            return f"Incorrect kernel values: {o.filterHeight}x{o.filterWidth}."
        if o.strideH <= 0 or o.strideW <= 0:
            return f"Incorrect stride values: {o.strideH}x{o.strideW}."
        return _activation_reason(o)
    if name in ("CONV_2D", "DEPTHWISE_CONV_2D", "TRANSPOSE_CONV"):
        if len(runtime) > 2:
            return f"Expected 1 or 2 input tensor(s), but node has {len(runtime)} runtime inputs."
        if len(op.outputs) != 1:
            return "Expected 1 output tensor."
        if o.strideH <= 0 or o.strideW <= 0:
            return f"Incorrect stride values: {o.strideH}x{o.strideW}."
        if name != "TRANSPOSE_CONV" and (o.dilationHFactor <= 0 or o.dilationWFactor <= 0):
            return "Incorrect dilation values."
        if name == "DEPTHWISE_CONV_2D":
            x, w, y = op.inputs[0], op.inputs[1], op.outputs[0]
            if len(x.shape) != 4 or len(w.shape) != 4 or len(y.shape) != 4:
                return "Input, filter and output must be 4-D."
            if w.shape[3] != y.shape[3]:
                return "filter.i != output.c"
            if y.shape[3] != x.shape[3] * o.depthMultiplier:
                return "output.c != input.c * depth_multiplier"
            if o.depthMultiplier != 1 and x.shape[3] != 1:
                return "depth_multiplier != 1 && input.c != 1"
        return _activation_reason(o)
    if name == "CONCATENATION":
        return _activation_reason(o)
    if name == "CAST":
        source, target = op.inputs[0].dtype, op.outputs[0].dtype
        floats = ("FLOAT32", "FLOAT16")
        if (
            (source == "BOOL" and target in floats)
            or (source in floats and target == "BOOL")
            or (source in ("FLOAT32", "INT32") and target in ("FLOAT32", "INT32"))
        ):
            return None
        return f"Not supported Cast case. Input type: {source} and output type: {target}."
    if name == "FULLY_CONNECTED":
        if o.weightsFormat != 0:
            return f"Unsupported FullyConnected weights format: {o.weightsFormat}."
        if len(runtime) > 2:
            return "FullyConnected doesn't support more than 2 runtime inputs."
        if op.inputs[0].is_const:
            return "FullyConnected doesn't support constant input."
        if o.keepNumDims and len(op.inputs[0].shape) != len(op.outputs[0].shape):
            return "Input and output dimensions different and keep_num_dims is set."
        return _activation_reason(o)
    if name in ("MEAN", "SUM", "REDUCE_MAX", "REDUCE_MIN", "REDUCE_PROD"):
        axes = op.inputs[1]
        if len(runtime) != 1:
            return "Expected 1 runtime input."
        if not axes.is_const or axes.dtype != "INT32":
            return f"{name} is only supported with constant int32 axes."
        return None
    if name in ("PAD", "PADV2", "MIRROR_PAD"):
        if name == "MIRROR_PAD" and o.mode != _schema().MirrorPadMode.REFLECT:
            return "Only Reflective padding is supported for Mirror Pad operation."
        if len(runtime) != 1:
            return "Expected 1 runtime input."
        paddings = op.inputs[1]
        if len(paddings.shape) != 2:
            return f"Invalid paddings tensor dimension: expected 2 dim, got {len(paddings.shape)}."
        if paddings.shape[0] not in (3, 4) or paddings.shape[1] != 2:
            return (
                "Invalid paddings tensor shape: expected 4x2 or 3x2, got "
                f"{paddings.shape[0]}x{paddings.shape[1]}."
            )
        return None
    if name == "RESHAPE":
        return None if len(runtime) == 1 else "RESHAPE needs exactly one runtime input."
    if name == "RESIZE_BILINEAR":
        if o.alignCorners and o.halfPixelCenters:
            return "If half_pixel_centers is True, align_corners must be False."
        return None
    if name == "SLICE":
        if len(op.inputs) < 3:
            return "SLICE requires 3 inputs."
        if len(op.inputs[0].shape) not in (3, 4):
            return "SLICE supports for 3 or 4 dimensional tensors only."
        return None
    if name == "SOFTMAX":
        return None if o.beta == 1 else f"Softmax.beta != 1 is not supported (beta={o.beta})."
    if name == "SPACE_TO_DEPTH":
        return None if o.blockSize > 1 else "SPACE_TO_DEPTH block_size must be > 1."
    if name == "SPLIT_V":
        return None if o.numSplits != 1 else "SplitV with num_splits = 1 is a no-op."
    if name == "STRIDED_SLICE":
        if o.ellipsisMask:
            return "Slice does not support ellipsis_mask."
        if o.newAxisMask:
            return "Slice does not support new_axis_mask."
        if o.shrinkAxisMask:
            return "Slice does not support shrink_axis_mask parameter."
        if len(op.inputs) < 4:
            return "STRIDED_SLICE requires 4 inputs."
        if len(op.inputs[0].shape) not in (3, 4):
            return "STRIDED_SLICE supports for 3 or 4 dimensional tensors only."
        return None
    if name == "ADD_N":
        return None if len(op.inputs) == 2 else "ADD_N only supports 2 inputs."
    if name == "DEPTH_TO_SPACE":
        return None if o.blockSize > 1 else "DEPTH_TO_SPACE block_size must be > 1."
    if name in ("TRANSPOSE", "HARD_SWISH", "TILE"):
        return None if len(runtime) == 1 else "Expected 1 runtime input."
    if name in _ONE_ARG_ELEMENTWISE:
        if len(runtime) != 1 or len(op.inputs) != 1:
            return "Expected 1 runtime input and no constant input."
        return None
    if name in _TWO_ARG_ELEMENTWISE:
        if len(op.inputs) != 2 or not runtime:
            return "Op can only handle 1 or 2 operand(s)."
        return _activation_reason(o)
    return None


def _tensor_type_reason(op: Operator, allow_quant_ops: bool) -> str | None:
    # model_builder.cc: runtime tensors are float (or int8/uint8 for quantized
    # models); logical ops may produce BOOL, CAST and index inputs may be INT32.
    allowed = {"FLOAT32", "FLOAT16"} | ({"INT8", "UINT8"} if allow_quant_ops else set())
    allowed_in, allowed_out = set(allowed), set(allowed)
    if op.name in _LOGICAL_OUTPUT or op.name in ("SELECT", "SELECT_V2", "CAST"):
        allowed_in.add("BOOL")
        allowed_out.add("BOOL")
    if op.name in ("CAST", "GATHER", "ONE_HOT", "EMBEDDING_LOOKUP", "DYNAMIC_UPDATE_SLICE"):
        allowed_in.add("INT32")
        if op.name == "CAST":
            allowed_out.add("INT32")
    checks = (("input", op.inputs, allowed_in), ("output", op.outputs, allowed_out))
    for role, tensors, ok in checks:
        for t in tensors:
            if t is not None and not t.is_const and t.dtype not in ok:
                return f"OP is supported, but tensor type isn't matched: {role} is {t.dtype}."
    return None


def check_gpu_compatibility(
    model: str | os.PathLike | bytes, allow_quant_ops: bool = True
) -> CompatibilityReport:
    """Checks every operator of a .tflite model against the GPU delegate's rules.

    Args:
        model: Path to a .tflite file, or its bytes.
        allow_quant_ops: Whether the delegate runs quantized (int8/uint8) tensors and
            QUANTIZE/DEQUANTIZE ops, as `TfLiteGpuDelegateOptionsV2Default()` does.

    Returns:
        A `CompatibilityReport`; `report.ok` is True when the delegate takes every op.
    """
    ops = read_operators(model)
    folded = {op.outputs[0].id for op in ops if _is_fp16_weight_dequantize(op)}
    for op in ops:
        op.inputs = [
            dataclasses.replace(t, is_const=True) if t is not None and t.id in folded else t
            for t in op.inputs
        ]
    issues = []
    for op in ops:
        reason = _op_reason(op, allow_quant_ops)
        if reason is None and not op.custom:
            reason = _tensor_type_reason(op, allow_quant_ops)
        if reason is not None:
            issues.append(OpIssue(op.index, op.name, reason))
    return CompatibilityReport(tuple(op.name for op in ops), tuple(issues), "GPU delegate")


def check_builtin_static(model: str | os.PathLike | bytes) -> CompatibilityReport:
    """Checks that a model holds only builtin ops over constant shapes.

    Rejects Flex and custom ops, resource-variable ops (VAR_HANDLE, READ_VARIABLE,
    ...), ops that compute shapes at run time (SHAPE, PACK, ...) and tensors whose
    shape signature has an unknown (-1) dimension.

    Args:
        model: Path to a .tflite file, or its bytes.

    Returns:
        A `CompatibilityReport` for the "builtin static graph" target.
    """
    ops = read_operators(model)
    issues = []
    for op in ops:
        reason = None
        if op.custom:
            kind = "Flex (Select TF)" if op.name.startswith("Flex") else "custom"
            reason = f"{kind} op; only builtin ops are allowed."
        elif op.name in _VARIABLE_OPS:
            reason = "resource-variable op; variables were not frozen into constants."
        elif op.name in _DYNAMIC_SHAPE_OPS:
            reason = "shape computed at run time; the graph should have constant shapes."
        else:
            for t in (*op.inputs, *op.outputs):
                if t is not None and any(d < 0 for d in t.signature):
                    reason = f"tensor with unknown dimension, shape signature {list(t.signature)}."
                    break
        if reason is not None:
            issues.append(OpIssue(op.index, op.name, reason))
    return CompatibilityReport(tuple(op.name for op in ops), tuple(issues), "builtin static graph")


def op_counts(ops: Iterable[str]) -> dict[str, int]:
    """Counts operator names, e.g. for logging a model's op mix."""
    return dict(sorted(collections.Counter(ops).items()))
