"""Export a kfcn model (.keras) for deployment.

    kfcn export saved_model --model fcn8s.keras --output fcn8s_savedmodel
    kfcn export serving --model fcn8s.keras --base_path /srv/models --model_name fcn
    kfcn export tflite --model fcn8s.keras --output fcn8s.tflite --input_size 512x512 \\
        --quantization float16
    kfcn export onnx --model fcn8s.keras --output fcn8s.onnx

saved_model: signatures `serving_default` (uint8 images) and `serving_bytes`
(JPEG/PNG bytes), returning class_ids and probabilities. serving: one version of
a TensorFlow Serving model (SavedModel + warmup requests), models.config and
batching parameters. tflite: fixed input size, float32/float16/int8, checked
against the GPU delegate's rules. onnx: any input size, checked against the Keras
model with onnxruntime (needs `pip install kfcn[onnx]`). Class names and colours
the model carries go into every export. An existing output is never replaced
without --overwrite.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from kfcn.cli.args import (
    add_bool,
    add_input_scale,
    apply_input_scale,
    model_path,
    parse_size,
    size_type,
)
from kfcn.cli.errors import CommandError, UsageError

HELP = "Export to SavedModel, TF Serving, TFLite or ONNX."
FORMATS = ("saved_model", "serving", "tflite", "onnx")
QUANTIZATIONS = ("none", "float16", "int8")
GPU_CHECKS = ("error", "warn", "off")
DEFAULT_MAX_PIXELS = 4096 * 4096
DEFAULT_WARMUP_SIZES = "360x480,512x512"
DESCRIPTIONS = {
    "saved_model": """\
Signatures `serving_default` (uint8 `images` [batch, H, W, 3]) and `serving_bytes`
(string `image_bytes` [batch], JPEG/PNG), both returning `class_ids` and
`probabilities`. Example:
    kfcn export saved_model --model fcn8s.keras --output fcn8s_savedmodel""",
    "serving": """\
Writes BASE_PATH/MODEL_NAME/<version>/ (SavedModel + warmup requests) atomically,
plus BASE_PATH/models.config and BASE_PATH/batching_parameters.txt. Example:
    kfcn export serving --model fcn8s.keras --base_path /srv/models --model_name fcn""",
    "tflite": """\
Input float32 [1, H, W, 3] 0..255 RGB, output float32 logits [1, H, W, C]; checked
against the GPU delegate's op rules (--gpu_check). Examples:
    kfcn export tflite --model fcn8s.keras --output fcn8s.tflite --input_size 512x512 \\
        --quantization float16
    kfcn export tflite --model fcn8s.keras --output fcn8s_int8.tflite \\
        --quantization int8 --representative_data images/""",
    "onnx": """\
Input `images` float32 [batch, H, W, 3] 0..255 RGB, output `logits` float32
[batch, H, W, C]; checked against the Keras model with onnxruntime. Needs
`pip install kfcn[onnx]` (tf2onnx, onnxruntime). Example:
    kfcn export onnx --model fcn8s.keras --output fcn8s.onnx""",
}


def _common(parser: argparse.ArgumentParser, output_help: str | None) -> None:
    parser.add_argument(
        "--model",
        required=True,
        type=model_path("model"),
        help="kfcn model (.keras) to export, or a preset name (e.g. camvid_fcn8s_mobilenetv2).",
    )
    add_input_scale(parser)
    if output_help:
        parser.add_argument("--output", required=True, help=output_help)
    add_bool(parser, "overwrite", False, "Replace an existing output")


def _probabilities(parser: argparse.ArgumentParser) -> None:
    add_bool(parser, "probabilities", True, "Also return per-class probabilities")
    parser.add_argument(
        "--max_pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help="Largest height*width a request may send per image (default: %(default)s).",
    )


def _add_format(formats: Any, parent: argparse.ArgumentParser, name: str, text: str):
    return formats.add_parser(
        name,
        help=text,
        description=f"{text}\n\n{DESCRIPTIONS[name]}",
        prog=f"{parent.prog} {name}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `kfcn export FORMAT` (those of the former export/*.py scripts)."""
    formats = parser.add_subparsers(dest="format", metavar="FORMAT", required=True)

    saved = _add_format(
        formats, parser, "saved_model", "SavedModel with image and bytes signatures."
    )
    _common(saved, "SavedModel directory to create.")
    _probabilities(saved)

    serving = _add_format(formats, parser, "serving", "A version of a TensorFlow Serving model.")
    _common(serving, None)
    serving.add_argument("--base_path", required=True, help="Model server base directory.")
    serving.add_argument("--model_name", required=True, help="Model name on the server.")
    serving.add_argument(
        "--version", type=int, help="Version number (default: largest existing + 1)."
    )
    _probabilities(serving)
    serving.add_argument(
        "--warmup_sizes",
        default=DEFAULT_WARMUP_SIZES,
        help="Comma-separated HxW sizes of the warmup requests, '' for none "
        "(default: %(default)s).",
    )
    serving.add_argument(
        "--config_base_path",
        help="The model directory as the server sees it, for models.config (e.g. /models/fcn "
        "in the tensorflow/serving container; default: the local path).",
    )

    tflite = _add_format(formats, parser, "tflite", "TFLite file at a fixed input size.")
    _common(tflite, ".tflite file to create.")
    tflite.add_argument(
        "--input_size",
        type=size_type("input_size"),
        default=(512, 512),
        help="Fixed input size HxW or N (default: 512x512).",
    )
    tflite.add_argument(
        "--quantization",
        choices=QUANTIZATIONS,
        default="none",
        help="Weight/activation precision (default: %(default)s).",
    )
    tflite.add_argument(
        "--representative_data", help="Directory of JPEG/PNG images for int8 calibration."
    )
    tflite.add_argument(
        "--num_calibration_images",
        type=int,
        default=100,
        help="Images used for int8 calibration (default: %(default)s).",
    )
    add_bool(
        tflite,
        "with_argmax",
        False,
        "Add an int32 class_ids output (ARG_MAX): CPU only, not GPU delegate",
    )
    tflite.add_argument(
        "--gpu_check",
        choices=GPU_CHECKS,
        default="error",
        help="What an op the GPU delegate cannot run does to the export (default: %(default)s).",
    )

    onnx = _add_format(formats, parser, "onnx", "ONNX file (tf2onnx), any input size.")
    _common(onnx, ".onnx file to create.")
    onnx.add_argument(
        "--input_size",
        type=size_type("input_size"),
        help="Fix the input to HxW (batch 1); default: any batch, height and width.",
    )
    onnx.add_argument("--opset", type=int, default=17, help="ONNX opset (default: %(default)s).")
    add_bool(
        onnx,
        "verify",
        True,
        "Compare the file's logits with the Keras model's (onnxruntime) before writing it",
    )


def parse_warmup_sizes(text: str) -> list[tuple[int, int]]:
    """'360x480,512x512' -> [(360, 480), (512, 512)]; '' -> []."""
    return [parse_size(part, "warmup_sizes") for part in text.split(",") if part.strip()]


def check_model_path(path: str, flag: str = "model") -> None:
    """Raises UsageError naming `--flag` if `path` does not exist (before any slow work)."""
    if not os.path.exists(path):
        raise UsageError(f"--{flag}: {path!r} does not exist; give a .keras file saved by kfcn.")


def load_model_flag(path: str, flag: str = "model", require_kfcn: bool = True) -> Any:
    """Loads `--model` with `kfcn.load_model` and checks it is a segmentation model.

    Raises:
        UsageError: `path` does not exist.
        CommandError: it is not a (kfcn) segmentation model.
    """
    check_model_path(path, flag)
    from kfcn.export.artifacts import load_segmentation_model

    try:
        return load_segmentation_model(path, require_kfcn=require_kfcn)
    except ValueError as error:
        raise CommandError(f"--{flag}: {error}") from error


def _refuse_existing(path: str, overwrite: bool, flag: str = "output") -> None:
    # Checked before the slow model load; the writer checks again before renaming.
    if os.path.lexists(path) and not overwrite:
        raise UsageError(f"--{flag}: {path!r} already exists; pass --overwrite to replace it.")


def _check_args(args: argparse.Namespace) -> None:
    if getattr(args, "max_pixels", 1) < 1:
        raise UsageError(f"--max_pixels must be >= 1. Received: --max_pixels={args.max_pixels}")
    if args.format == "serving":
        args.warmup_sizes = parse_warmup_sizes(args.warmup_sizes)
        if args.version is not None and args.version < 1:
            raise UsageError(f"--version must be >= 1. Received: --version={args.version}")
    if args.format == "tflite":
        if args.quantization == "int8" and not args.representative_data:
            raise UsageError(
                "--quantization int8 needs --representative_data: a directory of JPEG/PNG "
                "images to calibrate activation ranges."
            )
        if args.num_calibration_images < 1:
            raise UsageError(
                "--num_calibration_images must be >= 1. "
                f"Received: --num_calibration_images={args.num_calibration_images}"
            )
    if args.format != "serving":
        _refuse_existing(args.output, args.overwrite)


def run(args: argparse.Namespace) -> int:
    """Exports `--model` in `args.format`; prints where it went."""
    _check_args(args)
    apply_input_scale(args)
    model = load_model_flag(args.model)
    from kfcn.metadata import read_class_info

    class_info = read_class_info(args.model)
    exporter = {
        "saved_model": _saved_model,
        "serving": _serving,
        "tflite": _tflite,
        "onnx": _onnx,
    }[args.format]
    exporter(model, args, class_info)
    if class_info is not None:
        print(f"Class names and colours: {', '.join(class_info.names)}")
    return 0


def _saved_model(model: Any, args: argparse.Namespace, class_info: Any) -> None:
    from kfcn.export.saved_model import export_saved_model

    path = export_saved_model(
        model,
        args.output,
        include_probabilities=args.probabilities,
        max_pixels=args.max_pixels,
        overwrite=args.overwrite,
        class_info=class_info,
    )
    print(f"SavedModel written to {path}")


def _serving(model: Any, args: argparse.Namespace, class_info: Any) -> None:
    from kfcn.export.serving import export_for_serving

    result = export_for_serving(
        model,
        args.base_path,
        args.model_name,
        version=args.version,
        overwrite=args.overwrite,
        include_probabilities=args.probabilities,
        max_pixels=args.max_pixels,
        warmup_sizes=args.warmup_sizes,
        config_model_base_path=args.config_base_path,
        class_info=class_info,
    )
    print(f"Version {result.version} written to {result.version_dir}")
    print(f"Model server config: {result.config_file}")
    print(f"Batching parameters: {result.batching_file}")


def _tflite(model: Any, args: argparse.Namespace, class_info: Any) -> None:
    from kfcn.export.tflite import export_tflite

    result = export_tflite(
        model,
        args.output,
        args.input_size,
        quantization=args.quantization,
        representative_data=args.representative_data,
        num_calibration_images=args.num_calibration_images,
        with_argmax=args.with_argmax,
        gpu_check=args.gpu_check,
        overwrite=args.overwrite,
        class_info=class_info,
    )
    print(
        f"Wrote {result.path} ({result.size_bytes / 1e6:.2f} MB, {result.quantization}, "
        f"input {result.input_size[0]}x{result.input_size[1]})"
    )
    print(result.static_report.format())
    print(result.gpu_report.format())


def _onnx(model: Any, args: argparse.Namespace, class_info: Any) -> None:
    from kfcn.export.onnx import export_onnx

    try:
        result = export_onnx(
            model,
            args.output,
            input_size=args.input_size,
            opset=args.opset,
            verify=args.verify,
            overwrite=args.overwrite,
            class_info=class_info,
        )
    except ImportError as error:
        raise CommandError(str(error)) from error
    size = "any size" if result.input_size is None else "x".join(map(str, result.input_size))
    check = (
        "not checked"
        if result.max_abs_error is None
        else f"max |onnxruntime - Keras| logit difference {result.max_abs_error:.2g}"
    )
    print(f"Wrote {result.path} ({result.size_bytes / 1e6:.2f} MB, opset {result.opset}, {size})")
    print(f"Check: {check}")
