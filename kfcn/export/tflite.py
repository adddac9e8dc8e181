"""TFLite export at a fixed input size, for the LiteRT CPU runtime and GPU delegate.

The model is rebuilt at a static input shape [1, H, W, 3] from its config and
weights, so every shape in the graph is a constant and the converter folds the
shape arithmetic of padding and cropping away: the file holds only builtin ops (no
Flex ops, no variable ops, no SHAPE/PACK). Input: float32 0..255 RGB. Output:
float32 logits [1, H, W, num_classes] named "logits"; the per-pixel argmax is left
to the caller because ARG_MAX is not a GPU delegate op (`with_argmax=True` adds a
"class_ids" output for CPU-only use).

Quantization:
    none     float32 weights and activations.
    float16  float16 weights, dequantized on load (the GPU delegate's usual choice).
    int8     full integer quantization, calibrated on real images from a directory
             (resized to cover the input size, then center-cropped); float32 input
             and output, with QUANTIZE/DEQUANTIZE at the ends.

Other kinds of model (`kfcn.export.model_io`): a multi-task model's file has one
output per task, "logits_sem" and "logits_geo" (and "class_ids_<task>" with
argmax); an RGB-D model's input is float32 [1, H, W, 4] "images" (RGB 0..255, then
depth as the PNG holds it; its LOG op runs on the CPU runtime); an RGB-HHA model's
file takes two inputs, "rgb" and "hha". int8 calibration reads image files, so it
is refused for RGB-D and RGB-HHA models.

Every exported file is checked with `gpu_compat` (builtin static graph, and the GPU
delegate's op rules), and written under a temporary name then renamed.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import numpy as np

from kfcn.export import gpu_compat, model_io
from kfcn.export.artifacts import check_input_size
from kfcn.files import atomic_output

logger = logging.getLogger(__name__)

QUANTIZATIONS = ("none", "float16", "int8")
GPU_CHECK_MODES = ("error", "warn", "off")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


@dataclasses.dataclass(frozen=True)
class TFLiteExport:
    """Result of `export_tflite`.

    Attributes:
        path: The .tflite file.
        size_bytes: Its size.
        input_size: (height, width) of the fixed input.
        quantization: "none", "float16" or "int8".
        static_report: Builtin-ops / constant-shapes check.
        gpu_report: GPU delegate check.
    """

    path: str
    size_bytes: int
    input_size: tuple[int, int]
    quantization: str
    static_report: gpu_compat.CompatibilityReport
    gpu_report: gpu_compat.CompatibilityReport


def rebuild_static(model, input_size: tuple[int, int]):
    """Rebuilds a functional kfcn model with fixed [1, H, W, C] inputs.

    Args:
        model: A kfcn segmentation keras.Model (functional; any kind
            `kfcn.export.model_io` describes).
        input_size: (height, width).

    Returns:
        A new keras.Model with the same weights and static input shapes.

    Raises:
        ValueError: If the architecture cannot take that size.
    """
    io = model_io.describe(model)
    height, width = check_input_size(input_size)
    config = model.get_config()
    inputs = [layer for layer in config.get("layers", []) if layer["class_name"] == "InputLayer"]
    if len(inputs) != len(model.inputs) or not inputs:
        raise ValueError(
            "Only functional kfcn models can be rebuilt at a static size; this model's config "
            f"has {len(inputs)} InputLayer entries for {len(model.inputs)} inputs"
        )
    for entry in inputs:
        channels = entry["config"]["batch_shape"][-1]
        entry["config"]["batch_shape"] = (1, height, width, channels)
    try:
        static = model.__class__.from_config(config)
    except Exception as err:
        raise ValueError(
            f"The model cannot be built at `input_size`={height}x{width}: {err}"
        ) from err
    static.set_weights(model.get_weights())
    outputs = static.output if isinstance(static.output, dict) else {None: static.output}
    for task, classes in io.tasks.items():
        out_shape = tuple(outputs[task].shape)
        if out_shape != (1, height, width, classes):
            raise ValueError(
                f"The model built at `input_size`={height}x{width} outputs shape {out_shape}"
                f"{'' if task is None else f' for task {task!r}'}; expected "
                f"{(1, height, width, classes)}"
            )
    return static


def _input_specs(static_model):
    """(input names, TensorSpecs) of a static model, as the .tflite file names its inputs."""
    import tensorflow as tf

    if isinstance(static_model.input, dict):
        names = sorted(static_model.input)
        shapes = [tuple(static_model.input[name].shape) for name in names]
    else:
        names, shapes = ["images"], [tuple(static_model.inputs[0].shape)]
    return names, [tf.TensorSpec(s, tf.float32, name=n) for n, s in zip(names, shapes)]


def list_images(directory: str | os.PathLike) -> list[str]:
    """Sorted JPEG/PNG files under `directory` (recursively).

    Raises:
        ValueError: If `directory` does not exist or holds no JPEG/PNG image.
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise ValueError(f"`representative_data` is not a directory: {directory!r}")
    paths = sorted(
        os.path.join(root, name)
        for root, _, names in os.walk(directory)
        for name in names
        if name.lower().endswith(IMAGE_EXTENSIONS)
    )
    if not paths:
        raise ValueError(
            f"`representative_data` directory {directory!r} holds no JPEG or PNG images"
        )
    return paths


def load_image_resized(path: str, input_size: tuple[int, int]) -> np.ndarray:
    """Reads an image as RGB, scales it to cover `input_size`, center-crops it.

    Returns:
        uint8 [H, W, 3].
    """
    from PIL import Image

    height, width = input_size
    with Image.open(path) as image:
        image = image.convert("RGB")
        scale = max(height / image.height, width / image.width)
        resized = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
        image = image.resize(resized, Image.BILINEAR)
        left = (image.width - width) // 2
        top = (image.height - height) // 2
        image = image.crop((left, top, left + width, top + height))
        return np.asarray(image, np.uint8)


def representative_images(
    directory: str | os.PathLike, input_size: tuple[int, int], limit: int = 100
) -> list[np.ndarray]:
    """Up to `limit` real images from `directory`, as uint8 [H, W, 3] at the input size."""
    paths = list_images(directory)
    if len(paths) > limit:
        # Evenly spaced, so calibration sees the whole folder, not its first scenes.
        paths = [paths[i] for i in np.linspace(0, len(paths) - 1, limit).astype(int)]
    return [load_image_resized(p, input_size) for p in paths]


def convert(
    static_model,
    quantization: str = "none",
    calibration_images: list[np.ndarray] | None = None,
    with_argmax: bool = False,
) -> bytes:
    """Converts a static-shape kfcn model to a TFLite flatbuffer.

    Args:
        static_model: A model from `rebuild_static`.
        quantization: "none", "float16" or "int8" (int8: single RGB input only).
        calibration_images: uint8 [H, W, 3] images for "int8".
        with_argmax: Add an int32 "class_ids" output (ARG_MAX, CPU only).

    Returns:
        The .tflite bytes.
    """
    import tensorflow as tf

    if quantization not in QUANTIZATIONS:
        raise ValueError(
            f"`quantization` must be one of {QUANTIZATIONS}. "
            f"Received: quantization={quantization!r}"
        )
    input_names, specs = _input_specs(static_model)
    by_name = isinstance(static_model.input, dict)

    @tf.function(input_signature=specs)
    def serve(*images):
        logits = static_model(
            dict(zip(input_names, images)) if by_name else images[0], training=False
        )
        if not isinstance(logits, dict):
            logits = {None: logits}
        outputs = {}
        for task, task_logits in logits.items():
            task_logits = tf.cast(task_logits, tf.float32)
            outputs[model_io.output_name("logits", task)] = task_logits
            if with_argmax:
                outputs[model_io.output_name("class_ids", task)] = tf.argmax(
                    task_logits, axis=-1, output_type=tf.int32
                )
        return outputs

    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2,
    )

    # Freeze the weights into constants first: converting the function with its
    # variables leaves VAR_HANDLE/READ_VARIABLE ops in the file.
    frozen = convert_variables_to_constants_v2(serve.get_concrete_function())
    names = sorted(serve.get_concrete_function().structured_outputs)

    # Freezing flattens the outputs; name them again for the TFLite signature.
    @tf.function(input_signature=specs)
    def named(*images):
        flat = tf.nest.flatten(frozen(*images))
        return dict(zip(names, flat))

    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [named.get_concrete_function()], tf.Module()
    )
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if quantization == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif quantization == "int8":
        if not calibration_images:
            raise ValueError(
                "`quantization`='int8' needs `representative_data`: a directory of JPEG/PNG "
                "images to calibrate activation ranges"
            )
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]

        def dataset():
            for image in calibration_images:
                yield [image[None].astype(np.float32)]

        converter.representative_dataset = dataset
    return converter.convert()


def export_tflite(
    model,
    output_path: str | os.PathLike,
    input_size: tuple[int, int],
    *,
    quantization: str = "none",
    representative_data: str | os.PathLike | None = None,
    num_calibration_images: int = 100,
    with_argmax: bool = False,
    gpu_check: str = "error",
    overwrite: bool = False,
    class_info=None,
) -> TFLiteExport:
    """Exports a kfcn model to a .tflite file at a fixed input size.

    Args:
        model: A kfcn segmentation keras.Model (multi-task, RGB-D and RGB-HHA
            models too: see the module docstring).
        output_path: The .tflite file to write; must not exist unless `overwrite`.
        input_size: (height, width) of the fixed input.
        quantization: "none", "float16" or "int8".
        representative_data: Directory of JPEG/PNG images (required for "int8").
        num_calibration_images: Images used for int8 calibration.
        with_argmax: Add a "class_ids" ARG_MAX output; makes the file CPU-only (the
            GPU delegate lacks ARG_MAX), so the GPU check only warns.
        gpu_check: "error" fails the export if the GPU delegate cannot run every op,
            "warn" logs the issues, "off" skips the check.
        overwrite: Replace an existing `output_path`.
        class_info: A `kfcn.metadata.ClassInfo` to store as the file's
            "kfcn_classes" metadata (before the file is renamed into place).

    Returns:
        A `TFLiteExport` with the path, size and check reports.

    Raises:
        ValueError: For a bad size, quantization, model, or an unsupported op.
        FileExistsError: If `output_path` exists and `overwrite` is False.
    """
    from kfcn.dilated_fcn import inference_model  # imports Keras: not at module import

    model = inference_model(model)  # drops auxiliary heads (training only)
    if quantization not in QUANTIZATIONS:
        raise ValueError(
            f"`quantization` must be one of {QUANTIZATIONS}. "
            f"Received: quantization={quantization!r}"
        )
    if gpu_check not in GPU_CHECK_MODES:
        raise ValueError(
            f"`gpu_check` must be one of {GPU_CHECK_MODES}. Received: gpu_check={gpu_check!r}"
        )
    size = check_input_size(input_size)
    io = model_io.describe(model)
    if quantization == "int8" and io.modality != model_io.RGB:
        model_io.refuse(
            io,
            "TFLite int8 export",
            "calibration reads RGB image files; export float32 or float16 instead",
        )
    output_path = os.path.abspath(os.fspath(output_path))
    if os.path.lexists(output_path) and not overwrite:
        raise FileExistsError(
            f"Output {output_path!r} already exists; pass overwrite=True (--overwrite) to "
            "replace it"
        )
    calibration = None
    if quantization == "int8":
        if representative_data is None:
            raise ValueError(
                "`quantization`='int8' needs `representative_data`: a directory of JPEG/PNG "
                "images to calibrate activation ranges"
            )
        calibration = representative_images(representative_data, size, num_calibration_images)
    elif representative_data is not None:
        logger.warning("`representative_data` is only used for int8; ignoring it")

    static = rebuild_static(model, size)
    flatbuffer = convert(static, quantization, calibration, with_argmax)

    static_report = gpu_compat.check_builtin_static(flatbuffer)
    if not static_report.ok:
        raise ValueError(
            f"The converted model is not a static builtin graph.\n{static_report.format()}"
        )
    gpu_report = gpu_compat.check_gpu_compatibility(flatbuffer)
    if not gpu_report.ok and gpu_check != "off":
        message = gpu_report.format()
        if with_argmax:
            logger.warning("with_argmax: this file is for the CPU runtime.\n%s", message)
        elif gpu_check == "error":
            raise ValueError(
                f"The converted model does not run fully on the GPU delegate.\n{message}"
            )
        else:
            logger.warning("%s", message)

    with atomic_output(output_path, overwrite=overwrite, is_dir=False) as tmp:
        with open(tmp, "wb") as f:
            f.write(flatbuffer)
        if class_info is not None:
            from kfcn.metadata import write_class_info

            write_class_info(class_info, tmp)
    size_bytes = os.path.getsize(output_path)
    logger.info("Wrote %s (%d bytes, %s)", output_path, size_bytes, quantization)
    return TFLiteExport(
        path=output_path,
        size_bytes=size_bytes,
        input_size=size,
        quantization=quantization,
        static_report=static_report,
        gpu_report=gpu_report,
    )


def make_interpreter(path: str | os.PathLike, num_threads: int | None = None):
    """A LiteRT interpreter (ai_edge_litert), tensors allocated."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=os.fspath(path), num_threads=num_threads)
    interpreter.allocate_tensors()
    return interpreter


def tflite_logits(interpreter, image: np.ndarray) -> np.ndarray:
    """Runs one uint8/float [H, W, 3] image through a kfcn .tflite; returns logits [H, W, C]."""
    runner = interpreter.get_signature_runner()
    outputs = runner(images=np.asarray(image, np.float32)[None])
    return outputs["logits"][0]


def pixel_agreement(model, tflite_path: str | os.PathLike, images) -> float:
    """Fraction of pixels whose argmax class agrees between Keras and LiteRT.

    Args:
        model: The Keras model the file was exported from.
        tflite_path: The .tflite file.
        images: uint8 [H, W, 3] images at the file's input size.

    Returns:
        Agreement in [0, 1] over all pixels of all images.
    """
    interpreter = make_interpreter(tflite_path)
    agree = total = 0
    for image in images:
        reference = np.asarray(model(np.asarray(image, np.float32)[None], training=False))[0]
        ours = tflite_logits(interpreter, image)
        agree += int(np.sum(reference.argmax(-1) == ours.argmax(-1)))
        total += reference.shape[0] * reference.shape[1]
    return agree / total
