"""Exports a kfcn .keras model as a SavedModel with image and bytes signatures.

    python export/saved_model.py --model fcn8s.keras --output /tmp/fcn8s_savedmodel

A preset of `kfcn export saved_model` (same flags; `--help` lists them).
Signatures: `serving_default` (uint8 `images` [batch, H, W, 3]) and
`serving_bytes` (string `image_bytes` [batch], JPEG/PNG), both returning
`class_ids` and `probabilities`; see kfcn/export/saved_model.py.
"""

import sys

from kfcn.cli import main

if __name__ == "__main__":
    sys.exit(main(["export", "saved_model", *sys.argv[1:]], prog="export/saved_model.py"))
