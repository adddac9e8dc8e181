"""Every settings file under configs/ goes through `kfcn train --config`'s real parser.

Each file must parse, name only known settings, and give a `TrainConfig` that
validates, so no config rots when a flag or a dataset changes. A few are built
(tiny inputs, no weights) where that is cheap, and the model-zoo facts the file
names encode (crop, iterations, backbone, slide inference) are checked against
the file name.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re

import pytest

from kfcn.cli import build_parser, train
from kfcn.training import TrainConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*", "*.yaml")))
MMSEG = [p for p in CONFIGS if os.sep + "mmseg" + os.sep in p]
PAPER = [p for p in CONFIGS if os.sep + "paper" + os.sep in p]


def _load(path: str, tmp_path, *extra: str) -> TrainConfig:
    parser = build_parser("train")
    args = train.parse_args(parser, ["--config", path, "--model_dir", str(tmp_path), *extra])
    return train.config_from_args(args)


def test_the_model_zoo_and_the_papers_recipes_are_all_there():
    # mmseg's FCN zoo: Cityscapes 17 D8 + 12 D6 rows (with FP16), ADE20K 4, VOC 4, Context 4.
    assert len(MMSEG) == 41
    # NYUD 4 nets, SIFT Flow and Context (59) 3 each, each with a modern twin; Context 60 as the
    # reference nets (60 outputs) 3 more.
    assert len(PAPER) == 23
    names = {os.path.basename(p) for p in MMSEG}
    for name in (
        "fcn_r50-d8_4xb2-40k_cityscapes-512x1024.yaml",
        "fcn_r18b-d8_4xb2-80k_cityscapes-769x769.yaml",
        "fcn-d6_r101-d16_4xb2-80k_cityscapes-769x769.yaml",
        "fcn_r101-d8_4xb2-amp-80k_cityscapes-512x1024.yaml",
        "fcn_r50-d8_4xb4-160k_ade20k-512x512.yaml",
        "fcn_r101-d8_4xb4-20k_voc12aug-512x512.yaml",
        "fcn_r101-d8_4xb4-80k_pascal-context-59-480x480.yaml",
    ):
        assert name in names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.basename(p)[:-5])
def test_every_config_parses_and_validates(path, tmp_path):
    config = _load(path, tmp_path)
    config.validate()
    # Every key in the file is a setting, and the file's values arrive unchanged.
    import yaml

    written = yaml.safe_load(open(path, encoding="utf-8"))
    values = config.to_dict()
    for key, value in written.items():
        assert values[key] == (list(value) if isinstance(value, tuple) else value), key
    # A run's config.yaml round-trips to the same settings.
    assert TrainConfig.from_dict(values) == config


@pytest.mark.parametrize("path", MMSEG, ids=lambda p: os.path.basename(p)[:-5])
def test_mmseg_rows_match_their_names(path, tmp_path):
    name = os.path.basename(path)[:-5]
    match = re.fullmatch(
        r"(fcn|fcn-d6)_r(\d+)(b?)-d(8|16)_4xb(\d)(-amp)?-(\d+)k_([a-z0-9-]+)-(\d+)x(\d+)", name
    )
    assert match, name
    head, depth, b, stride, per_gpu, amp, kiters, data, height, width = match.groups()
    config = _load(path, tmp_path)
    assert config.variant == {"fcn": "fcn_d8", "fcn-d6": "fcn_d6"}[head]
    assert (head == "fcn-d6") == (stride == "16")
    assert config.backbone == f"resnet{depth}_v1{'b' if b else 'c'}"
    assert (config.head_channels, config.aux_channels) == (
        (128, 64) if depth == "18" else (512, 256)
    )
    assert config.aux_head and config.aux_loss_weight == 0.4 and config.sync_batchnorm
    assert config.batch_size == 4 * int(per_gpu)
    assert config.steps == int(kiters) * 1000
    assert config.crop_size == (int(height), int(width))
    assert config.mixed_precision == bool(amp)
    assert (
        config.dataset
        == {
            "cityscapes": "cityscapes",
            "ade20k": "ade20k",
            "voc12aug": "sbd",
            "pascal-context": "pascal_context",
            "pascal-context-59": "pascal_context59",
        }[data]
    )
    assert (config.schedule, config.poly_power, config.min_learning_rate) == ("poly", 0.9, 1e-4)
    assert (config.optimizer, config.momentum) == ("sgd", 0.9)
    assert config.learning_rate == (0.004 if "context" in data else 0.01)
    assert (config.scale_range, config.flip, config.photometric) == ((0.5, 2.0), True, "mmseg")
    assert config.cat_max_ratio == 0.75 and config.dropout == 0.1
    if (height, width) == ("769", "769"):
        assert (config.val_mode, config.val_crop_size, config.val_stride) == (
            "slide",
            (769, 769),
            (513, 513),
        )
    elif "context" in data:
        assert (config.val_mode, config.val_crop_size) == ("slide", (480, 480))
    else:
        assert config.val_mode == "whole"


@pytest.mark.parametrize(
    "path", [p for p in PAPER if "modern" not in p], ids=lambda p: os.path.basename(p)[:-5]
)
def test_paper_recipes_are_the_reference_solvers(path, tmp_path):
    name = os.path.basename(path)[:-5]
    config = _load(path, tmp_path)
    # fcn.berkeleyvision.org solvers: fixed lr for the summed loss, momentum 0.99, batch 1.
    assert (config.schedule, config.loss_reduction, config.batch_size) == ("fixed", "sum", 1)
    assert config.momentum == 0.99 and config.weight_decay == 5e-4
    expected_lr = {"fcn32s": 1e-10, "fcn16s": 1e-12, "fcn8s": 1e-14}[config.variant]
    if name == "nyud-fcn32s-color-hha":
        expected_lr = 1e-12
    assert config.learning_rate == expected_lr
    assert (config.scale_range, config.flip, config.photometric) == ((1.0, 1.0), False, "none")
    if name.startswith("siftflow"):
        assert config.heads == {"sem": 33, "geo": 3}
    if name.startswith("nyud"):
        modality = name.removeprefix("nyud-fcn32s-")
        assert (
            config.modality
            == {
                "color": "rgb",
                "hha": "hha",
                "color-d": "rgbd",
                "color-hha": "rgb+hha",
            }[modality]
        )


def test_flags_override_a_config_file(tmp_path):
    path = os.path.join(REPO, "configs", "mmseg", "fcn_r50-d8_4xb2-40k_cityscapes-512x1024.yaml")
    config = _load(path, tmp_path, "--steps", "10", "--noaux_head", "--aux_loss_weight", "0.5")
    assert (config.steps, config.aux_head, config.aux_loss_weight) == (10, False, 0.5)
    assert config.backbone == "resnet50_v1c"  # the rest from the file


@pytest.mark.slow
def test_a_dilated_row_builds(tmp_path):
    """FCN R-18-D8 as its file says: logits and aux_logits at the input size, 19 classes."""
    import numpy as np

    from kfcn.training.job import build_model

    path = os.path.join(REPO, "configs", "mmseg", "fcn_r18-d8_4xb2-80k_cityscapes-512x1024.yaml")
    config = _load(path, tmp_path)
    model = build_model(config, 19)
    outputs = model(np.zeros((1, 33, 47, 3), np.float32), training=False)
    assert sorted(outputs) == ["aux_logits", "logits"]
    assert tuple(outputs["logits"].shape) == tuple(outputs["aux_logits"].shape) == (1, 33, 47, 19)


def test_settings_of_the_other_family_are_refused(tmp_path):
    from kfcn.cli.errors import UsageError

    path = os.path.join(REPO, "configs", "paper", "siftflow-fcn32s.yaml")
    with pytest.raises(UsageError, match="--aux_head is a setting of the dilated nets"):
        _load(path, tmp_path, "--aux_head")
    path = os.path.join(REPO, "configs", "mmseg", "fcn_r50-d8_4xb2-40k_cityscapes-512x1024.yaml")
    with pytest.raises(UsageError, match="--modality is a setting of the skip nets"):
        _load(path, tmp_path, "--modality", "rgbd")
    assert dataclasses.fields(TrainConfig)  # the dataclass stays importable without TF
