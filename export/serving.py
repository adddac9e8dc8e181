"""Exports a kfcn .keras model as a version of a TensorFlow Serving model.

    python export/serving.py --model fcn8s.keras --base_path /srv/models --model_name fcn

A preset of `kfcn export serving` (same flags; `--help` lists them). Writes
/srv/models/fcn/<version>/ (SavedModel + warmup requests) atomically, plus
/srv/models/models.config and /srv/models/batching_parameters.txt; see
kfcn/export/serving.py and the README's deployment section.
"""

import sys

from kfcn.cli import main

if __name__ == "__main__":
    sys.exit(main(["export", "serving", *sys.argv[1:]], prog="export/serving.py"))
