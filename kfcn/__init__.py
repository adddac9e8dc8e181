"""kfcn: Fully Convolutional Networks for semantic segmentation in Keras 3.

Long, Shelhamer and Darrell, "Fully Convolutional Networks for Semantic
Segmentation", CVPR 2015 / TPAMI 2017.

Importing `kfcn` is cheap and silent: TensorFlow and Keras are imported on first
use of a builder or submodule (PEP 562 lazy attributes). It does register a
post-import hook on `keras` (wrapt's, as OpenTelemetry's instrumentations do), so
that kfcn's layers, losses and metrics are registered with Keras whenever Keras
is imported, before or after kfcn: `import kfcn; keras.saving.load_model("m.keras")`
works in safe mode without importing Keras at `import kfcn`.
"""

import importlib
from typing import Any

import wrapt

__version__ = "0.1.0"

#: The paper's three nets (Long et al., Sec. 4.2), coarse to fine. Defined here, where
#: importing it costs nothing, so the command line can offer it without loading Keras.
PAPER_VARIANTS = ("fcn32s", "fcn16s", "fcn8s")
#: Every skip net kfcn builds: the paper's three and FCN-4s, which adds a pool2 skip
#: the same way (the paper stops at FCN-8s, Sec. 4.2: "diminishing returns" on VOC).
VARIANTS = (*PAPER_VARIANTS, "fcn4s")

_LAZY_ATTRS = {
    "build_fcn": "kfcn.fcn",
    "build_fcn32s": "kfcn.fcn",
    "build_fcn16s": "kfcn.fcn",
    "build_fcn8s": "kfcn.fcn",
    "build_fcn4s": "kfcn.fcn",
    "load_model": "kfcn.fcn",
    "convolutionalize": "kfcn.fully_convolutional",
    "dilate": "kfcn.dilation",
    "shift_and_stitch": "kfcn.stitching",
    "build_dilated_fcn": "kfcn.dilated_fcn",
    "inference_model": "kfcn.dilated_fcn",
    "from_preset": "kfcn.presets",
    "list_presets": "kfcn.presets",
    "with_input_scale": "kfcn.input_scale",
    "with_logit_adjustment": "kfcn.logit_adjustment",
}
_LAZY_MODULES = (
    "backbones",
    "batch_norm",
    "bilinear",
    "data",
    "dilated_fcn",
    "dilation",
    "evaluation",
    "export",
    "fcn",
    "fully_convolutional",
    "geometry",
    "heads",
    "input_scale",
    "layers",
    "logit_adjustment",
    "losses",
    "metrics",
    "modality",
    "models",
    "presets",
    "surgery",
    "training",
)

__all__ = ["PAPER_VARIANTS", "VARIANTS", *sorted(_LAZY_ATTRS), *_LAZY_MODULES]


#: Modules whose import registers kfcn's Keras classes (`register_keras_serializable`).
_REGISTERING_MODULES = (
    "kfcn.layers",
    "kfcn.batch_norm",
    "kfcn.bilinear",
    "kfcn.losses",
    "kfcn.metrics",
    "kfcn.modality",
)


def _register_keras_classes(_keras: Any) -> None:
    # Runs once Keras has finished importing. A module already being imported
    # (Keras imported by kfcn.layers itself) is returned half-made by
    # import_module and registers its classes when it completes.
    for module in _REGISTERING_MODULES:
        importlib.import_module(module)


wrapt.register_post_import_hook(_register_keras_classes, "keras")


def __getattr__(name: str) -> Any:
    if name in _LAZY_ATTRS:
        return getattr(importlib.import_module(_LAZY_ATTRS[name]), name)
    if name in _LAZY_MODULES:
        return importlib.import_module(f"kfcn.{name}")
    raise AttributeError(f"module 'kfcn' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
