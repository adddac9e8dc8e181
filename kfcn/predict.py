"""Segment image files with a kfcn model in any exported format (`kfcn predict`).

The model is a `.keras` file, a SavedModel directory (as `kfcn.export.saved_model`
writes it) or a `.tflite` file (as `kfcn.export.tflite` writes it); `load_predictor`
wraps each in a `Predictor` whose `scores(batch)` maps float32 RGB images [b, H, W, 3]
(0..255) to per-pixel class scores [b, H, W, C]:

- ``.keras``: the model's logits (one traced `tf.function`, any size).
- SavedModel: the `serving_default` signature's `probabilities` (its `images` input
  is uint8, so images are rounded, which they already are when read from files); a
  SavedModel exported without probabilities gives one-hot `class_ids`.
- ``.tflite``: the `logits` output at the file's fixed input size. An image of any
  other size is covered by windows of exactly that size (`tile_scores`), padded
  with the ImageNet mean colour where the image is smaller, and the overlapping
  windows' logits averaged: every result is for the image's own pixels, nothing is
  resized.

`tile_scores` is the generic sliding window over any `scores` function and
matches `kfcn.evaluation.predict_slide` (same windows, padding colour and
averaging); `.keras` models use `predict_slide` itself.

Models of the other kinds (`kfcn.export.model_io`): a multi-task model (SIFT
Flow's `heads={"sem": 33, "geo": 3}`) is segmented for one task, `task=` (default:
its first, logged); RGB-D and RGB-HHA models are refused with one line
(`ModelError`), since image files hold RGB only: run their SavedModel's
`serving_default` (inputs `rgb` + `depth`, or `rgb` + `hha`) or call the Keras
model on the 4-channel image / the `{"rgb", "hha"}` dict.

Images are read by `kfcn.data.images.read_image`, as training reads them
(grayscale, palette, RGBA and 16-bit images become 8-bit RGB with a warning; pixels
as stored, no EXIF rotation), so every output is of the stored image's size.

For each input `NAME.ext`, `predict_to_directory` writes into the output directory
`NAME.png` (the class map as an indexed, mode "P", PNG of the input's size, its
palette the classes' colours), `NAME_overlay.jpg` (`kfcn.visualize.overlay` with a
legend) and optionally `NAME_probs.npy` (float16 softmax [H, W, C]), and finally
`summary.json` (each image's class pixel fractions).

Example:
    ```python
    from kfcn import predict

    summary = predict.predict_to_directory("fcn8s.keras", ["photos/"], "out")
    summary["images"]["street"]["fractions"]      # {"road": 0.41, "car": 0.12, ...}
    ```
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from kfcn import metadata, visualize
from kfcn.data.images import read_image
from kfcn.files import atomic_output, write_text_atomically

logger = logging.getLogger(__name__)

#: File endings read from folders (explicit file arguments may have any ending).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
#: Largest number of classes an indexed PNG can hold.
MAX_CLASSES = 256
SUMMARY_FILE = "summary.json"
_GLOB_CHARS = "*?["


class InputError(ValueError):
    """An INPUT argument names nothing readable (missing file, glob matching nothing)."""


class ModelError(ValueError):
    """The model path is not a kfcn model in a supported format."""


# --------------------------------------------------------------------------- inputs


@dataclasses.dataclass(frozen=True)
class InputImage:
    """An image to segment.

    Attributes:
        path: The image file.
        name: Output name without extension, relative to the output directory
            ("street", or "city/street" for a file in a subfolder of a folder input).
    """

    path: str
    name: str


def _folder_images(folder: str, exclude: str | None) -> list[str]:
    found = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        if exclude and (os.path.realpath(root) + os.sep).startswith(exclude):
            dirs[:] = []
            continue
        found += [
            os.path.join(root, f) for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS)
        ]
    return found


def find_images(inputs: Sequence[str], exclude_dir: str | None = None) -> list[InputImage]:
    """Expands INPUT arguments (files, folders, globs) into images with output names.

    A file is taken as it is (any ending). A folder is searched recursively for
    files ending in `IMAGE_EXTENSIONS`, and an image in a subfolder keeps the
    subfolder in its output name (`folder/a/x.jpg` -> "a/x"). A glob (`*`, `?`,
    `[`; `**` recurses) takes the matching image files. The same file reached twice
    is segmented once. When two different files would get the same output name
    (`a/x.jpg` and `b/x.jpg`, or `x.jpg` and `x.png`), the later one in argument
    order gets "_2" appended ("x_2"; then "_3", ...), with a warning naming it.

    Args:
        inputs: The INPUT arguments.
        exclude_dir: A folder whose contents folder searches skip (the output
            directory, so earlier results are not taken as inputs).

    Returns:
        The images, in argument order (files of a folder or glob sorted).

    Raises:
        InputError: If an argument is neither an existing file or folder nor a glob
            matching an image, or a folder holds no image.
    """
    exclude = os.path.realpath(exclude_dir) + os.sep if exclude_dir else None
    seen: set[str] = set()
    used: set[str] = set()
    images: list[InputImage] = []
    for argument in inputs:
        if os.path.isfile(argument):
            candidates = [(argument, os.path.splitext(os.path.basename(argument))[0])]
        elif os.path.isdir(argument):
            paths = _folder_images(argument, exclude)
            if not paths:
                raise InputError(
                    f"INPUT folder {argument!r} holds no image files "
                    f"({', '.join(IMAGE_EXTENSIONS)})"
                )
            candidates = [
                (p, os.path.splitext(os.path.relpath(p, argument))[0].replace(os.sep, "/"))
                for p in paths
            ]
        elif any(ch in argument for ch in _GLOB_CHARS):
            paths = sorted(
                p
                for p in glob.glob(argument, recursive=True)
                if os.path.isfile(p) and p.lower().endswith(IMAGE_EXTENSIONS)
            )
            if not paths:
                raise InputError(f"INPUT {argument!r} matched no image files")
            candidates = [(p, os.path.splitext(os.path.basename(p))[0]) for p in paths]
        else:
            raise InputError(f"INPUT {argument!r} does not exist")
        for path, name in candidates:
            real = os.path.realpath(path)
            if real in seen:
                continue
            seen.add(real)
            unique, count = name, 1
            while unique in used:
                count += 1
                unique = f"{name}_{count}"
            if unique != name:
                logger.warning(
                    "%s: output name %r is taken by another input; writing %r instead",
                    path,
                    name,
                    unique,
                )
            used.add(unique)
            images.append(InputImage(path=path, name=unique))
    if not images:
        raise InputError("no INPUT given")
    return images


def _image_size(path: str) -> tuple[int, int] | None:
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.height, image.width
    except Exception:  # noqa: BLE001 - read_image reports the real error later
        return None


# --------------------------------------------------------------------------- models


class Predictor:
    """A model in one format: `scores(batch)` and what they are.

    Attributes:
        path: The model path.
        kind: "keras", "saved_model" or "tflite".
        num_classes: C, the number of output classes.
        input_size: (height, width) the model requires, or None for any size.
        max_batch: Largest batch `scores` takes (None: any).
        scores_are: "logits", "probabilities" or "one_hot" (what `scores` returns).
    """

    path: str
    kind: str
    num_classes: int
    input_size: tuple[int, int] | None = None
    max_batch: int | None = None
    scores_are: str = "logits"
    task: str | None = None

    def scores(self, batch: np.ndarray) -> np.ndarray:
        """float32 [b, H, W, 3] (0..255 RGB) -> float32 [b, H, W, C]."""
        raise NotImplementedError


def _refuse_inputs(path: str, kind: str) -> ModelError:
    return ModelError(
        f"kfcn predict cannot take model {path!r} ({kind}): it reads RGB image files; run "
        "the SavedModel's serving_default (inputs rgb + depth, or rgb + hha) or call the "
        "Keras model on the 4-channel image or the {'rgb', 'hha'} dict"
    )


def _pick_task(path: str, tasks: Sequence[str], task: str | None) -> str | None:
    """The task a multi-task model is segmented for (None for a single-task model)."""
    tasks = list(tasks)
    if not tasks or tasks == [None]:
        if task is not None:
            raise ModelError(f"--model {path!r} has one output; it takes no task={task!r}")
        return None
    if task is None:
        logger.info("%s has tasks %s; segmenting for %r (pass task=)", path, tasks, tasks[0])
        return tasks[0]
    if task not in tasks:
        raise ModelError(f"--model {path!r} has tasks {tasks}. Received: task={task!r}")
    return task


class KerasPredictor(Predictor):
    """A `.keras` kfcn model; `scores` are its logits."""

    kind = "keras"

    def __init__(self, path: str, task: str | None = None):
        import keras

        from kfcn.evaluation import traced
        from kfcn.export import model_io
        from kfcn.export.artifacts import load_segmentation_model

        try:
            self.model = load_segmentation_model(path)
            io = model_io.describe(self.model, source=f"--model {path!r}")
        except ValueError as error:
            raise ModelError(str(error)) from error
        if io.modality != model_io.RGB:
            raise _refuse_inputs(path, io.describe())
        self.path = path
        self.task = _pick_task(path, io.tasks, task)
        model = self.model
        if self.task is not None:  # the task's logits, same layers
            model = keras.Model(model.input, model.output[self.task], name=model.name)
        self.num_classes = int(model.outputs[0].shape[-1])
        self.forward = traced(model)

    def scores(self, batch: np.ndarray) -> np.ndarray:
        return np.asarray(self.forward(np.asarray(batch, np.float32)), np.float32)


class SavedModelPredictor(Predictor):
    """A SavedModel as kfcn exports it; `scores` are `serving_default`'s probabilities."""

    kind = "saved_model"

    def __init__(self, path: str, task: str | None = None):
        import tensorflow as tf

        try:
            loaded = tf.saved_model.load(path)
        except Exception as error:  # noqa: BLE001 - TF raises many kinds here
            raise ModelError(f"--model {path!r}: cannot load the SavedModel: {error}") from error
        signature = loaded.signatures.get("serving_default")
        inputs = signature.structured_input_signature[1] if signature is not None else {}
        outputs = signature.structured_outputs if signature is not None else {}
        if "rgb" in inputs and ("depth" in inputs or "hha" in inputs):
            kind = "RGB-D input" if "depth" in inputs else "RGB and HHA inputs"
            raise _refuse_inputs(path, kind)
        tasks = [k[len("class_ids_") :] for k in sorted(outputs) if k.startswith("class_ids_")]
        self.task = _pick_task(path, tasks, task)
        self._suffix = "" if self.task is None else f"_{self.task}"
        if "images" not in inputs or f"class_ids{self._suffix}" not in outputs:
            raise ModelError(
                f"--model {path!r} is not a kfcn SavedModel: expected a serving_default "
                "signature taking `images` and returning `class_ids` (kfcn export saved_model)"
            )
        self._loaded = loaded  # keeps the signature's variables alive
        self._signature = signature
        self.path = path
        if f"probabilities{self._suffix}" in outputs:
            self.num_classes = int(outputs[f"probabilities{self._suffix}"].shape[-1])
            self.scores_are = "probabilities"
        else:
            info = metadata.read_class_info(path)
            if isinstance(info, metadata.TaskClassInfo):
                info = info.tasks.get(self.task)
            if info is None:
                raise ModelError(
                    f"--model {path!r} returns class_ids only and carries no class names, so "
                    "its number of classes is unknown; export it with probabilities"
                )
            self.num_classes = info.num_classes
            self.scores_are = "one_hot"
        self._tf = tf

    def scores(self, batch: np.ndarray) -> np.ndarray:
        images = np.clip(np.round(batch), 0, 255).astype(np.uint8)
        outputs = self._signature(images=self._tf.constant(images))
        if self.scores_are == "probabilities":
            return outputs[f"probabilities{self._suffix}"].numpy().astype(np.float32)
        ids = outputs[f"class_ids{self._suffix}"].numpy()
        return np.eye(self.num_classes, dtype=np.float32)[ids]


class TFLitePredictor(Predictor):
    """A kfcn `.tflite` file; `scores` are its `logits`, at its fixed input size."""

    kind = "tflite"
    max_batch = 1

    def __init__(self, path: str, num_threads: int | None = None, task: str | None = None):
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError:  # TensorFlow's copy of the runtime
            from tensorflow.lite.python.interpreter import Interpreter
        try:
            interpreter = Interpreter(model_path=path, num_threads=num_threads)
            interpreter.allocate_tensors()
            signatures = interpreter.get_signature_list()
        except Exception as error:  # noqa: BLE001 - the runtime raises ValueError/RuntimeError
            raise ModelError(f"--model {path!r}: cannot load the TFLite file: {error}") from error
        signature = signatures.get("serving_default", {})
        if signature.get("inputs") == ["hha", "rgb"]:
            raise _refuse_inputs(path, "RGB and HHA inputs")
        outputs = signature.get("outputs", [])
        tasks = [name[len("logits_") :] for name in outputs if name.startswith("logits_")]
        self.task = _pick_task(path, tasks, task)
        self._output = "logits" if self.task is None else f"logits_{self.task}"
        if signature.get("inputs") != ["images"] or self._output not in outputs:
            raise ModelError(
                f"--model {path!r} is not a kfcn TFLite file: expected a serving_default "
                f"signature images -> logits (kfcn export tflite). Found: {signatures}"
            )
        self._runner = interpreter.get_signature_runner("serving_default")
        details = self._runner.get_input_details()["images"]
        shape = tuple(int(v) for v in details["shape"])
        if len(shape) == 4 and shape[3] == 4:
            raise _refuse_inputs(path, "RGB-D input")
        if len(shape) != 4 or shape[0] != 1 or shape[3] != 3:
            raise ModelError(f"--model {path!r}: input shape {shape}, expected [1, H, W, 3]")
        self.input_size = (shape[1], shape[2])
        self.num_classes = int(self._runner.get_output_details()[self._output]["shape"][-1])
        self.path = path

    def scores(self, batch: np.ndarray) -> np.ndarray:
        out = [
            self._runner(images=np.asarray(image[None], np.float32))[self._output]
            for image in batch
        ]
        return np.concatenate(out, 0).astype(np.float32)


def _latest_serving_version(path: str) -> str:
    """A TF Serving model directory (`kfcn export serving`): its highest version."""
    versions = [
        int(name)
        for name in os.listdir(path)
        if name.isdigit() and metadata.model_format(os.path.join(path, name)) == "saved_model"
    ]
    if not versions:
        raise ModelError(
            f"--model {path!r} is a directory without saved_model.pb (nor numbered TF Serving "
            "versions holding one); expected a .keras file, a SavedModel directory or a "
            ".tflite file written by kfcn"
        )
    chosen = os.path.join(path, str(max(versions)))
    logger.info("%s is a TF Serving model directory; using its latest version %s", path, chosen)
    return chosen


def load_predictor(
    path: str | os.PathLike, num_threads: int | None = None, task: str | None = None
) -> Predictor:
    """Opens a kfcn model in any of the three formats.

    Args:
        path: A `.keras` file, a SavedModel directory or a `.tflite` file (or a TF
            Serving model directory of numbered SavedModels: the highest is used).
        num_threads: Threads for the TFLite interpreter (default: the runtime's).
        task: For a multi-task model, the task to segment for (default: its first).

    Raises:
        FileNotFoundError: If `path` does not exist.
        ModelError: If it is not a kfcn model in one of the formats, takes other
            inputs than RGB images (RGB-D, RGB-HHA), or has no such `task`.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"--model {path!r} does not exist")
    kind = metadata.model_format(path)
    if kind is None and os.path.isdir(path):
        path, kind = _latest_serving_version(path), "saved_model"
    if kind == "keras":
        return KerasPredictor(path, task)
    if kind == "saved_model":
        return SavedModelPredictor(path, task)
    if kind == "tflite":
        return TFLitePredictor(path, num_threads, task)
    raise ModelError(
        f"--model {path!r} is not a model file; expected a .keras file, a SavedModel "
        "directory or a .tflite file written by kfcn"
    )


# --------------------------------------------------------------------------- inference


def tile_scores(
    scores: Callable[[np.ndarray], np.ndarray],
    image: np.ndarray,
    tile: tuple[int, int],
    stride: tuple[int, int] | None = None,
    batch_size: int = 4,
) -> np.ndarray:
    """Sliding-window scores [H, W, C] of one image over any `scores(batch)` function.

    `kfcn.evaluation.slide_scores`, the computation of `predict_slide`, for models
    that are not Keras models (imported here on use: it loads TensorFlow).
    """
    from kfcn.evaluation import slide_scores

    return slide_scores(scores, image, tile, stride, batch_size)


def check_tile(predictor: Predictor, tile: tuple[int, int] | None) -> None:
    """Raises ValueError if `tile` differs from a TFLite file's fixed input size."""
    if predictor.input_size is not None and tile is not None:
        if tuple(tile) != tuple(predictor.input_size):
            height, width = predictor.input_size
            raise ValueError(
                f"--tile {tile[0]}x{tile[1]} differs from the TFLite file's fixed input size "
                f"{height}x{width}; omit --tile (images are tiled at the input size) or pass "
                f"--tile {height}x{width}"
            )


def _test_time_scales(scales: Sequence[float] | None, flip: bool) -> tuple[float, ...] | None:
    """The scales to predict at: `scales`, (1.0,) for a mirrored pass alone, or None."""
    if scales is None:
        return (1.0,) if flip else None
    return tuple(float(s) for s in scales)


def check_scales(predictor: Predictor, scales: Sequence[float] | None, flip: bool = False) -> None:
    """Raises ValueError unless test-time `scales` or `flip` can run here (Keras only)."""
    scales = _test_time_scales(scales, flip)
    if scales is None:
        return
    if not scales or not all(float(s) > 0 for s in scales):
        raise ValueError(f"--scales must be positive numbers. Received: --scales={scales!r}")
    if not isinstance(predictor, KerasPredictor):
        raise ValueError(
            f"--scales/--flip (test-time scales and mirroring) need a .keras model or a "
            f"preset; --model {predictor.path!r} is a {predictor.kind} file"
        )


def image_scores(
    predictor: Predictor,
    image: np.ndarray,
    tile: tuple[int, int] | None = None,
    stride: tuple[int, int] | None = None,
    batch_size: int = 4,
    scales: Sequence[float] | None = None,
    flip: bool = False,
) -> np.ndarray:
    """Class scores [H, W, C] of one image: whole, in tiles, or at several scales.

    A TFLite file always runs at its input size: an image of another size is
    tiled with windows of that size (`tile`, if given, must equal it). With
    `scales` (a Keras model only) the image is predicted at each scale, and
    mirrored with `flip`, as `kfcn.evaluation.predict_msflip` does (each in tiles
    with `tile`); the averaged probabilities come back as their logarithms, so
    the scores stay logits (softmax gives the averaged probabilities back).

    Raises:
        ValueError: If `tile` differs from a TFLite file's input size, or `scales`
            are given for a model that is not a Keras model.
    """
    image = np.asarray(image, np.float32)
    scales = _test_time_scales(scales, flip)
    check_tile(predictor, tile)
    check_scales(predictor, scales)
    if scales is not None:
        from kfcn.evaluation import predict_msflip

        probabilities = np.asarray(
            predict_msflip(predictor.forward, image, scales, flip, crop_size=tile, stride=stride)
        )
        return np.log(np.maximum(probabilities, np.finfo(np.float32).tiny))
    if predictor.input_size is not None:
        if image.shape[:2] == predictor.input_size:
            return predictor.scores(image[None])[0]
        return tile_scores(predictor.scores, image, predictor.input_size, stride, batch_size)
    if tile is None:
        return predictor.scores(image[None])[0]
    if isinstance(predictor, KerasPredictor):
        from kfcn.evaluation import predict_slide

        return np.asarray(
            predict_slide(predictor.forward, image, tile, stride, batch_size=batch_size)
        )
    return tile_scores(predictor.scores, image, tile, stride, batch_size)


def softmax(scores: np.ndarray, scores_are: str) -> np.ndarray:
    """Per-pixel probabilities from `Predictor.scores` output (float32)."""
    if scores_are != "logits":
        return scores / np.maximum(scores.sum(-1, keepdims=True), 1e-12)
    shifted = np.exp(scores - scores.max(-1, keepdims=True))
    return shifted / shifted.sum(-1, keepdims=True)


@dataclasses.dataclass
class Prediction:
    """One image's result (or why there is none).

    Attributes:
        item: The input.
        image: uint8 [H, W, 3] (None on failure).
        scores: float32 [H, W, C] (None on failure).
        error: One-line reason the image has no result.
    """

    item: InputImage
    image: np.ndarray | None = None
    scores: np.ndarray | None = None
    error: str | None = None


def iter_predictions(
    predictor: Predictor,
    images: Sequence[InputImage],
    batch_size: int = 4,
    tile: tuple[int, int] | None = None,
    stride: tuple[int, int] | None = None,
    scales: Sequence[float] | None = None,
    flip: bool = False,
) -> Iterator[Prediction]:
    """Predicts every image, batching images of one size together.

    Images are grouped by size (read from their headers) and sent `batch_size` at
    a time; with `tile` (or a TFLite file at another size) one at a time, the
    windows batched; with `scales` one at a time (see `image_scores`). An image
    that cannot be read yields a `Prediction` with `error` set and does not stop
    the rest. Order: by size group, then input order.
    """
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1. Received: batch_size={batch_size}")
    scales = _test_time_scales(scales, flip)
    groups: dict[Any, list[InputImage]] = {}
    for item in images:
        groups.setdefault(_image_size(item.path), []).append(item)
    limit = batch_size if predictor.max_batch is None else min(batch_size, predictor.max_batch)
    for size, members in groups.items():
        fits = predictor.input_size is None or size == predictor.input_size
        whole = size is not None and tile is None and fits and scales is None
        step = limit if whole else 1
        for first in range(0, len(members), step):
            chunk = members[first : first + step]
            loaded: list[tuple[InputImage, np.ndarray]] = []
            for item in chunk:
                try:
                    array = read_image(item.path)
                except ValueError as error:  # kfcn.data.DataError names the file
                    yield Prediction(item, error=str(error))
                    continue
                if array.shape[:2] != size:  # header and pixels disagree: predict alone
                    yield _predict_one(
                        predictor, item, array, tile, stride, batch_size, scales, flip
                    )
                    continue
                loaded.append((item, array))
            if not loaded:
                continue
            if not whole:
                for item, array in loaded:
                    yield _predict_one(
                        predictor, item, array, tile, stride, batch_size, scales, flip
                    )
                continue
            batch = np.stack([array for _, array in loaded]).astype(np.float32)
            try:
                out = predictor.scores(batch)
            except Exception as error:  # noqa: BLE001 - e.g. out of memory: report per image
                for item, _ in loaded:
                    yield Prediction(item, error=_failure(item.path, error))
                continue
            for (item, array), scores in zip(loaded, out, strict=True):
                yield Prediction(item, image=array, scores=scores)


def _failure(path: str, error: BaseException) -> str:
    text = " ".join(str(error).split())[:300] or type(error).__name__
    hint = " (out of memory? try --tile)" if "OOM" in text or "memory" in text.lower() else ""
    return f"{path}: prediction failed: {text}{hint}"


def _predict_one(predictor, item, array, tile, stride, batch_size, scales, flip) -> Prediction:
    try:
        scores = image_scores(predictor, array, tile, stride, batch_size, scales, flip)
    except Exception as error:  # noqa: BLE001 - e.g. out of memory: report per image
        return Prediction(item, error=_failure(item.path, error))
    return Prediction(item, image=array, scores=scores)


# --------------------------------------------------------------------------- outputs


def resolve_class_info(
    predictor: Predictor, palette_name: str | None = None
) -> tuple[metadata.ClassInfo, str]:
    """Class names and colours for the model's outputs, and where they came from.

    `palette_name` (voc, camvid, cityscapes, ade20k, generic) sets the colours (and,
    for a dataset of the model's number of classes whose names the model does not
    carry, the names). Otherwise the model's own `ClassInfo`, else "class_i" names
    with the generic palette.

    Returns:
        (ClassInfo, source) with source "model", "--palette NAME" or "generic".
    """
    count = predictor.num_classes
    carried = metadata.read_class_info(predictor.path)
    if isinstance(carried, metadata.TaskClassInfo):  # the predicted task's names
        carried = carried.tasks.get(predictor.task)
    if carried is not None and carried.num_classes != count:
        logger.warning(
            "%s carries %d class names for %d outputs; ignoring them",
            predictor.path,
            carried.num_classes,
            count,
        )
        carried = None
    if palette_name:
        if carried is not None:
            names = carried.names
        elif palette_name in metadata.KNOWN_DATASETS and (
            metadata.KNOWN_DATASETS[palette_name][0] == count
        ):
            names = metadata.class_info_for_dataset(palette_name, count).names
        else:
            names = [f"class_{i}" for i in range(count)]
        colours = visualize.palette(palette_name, count).tolist()
        return metadata.ClassInfo(names, colours, dataset=palette_name), f"--palette {palette_name}"
    if carried is not None:
        return carried, "model"
    logger.info(
        "%s carries no class names; using class_0..class_%d and the generic palette "
        "(--palette picks a dataset's colours)",
        predictor.path,
        count - 1,
    )
    return metadata.class_info_for_dataset("generic", count), "generic"


def write_class_map_png(class_map: np.ndarray, colours: np.ndarray, path: str) -> None:
    """Writes class ids as an indexed (mode "P") PNG whose palette is `colours`."""
    from PIL import Image

    picture = Image.fromarray(class_map.astype(np.uint8), mode="P")
    table = np.zeros((MAX_CLASSES, 3), np.uint8)
    table[: len(colours)] = np.asarray(colours, np.uint8)[:MAX_CLASSES]
    picture.putpalette(table.reshape(-1).tolist())
    with atomic_output(path, suffix=".png") as tmp:
        picture.save(tmp, format="PNG")


def _write_jpeg(rgb: np.ndarray, path: str, quality: int = 90) -> None:
    from PIL import Image

    with atomic_output(path, suffix=".jpg") as tmp:
        Image.fromarray(rgb).save(tmp, format="JPEG", quality=quality)


def _write_npy(array: np.ndarray, path: str) -> None:
    with atomic_output(path, suffix=".npy") as tmp:
        np.save(tmp, array)


def class_fractions(class_map: np.ndarray, names: Sequence[str]) -> dict[str, float]:
    """{class name: share of the pixels} for the classes present, in class order."""
    counts = np.bincount(class_map.reshape(-1), minlength=len(names))
    total = max(int(class_map.size), 1)
    return {
        str(names[i]): round(int(c) / total, 6) for i, c in enumerate(counts[: len(names)]) if c
    }


def predict_to_directory(
    model: str | os.PathLike | Predictor,
    inputs: Sequence[str] | Sequence[InputImage],
    output_dir: str | os.PathLike,
    *,
    batch_size: int = 4,
    tile: tuple[int, int] | None = None,
    stride: tuple[int, int] | None = None,
    scales: Sequence[float] | None = None,
    flip: bool = False,
    probabilities: bool = False,
    palette_name: str | None = None,
    alpha: float = 0.5,
    legend: bool = True,
    on_image: Callable[[Prediction], None] | None = None,
) -> dict[str, Any]:
    """Segments images and writes class maps, overlays and a summary.

    Writes, for each input with output name NAME: `NAME.png` (indexed PNG of the
    input's size, palette = class colours), `NAME_overlay.jpg` (blend with `alpha`,
    legend of the classes present to the right) and with `probabilities`
    `NAME_probs.npy` (float16 softmax [H, W, C]); then `summary.json` (the return
    value). Every file is written atomically.

    Args:
        model: A model path (see `load_predictor`) or a `Predictor`.
        inputs: Image files, folders or globs (see `find_images`), or its result.
        output_dir: Created if missing.
        batch_size: Images (of one size) per forward pass; windows per pass with tiles.
        tile: Sliding-window size (height, width), for images too large for memory.
        stride: Window step; default 2/3 of the tile.
        scales: Test-time resize factors (a Keras model only), e.g. (0.75, 1.0, 1.25):
            probabilities averaged over them (see `image_scores`).
        flip: With `scales`, also predict each image mirrored.
        probabilities: Also write `NAME_probs.npy`.
        palette_name: Colours to use instead of the model's (see `resolve_class_info`).
        alpha: Weight of the class colours in the overlay.
        legend: Draw the overlay's legend.
        on_image: Called after each image (a progress bar's update).

    Returns:
        The summary: model, format, class names and palette (with their source),
        and "images": {NAME: {"input", "height", "width", "class_map", "overlay",
        ["probabilities"], "fractions": {class name: pixel share, classes present}}},
        and "failed": [{"input", "error"}] for images that could not be read.

    Raises:
        InputError: For INPUT arguments that match nothing.
        ModelError: For a model that is not a kfcn model, or has > 256 classes.
        ValueError: For a `tile` that a TFLite file cannot take, or `scales` for a
            model that is not a Keras model.
    """
    output_dir = os.path.abspath(os.fspath(output_dir))
    if all(isinstance(item, InputImage) for item in inputs):
        images = list(inputs)  # already expanded by find_images
    else:
        images = find_images(inputs, exclude_dir=output_dir)
    predictor = model if isinstance(model, Predictor) else load_predictor(model)
    if predictor.num_classes > MAX_CLASSES:
        raise ModelError(
            f"--model {predictor.path!r} has {predictor.num_classes} classes; indexed PNG "
            f"class maps hold at most {MAX_CLASSES}"
        )
    check_tile(predictor, tile)
    scales = _test_time_scales(scales, flip)
    check_scales(predictor, scales)
    if probabilities and predictor.scores_are == "one_hot":
        raise ModelError(
            f"--probabilities: the SavedModel {predictor.path!r} was exported without probabilities"
        )
    info, source = resolve_class_info(predictor, palette_name)
    colours = np.asarray(info.palette, np.uint8)
    os.makedirs(output_dir, exist_ok=True)
    results: dict[str, dict[str, Any]] = {}
    failed: list[dict[str, str]] = []
    for prediction in iter_predictions(predictor, images, batch_size, tile, stride, scales, flip):
        item = prediction.item
        if prediction.error is not None:
            failed.append({"input": item.path, "error": prediction.error})
        else:
            results[item.name] = _write_one(
                prediction,
                output_dir,
                info,
                colours,
                predictor.scores_are,
                probabilities,
                alpha,
                legend,
            )
        if on_image is not None:
            on_image(prediction)
    order = {item.name: index for index, item in enumerate(images)}
    summary = {
        "model": os.path.abspath(predictor.path),
        "format": predictor.kind,
        "num_classes": predictor.num_classes,
        "class_names": info.names,
        "palette": info.palette,
        "class_info_source": source,
        "tile": list(tile) if tile else None,
        "scales": list(scales) if scales else None,
        "flip": bool(flip),
        "images": dict(sorted(results.items(), key=lambda kv: order[kv[0]])),
        "failed": failed,
    }
    # Not sorted: images stay in input order and fractions in class order.
    text = json.dumps(summary, indent=2) + "\n"
    write_text_atomically(text, os.path.join(output_dir, SUMMARY_FILE))
    return summary


def _write_one(prediction, output_dir, info, colours, scores_are, probabilities, alpha, legend):
    item, image, scores = prediction.item, prediction.image, prediction.scores
    class_map = scores.argmax(-1).astype(np.uint8)
    base = os.path.join(output_dir, *item.name.split("/"))
    os.makedirs(os.path.dirname(base), exist_ok=True)
    write_class_map_png(class_map, colours, base + ".png")
    picture = visualize.overlay(image, class_map, colours, info.names, alpha, legend)
    _write_jpeg(picture, base + "_overlay.jpg")
    record = {
        "input": item.path,
        "height": int(image.shape[0]),
        "width": int(image.shape[1]),
        "class_map": item.name + ".png",
        "overlay": item.name + "_overlay.jpg",
        "fractions": class_fractions(class_map, info.names),
    }
    if probabilities:
        _write_npy(softmax(scores, scores_are).astype(np.float16), base + "_probs.npy")
        record["probabilities"] = item.name + "_probs.npy"
    return record


def load_summary(output_dir: str | os.PathLike) -> dict[str, Any]:
    """Reads `summary.json` from a `predict_to_directory` output directory."""
    with open(os.path.join(os.fspath(output_dir), SUMMARY_FILE), encoding="utf-8") as f:
        return json.load(f)
