"""Trained models that ship inside the package (`from_preset`, `list_presets`).

A preset is a folder under `kfcn/preset_files/<name>/` with three files:

- `config.json`: the Keras functional config of the model (`model.to_json()`),
  exactly as training built it;
- `weights.npz`: its weights keyed by variable path. Kernels of more than
  `FLOAT16_MIN_SIZE` values are stored as float16 (half the bytes); biases and
  normalization statistics stay float32. The model computes in float32.
- `preset.json`: the model card: what the net is, its classes and palette, the
  command that trained it, on which data and machine, how long it took, its
  validation scores, and the SHA-256 of `weights.npz`, checked on every load.

`from_preset(name)` rebuilds the Keras model. Wherever the `kfcn` command
accepts a model path (`predict`, `evaluate`, `export`, `train --init_from`), a
preset name works too: `preset_model_path(name)` writes the preset once as an
ordinary kfcn `.keras` file (with its class names) under the cache directory
(`$KFCN_CACHE_DIR`, default `~/.cache/kfcn`) and returns its path.

Listing presets reads JSON only; TensorFlow loads when a model is built.

Example:
    ```python
    import kfcn
    kfcn.list_presets()["camvid_fcn8s_mobilenetv2"]["validation"]["mean_iou"]
    model = kfcn.from_preset("camvid_fcn8s_mobilenetv2")
    model.class_info.names[:3]            # ['Sky', 'Building', 'Pole']
    ```
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from typing import Any

#: Card format written by `write_preset` and read by `list_presets`.
FORMAT = "kfcn.preset/1"
#: Folder of the shipped presets, one subfolder per preset.
PRESET_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "preset_files")
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.npz"
CARD_FILE = "preset.json"
#: Weights with at least this many values are stored as float16.
FLOAT16_MIN_SIZE = 4096
#: Shipped size limit of one preset's files, in bytes.
MAX_PRESET_BYTES = 10 * 1024 * 1024


class PresetError(ValueError):
    """An unknown preset name, or a preset whose files are missing or damaged."""


def preset_names() -> list[str]:
    """The names of the shipped presets, sorted (reads no file contents)."""
    if not os.path.isdir(PRESET_DIR):
        return []
    return sorted(
        name
        for name in os.listdir(PRESET_DIR)
        if os.path.isfile(os.path.join(PRESET_DIR, name, CARD_FILE))
    )


def is_preset(name: str | os.PathLike) -> bool:
    """True if `name` is a shipped preset's name (not a path)."""
    return isinstance(name, str) and name in preset_names()


def _folder(name: str) -> str:
    if not isinstance(name, str) or name not in preset_names():
        known = ", ".join(preset_names()) or "none"
        raise PresetError(f"unknown preset {name!r}; the shipped presets are: {known}")
    return os.path.join(PRESET_DIR, name)


def model_card(name: str) -> dict[str, Any]:
    """The model card (`preset.json`) of preset `name`.

    Raises:
        PresetError: If `name` is not a shipped preset or its card is unreadable.
    """
    path = os.path.join(_folder(name), CARD_FILE)
    try:
        with open(path, encoding="utf-8") as handle:
            card = json.load(handle)
    except (OSError, ValueError) as error:
        raise PresetError(f"preset {name!r}: cannot read {path}: {error}") from error
    if card.get("format") != FORMAT:
        raise PresetError(
            f"preset {name!r}: {path} has format {card.get('format')!r}; this kfcn reads {FORMAT!r}"
        )
    return card


def list_presets() -> dict[str, dict[str, Any]]:
    """The shipped presets: `{name: model card}`.

    Each card holds "description", "architecture", "class_info", "training"
    (the command, data, steps, wall-clock minutes, machine, date),
    "validation" (the val split's scores, also with test-time flip) and
    "weights" (file, SHA-256, parameters, float16 argmax agreement); where
    set, "input_scale" (applied by `from_preset`) and "logit_adjustment" (tau
    and the class weights behind the net's "score_adjust" layer).
    """
    return {name: model_card(name) for name in preset_names()}


def folder_bytes(folder: str | os.PathLike) -> int:
    """The bytes of the files in a preset folder (what `MAX_PRESET_BYTES` limits)."""
    folder = os.fspath(folder)
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes, as hex (read in 1 MB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _class_info(card: dict[str, Any]) -> Any:
    from kfcn.metadata import class_info_from_dict

    return class_info_from_dict(card["class_info"])


def _input_scale(card: dict[str, Any], override: float | None) -> float:
    """The input scale a preset runs at: `override`, else its card's, else 1.0."""
    from kfcn.input_scale import check_scale

    return check_scale(card.get("input_scale", 1.0) if override is None else override)


def from_preset(name: str, input_scale: float | None = None) -> Any:
    """Builds the Keras model of a shipped preset.

    A card with an "input_scale" (e.g. 1.25: the test resolution its scores were
    measured at) gets the net wrapped by `kfcn.input_scale.with_input_scale`:
    it takes and returns native-size maps and runs the net at that multiple of
    the input's height and width.

    Args:
        name: A name from `list_presets()`, e.g. "camvid_fcn8s_mobilenetv2".
        input_scale: Run the net at this scale instead of the card's; 1.0 gives
            the plain net as trained.

    Returns:
        The float32 Keras model with its weights; `model.class_info` is its
        `kfcn.metadata.ClassInfo` (class names, palette, dataset, ignore label).

    Raises:
        PresetError: If `name` is unknown, or the preset's files are missing,
            damaged (SHA-256 mismatch) or do not fit its config.
        ValueError: If `input_scale` is not a finite number > 0.
    """
    import keras
    import numpy as np

    import kfcn.layers  # noqa: F401 - registers kfcn's layers for the config

    card = model_card(name)
    scale = _input_scale(card, input_scale)
    folder = _folder(name)
    weights_path = os.path.join(folder, WEIGHTS_FILE)
    expected = card["weights"]["sha256"]
    try:
        actual = file_sha256(weights_path)
        with open(os.path.join(folder, CONFIG_FILE), encoding="utf-8") as handle:
            config = handle.read()
    except OSError as error:
        raise PresetError(f"preset {name!r}: {error}") from error
    if actual != expected:
        raise PresetError(
            f"preset {name!r}: {weights_path} has SHA-256 {actual}, its card says {expected}; "
            "reinstall kfcn"
        )
    model = keras.models.model_from_json(config)
    with np.load(weights_path) as stored:
        names = [variable.path for variable in model.weights]
        missing = sorted(set(names) - set(stored.files))
        extra = sorted(set(stored.files) - set(names))
        if missing or extra:
            raise PresetError(
                f"preset {name!r}: {weights_path} does not fit {CONFIG_FILE}: "
                f"missing {missing[:3]}, unexpected {extra[:3]}"
            )
        for variable in model.weights:
            value = stored[variable.path]
            if tuple(value.shape) != tuple(variable.shape):
                raise PresetError(
                    f"preset {name!r}: {variable.path} has shape {value.shape} in {WEIGHTS_FILE}, "
                    f"the model expects {tuple(variable.shape)}"
                )
            variable.assign(value.astype(variable.dtype))
    if scale != 1.0:
        from kfcn.input_scale import with_input_scale

        model = with_input_scale(model, scale)
    model.class_info = _class_info(card)
    return model


def cache_dir() -> str:
    """Where `preset_model_path` writes: `$KFCN_CACHE_DIR`, default `~/.cache/kfcn`."""
    return os.environ.get("KFCN_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "kfcn"
    )


def preset_model_path(name: str, input_scale: float | None = None) -> str:
    """A kfcn `.keras` file of preset `name` (with its class info), written once.

    The file is `<cache_dir()>/presets/<name>-<sha256[:12]>.keras`, with
    `-x<scale>` before the suffix when the model runs at an input scale other
    than 1.0 (`from_preset`): a new version of the preset's weights, or another
    scale, gets a new file. It is written atomically, so concurrent callers and
    interrupted writes never leave a partial file.

    Raises:
        PresetError: As `from_preset`, or if the cache directory is not writable.
        ValueError: If `input_scale` is not a finite number > 0.
    """
    card = model_card(name)
    scale = _input_scale(card, input_scale)
    suffix = "" if scale == 1.0 else f"-x{scale:g}"
    folder = os.path.join(cache_dir(), "presets")
    path = os.path.join(folder, f"{name}-{card['weights']['sha256'][:12]}{suffix}.keras")
    if os.path.isfile(path):
        return path
    model = from_preset(name, input_scale=scale)
    from kfcn.metadata import save_model

    try:
        save_model(model, path, model.class_info)
    except OSError as error:
        raise PresetError(
            f"preset {name!r}: cannot write {path} ({error}); set KFCN_CACHE_DIR to a writable "
            "directory"
        ) from error
    return path


def resolve_model(path_or_name: str) -> str:
    """`path_or_name` itself if it exists, else the `.keras` file of the preset it names.

    A path that exists wins over a preset of the same name. Anything else is
    returned unchanged, for the caller's own "does not exist" error.
    """
    if os.path.exists(path_or_name) or not is_preset(path_or_name):
        return path_or_name
    return preset_model_path(path_or_name)


def storage_arrays(model: Any) -> dict[str, Any]:
    """The arrays `write_preset` stores: `{variable path: array}`, large ones float16."""
    import numpy as np

    arrays = {}
    for variable in model.weights:
        value = np.asarray(variable.numpy())
        if value.dtype == np.float32 and value.size >= FLOAT16_MIN_SIZE:
            value = value.astype(np.float16)
        arrays[variable.path] = value
    if len(arrays) != len(model.weights):
        raise ValueError("the model's variable paths are not unique; it cannot be a preset")
    return arrays


def write_preset(model: Any, card: dict[str, Any], folder: str | os.PathLike) -> dict[str, Any]:
    """Writes `model` as a preset folder (config, float16 weights, card).

    Args:
        model: The trained float32 Keras model.
        card: The model card without "format" and "weights"["sha256"/"file"/
            "parameters"], which are filled in here; it must hold "class_info".
        folder: The preset folder, `PRESET_DIR/<name>` for a shipped preset.

    Returns:
        The card as written.

    Raises:
        ValueError: If the card lacks "class_info" or the files exceed
            `MAX_PRESET_BYTES`.
    """
    import numpy as np

    from kfcn.files import write_json_atomically, write_text_atomically

    if "class_info" not in card:
        raise ValueError("`card` must hold 'class_info' (names and palette of the classes)")
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    card = copy.deepcopy(card)
    weights_path = os.path.join(folder, WEIGHTS_FILE)
    np.savez_compressed(weights_path, **storage_arrays(model))
    write_text_atomically(model.to_json(), os.path.join(folder, CONFIG_FILE))
    card["format"] = FORMAT
    card.setdefault("weights", {})
    card["weights"].update(
        file=WEIGHTS_FILE,
        sha256=file_sha256(weights_path),
        parameters=int(model.count_params()),
    )
    write_json_atomically(card, os.path.join(folder, CARD_FILE))
    size = folder_bytes(folder)
    if size > MAX_PRESET_BYTES:
        raise ValueError(
            f"preset folder {folder} holds {size} bytes; the limit is {MAX_PRESET_BYTES}"
        )
    return card
