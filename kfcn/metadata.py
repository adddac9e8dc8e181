"""Class names and colours carried by a model file (`ClassInfo`).

A kfcn model's output channels are class ids; what they mean (names, colours for
pictures, the dataset, its ignore label) travels with the model as one small JSON
document, `kfcn_classes.json`:

    {"format": "kfcn.class_info/1", "names": [...], "palette": [[r, g, b], ...],
     "dataset": "camvid", "ignore_label": 255}

stored where each format has room for extra data:

- ``.keras`` file (a zip archive): the entry `kfcn_classes.json` beside Keras'
  `config.json`, `metadata.json` and `model.weights.h5`. Keras ignores entries it
  does not know, so `keras.saving.load_model` (safe mode) loads the file as
  before. A model re-saved by Keras (`model.save`) loses the entry: Keras writes a
  new archive from the in-memory model. `read_class_info` then returns None and
  `kfcn predict` falls back to a generic palette; use `save_model` (or call
  `write_class_info` again after saving) to keep the names.
- SavedModel directory: `assets.extra/kfcn_classes.json` (TensorFlow Serving's
  place for files that are not part of the graph; TF's loader ignores it).
- ``.tflite`` file: a flatbuffer `metadata` entry named "kfcn_classes" whose
  buffer holds the JSON (the schema's place for named, tool-specific data; the
  interpreter ignores it).

Every rewrite goes through `kfcn.files.atomic_output`: a reader sees the old or
the new complete file, never a partial one. Exporters can embed the info before
the first write: `save_model` for `.keras`, `write_class_info(info, tmp_dir)` on
the SavedModel's temporary directory, `tflite_with_class_info(bytes, info)`.

Example:
    ```python
    info = class_info_for_dataset("camvid", 11)
    save_model(model, "run/model.keras", info)      # or write_class_info(info, path)
    read_class_info("run/model.keras").names[:2]    # ['Sky', 'Building']
    ```
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import zipfile
from collections.abc import Sequence
from typing import Any

from kfcn import visualize
from kfcn.files import atomic_output, write_json_atomically

logger = logging.getLogger(__name__)

FORMAT = "kfcn.class_info/1"
#: Name of the JSON entry in a .keras zip and of the file in a SavedModel's assets.extra.
FILENAME = "kfcn_classes.json"
SAVED_MODEL_SUBDIR = "assets.extra"
#: Name of the .tflite metadata entry.
TFLITE_METADATA_NAME = "kfcn_classes"

# ADE20K SceneParsing's 150 classes, in mmsegmentation's order (ADE20KDataset).
ADE20K_CLASS_NAMES = tuple(
    "wall|building|sky|floor|tree|ceiling|road|bed|windowpane|grass|cabinet|sidewalk|person|"
    "earth|door|table|mountain|plant|curtain|chair|car|water|painting|sofa|shelf|house|sea|"
    "mirror|rug|field|armchair|seat|fence|desk|rock|wardrobe|lamp|bathtub|railing|cushion|"
    "base|box|column|signboard|chest of drawers|counter|sand|sink|skyscraper|fireplace|"
    "refrigerator|grandstand|path|stairs|runway|case|pool table|pillow|screen door|stairway|"
    "river|bridge|bookcase|blind|coffee table|toilet|flower|book|hill|bench|countertop|stove|"
    "palm|kitchen island|computer|swivel chair|boat|bar|arcade machine|hovel|bus|towel|"
    "light|truck|tower|chandelier|awning|streetlight|booth|television receiver|airplane|"
    "dirt track|apparel|pole|land|bannister|escalator|ottoman|bottle|buffet|poster|stage|"
    "van|ship|fountain|conveyer belt|canopy|washer|plaything|swimming pool|stool|barrel|"
    "basket|waterfall|tent|bag|minibike|cradle|oven|ball|food|step|tank|trade name|"
    "microwave|pot|animal|bicycle|lake|dishwasher|screen|blanket|sculpture|hood|sconce|"
    "vase|traffic light|tray|ashcan|fan|pier|crt screen|plate|monitor|bulletin board|"
    "shower|radiator|glass|clock|flag".split("|")
)

#: Datasets whose class names and colours are known: name -> (number of classes, palette).
KNOWN_DATASETS = {
    "voc": (21, "voc"),
    "sbd": (21, "voc"),
    "camvid": (11, "camvid"),
    "cityscapes": (19, "cityscapes"),
    "ade20k": (150, "ade20k"),
    "nyud": (40, "nyud"),
}
#: Multi-task datasets: name -> {task: (number of classes, palette)}.
KNOWN_TASK_DATASETS = {"siftflow": {"sem": (33, "siftflow"), "geo": (3, "siftflow_geo")}}
#: Format of the multi-task document: {"format": ..., "tasks": {task: ClassInfo document}}.
TASKS_FORMAT = "kfcn.class_info.tasks/1"
_IGNORE_LABEL = 255


@dataclasses.dataclass
class ClassInfo:
    """What a model's output channels mean.

    Attributes:
        names: One name per class (output channel), unique.
        palette: One [r, g, b] (0..255) per class.
        dataset: The dataset the model was trained on ("camvid", "folder", ...).
        ignore_label: The label value that marks unlabelled pixels, if any.
    """

    names: list[str]
    palette: list[list[int]]
    dataset: str | None = None
    ignore_label: int | None = None

    def __post_init__(self) -> None:
        self.names = [str(name) for name in self.names]
        self.palette = [[int(c) for c in rgb] for rgb in self.palette]
        if not self.names:
            raise ValueError("`names` is empty; a model has at least one class")
        if len(self.palette) != len(self.names):
            raise ValueError(
                f"`palette` has {len(self.palette)} colours for {len(self.names)} `names`"
            )
        bad = [rgb for rgb in self.palette if len(rgb) != 3 or not all(0 <= c <= 255 for c in rgb)]
        if bad:
            raise ValueError(f"`palette` rows must be [r, g, b] in 0..255. Received: {bad[0]}")
        if len(set(self.names)) != len(self.names):
            repeated = sorted({n for n in self.names if self.names.count(n) > 1})
            raise ValueError(f"`names` must be unique. Repeated: {repeated}")

    @property
    def num_classes(self) -> int:
        """The number of classes."""
        return len(self.names)

    def to_dict(self) -> dict[str, Any]:
        """The JSON document stored in model files."""
        return {"format": FORMAT, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ClassInfo:
        """Inverse of `to_dict` (keys other than the fields and "format" are ignored).

        Raises:
            ValueError: If the document is of another format or misses names/palette.
        """
        if not isinstance(values, dict):
            raise ValueError(f"class info must be a JSON object. Received: {type(values).__name__}")
        fmt = values.get("format", FORMAT)
        if fmt != FORMAT:
            raise ValueError(f"class info has format {fmt!r}; this kfcn reads {FORMAT!r}")
        missing = [key for key in ("names", "palette") if key not in values]
        if missing:
            raise ValueError(f"class info lacks {missing}")
        return cls(
            names=list(values["names"]),
            palette=list(values["palette"]),
            dataset=values.get("dataset"),
            ignore_label=values.get("ignore_label"),
        )


@dataclasses.dataclass
class TaskClassInfo:
    """What each output of a multi-task model means (SIFT Flow's "sem" and "geo").

    Stored like `ClassInfo` (same file entries, `write_class_info` and
    `read_class_info`), as `{"format": TASKS_FORMAT, "tasks": {task: ClassInfo
    document}}`; readers of single-task class info see an unknown format and
    ignore it.

    Attributes:
        tasks: One `ClassInfo` per task, keyed as the model's outputs.
    """

    tasks: dict[str, ClassInfo]

    def __post_init__(self) -> None:
        if not isinstance(self.tasks, dict) or not self.tasks:
            raise ValueError(f"`tasks` must be a non-empty dict. Received: {self.tasks!r}")
        self.tasks = {
            str(task): info if isinstance(info, ClassInfo) else ClassInfo.from_dict(info)
            for task, info in self.tasks.items()
        }

    @property
    def num_classes(self) -> dict[str, int]:
        """The number of classes per task."""
        return {task: info.num_classes for task, info in self.tasks.items()}

    @property
    def names(self) -> list[str]:
        """Every task's class names as "task/name", for display (e.g. "geo/sky")."""
        return [f"{task}/{name}" for task, info in self.tasks.items() for name in info.names]

    def to_dict(self) -> dict[str, Any]:
        """The JSON document stored in model files."""
        return {
            "format": TASKS_FORMAT,
            "tasks": {task: info.to_dict() for task, info in self.tasks.items()},
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TaskClassInfo:
        """Inverse of `to_dict`.

        Raises:
            ValueError: If the document is of another format or a task's is invalid.
        """
        if not isinstance(values, dict) or values.get("format") != TASKS_FORMAT:
            raise ValueError(f"multi-task class info must have format {TASKS_FORMAT!r}")
        return cls({task: ClassInfo.from_dict(doc) for task, doc in values["tasks"].items()})


def class_info_from_dict(values: dict[str, Any]) -> ClassInfo | TaskClassInfo:
    """`ClassInfo.from_dict` or, for a multi-task document, `TaskClassInfo.from_dict`."""
    if isinstance(values, dict) and values.get("format") == TASKS_FORMAT:
        return TaskClassInfo.from_dict(values)
    return ClassInfo.from_dict(values)


def class_info_for_tasks(
    dataset: str,
    heads: dict[str, int],
    class_names: dict[str, Sequence[str]] | None = None,
    *,
    ignore_label: int | None = None,
) -> TaskClassInfo:
    """The class names and palettes of a multi-task model's outputs.

    SIFT Flow ("siftflow") gets its 33 semantic and 3 geometric class names
    (`kfcn.data.siftflow`) and palettes; any other dataset "class_0".. and the
    generic palette per task, as `class_info_for_dataset`.

    Args:
        dataset: Dataset name.
        heads: Number of classes per task, as `kfcn.build_fcn(heads=...)`.
        class_names: Names per task to use instead of the dataset's.
        ignore_label: Overrides the dataset's ignore label (known datasets: 255).

    Returns:
        A `TaskClassInfo`.

    Raises:
        ValueError: If `heads` is empty or a task's `class_names` has another length.
    """
    if not heads:
        raise ValueError(f"`heads` must be a non-empty dict. Received: heads={heads!r}")
    key = str(dataset).strip().lower()
    known = KNOWN_TASK_DATASETS.get(key, {})
    tasks = {}
    for task, count in heads.items():
        names = None if class_names is None else class_names.get(task)
        if task in known:
            expected, palette_name = known[task]
            if names is None:
                from kfcn.data import siftflow

                names = list(siftflow.CLASS_NAMES[task])
                if expected != count:
                    logger.warning(
                        "Dataset %r task %r has %d classes but heads[%r]=%d; extra classes "
                        "get generic names",
                        key, task, expected, task, count,
                    )  # fmt: skip
                names = (names + [f"class_{i}" for i in range(len(names), count)])[:count]
            colours = visualize.palette(palette_name, count)
            default_ignore = _IGNORE_LABEL
        else:
            colours = visualize.palette("generic", count)
            default_ignore = None
        if names is None:
            names = [f"class_{i}" for i in range(count)]
        if len(names) != count:
            raise ValueError(
                f"`class_names[{task!r}]` has {len(names)} names for heads[{task!r}]={count}"
            )
        tasks[task] = ClassInfo(
            names=list(names),
            palette=colours.tolist(),
            dataset=key,
            ignore_label=default_ignore if ignore_label is None else int(ignore_label),
        )
    return TaskClassInfo(tasks)


def _known_names(dataset: str) -> tuple[str, ...]:
    # Imported on use: kfcn.data.voc and .cityscapes import TensorFlow Datasets.
    if dataset in ("voc", "sbd"):
        from kfcn.data import voc

        return tuple(voc.CLASS_NAMES)
    if dataset == "cityscapes":
        from kfcn.data import cityscapes

        return tuple(cityscapes.CLASS_NAMES)
    if dataset == "camvid":
        from kfcn.data import listfile

        return tuple(listfile.CAMVID_CLASS_NAMES)
    if dataset == "nyud":
        from kfcn.data import nyud

        return tuple(nyud.CLASS_NAMES)
    return ADE20K_CLASS_NAMES


def class_info_for_dataset(
    dataset: str,
    num_classes: int,
    class_names: Sequence[str] | None = None,
    *,
    ignore_label: int | None = None,
) -> ClassInfo:
    """The class names and palette of a dataset.

    Known datasets (voc, sbd, camvid, cityscapes, ade20k) get their own names and
    colours; any other (e.g. "folder") gets `class_names` or "class_0".."class_N-1"
    and the generic palette. A known dataset with another number of classes keeps
    its colours for the first classes and adds generic ones (names beyond its own
    become "class_i", with a warning).

    Args:
        dataset: Dataset name as `kfcn.data.load_dataset` takes it.
        num_classes: The model's number of classes.
        class_names: Names to use instead of the dataset's (length `num_classes`).
        ignore_label: Overrides the dataset's ignore label (known datasets: 255).

    Returns:
        A `ClassInfo`.

    Raises:
        ValueError: If `num_classes` < 1 or `class_names` has another length.
    """
    num_classes = int(num_classes)
    if num_classes < 1:
        raise ValueError(f"`num_classes` must be >= 1. Received: num_classes={num_classes}")
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(
            f"`class_names` has {len(class_names)} names for num_classes={num_classes}"
        )
    key = str(dataset).strip().lower()
    if key in KNOWN_DATASETS:
        expected, palette_name = KNOWN_DATASETS[key]
        names = list(_known_names(key))
        if expected != num_classes:
            logger.warning(
                "Dataset %r has %d classes but num_classes=%d; classes beyond its own get "
                "generic names and colours",
                key,
                expected,
                num_classes,
            )
        names = (names + [f"class_{i}" for i in range(len(names), num_classes)])[:num_classes]
        colours = visualize.palette(palette_name, num_classes)
        default_ignore = _IGNORE_LABEL
    else:
        names = [f"class_{i}" for i in range(num_classes)]
        colours = visualize.palette("generic", num_classes)
        default_ignore = None
    if class_names is not None:
        names = [str(name) for name in class_names]
    return ClassInfo(
        names=names,
        palette=colours.tolist(),
        dataset=key,
        ignore_label=default_ignore if ignore_label is None else int(ignore_label),
    )


def model_format(model_path: str | os.PathLike) -> str | None:
    """ "keras", "saved_model", "tflite", or None for anything else (or a missing path)."""
    path = os.fspath(model_path)
    if os.path.isdir(path):
        has_pb = any(
            os.path.isfile(os.path.join(path, name))
            for name in ("saved_model.pb", "saved_model.pbtxt")
        )
        return "saved_model" if has_pb else None
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        head = f.read(8)
    if head[4:8] == b"TFL3":
        return "tflite"
    if zipfile.is_zipfile(path):
        return "keras"
    return None


def write_class_info(info: ClassInfo | TaskClassInfo, model_path: str | os.PathLike) -> None:
    """Stores `info` in a model file or directory (replacing what it held).

    Args:
        info: The class info.
        model_path: A `.keras` file, a SavedModel directory or a `.tflite` file.

    Raises:
        FileNotFoundError: If `model_path` does not exist.
        ValueError: If it is none of the three formats.
    """
    path = os.fspath(model_path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"`model_path` does not exist. Received: {path!r}")
    document = info.to_dict()
    kind = model_format(path)
    if kind == "keras":
        _write_keras(path, document)
    elif kind == "saved_model":
        write_json_atomically(document, os.path.join(path, SAVED_MODEL_SUBDIR, FILENAME))
    elif kind == "tflite":
        _write_tflite(path, info)
    else:
        raise ValueError(
            "`model_path` must be a .keras file, a SavedModel directory or a .tflite file. "
            f"Received: {path!r}"
        )


def read_class_info(model_path: str | os.PathLike) -> ClassInfo | TaskClassInfo | None:
    """The `ClassInfo` (`TaskClassInfo` for a multi-task model) a model file carries, or None.

    None when the path is not one of the three formats, when the model carries no
    class info (e.g. a `.keras` file re-saved by Keras) or when what it carries
    cannot be read (logged as a warning).

    Args:
        model_path: A `.keras` file, a SavedModel directory or a `.tflite` file.
    """
    path = os.fspath(model_path)
    kind = model_format(path)
    try:
        if kind == "keras":
            text = _read_keras(path)
        elif kind == "saved_model":
            entry = os.path.join(path, SAVED_MODEL_SUBDIR, FILENAME)
            text = open(entry, encoding="utf-8").read() if os.path.isfile(entry) else None
        elif kind == "tflite":
            text = _read_tflite(path)
        else:
            return None
        return None if text is None else class_info_from_dict(json.loads(text))
    except (ValueError, KeyError, OSError, zipfile.BadZipFile) as error:
        logger.warning("Ignoring the class info in %s: %s", path, error)
        return None


def save_model(model: Any, path: str | os.PathLike, info: ClassInfo | TaskClassInfo | None) -> None:
    """Saves a Keras model to a `.keras` file with `info` inside, in one atomic step.

    `kfcn.files.save_model_atomically` followed by `write_class_info` would leave a
    moment where the file has no class info; here the entry is added to the
    temporary archive before it is renamed into place.

    Raises:
        ValueError: If `path` does not end in ".keras".
    """
    if not os.fspath(path).endswith(".keras"):
        raise ValueError(f"`path` must end in '.keras'. Received: path={os.fspath(path)!r}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_output(path, suffix=".keras") as tmp:
        model.save(tmp, overwrite=True)
        if info is not None:
            with zipfile.ZipFile(tmp, "a", compression=zipfile.ZIP_DEFLATED) as archive:
                archive.writestr(FILENAME, json.dumps(info.to_dict(), indent=2))


def _read_keras(path: str) -> str | None:
    with zipfile.ZipFile(path) as archive:
        if FILENAME not in archive.namelist():
            return None
        return archive.read(FILENAME).decode("utf-8")


def _write_keras(path: str, document: dict[str, Any]) -> None:
    # Copy every other entry (streamed, with its compression) into a new archive.
    with atomic_output(path, suffix=".keras") as tmp:
        with zipfile.ZipFile(path) as source, zipfile.ZipFile(tmp, "w") as target:
            for item in source.infolist():
                if item.filename == FILENAME:
                    continue
                with source.open(item) as reader, target.open(item, "w") as writer:
                    shutil.copyfileobj(reader, writer, 1 << 20)
            target.writestr(
                FILENAME, json.dumps(document, indent=2), compress_type=zipfile.ZIP_DEFLATED
            )


def _tflite_schema():
    """The TFLite flatbuffer schema module (LiteRT's copy, else TensorFlow's)."""
    try:
        from ai_edge_litert import schema_py_generated as schema
    except ImportError:
        from tensorflow.lite.python import schema_py_generated as schema
    return schema


def _read_tflite(path: str) -> str | None:
    schema = _tflite_schema()
    with open(path, "rb") as f:
        data = f.read()
    model = schema.Model.GetRootAs(data, 0)
    for index in range(model.MetadataLength()):
        entry = model.Metadata(index)
        if entry.Name() is not None and entry.Name().decode() == TFLITE_METADATA_NAME:
            return model.Buffers(entry.Buffer()).DataAsNumpy().tobytes().decode("utf-8")
    return None


def tflite_with_class_info(flatbuffer: bytes, info: ClassInfo | TaskClassInfo) -> bytes:
    """A .tflite flatbuffer with `info` as its "kfcn_classes" metadata entry.

    For exporters, to embed the class info before the file is first written
    (`write_class_info` rewrites an existing file). An existing entry's buffer is
    reused, so rewriting does not grow the file.

    Args:
        flatbuffer: The .tflite bytes (e.g. `TFLiteConverter.convert()`'s result).
        info: The class info.

    Returns:
        The new .tflite bytes; the interpreter runs them exactly as before.
    """
    import flatbuffers
    import numpy as np

    schema = _tflite_schema()
    model = schema.ModelT.InitFromPackedBuf(bytearray(flatbuffer), 0)
    payload = np.frombuffer(json.dumps(info.to_dict()).encode("utf-8"), np.uint8)
    model.metadata = list(model.metadata or [])
    model.buffers = list(model.buffers or [])
    names = [m.name.decode() if isinstance(m.name, bytes) else m.name for m in model.metadata]
    if TFLITE_METADATA_NAME in names:  # rewrite the entry's own buffer, leave no orphan
        buffer = model.buffers[model.metadata[names.index(TFLITE_METADATA_NAME)].buffer]
    else:
        buffer = schema.BufferT()
        model.buffers.append(buffer)
        entry = schema.MetadataT()
        entry.name = TFLITE_METADATA_NAME
        entry.buffer = len(model.buffers) - 1
        model.metadata.append(entry)
    buffer.data = payload
    buffer.offset = buffer.size = 0
    builder = flatbuffers.Builder(len(flatbuffer) + len(payload) + 1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def _write_tflite(path: str, info: ClassInfo | TaskClassInfo) -> None:
    with open(path, "rb") as f:
        data = f.read()
    rewritten = tflite_with_class_info(data, info)
    with atomic_output(path, suffix=".tflite") as tmp:
        with open(tmp, "wb") as f:
            f.write(rewritten)
