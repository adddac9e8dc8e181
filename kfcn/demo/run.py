"""The demo job: generate data, train FCN-32s/16s/8s staged, score, draw, export, predict.

`run_demo(output_dir, settings)` runs the product path a user would, in order:

1. `kfcn.demo.synthetic` writes the dataset in the `folder` layout (`O/data`);
2. `kfcn.training.fit` trains FCN-32s, then FCN-16s from it and FCN-8s from that
   (`init_from`, the paper's staged training, section 4.2), each in `O/runs/<variant>`;
3. `kfcn.evaluation.evaluate` scores each final model on the held-out split;
4. `kfcn.visualize` draws Figure 2 (image | FCN-32s | FCN-16s | FCN-8s | ground
   truth), the FCN-8s confusion matrix and the training curves;
5. `kfcn.export` writes the FCN-8s as a SavedModel and a float16 TFLite file, and
   `kfcn predict` segments held-out images with each; their class maps are
   compared with the Keras model's argmax.

No flags here: `kfcn demo` (`kfcn.cli.demo`) picks `FULL` or `QUICK` and shows
progress through the `progress` callback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from kfcn import PAPER_VARIANTS
from kfcn.demo import synthetic

TITLES = {"fcn32s": "FCN-32s", "fcn16s": "FCN-16s", "fcn8s": "FCN-8s"}
#: The kfcn.metrics.scores keys shown in the table, with their headings.
TABLE_COLUMNS = (
    ("pixel_accuracy", "pixel acc."),
    ("mean_accuracy", "mean acc."),
    ("mean_iou", "mean IU"),
    ("frequency_weighted_iou", "f.w. IU"),
)

#: Written into the output directory, so a rerun knows it may replace the demo's files there.
MARKER_FILE = ".kfcn_demo"

#: `progress(task, done, total)`: a task's progress (steps, images), for progress bars.
ProgressFn = Callable[[str, int, int], None]


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """Everything the demo does, as plain values (`FULL` and `QUICK` below).

    Attributes:
        seed: Seed of the dataset, the initialisation and the batches.
        image_size: Height and width of the generated images.
        num_train: Training images.
        num_val: Held-out images (scored, drawn and predicted).
        stage_steps: Training steps of FCN-32s, FCN-16s and FCN-8s.
        batch_size: Images per step.
        crop_size: Side of the random training crops.
        optimizer: "adam" or "sgd" (`kfcn.training.TrainConfig.optimizer`).
        learning_rate: Initial learning rate of each stage (poly decay to 0).
        bn_momentum: BatchNormalization momentum (short runs need a fast average).
        dropout: Dropout before the scoring layer.
        trainable_upsampling: Learn the bilinear-initialised upsampling layers.
        class_weighting: "none", "median_frequency" or "sqrt_median_frequency".
        eval_images: Held-out images validated during training (training curves).
        evals_per_stage: Validations per stage (for the curves).
        figure_images: Rows of Figure 2.
        predict_images: Held-out images segmented by the exported models.
    """

    seed: int = 0
    image_size: int = 128
    num_train: int = 400
    num_val: int = 80
    stage_steps: tuple[int, int, int] = (800, 400, 500)
    batch_size: int = 8
    crop_size: int = 96
    optimizer: str = "adam"
    learning_rate: float = 3e-3
    bn_momentum: float = 0.9
    dropout: float = 0.0
    trainable_upsampling: bool = True
    class_weighting: str = "none"
    eval_images: int = 16
    evals_per_stage: int = 3
    figure_images: int = 4
    predict_images: int = 8


FULL = DemoSettings()
#: The same path in well under a minute (for tests): tiny data, a few steps.
QUICK = dataclasses.replace(
    FULL,
    num_train=32,
    num_val=8,
    stage_steps=(12, 6, 6),
    eval_images=4,
    evals_per_stage=1,
    figure_images=2,
    predict_images=2,
)


@dataclasses.dataclass
class DemoResult:
    """What the demo measured and where it wrote it.

    Attributes:
        output_dir: The demo's directory.
        scores: Variant -> held-out scores (the keys of `kfcn.metrics.scores`,
            plus "num_images" and "class_names").
        agreement: Export ("saved_model", "tflite_fp16") -> fraction of held-out
            pixels whose `kfcn predict` class equals the Keras model's argmax.
        paths: What -> where (dataset, runs, pictures, metrics, exports, predictions).
        seconds: Stage -> wall-clock seconds.
    """

    output_dir: str
    scores: dict[str, dict[str, Any]]
    agreement: dict[str, float]
    paths: dict[str, str]
    seconds: dict[str, float]


# --------------------------------------------------------------------------------------
# 1. Data


def _write_dataset(output_dir: str, settings: DemoSettings) -> str:
    data_dir = os.path.join(output_dir, "data")
    shutil.rmtree(data_dir, ignore_errors=True)
    synthetic.write_folder_dataset(
        data_dir,
        {"train": settings.num_train, "val": settings.num_val},
        seed=settings.seed,
        image_size=settings.image_size,
    )
    return data_dir


def _load(data_dir: str, split: str) -> tuple[Any, Any]:
    from kfcn import data

    return data.load_dataset(
        "folder",
        split,
        data_dir,
        num_classes=synthetic.NUM_CLASSES,
        class_names=synthetic.CLASS_NAMES,
    )


# --------------------------------------------------------------------------------------
# 2. Staged training


def build_demo_model(config: Any, num_classes: int) -> Any:
    """`kfcn.training.fit`'s `model_fn`: the configured FCN on the demo's trunk."""
    import kfcn
    from kfcn.demo.backbone import build_backbone

    return kfcn.build_fcn(
        config.variant,
        backbone=build_backbone(),
        num_classes=num_classes,
        dropout=config.dropout,
        trainable_upsampling=config.trainable_upsampling,
        init_from=config.init_from,
    )


def train_config(
    variant: str, steps: int, run_dir: str, data_dir: str, settings: DemoSettings, init_from
) -> Any:
    """The `kfcn.training.TrainConfig` of one stage (what `kfcn train` would take)."""
    from kfcn.training import TrainConfig

    return TrainConfig(
        model_dir=run_dir,
        dataset="folder",
        data_dir=data_dir,
        num_classes=synthetic.NUM_CLASSES,
        class_names=synthetic.CLASS_NAMES,
        backbone="demo_vgg",
        variant=variant,
        init_from=init_from,
        dropout=settings.dropout,
        trainable_upsampling=settings.trainable_upsampling,
        bn_momentum=settings.bn_momentum,
        batch_size=settings.batch_size,
        crop_size=(settings.crop_size, settings.crop_size),
        scale_range=(1.0, 1.0),
        steps=steps,
        optimizer=settings.optimizer,
        learning_rate=settings.learning_rate,
        weight_decay=0.0,
        class_weighting=settings.class_weighting,
        eval_every=max(1, steps // settings.evals_per_stage),
        max_eval_images=settings.eval_images,
        num_overlays=0,
        checkpoint_every=steps,
        log_every=max(1, min(10, steps // 20)),
        seed=settings.seed,
    )


class _StepProgress(logging.Handler):
    """Turns the training loop's "step N/T" log records into `progress` calls.

    `kfcn.training.fit` takes no progress callback; its loop logs a line every
    `log_every` steps whose first two arguments are the step and the total.
    """

    def __init__(self, task: str, progress: ProgressFn) -> None:
        super().__init__(level=logging.INFO)
        self.task = task
        self.progress = progress

    def emit(self, record: logging.LogRecord) -> None:
        if isinstance(record.msg, str) and record.msg.startswith("step ") and record.args:
            step, total = record.args[0], record.args[1]
            self.progress(self.task, int(step), int(total))


def train_stages(
    runs_dir: str, data_dir: str, settings: DemoSettings, progress: ProgressFn | None = None
) -> dict[str, str]:
    """Trains FCN-32s, FCN-16s from it and FCN-8s from that; returns variant -> model.keras."""
    from kfcn import metadata
    from kfcn.training import fit

    loop_logger = logging.getLogger("kfcn.training.loop")
    models: dict[str, str] = {}
    init_from = None
    for variant, steps in zip(PAPER_VARIANTS, settings.stage_steps, strict=True):
        run_dir = os.path.join(runs_dir, variant)
        shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run, never a resumed one
        config = train_config(variant, steps, run_dir, data_dir, settings, init_from)
        handler = _StepProgress(f"train {TITLES[variant]}", progress) if progress else None
        if handler:
            loop_logger.addHandler(handler)
            previous_level = loop_logger.level
            loop_logger.setLevel(logging.INFO)
        try:
            result = fit(config, model_fn=build_demo_model)
        finally:
            if handler:
                loop_logger.removeHandler(handler)
                loop_logger.setLevel(previous_level)
        # The demo's own colours, so `kfcn predict` with these files draws them too.
        metadata.write_class_info(class_info(), result.model_path)
        models[variant] = init_from = result.model_path
    return models


# --------------------------------------------------------------------------------------
# 3. Scores


def score_models(
    models: dict[str, str],
    data_dir: str,
    num_examples: int,
    progress: ProgressFn | None = None,
) -> tuple[dict[str, dict[str, Any]], dict[str, list[np.ndarray]], np.ndarray]:
    """Scores each model on the held-out split with `kfcn.evaluation.evaluate`.

    Returns:
        (variant -> scores with the keys of `kfcn.metrics.scores`, variant -> class
        maps of the first `num_examples` held-out images, FCN-8s confusion matrix).
    """
    import kfcn
    from kfcn import evaluation, metrics

    scores: dict[str, dict[str, Any]] = {}
    examples: dict[str, list[np.ndarray]] = {}
    confusion = None
    for variant, path in models.items():
        model = kfcn.load_model(path, compile=False)
        dataset, info = _load(data_dir, "val")
        kept: list[np.ndarray] = []
        task, total = f"score {TITLES[variant]}", info.num_examples

        def on_image(
            done: int, name: str, image, label, prediction, kept=kept, task=task, total=total
        ) -> None:
            if len(kept) < num_examples:
                kept.append(np.asarray(prediction, np.uint8))
            if progress:
                progress(task, done, total or done)

        results = evaluation.evaluate(model, dataset, info, on_image=on_image)
        matrix = np.asarray(results["confusion_matrix"], np.int64)
        scores[variant] = {
            **metrics.scores(matrix),
            "num_images": results["num_images"],
            "class_names": list(info.class_names),
        }
        examples[variant] = kept
        if variant == PAPER_VARIANTS[-1]:
            confusion = matrix
    return scores, examples, confusion


def format_table(scores: dict[str, dict[str, Any]]) -> str:
    """The paper's four metrics per variant (percent), as a text table (cf. its Table 2)."""
    header = f"{'':<8}" + "".join(f"{title:>12}" for _, title in TABLE_COLUMNS)
    lines = [header]
    for variant, values in scores.items():
        cells = "".join(f"{100 * values[key]:>12.1f}" for key, _ in TABLE_COLUMNS)
        lines.append(f"{TITLES.get(variant, variant):<8}{cells}")
    names = next(iter(scores.values()))["class_names"]
    lines += ["", "IU per class (%):", f"{'':<8}" + "".join(f"{n:>9}" for n in names)]
    for variant, values in scores.items():
        cells = "".join(f"{100 * v:>9.1f}" for v in values["iou"])
        lines.append(f"{TITLES.get(variant, variant):<8}{cells}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# 4. Pictures


def draw_pictures(
    output_dir: str,
    runs_dir: str,
    data_dir: str,
    examples: dict[str, list[np.ndarray]],
    confusion: np.ndarray,
) -> dict[str, str]:
    """Writes figure2.png, confusion.png and training_curves.png; returns name -> path."""
    from kfcn import visualize
    from kfcn.data import read_image, read_label

    palette = np.asarray(synthetic.PALETTE, np.uint8)
    count = min(len(maps) for maps in examples.values())
    names = [f"val_{index:04d}" for index in range(count)]
    rows = []
    for index, name in enumerate(names):
        image = read_image(os.path.join(data_dir, "images", f"{name}.png"))
        label = read_label(
            os.path.join(data_dir, "labels", f"{name}.png"), synthetic.NUM_CLASSES, 255
        )
        maps = [examples[variant][index] for variant in PAPER_VARIANTS]
        rows.append([image] + [visualize.colorize(m, palette) for m in maps + [label]])
    paths = {
        "figure2": os.path.join(output_dir, "figure2.png"),
        "confusion": os.path.join(output_dir, "confusion.png"),
        "training_curves": os.path.join(output_dir, "training_curves.png"),
    }
    titles = ["image"] + [TITLES[v] for v in PAPER_VARIANTS] + ["ground truth"]
    visualize.figure_grid(rows, titles, paths["figure2"])
    visualize.plot_confusion_matrix(confusion, synthetic.CLASS_NAMES, paths["confusion"])
    visualize.training_curves(runs_dir, paths["training_curves"])
    return paths


# --------------------------------------------------------------------------------------
# 5. Export and predict


def class_info() -> Any:
    """The demo's classes as a `kfcn.metadata.ClassInfo` (names and `synthetic.PALETTE`)."""
    from kfcn import metadata

    return metadata.ClassInfo(
        names=list(synthetic.CLASS_NAMES),
        palette=[list(colour) for colour in synthetic.PALETTE],
        dataset="folder",
        ignore_label=255,
    )


def export_and_predict(
    output_dir: str,
    model_path: str,
    data_dir: str,
    settings: DemoSettings,
) -> tuple[dict[str, str], dict[str, float]]:
    """Exports the FCN-8s, runs `kfcn predict` with each export, measures agreement.

    Returns:
        (name -> path of the exports and prediction folders, export -> fraction of
        held-out pixels where `kfcn predict`'s class equals the Keras argmax).
    """
    import kfcn
    from kfcn import cli, evaluation, export
    from kfcn.data import read_image, read_label

    model = kfcn.load_model(model_path, compile=False)
    info = class_info()
    paths = {
        "saved_model": os.path.join(output_dir, "saved_model"),
        "tflite": os.path.join(output_dir, "fcn8s_fp16.tflite"),
    }
    export.export_saved_model(model, paths["saved_model"], overwrite=True, class_info=info)
    export.export_tflite(
        model,
        paths["tflite"],
        (settings.image_size, settings.image_size),
        quantization="float16",
        overwrite=True,
        class_info=info,
    )
    images = [
        os.path.join(data_dir, "images", f"val_{index:04d}.png")
        for index in range(min(settings.predict_images, settings.num_val))
    ]
    reference = {
        path: evaluation.predict_whole(model, read_image(path)).numpy().argmax(-1)
        for path in images
    }
    agreement = {}
    exported = (("saved_model", paths["saved_model"]), ("tflite_fp16", paths["tflite"]))
    for name, model_file in exported:
        folder = os.path.join(output_dir, "predictions", name)
        shutil.rmtree(folder, ignore_errors=True)
        code = cli.main(["predict", "--model", model_file, "--output_dir", folder, *images])
        if code != 0:
            raise RuntimeError(f"kfcn predict --model {model_file} failed (exit code {code})")
        same = total = 0
        for path, expected in reference.items():
            stem = os.path.splitext(os.path.basename(path))[0]
            predicted = read_label(os.path.join(folder, f"{stem}.png"), synthetic.NUM_CLASSES, 255)
            same += int((predicted == expected).sum())
            total += expected.size
        agreement[name] = same / total
        paths[f"predictions_{name}"] = folder
    return paths, agreement


# --------------------------------------------------------------------------------------
# The whole demo


def check_output_dir(output_dir: str | os.PathLike) -> None:
    """Raises ValueError unless `output_dir` is new, empty or an earlier demo's.

    Raises:
        ValueError: naming `output_dir`, if it is a file or a non-empty directory
            without the demo's `MARKER_FILE`.
    """
    path = os.fspath(output_dir)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(
            f"`output_dir` must be a directory. Received: output_dir={path!r} (a file)"
        )
    if os.path.isdir(path) and os.listdir(path):
        if not os.path.exists(os.path.join(path, MARKER_FILE)):
            raise ValueError(
                f"`output_dir` holds files the demo did not write; choose a new or empty "
                f"directory. Received: output_dir={path!r}"
            )


def run_demo(
    output_dir: str | os.PathLike,
    settings: DemoSettings = FULL,
    *,
    progress: ProgressFn | None = None,
    on_stage: Callable[[str], None] | None = None,
) -> DemoResult:
    """Runs the demo (see the module docstring), writing everything under `output_dir`.

    Args:
        output_dir: The demo's directory (created; the demo's own files in it are
            replaced: data/, runs/, predictions/, saved_model/ and the pictures).
        settings: `FULL` (the README's figures) or `QUICK` (tests).
        progress: Called as `progress(task, done, total)` during training and scoring.
        on_stage: Called with a one-line description as each stage starts.

    Returns:
        The `DemoResult` (also written to `output_dir/metrics.json`: the scores).

    Raises:
        ValueError: If `output_dir` holds files and was not written by the demo
            (the demo replaces its own files there, never anyone else's).
    """
    from kfcn import files

    output_dir = os.path.abspath(os.fspath(output_dir))
    check_output_dir(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    files.write_text_atomically(
        "kfcn demo output; rerunning the demo replaces it\n", os.path.join(output_dir, MARKER_FILE)
    )
    seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(name: str, text: str) -> Iterator[None]:
        if on_stage:
            on_stage(text)
        start = time.perf_counter()
        yield
        seconds[name] = time.perf_counter() - start

    runs_dir = os.path.join(output_dir, "runs")
    metrics_path = os.path.join(output_dir, "metrics.json")
    with stage("data", f"Generating {settings.num_train} + {settings.num_val} images"):
        data_dir = _write_dataset(output_dir, settings)
    with stage("train", "Training FCN-32s, then FCN-16s from it, then FCN-8s from that"):
        models = train_stages(runs_dir, data_dir, settings, progress)
    with stage("score", "Scoring each model on the held-out images"):
        scores, examples, confusion = score_models(
            models, data_dir, settings.figure_images, progress
        )
        files.write_json_atomically(scores, metrics_path)
    with stage("pictures", "Drawing Figure 2, the confusion matrix and the training curves"):
        pictures = draw_pictures(output_dir, runs_dir, data_dir, examples, confusion)
    with stage("export", "Exporting FCN-8s (SavedModel, float16 TFLite), running kfcn predict"):
        exports, agreement = export_and_predict(output_dir, models["fcn8s"], data_dir, settings)
    paths = {
        "data": data_dir,
        "runs": runs_dir,
        **{f"model_{v}": p for v, p in models.items()},
        "metrics": metrics_path,
        **pictures,
        **exports,
    }
    return DemoResult(output_dir, scores, agreement, paths, seconds)
