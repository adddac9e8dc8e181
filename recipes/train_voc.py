"""Trains an FCN on PASCAL VOC 2012 (21 classes) or SBD train_aug (Long et al. 2015, Sec. 4.3).

A preset of `kfcn train`: the defaults below, every flag of `kfcn train --help`.

Examples:
    # FCN-32s from ImageNet VGG16 on SBD train_aug (VOC 2012 val for validation):
    python recipes/train_voc.py --dataset sbd --model_dir /work/runs/voc32 --variant fcn32s
    # then FCN-16s and FCN-8s, each initialised from the previous stage:
    python recipes/train_voc.py --dataset sbd --model_dir /work/runs/voc16 --variant fcn16s \\
        --init_from /work/runs/voc32/model.keras --learning_rate 1e-5
    python recipes/train_voc.py --dataset sbd --model_dir /work/runs/voc8 --variant fcn8s \\
        --init_from /work/runs/voc16/model.keras --learning_rate 1e-6

The archives go to tfds' manual directory (--manual_dir, default
<--data_dir>/downloads/manual); validation uses VOC (--val_split val, or seg11valid for
the paper's split). Writes model_dir/config.yaml, checkpoints/, logs/, model.keras and
result.json.
"""

import sys

import kfcn.cli

# After the paper's Sec. 4.3: SGD, momentum 0.9, weight decay 5e-4 (L2 on kernels), fixed
# rate 1e-4 for FCN-VGG16 with the loss averaged over pixels, minibatch 20. Images are
# cropped to 512x512 (padded with the mean) so that a batch can hold 20 of them.
DEFAULTS = dict(
    dataset="sbd",
    val_dataset="voc",
    val_split="val",
    backbone="vgg16",
    variant="fcn32s",
    weights="imagenet",
    batch_size=20,
    crop_size="512x512",
    scale_range="0.5,2.0",
    epochs=50,
    optimizer="sgd",
    learning_rate=1e-4,
    momentum=0.9,
    weight_decay=5e-4,
    schedule="fixed",
    class_weighting="none",
)

if __name__ == "__main__":
    sys.exit(
        kfcn.cli.main(
            ["train", *sys.argv[1:]],
            prog="train_voc.py",
            defaults=DEFAULTS,
            choices={"dataset": ("voc", "sbd"), "val_dataset": ("voc",)},
        )
    )
