"""Exports a kfcn .keras model to TFLite at a fixed input size.

    python export/tflite.py --model fcn8s.keras --output fcn8s.tflite \
        --input_size 512x512 --quantization float16
    python export/tflite.py --model fcn8s.keras --output fcn8s_int8.tflite \
        --input_size 512x512 --quantization int8 --representative_data images/

Input float32 [1, H, W, 3] 0..255 RGB, output float32 logits [1, H, W, C]; the
file is checked against the GPU delegate's op rules (--gpu_check). See
kfcn/export/tflite.py.
"""

import os
import sys

# This folder is sys.path[0] when run as a script; drop it so the sibling scripts
# (saved_model.py, serving.py, tflite.py) never shadow modules of the same name.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

from absl import app, flags  # noqa: E402

MODEL = flags.DEFINE_string("model", None, "kfcn model (.keras) to export.", required=True)
OUTPUT = flags.DEFINE_string("output", None, ".tflite file to create.", required=True)
INPUT_SIZE = flags.DEFINE_string("input_size", "512x512", "Fixed input size HxW.")
QUANTIZATION = flags.DEFINE_enum(
    "quantization", "none", ["none", "float16", "int8"], "Weight/activation precision."
)
REPRESENTATIVE_DATA = flags.DEFINE_string(
    "representative_data", None, "Directory of JPEG/PNG images for int8 calibration."
)
NUM_CALIBRATION = flags.DEFINE_integer("num_calibration_images", 100, "Images for int8.")
WITH_ARGMAX = flags.DEFINE_bool(
    "with_argmax", False, "Add an int32 class_ids output (ARG_MAX): CPU only, not GPU delegate."
)
GPU_CHECK = flags.DEFINE_enum(
    "gpu_check",
    "error",
    ["error", "warn", "off"],
    "What an op the GPU delegate cannot run does to the export.",
)
OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing --output.")


def main(argv):
    del argv
    from kfcn.export.artifacts import load_segmentation_model, parse_input_size
    from kfcn.export.tflite import export_tflite

    if os.path.lexists(OUTPUT.value) and not OVERWRITE.value:
        # Fail before the slow model load.
        sys.exit(f"error: Output {OUTPUT.value!r} already exists; pass --overwrite to replace it")
    try:
        size = parse_input_size(INPUT_SIZE.value)
        model = load_segmentation_model(MODEL.value)
        result = export_tflite(
            model,
            OUTPUT.value,
            size,
            quantization=QUANTIZATION.value,
            representative_data=REPRESENTATIVE_DATA.value,
            num_calibration_images=NUM_CALIBRATION.value,
            with_argmax=WITH_ARGMAX.value,
            gpu_check=GPU_CHECK.value,
            overwrite=OVERWRITE.value,
        )
    except (ValueError, FileExistsError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")
    print(
        f"Wrote {result.path} ({result.size_bytes / 1e6:.2f} MB, {result.quantization}, "
        f"input {result.input_size[0]}x{result.input_size[1]})"
    )
    print(result.static_report.format())
    print(result.gpu_report.format())


if __name__ == "__main__":
    app.run(main)
