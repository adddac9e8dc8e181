"""ONNX export with tf2onnx, checked against the Keras model with onnxruntime.

The file takes `images`, float32 [batch, height, width, 3] 0..255 RGB (any height
and width, unless a fixed `input_size` is asked for), and returns `logits`,
float32 [batch, height, width, num_classes]; the argmax is the caller's.

Integer arithmetic on shapes must not depend on the rounding of negative
operands: tf2onnx lowers an integer FloorMod to `a - Div(a, b) * b` and ONNX
Runtime's integer Div truncates toward zero (tf2onnx issue #2174), so `(-45) % 32`
becomes -13 there; kfcn's `PadToMultiple` computes its padding from non-negative
operands for this reason. Every export is run with onnxruntime at two sizes, one
not a multiple of 32, and compared with the Keras model before it is written.

Other kinds of model (`kfcn.export.model_io`): a multi-task model's file returns
`logits_sem` and `logits_geo`; an RGB-D model's `images` have 4 channels (RGB
0..255, then depth as the PNG holds it); an RGB-HHA model's file takes two inputs,
`rgb` and `hha`.

Example:
    >>> result = export_onnx(model, "fcn8s.onnx")
    >>> session = onnxruntime.InferenceSession("fcn8s.onnx")
    >>> logits = session.run(["logits"], {"images": images})[0]
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import numpy as np

from kfcn.export import model_io
from kfcn.export.artifacts import check_input_size
from kfcn.files import atomic_output

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 17
INPUT_NAME = "images"
OUTPUT_NAME = "logits"
#: Metadata property holding the class info JSON (as kfcn.metadata's other formats).
METADATA_KEY = "kfcn_classes"


@dataclasses.dataclass(frozen=True)
class ONNXExport:
    """Result of `export_onnx`.

    Attributes:
        path: The .onnx file.
        size_bytes: Its size.
        opset: The ONNX opset.
        input_size: (height, width) if fixed, else None (any size).
        max_abs_error: Largest |onnxruntime - Keras| logit difference found by the
            check, or None if not checked.
    """

    path: str
    size_bytes: int
    opset: int
    input_size: tuple[int, int] | None
    max_abs_error: float | None


def _input_channels(model) -> dict:
    """Input name -> channels, as the ONNX file names its inputs."""
    if isinstance(model.input, dict):
        return {name: int(model.input[name].shape[-1]) for name in sorted(model.input)}
    return {INPUT_NAME: int(model.inputs[0].shape[-1])}


def onnx_function(model, input_size: tuple[int, int] | None = None):
    """The tf.function that is converted: the model's logits as float32.

    Args:
        model: A kfcn segmentation keras.Model (any kind `kfcn.export.model_io`
            describes).
        input_size: Fixed (height, width), or None for any size.

    Returns:
        A tf.function of the inputs (`images`, or `hha` and `rgb`) returning
        {"logits": ...} (or {"logits_<task>": ...} per task).
    """
    import tensorflow as tf

    channels = _input_channels(model)
    size = [None, None, None] if input_size is None else [1, *input_size]
    specs = [tf.TensorSpec([*size, c], tf.float32, name=n) for n, c in channels.items()]
    by_name = isinstance(model.input, dict)

    @tf.function(input_signature=specs)
    def serve(*images):
        logits = model(dict(zip(channels, images)) if by_name else images[0], training=False)
        if not isinstance(logits, dict):
            logits = {None: logits}
        return {
            model_io.output_name(OUTPUT_NAME, task): tf.cast(task_logits, tf.float32)
            for task, task_logits in logits.items()
        }

    return serve


def _rename_output(model_proto, old: str, new: str) -> None:
    for node in model_proto.graph.node:
        node.output[:] = [new if name == old else name for name in node.output]
        node.input[:] = [new if name == old else name for name in node.input]
    for output in model_proto.graph.output:
        if output.name == old:
            output.name = new


def convert(model, input_size: tuple[int, int] | None = None, opset: int = DEFAULT_OPSET):
    """Converts a kfcn model to an ONNX ModelProto with tf2onnx.

    Raises:
        ImportError: If tf2onnx is not installed (`pip install kfcn[onnx]`).
    """
    try:
        import tf2onnx
    except ImportError as err:
        raise ImportError(
            "ONNX export needs tf2onnx and onnx: pip install 'kfcn[onnx]' "
            "(or pip install tf2onnx onnxruntime)"
        ) from err
    function = onnx_function(model, input_size)
    concrete = function.get_concrete_function()
    model_proto, _ = tf2onnx.convert.from_function(
        function, input_signature=function.input_signature, opset=int(opset)
    )
    # The concrete function's flat outputs follow its dict's sorted keys.
    for name, tensor in zip(sorted(concrete.structured_outputs), concrete.outputs):
        _rename_output(model_proto, tensor.name, name)
    return model_proto


def onnx_logits(path: str | os.PathLike, images) -> np.ndarray | dict:
    """Runs float32 inputs through an exported file with onnxruntime.

    Args:
        path: The .onnx file.
        images: [b, H, W, C] images, or a dict of them by input name.

    Returns:
        The logits, or a dict `{output name: logits}` for a multi-task file.
    """
    import onnxruntime

    session = onnxruntime.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    feeds = images if isinstance(images, dict) else {INPUT_NAME: images}
    feeds = {name: np.asarray(value, np.float32) for name, value in feeds.items()}
    names = [output.name for output in session.get_outputs()]
    results = session.run(names, feeds)
    if names == [OUTPUT_NAME]:
        return results[0]
    return dict(zip(names, results))


def random_inputs(model, height: int, width: int, batch: int = 1, seed: int = 0):
    """Random inputs for a kfcn model: 0..255 colour, depth 500..8000 (mm) for RGB-D."""
    rng = np.random.default_rng(seed)
    channels = _input_channels(model)
    inputs = {}
    for name, count in channels.items():
        x = rng.uniform(0, 255, (batch, height, width, count)).astype(np.float32)
        if count == 4:
            x[..., 3] = rng.uniform(500, 8000, (batch, height, width))
        inputs[name] = x
    return inputs if isinstance(model.input, dict) else inputs[INPUT_NAME]


def _as_dict(logits) -> dict:
    return logits if isinstance(logits, dict) else {OUTPUT_NAME: logits}


def check_against_keras(
    model, path: str | os.PathLike, input_size: tuple[int, int] | None, seed: int = 0
) -> float:
    """Largest |onnxruntime - Keras| logit difference on random images.

    Two sizes are tried when the file takes any size (one not a multiple of 32),
    the fixed size otherwise.
    """
    sizes = [input_size] if input_size else [(45, 77), (64, 96)]
    error = 0.0
    for height, width in sizes:
        batch = 1 if input_size else 2
        images = random_inputs(model, height, width, batch, seed)
        reference = model(images, training=False)
        if isinstance(reference, dict):
            reference = {model_io.output_name(OUTPUT_NAME, k): v for k, v in reference.items()}
        reference = {k: np.asarray(v, np.float32) for k, v in _as_dict(reference).items()}
        ours = _as_dict(onnx_logits(path, images))
        for name, expected in reference.items():
            if name not in ours or ours[name].shape != expected.shape:
                shape = ours[name].shape if name in ours else None
                raise RuntimeError(
                    f"The ONNX file returns {name} of shape {shape} for inputs of size "
                    f"{height}x{width}; Keras returns {expected.shape}"
                )
            error = max(error, float(np.max(np.abs(ours[name] - expected))))
    return error


def export_onnx(
    model,
    output_path: str | os.PathLike,
    *,
    input_size: tuple[int, int] | None = None,
    opset: int = DEFAULT_OPSET,
    verify: bool = True,
    tolerance: float = 1e-3,
    overwrite: bool = False,
    class_info=None,
) -> ONNXExport:
    """Exports a kfcn model to an ONNX file.

    Args:
        model: A kfcn segmentation keras.Model (multi-task, RGB-D and RGB-HHA
            models too: see the module docstring).
        output_path: The .onnx file to write; must not exist unless `overwrite`.
        input_size: Fixed (height, width) with batch 1, or None for any size.
        opset: ONNX opset to target.
        verify: Run the file with onnxruntime on random images and compare its
            logits with the Keras model's before writing it (needs onnxruntime).
        tolerance: Largest absolute logit difference `verify` accepts, relative to
            the largest logit magnitude (or absolute when that is below 1).
        overwrite: Replace an existing `output_path`.
        class_info: A `kfcn.metadata.ClassInfo`, stored as the model's metadata
            property "kfcn_classes" (its JSON document; `read_onnx_class_info`).

    Returns:
        An `ONNXExport` with the path, size and the check's error.

    Raises:
        ValueError: For a bad model or size, or if `verify` finds a disagreement.
        FileExistsError: If `output_path` exists and `overwrite` is False.
        ImportError: If tf2onnx (or, with `verify`, onnxruntime) is missing.
    """
    from kfcn.dilated_fcn import inference_model  # imports Keras: not at module import

    model = inference_model(model)  # drops auxiliary heads (training only)
    model_io.describe(model)
    size = None if input_size is None else check_input_size(input_size)
    output_path = os.path.abspath(os.fspath(output_path))
    if os.path.lexists(output_path) and not overwrite:
        raise FileExistsError(
            f"Output {output_path!r} already exists; pass overwrite=True (--overwrite) to "
            "replace it"
        )
    if verify:
        try:
            import onnxruntime  # noqa: F401
        except ImportError as err:
            raise ImportError(
                "Checking the ONNX file needs onnxruntime: pip install onnxruntime "
                "(or export with verify=False / --noverify)"
            ) from err
    model_proto = convert(model, size, opset)
    if class_info is not None:
        entry = model_proto.metadata_props.add()
        entry.key, entry.value = METADATA_KEY, json.dumps(class_info.to_dict())
    error = None
    with atomic_output(output_path, overwrite=overwrite, suffix=".onnx") as tmp:
        with open(tmp, "wb") as f:
            f.write(model_proto.SerializeToString())
        if verify:
            error = check_against_keras(model, tmp, size)
            scale = max(1.0, _logit_scale(model, size))
            if error > tolerance * scale:
                raise ValueError(
                    f"The ONNX file's logits differ from the Keras model's by up to {error:.3g} "
                    f"(tolerance {tolerance * scale:.3g}); not writing {output_path!r}"
                )
    size_bytes = os.path.getsize(output_path)
    logger.info("Wrote %s (%d bytes, opset %d)", output_path, size_bytes, opset)
    return ONNXExport(output_path, size_bytes, int(opset), size, error)


def _logit_scale(model, input_size: tuple[int, int] | None) -> float:
    height, width = input_size or (45, 77)
    logits = model(random_inputs(model, height, width, seed=1), training=False)
    return max(float(np.max(np.abs(np.asarray(v)))) for v in _as_dict(logits).values())


def read_onnx_class_info(path: str | os.PathLike):
    """The `ClassInfo` (or `TaskClassInfo`) an exported .onnx file carries, or None."""
    import onnx

    from kfcn.metadata import class_info_from_dict

    model_proto = onnx.load(os.fspath(path), load_external_data=False)
    for entry in model_proto.metadata_props:
        if entry.key == METADATA_KEY:
            return class_info_from_dict(json.loads(entry.value))
    return None
