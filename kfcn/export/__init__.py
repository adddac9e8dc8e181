"""Deployment exports of kfcn models: SavedModel, TF Serving, TFLite (GPU delegate).

Modules:
    artifacts: model loading and checks, input sizes, shared by the exporters.
    onnx: ONNX file (tf2onnx) with dynamic height and width, onnxruntime parity.
    saved_model: SavedModel with `serving_default` (uint8 images) and
        `serving_bytes` (encoded JPEG/PNG) signatures.
    serving: TF Serving model directory (versioned, atomic), warmup records,
        models.config and batching parameters.
    client: REST and gRPC clients for TF Serving returning numpy label maps.
    tflite: static-size .tflite export (float32, float16, int8) and LiteRT parity.
    gpu_compat: offline checks of a .tflite file against the GPU delegate's rules.

Submodules are imported on first attribute access, so `import kfcn.export` does
not import TensorFlow.
"""

import importlib
from typing import Any

_LAZY_ATTRS = {
    "export_saved_model": "kfcn.export.saved_model",
    "build_serving_module": "kfcn.export.saved_model",
    "export_for_serving": "kfcn.export.serving",
    "write_model_server_config": "kfcn.export.serving",
    "write_batching_parameters": "kfcn.export.serving",
    "RestClient": "kfcn.export.client",
    "GrpcClient": "kfcn.export.client",
    "ServingError": "kfcn.export.client",
    "export_tflite": "kfcn.export.tflite",
    "check_gpu_compatibility": "kfcn.export.gpu_compat",
    "check_builtin_static": "kfcn.export.gpu_compat",
    "load_segmentation_model": "kfcn.export.artifacts",
    "check_input_size": "kfcn.export.artifacts",
    "export_onnx": "kfcn.export.onnx",
}
_SUBMODULES = ("artifacts", "client", "gpu_compat", "onnx", "saved_model", "serving", "tflite")

__all__ = sorted(_LAZY_ATTRS) + list(_SUBMODULES)


def __getattr__(name: str) -> Any:
    if name in _LAZY_ATTRS:
        return getattr(importlib.import_module(_LAZY_ATTRS[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"kfcn.export.{name}")
    raise AttributeError(f"module 'kfcn.export' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
