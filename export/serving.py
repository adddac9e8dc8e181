"""Exports a kfcn .keras model as a version of a TensorFlow Serving model.

    python export/serving.py --model fcn8s.keras --base_path /srv/models --model_name fcn

writes /srv/models/fcn/<version>/ (SavedModel + warmup requests) atomically, plus
/srv/models/models.config and /srv/models/batching_parameters.txt; see
kfcn/export/serving.py and the README's deployment section.
"""

import os
import sys

# This folder is sys.path[0] when run as a script; drop it so the sibling scripts
# (saved_model.py, serving.py, tflite.py) never shadow modules of the same name.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

from absl import app, flags  # noqa: E402

MODEL = flags.DEFINE_string("model", None, "kfcn model (.keras) to export.", required=True)
BASE_PATH = flags.DEFINE_string("base_path", None, "Model server base directory.", required=True)
MODEL_NAME = flags.DEFINE_string("model_name", None, "Model name on the server.", required=True)
VERSION = flags.DEFINE_integer("version", None, "Version number; default: largest existing + 1.")
OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing --version.")
PROBABILITIES = flags.DEFINE_bool("probabilities", True, "Also return probabilities.")
MAX_PIXELS = flags.DEFINE_integer("max_pixels", 4096 * 4096, "Largest height*width per image.")
WARMUP_SIZES = flags.DEFINE_list(
    "warmup_sizes", ["360x480", "512x512"], "HxW sizes of the warmup requests ('' for none)."
)
CONFIG_BASE_PATH = flags.DEFINE_string(
    "config_base_path",
    None,
    "The model directory as the server sees it, for models.config (e.g. /models/fcn in the "
    "tensorflow/serving container); default: the local path.",
)


def main(argv):
    del argv
    from kfcn.export.artifacts import load_segmentation_model, parse_input_size
    from kfcn.export.serving import export_for_serving

    try:
        sizes = [parse_input_size(s) for s in WARMUP_SIZES.value if s]
        model = load_segmentation_model(MODEL.value)
        result = export_for_serving(
            model,
            BASE_PATH.value,
            MODEL_NAME.value,
            version=VERSION.value,
            overwrite=OVERWRITE.value,
            include_probabilities=PROBABILITIES.value,
            max_pixels=MAX_PIXELS.value,
            warmup_sizes=sizes,
            config_model_base_path=CONFIG_BASE_PATH.value,
        )
    except (ValueError, FileExistsError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")
    print(f"Version {result.version} written to {result.version_dir}")
    print(f"Model server config: {result.config_file}")
    print(f"Batching parameters: {result.batching_file}")


if __name__ == "__main__":
    app.run(main)
