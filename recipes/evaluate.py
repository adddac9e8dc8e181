"""Evaluates a saved kfcn model on a segmentation dataset (FCN metrics, section 5).

A preset of `kfcn evaluate` (same flags; `--help` lists them): prints pixel
accuracy, mean accuracy, mean IU and frequency-weighted IU and a per-class IU
table; --output_json writes them with the confusion matrix, --output_dir adds
pictures.

Examples:
    python recipes/evaluate.py --model fcn8s.keras --dataset camvid \\
        --data_dir /work/shared/data/camvid --split val --output_json camvid_val.json
    python recipes/evaluate.py --model fcn8s.keras --dataset camvid --data_dir D \\
        --mode slide --crop_size 256 --stride 170 --output_json slide.json
    python recipes/evaluate.py --model fcn8s.keras --dataset camvid --data_dir D \\
        --mode msflip --scales 0.75,1.0,1.25 --output_json msflip.json
    python recipes/evaluate.py --model m.keras --dataset folder --data_dir D \\
        --list_file D/val.txt --num_classes 2 --ignore_label 255 --output_json f.json
"""

from __future__ import annotations

import sys

from kfcn.cli import main as kfcn_main

# Flags whose value this recipe once took as "H,W"; `kfcn` writes sizes "HxW".
_SIZE_FLAGS = ("--crop_size", "--stride")


def _sizes_as_hxw(argv: list[str]) -> list[str]:
    out = list(argv)
    for i, arg in enumerate(out):
        name, eq, value = arg.partition("=")
        if name in _SIZE_FLAGS and eq:
            out[i] = f"{name}={value.replace(',', 'x')}"
        elif i > 0 and out[i - 1] in _SIZE_FLAGS:
            out[i] = arg.replace(",", "x")
    return out


def main(argv: list[str] | None = None) -> int:
    """Runs `kfcn evaluate` with this script's arguments; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    return kfcn_main(["evaluate", *_sizes_as_hxw(argv)], prog="recipes/evaluate.py")


if __name__ == "__main__":
    sys.exit(main())
