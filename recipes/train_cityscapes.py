"""Trains an FCN on Cityscapes fine (19 train classes, the rest ignored).

A preset of `kfcn train`: the defaults below, every flag of `kfcn train --help`.

Put leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip (from
https://www.cityscapes-dataset.com/downloads/, after registering) in tfds' manual
directory, <--data_dir>/downloads/manual, or pass their folder as --manual_dir; the
first run prepares tfds records in --data_dir (about 11 GB) and later runs reuse them.

Examples:
    python recipes/train_cityscapes.py --data_dir /data/tfds --manual_dir /data/cityscapes_zips \\
        --model_dir /work/runs/cityscapes_fcn8s
    # Two GPUs, or two CPU replicas without GPUs:
    python recipes/train_cityscapes.py --data_dir /data/tfds --model_dir M --strategy mirrored

Validation runs on the 500 val images at their native 1024x2048 (use --max_eval_images to
validate on fewer during training, `kfcn evaluate` for the final scores).
"""

import sys

import kfcn.cli

# 2975 training images of 1024x2048: 512x1024 random crops at scales 0.5-2.0, SGD with the
# poly schedule, as the FCN-based Cityscapes baselines of later work (DeepLab, PSPNet,
# mmsegmentation's fcn_r50-d8_512x1024) train; FCN-VGG16 from ImageNet.
DEFAULTS = dict(
    dataset="cityscapes",
    val_split="val",
    backbone="vgg16",
    variant="fcn8s",
    weights="imagenet",
    batch_size=8,
    crop_size="512x1024",
    scale_range="0.5,2.0",
    epochs=100,
    optimizer="sgd",
    learning_rate=1e-3,
    momentum=0.9,
    weight_decay=5e-4,
    schedule="poly",
    class_weighting="none",
    max_eval_images=100,
)

if __name__ == "__main__":
    sys.exit(
        kfcn.cli.main(
            ["train", *sys.argv[1:]],
            prog="train_cityscapes.py",
            defaults=DEFAULTS,
            choices={"dataset": ("cityscapes",), "val_dataset": ("cityscapes",)},
        )
    )
