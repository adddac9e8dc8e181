"""Exports a kfcn .keras model to TFLite at a fixed input size.

    python export/tflite.py --model fcn8s.keras --output fcn8s.tflite \\
        --input_size 512x512 --quantization float16
    python export/tflite.py --model fcn8s.keras --output fcn8s_int8.tflite \\
        --input_size 512x512 --quantization int8 --representative_data images/

A preset of `kfcn export tflite` (same flags; `--help` lists them). Input
float32 [1, H, W, 3] 0..255 RGB, output float32 logits [1, H, W, C]; the file is
checked against the GPU delegate's op rules (--gpu_check). See
kfcn/export/tflite.py.
"""

import sys

from kfcn.cli import main

if __name__ == "__main__":
    sys.exit(main(["export", "tflite", *sys.argv[1:]], prog="export/tflite.py"))
