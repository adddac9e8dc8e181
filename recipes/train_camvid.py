"""Trains an FCN on CamVid (11 classes, void ignored) with median-frequency balancing.

A preset of `kfcn train`: the defaults below, every flag of `kfcn train --help`.

Examples:
    # MobileNetV2 FCN-8s from scratch (val mIoU 50.05% in 16 min on 2 CPU cores):
    python recipes/train_camvid.py --data_dir /work/shared/data/camvid \\
        --model_dir /work/runs/camvid_fcn8s_mnv2 --backbone mobilenetv2 --weights none \\
        --bn_momentum 0.9 --crop_size 256x256 --scale_range 0.75,1.5 --epochs 25 \\
        --optimizer adam --learning_rate 1e-3 --weight_decay 1e-4 --seed 0
    # Two CPU replicas (MirroredStrategy), resumable: rerun the same command after a crash.
    python recipes/train_camvid.py --data_dir D --model_dir M --strategy mirrored --cpu_replicas 2
    # Staged like the reference: 32s, then 16s and 8s initialised from the previous stage.
    python recipes/train_camvid.py ... --variant fcn32s --model_dir M32
    python recipes/train_camvid.py ... --variant fcn16s --init_from M32/model.keras --model_dir M16

Writes model_dir/config.yaml, checkpoints/, logs/ (TensorBoard), model.keras (for
`kfcn evaluate`, `kfcn predict` and `kfcn export`) and result.json.
"""

import sys

import kfcn.cli

# CamVid is small (367 training images at 360x480): whole-image crops, SGD when
# fine-tuning from ImageNet (Adam from scratch), the poly schedule, and median-frequency
# class balancing as published CamVid recipes do. --data_dir defaults to
# $KFCN_DATA_DIR/camvid.
DEFAULTS = dict(
    dataset="camvid",
    val_split="val",
    backbone="vgg16",
    variant="fcn8s",
    weights="imagenet",
    batch_size=8,
    crop_size="360x480",
    scale_range="0.75,1.5",
    epochs=100,
    optimizer="sgd",
    learning_rate=1e-3,
    momentum=0.9,
    weight_decay=5e-4,
    schedule="poly",
    class_weighting="median_frequency",
)

if __name__ == "__main__":
    sys.exit(
        kfcn.cli.main(
            ["train", *sys.argv[1:]],
            prog="train_camvid.py",
            defaults=DEFAULTS,
            choices={"dataset": ("camvid",), "val_dataset": ("camvid",)},
        )
    )
