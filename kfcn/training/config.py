"""`TrainConfig`: every setting of a training run, as plain values.

The `kfcn train` command has one flag per field, of the same name; a run writes
the fields it used to `model_dir/config.yaml` (`to_dict`), and
`TrainConfig.from_dict` reads them back. Importing this module imports neither
TensorFlow nor Keras.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

from kfcn.training.outputs import LOSS_REDUCTIONS
from kfcn.training.schedules import SCHEDULES
from kfcn.training.strategy import STRATEGIES

OPTIMIZERS = ("sgd", "adam")
CLASS_WEIGHTINGS = ("none", "median_frequency", "sqrt_median_frequency")
# Exponent of the median-frequency weights for each weighting that uses them.
CLASS_WEIGHT_POWERS = {"median_frequency": 1.0, "sqrt_median_frequency": 0.5}
#: The dilated FCNs of mmsegmentation's model zoo, `kfcn.build_dilated_fcn`:
#: variant -> (output_stride, head_dilation). FCN-D6 is R-x-D16 with a dilation-6 head.
DILATED_VARIANTS = {"fcn_d8": (8, 1), "fcn_d16": (16, 1), "fcn_d6": (16, 6)}
#: Input modalities of `kfcn.build_fcn(modality=...)` (NYUDv2, Long et al. CVPR 2015 section 5).
MODALITIES = ("rgb", "rgbd", "hha", "rgb+hha")
#: `photometric` settings (`kfcn.data.train_pipeline`).
PHOTOMETRIC = ("none", "jitter", "mmseg")
#: Validation test modes (`kfcn.evaluation.MODES`; msflip with `val_scales`, `val_flip`).
VAL_MODES = ("whole", "slide", "msflip")
#: Score names `selection_metric` may take (optionally "<task>/<name>").
SELECTION_SCORES = ("mean_iou", "pixel_accuracy", "mean_accuracy", "frequency_weighted_iou")
#: Settings of the dilated family only.
DILATED_SETTINGS = ("head_channels", "num_convs", "concat_input", "aux_head", "aux_channels")
#: Settings that only the "folder" dataset takes (the others know their classes).
FOLDER_SETTINGS = ("list_file", "val_list_file", "num_classes", "ignore_label", "class_names")


@dataclasses.dataclass
class TrainConfig:
    """Every setting of a training run.

    Attributes:
        model_dir: Run directory: checkpoints/, logs/, config.yaml, model.keras, result.json.
        dataset: A name `kfcn.data.load_dataset` knows.
        data_dir: Dataset root (CamVid/folder root; the tfds data dir for voc, sbd, cityscapes).
        manual_dir: Manually downloaded archives of the tfds datasets.
        list_file: "folder" only: the training list of `image mask` lines.
        val_list_file: "folder" only: the validation list.
        num_classes: "folder" only: number of classes.
        ignore_label: "folder" only: label value left out of loss and scores (default 255).
        class_names: "folder" only: one name per class.
        train_split: Training split (default "train_aug" for sbd, else "train").
        val_dataset: Validation dataset (default `dataset`).
        val_split: Validation split; None skips validation.
        strategy: "one_device", "mirrored" or "multi_worker_mirrored".
        cpu_replicas: Logical CPU devices for "mirrored" on a machine without GPUs.
        backbone: Backbone name (`kfcn.backbones`).
        variant: The paper's skip nets "fcn32s", "fcn16s", "fcn8s" and "fcn4s"
            (FCN-8s with a pool2 skip; `kfcn.build_fcn`) or mmsegmentation's
            dilated nets "fcn_d8", "fcn_d16", "fcn_d6"
            (`kfcn.build_dilated_fcn`: output stride 8, 16, and 16 with a
            dilation-6 head).
        head_channels: Dilated nets: channels of the FCNHead's convs (mmseg 512).
        num_convs: Dilated nets: 3x3 convs of the FCNHead (mmseg 2).
        concat_input: Dilated nets: concatenate the head's input with its convs' output.
        aux_head: Dilated nets: train an auxiliary FCNHead on the stage before the
            last (the model then returns {"logits", "aux_logits"}).
        aux_channels: Dilated nets: channels of the auxiliary head (mmseg 256).
        sync_batchnorm: Dilated nets: synchronise BatchNormalization across replicas.
        modality: Skip nets: "rgb", "rgbd" (4-channel early fusion), "hha", or
            "rgb+hha" (two streams, late fusion), as the paper's NYUDv2 nets.
        heads: Skip nets: {task: classes} for one trunk with a head per task (SIFT
            Flow {"sem": 33, "geo": 3}); default: the dataset's tasks if it has several.
        weights: None, "imagenet" or a Keras Applications classifier weights file.
        init_from: A `.keras` model whose same-named layers initialise the network.
        trainable_upsampling: Learn the bilinear upsampling.
        dropout: Dropout rate of the classifier.
        bn_momentum: Momentum of every BatchNormalization layer (None: the backbone's).
        batch_size: Global batch size.
        crop_size: Training crop (height, width).
        scale_range: Random rescaling (min, max).
        epochs: Training epochs (when `steps` is None).
        steps: Training steps.
        time_budget: Minutes of the training loop's wall clock (validations and
            checkpoints included) the run may take: it ends where its pace
            projects the budget to run out, and "poly" ends its decay there
            (`kfcn.training.time_budget`); `steps`/`epochs` still cap it. None: off.
        optimizer: "sgd" or "adam".
        learning_rate: Initial learning rate.
        momentum: SGD momentum.
        weight_decay: L2 on kernels added to the loss (Caffe's weight_decay).
        ema_momentum: Keep an exponential moving average of the trainable weights
            (Polyak averaging, with TensorFlow's warm-up; `kfcn.training.averaging`)
            with this momentum, e.g. 0.998; validation, `best.weights.h5` and
            `model.keras` use the average. 0 disables.
        schedule: "poly" or "fixed".
        class_weighting: "none", "median_frequency" (Eigen & Fergus) or
            "sqrt_median_frequency" (their square roots: milder on rare classes).
        min_learning_rate: "poly" ends at this rate (mmseg's `eta_min` 1e-4).
        poly_power: Exponent of "poly" (0.9).
        aux_loss_weight: Loss weight of auxiliary outputs (mmseg 0.4; torchvision 0.5).
        task_loss_weights: Loss weight of each main output by name, e.g.
            {"sem": 1, "geo": 1} (default 1 each).
        loss_reduction: "mean": each output's loss over the valid pixels of the
            global batch; "sum": unnormalised, the reference solvers' `normalize: false`.
        flip: Random horizontal mirroring.
        photometric: Colour augmentation of the RGB channels: "none", "jitter"
            (brightness, contrast, saturation, hue) or "mmseg" (mmsegmentation's
            `PhotoMetricDistortion`), see `kfcn.data.train_pipeline`.
        cat_max_ratio: Redraw a training crop (up to 10 times) while one class
            covers more than this fraction of it (mmseg 0.75); None disables.
        mixed_precision: float16 (GPU) or bfloat16 (CPU) compute.
        float32_depthwise: With `mixed_precision`, keep the depthwise
            convolutions (and their batch norm and activation) in float32
            (`kfcn.precision.float32_depthwise`).
        jit_compile: Compile the train step with XLA (one replica only; faster
            for some models, much slower for depthwise convolutions on CPU:
            see README's benchmarks).
        eval_every: Validate every N steps (0: every epoch) and at the end.
        max_eval_images: Validate on at most this many images.
        val_mode: "whole" images or "slide" windows (mmseg's Cityscapes 769x769 rows).
        val_crop_size: Window (height, width) of "slide".
        val_stride: Window stride of "slide" (default 2/3 of the window).
        val_scales: Resize factors of "msflip" (`kfcn.evaluation.predict_msflip`);
            (1.0,) with `val_flip` is test-time flip alone.
        val_flip: "msflip" also predicts the mirrored images.
        input_scale: Validation and model.keras run the net at this multiple of
            the input's size (`kfcn.with_input_scale`; `kfcn.training.test_time`).
        logit_adjustment: Validation and model.keras add -tau * log w to the
            logits, w the loss's class weights (`kfcn.with_logit_adjustment`;
            0: none; needs `class_weighting`).
        selection_metric: Validation score that picks `best.weights.h5`:
            "mean_iou" (the mean over tasks for several) or "<task>/<score>".
        num_overlays: Prediction overlays written to TensorBoard at each validation.
        checkpoint_every: Checkpoint every N steps (0: every epoch) and at the end.
        log_every: Log a progress line every N steps.
        seed: Seed of initialisation, shuffling and augmentation (None: random, then
            recorded in config.yaml).
        step_timeout: Seconds without a finished step after which the process exits.
        collective_timeout: Multi-worker all-reduce timeout in seconds.
    """

    model_dir: str
    dataset: str = "camvid"
    data_dir: str | None = None
    manual_dir: str | None = None
    list_file: str | None = None
    val_list_file: str | None = None
    num_classes: int | None = None
    ignore_label: int | None = None
    class_names: tuple[str, ...] | None = None
    train_split: str | None = None
    val_dataset: str | None = None
    val_split: str | None = "val"
    strategy: str = "one_device"
    cpu_replicas: int = 1
    backbone: str = "vgg16"
    variant: str = "fcn8s"
    head_channels: int = 512
    num_convs: int = 2
    concat_input: bool = True
    aux_head: bool = False
    aux_channels: int = 256
    sync_batchnorm: bool = True
    modality: str = "rgb"
    heads: dict[str, int] | None = None
    weights: str | None = None
    init_from: str | None = None
    trainable_upsampling: bool = False
    dropout: float = 0.5
    bn_momentum: float | None = None
    batch_size: int = 8
    crop_size: tuple[int, int] = (512, 512)
    scale_range: tuple[float, float] = (0.5, 2.0)
    epochs: int = 50
    steps: int | None = None
    time_budget: float | None = None
    optimizer: str = "sgd"
    learning_rate: float = 1e-4
    momentum: float = 0.9
    weight_decay: float = 5e-4
    ema_momentum: float = 0.0
    schedule: str = "poly"
    class_weighting: str = "none"
    min_learning_rate: float = 0.0
    poly_power: float = 0.9
    aux_loss_weight: float = 0.4
    task_loss_weights: dict[str, float] | None = None
    loss_reduction: str = "mean"
    flip: bool = True
    photometric: str = "none"
    cat_max_ratio: float | None = None
    mixed_precision: bool = False
    float32_depthwise: bool = False
    jit_compile: bool = False
    eval_every: int = 0
    max_eval_images: int | None = None
    val_mode: str = "whole"
    val_crop_size: tuple[int, int] | None = None
    val_stride: tuple[int, int] | None = None
    val_scales: tuple[float, ...] = (1.0,)
    val_flip: bool = True
    input_scale: float = 1.0
    logit_adjustment: float = 0.0
    selection_metric: str = "mean_iou"
    num_overlays: int = 3
    checkpoint_every: int = 0
    log_every: int = 10
    seed: int | None = None
    step_timeout: float | None = 1800.0
    collective_timeout: float | None = 600.0

    def __post_init__(self) -> None:
        self.crop_size = tuple(int(v) for v in self.crop_size)
        self.scale_range = tuple(float(v) for v in self.scale_range)
        if self.class_names is not None:
            self.class_names = tuple(str(n) for n in self.class_names)
        self.val_scales = tuple(float(v) for v in self.val_scales)
        for name in ("val_crop_size", "val_stride"):
            if getattr(self, name) is not None:
                setattr(self, name, tuple(int(v) for v in getattr(self, name)))
        if self.heads is not None:
            self.heads = {str(k): int(v) for k, v in dict(self.heads).items()}
        if self.task_loss_weights is not None:
            self.task_loss_weights = {
                str(k): float(v) for k, v in dict(self.task_loss_weights).items()
            }

    @property
    def is_dilated(self) -> bool:
        """Whether `variant` is one of mmsegmentation's dilated FCNs."""
        return self.variant in DILATED_VARIANTS

    @property
    def resolved_train_split(self) -> str:
        """`train_split`, defaulting to SBD's "train_aug" and other datasets' "train"."""
        return self.train_split or ("train_aug" if self.dataset == "sbd" else "train")

    @property
    def resolved_val_dataset(self) -> str:
        """`val_dataset`, defaulting to `dataset`."""
        return self.val_dataset or self.dataset

    def dataset_kwargs(self, validation: bool = False) -> dict[str, Any]:
        """Keyword arguments of `kfcn.data.load_dataset` for the training or validation data."""
        kwargs: dict[str, Any] = {}
        if self.manual_dir:
            kwargs["manual_dir"] = self.manual_dir
        name = self.resolved_val_dataset if validation else self.dataset
        if name == "nyud":  # the loader reads the images the model's modality takes
            kwargs["modality"] = self.modality
        if name == "folder":
            kwargs["num_classes"] = self.num_classes
            list_file = self.val_list_file if validation else self.list_file
            if list_file:
                kwargs["list_file"] = list_file
            if self.ignore_label is not None:
                kwargs["ignore_label"] = self.ignore_label
            if self.class_names is not None:
                kwargs["class_names"] = self.class_names
        return kwargs

    @property
    def has_validation(self) -> bool:
        """Whether the run validates: a split is named and, for a folder, its list exists."""
        if not self.val_split:
            return False
        if self.resolved_val_dataset == "folder" and not self.val_list_file:
            return bool(self.data_dir) and os.path.isfile(
                os.path.join(self.data_dir, f"{self.val_split}.txt")
            )
        return True

    def validate(self) -> None:
        """Checks the settings that need no TensorFlow.

        Raises:
            ValueError: naming the setting and the value received, Keras-style
                ("`batch_size` must be >= 1. Received: batch_size=0").
        """

        def fail(name: str, requirement: str) -> None:
            raise ValueError(f"`{name}` {requirement}. Received: {name}={getattr(self, name)!r}")

        for name, allowed in (
            ("strategy", STRATEGIES),
            ("optimizer", OPTIMIZERS),
            ("schedule", SCHEDULES),
            ("class_weighting", CLASS_WEIGHTINGS),
            ("loss_reduction", LOSS_REDUCTIONS),
            ("modality", MODALITIES),
            ("val_mode", VAL_MODES),
            ("photometric", PHOTOMETRIC),
        ):
            if getattr(self, name) not in allowed:
                fail(name, f"must be one of {', '.join(allowed)}")
        if not self.model_dir:
            fail("model_dir", "is required")
        from kfcn import VARIANTS

        if self.variant not in (*VARIANTS, *DILATED_VARIANTS):
            fail("variant", f"must be one of {', '.join((*VARIANTS, *DILATED_VARIANTS))}")
        for name in ("batch_size", "cpu_replicas", "epochs", "log_every"):
            if getattr(self, name) < 1:
                fail(name, "must be >= 1")
        for name in ("steps", "max_eval_images", "num_classes"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                fail(name, "must be >= 1")
        for name in ("eval_every", "checkpoint_every", "num_overlays"):
            if getattr(self, name) < 0:
                fail(name, "must be >= 0")
        if not self.learning_rate > 0:
            fail("learning_rate", "must be > 0")
        if self.weight_decay < 0:
            fail("weight_decay", "must be >= 0")
        if not 0 <= self.momentum < 1:
            fail("momentum", "must be in [0, 1)")
        if not 0 <= self.dropout < 1:
            fail("dropout", "must be in [0, 1)")
        if self.bn_momentum is not None and not 0 <= self.bn_momentum < 1:
            fail("bn_momentum", "must be in [0, 1)")
        if not 0 <= self.ema_momentum < 1:
            fail("ema_momentum", "must be in [0, 1) (0 disables the average)")
        if self.time_budget is not None and not (
            math.isfinite(self.time_budget) and self.time_budget > 0
        ):
            fail("time_budget", "must be a number of minutes > 0")
        if len(self.crop_size) != 2 or min(self.crop_size) < 1:
            fail("crop_size", "must be (height, width), positive")
        if len(self.scale_range) != 2 or not 0 < self.scale_range[0] <= self.scale_range[1]:
            fail("scale_range", "must be (min, max) with 0 < min <= max")
        if not 0 <= self.min_learning_rate < self.learning_rate:
            fail("min_learning_rate", f"must be in [0, learning_rate={self.learning_rate})")
        if not self.poly_power > 0:
            fail("poly_power", "must be > 0")
        if self.aux_loss_weight < 0:
            fail("aux_loss_weight", "must be >= 0")
        if self.task_loss_weights is not None and min(self.task_loss_weights.values()) < 0:
            fail("task_loss_weights", "must be >= 0")
        if self.cat_max_ratio is not None and not 0 < self.cat_max_ratio <= 1:
            fail("cat_max_ratio", "must be in (0, 1]")
        if self.heads is not None and (not self.heads or min(self.heads.values()) < 1):
            fail("heads", "must map task names to >= 1 classes")
        if self.val_mode == "slide" and self.val_crop_size is None:
            fail("val_crop_size", "is required with val_mode='slide'")
        if not self.val_scales or min(self.val_scales) <= 0:
            fail("val_scales", "must be one or more numbers > 0")
        from kfcn.input_scale import check_scale

        check_scale(self.input_scale)  # the one scale check, naming `input_scale`
        if not (0 <= self.logit_adjustment < float("inf")):
            fail("logit_adjustment", "must be a finite number >= 0 (0: none)")
        if self.logit_adjustment and self.class_weighting == "none":
            fail(
                "logit_adjustment",
                "takes the loss's class weights back out of the scores and needs "
                "class_weighting (median_frequency or sqrt_median_frequency)",
            )
        self._validate_test_time()
        if self.float32_depthwise and not self.mixed_precision:
            fail("float32_depthwise", "keeps layers in float32 under mixed_precision, which is off")
        if self.selection_metric.rpartition("/")[2] not in SELECTION_SCORES:
            fail(
                "selection_metric", f"must be one of {', '.join(SELECTION_SCORES)}, or <task>/<one>"
            )
        self._validate_model_settings()
        if self.ignore_label is not None and not 0 <= self.ignore_label <= 255:
            fail("ignore_label", "must be in [0, 255]")
        if self.strategy != "mirrored" and self.cpu_replicas != 1:
            fail("cpu_replicas", f"is for strategy='mirrored' only, not {self.strategy!r}")
        if self.strategy == "mirrored" and self.batch_size % self.cpu_replicas:
            fail("batch_size", f"must be divisible by the {self.cpu_replicas} CPU replicas")
        self._validate_dataset_settings()

    def _validate_model_settings(self) -> None:
        if self.is_dilated:
            for name, default in (("modality", "rgb"), ("heads", None)):
                if getattr(self, name) != default:
                    raise ValueError(
                        f"`{name}` is a setting of the skip nets (fcn32s ... fcn4s); "
                        f"the dilated nets take RGB and one task. Received: "
                        f"{name}={getattr(self, name)!r} with variant={self.variant!r}"
                    )
            for name in ("head_channels", "num_convs", "aux_channels"):
                if getattr(self, name) < 1:
                    raise ValueError(
                        f"`{name}` must be >= 1. Received: {name}={getattr(self, name)!r}"
                    )
            return
        for name in DILATED_SETTINGS:
            field = next(f for f in dataclasses.fields(self) if f.name == name)
            if getattr(self, name) != field.default:
                raise ValueError(
                    f"`{name}` is a setting of the dilated nets "
                    f"({', '.join(DILATED_VARIANTS)}). Received: {name}="
                    f"{getattr(self, name)!r} with variant={self.variant!r}"
                )
        if self.heads is not None and self.class_weighting != "none":
            raise ValueError(
                "`class_weighting` needs one task; the run has several. Received: "
                f"class_weighting={self.class_weighting!r} with heads={self.heads!r}"
            )

    def _validate_test_time(self) -> None:
        """input_scale and logit_adjustment need a net of one image input and one output."""
        if self.input_scale == 1.0 and not self.logit_adjustment:
            return
        several = {
            "aux_head": self.aux_head,  # a second output
            "heads": self.heads is not None,  # one output per task
            "modality": self.modality == "rgb+hha",  # two image inputs
        }
        for name, is_several in several.items():
            if is_several:
                raise ValueError(
                    f"`input_scale` and `logit_adjustment` need a net of one image input and "
                    f"one output. Received: {name}={getattr(self, name)!r} with input_scale="
                    f"{self.input_scale!r}, logit_adjustment={self.logit_adjustment!r}"
                )

    def _validate_dataset_settings(self) -> None:
        uses_folder = "folder" in (self.dataset, self.resolved_val_dataset)
        if not uses_folder:
            for name in FOLDER_SETTINGS:
                if getattr(self, name) is not None:
                    raise ValueError(
                        f"`{name}` is a setting of dataset='folder' only (other datasets know "
                        f"their classes and files). Received: {name}={getattr(self, name)!r} "
                        f"with dataset={self.dataset!r}"
                    )
            return
        if self.num_classes is None:
            raise ValueError(
                "`num_classes` is required with dataset='folder'. Received: num_classes=None"
            )
        if self.dataset == "folder" and not (self.list_file or self.data_dir):
            raise ValueError(
                "dataset='folder' needs `list_file` (or `data_dir` holding "
                f"{self.resolved_train_split}.txt). Received: list_file=None, data_dir=None"
            )
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise ValueError(
                f"`class_names` must name the {self.num_classes} classes. Received: "
                f"class_names={','.join(self.class_names)!r} ({len(self.class_names)} names)"
            )

    def to_dict(self) -> dict[str, Any]:
        """The settings as plain YAML/JSON values (tuples become lists)."""
        values = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Builds a config from `to_dict`'s output (e.g. a run's config.yaml).

        Raises:
            ValueError: naming keys that are not settings.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"Unknown training settings {unknown}; known: {sorted(names)}")
        return cls(**values)
