"""Exports a kfcn .keras model as a SavedModel with image and bytes signatures.

    python export/saved_model.py --model fcn8s.keras --output /tmp/fcn8s_savedmodel

Signatures: `serving_default` (uint8 `images` [batch, H, W, 3]) and
`serving_bytes` (string `image_bytes` [batch], JPEG/PNG), both returning
`class_ids` and `probabilities`; see kfcn/export/saved_model.py.
"""

import os
import sys

# This folder is sys.path[0] when run as a script; drop it so the sibling scripts
# (saved_model.py, serving.py, tflite.py) never shadow modules of the same name.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

from absl import app, flags  # noqa: E402

MODEL = flags.DEFINE_string("model", None, "kfcn model (.keras) to export.", required=True)
OUTPUT = flags.DEFINE_string("output", None, "SavedModel directory to create.", required=True)
PROBABILITIES = flags.DEFINE_bool(
    "probabilities", True, "Also return probabilities (--noprobabilities: class_ids only)."
)
MAX_PIXELS = flags.DEFINE_integer("max_pixels", 4096 * 4096, "Largest height*width per image.")
OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing --output.")


def main(argv):
    del argv
    from kfcn.export.artifacts import load_segmentation_model
    from kfcn.export.saved_model import export_saved_model

    if os.path.lexists(OUTPUT.value) and not OVERWRITE.value:
        # Fail before the slow model load.
        sys.exit(f"error: Output {OUTPUT.value!r} already exists; pass --overwrite to replace it")
    try:
        model = load_segmentation_model(MODEL.value)
        path = export_saved_model(
            model,
            OUTPUT.value,
            include_probabilities=PROBABILITIES.value,
            max_pixels=MAX_PIXELS.value,
            overwrite=OVERWRITE.value,
        )
    except (ValueError, FileExistsError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")
    print(f"SavedModel written to {path}")


if __name__ == "__main__":
    app.run(main)
