"""What every exporter shares: loading and checking the model, sizes, atomic writes.

Artifacts are built under a temporary name beside their destination and renamed
into place only when complete, so a reader (a model server polling a directory,
a build step picking up a file) never sees a half-written one, and a failed or
killed export leaves nothing at the destination.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import zipfile
from collections.abc import Iterator

logger = logging.getLogger(__name__)


def parse_input_size(size: str | tuple[int, int] | list[int]) -> tuple[int, int]:
    """Parses an image size given as "HxW" (e.g. "512x512") or (H, W).

    Args:
        size: "HxW" string or a pair of positive integers.

    Returns:
        (height, width).

    Raises:
        ValueError: If the size is malformed or not positive.
    """
    if isinstance(size, str):
        match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", size)
        if not match:
            raise ValueError(
                f"`input_size` must be 'HxW' with positive integers, e.g. '512x512'. "
                f"Received: input_size={size!r}"
            )
        height, width = int(match.group(1)), int(match.group(2))
    else:
        try:
            height, width = (int(v) for v in size)
        except (TypeError, ValueError):
            raise ValueError(
                f"`input_size` must be 'HxW' or (height, width). Received: input_size={size!r}"
            ) from None
    if height < 1 or width < 1:
        raise ValueError(
            f"`input_size` must have height and width >= 1. Received: input_size={size!r}"
        )
    return height, width


def check_segmentation_model(model, source: str = "model") -> int:
    """Checks that a Keras model follows the kfcn contract.

    The contract (kfcn.build_fcn): one input of RGB images (batch, H, W, 3) with any
    H and W, one output of logits (batch, H, W, num_classes) at the input's size.

    Args:
        model: A keras.Model.
        source: Where the model came from, for error messages.

    Returns:
        The number of classes.

    Raises:
        ValueError: If the model is not a kfcn segmentation model.
    """
    import keras

    if not isinstance(model, keras.Model):
        raise ValueError(f"{source} is not a keras.Model. Received: {type(model).__name__}")
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ValueError(
            f"{source} is not a kfcn segmentation model: expected one image input and one "
            f"logits output, got {len(model.inputs)} inputs and {len(model.outputs)} outputs"
        )
    in_shape = tuple(model.inputs[0].shape)
    out_shape = tuple(model.outputs[0].shape)
    if len(in_shape) != 4 or in_shape[-1] != 3:
        raise ValueError(
            f"{source} is not a kfcn segmentation model: input shape {in_shape}, expected "
            "(batch, height, width, 3)"
        )
    if len(out_shape) != 4 or out_shape[-1] is None:
        raise ValueError(
            f"{source} is not a kfcn segmentation model: output shape {out_shape}, expected "
            "(batch, height, width, num_classes) logits"
        )
    kfcn_layers = [
        layer
        for layer in model.layers
        if (keras.saving.get_registered_name(type(layer)) or "").startswith("kfcn>")
    ]
    if not kfcn_layers:
        raise ValueError(
            f"{source} is not a kfcn model: it has no kfcn layers (kfcn models carry their "
            "preprocessing as a kfcn>Preprocess layer). Build it with kfcn.build_fcn()."
        )
    return int(out_shape[-1])


def load_segmentation_model(path: str | os.PathLike):
    """Loads a .keras file and checks that it holds a kfcn segmentation model.

    Args:
        path: A .keras file written by `model.save()`.

    Returns:
        The keras.Model.

    Raises:
        FileNotFoundError: If `path` does not exist.
        ValueError: If the file is not a Keras archive or not a kfcn model.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"`model` file not found. Received: model={path!r}")
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"`model` must be a .keras archive written by model.save(); {path!r} is not a "
            "zip archive"
        )
    from kfcn.fcn import load_model  # registers kfcn's layers, losses and metrics

    try:
        model = load_model(path, compile=False)
    except Exception as err:  # keras raises many types for a foreign archive
        raise ValueError(f"Could not load `model` {path!r} as a Keras model: {err}") from err
    check_segmentation_model(model, source=f"`model` {path!r}")
    return model


def _temp_sibling(final_path: str, tag: str) -> str:
    parent, name = os.path.split(os.path.abspath(final_path))
    return os.path.join(parent, f".{name}.{tag}-{os.getpid()}")


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def replace_path(tmp_path: str, final_path: str, overwrite: bool) -> None:
    """Renames a finished artifact into place.

    Without `overwrite`, an existing `final_path` is an error (checked again here,
    as another process may have written it meanwhile). With `overwrite`, the old
    artifact is first renamed aside and deleted after the new one is in place, so
    `final_path` is always either the complete old or the complete new artifact
    (apart from the instant between the two renames).

    Raises:
        FileExistsError: If `final_path` exists and `overwrite` is False.
    """
    if os.path.lexists(final_path):
        if not overwrite:
            raise FileExistsError(
                f"Output {final_path!r} already exists; pass overwrite=True (--overwrite) "
                "to replace it"
            )
        old = _temp_sibling(final_path, "old")
        os.rename(final_path, old)
        os.rename(tmp_path, final_path)
        _remove(old)
    else:
        os.rename(tmp_path, final_path)


@contextlib.contextmanager
def atomic_output(
    final_path: str | os.PathLike, overwrite: bool = False, is_dir: bool = True
) -> Iterator[str]:
    """Yields a temporary path to build an artifact in; renames it on success.

    Args:
        final_path: Where the artifact goes.
        overwrite: Replace an existing artifact instead of failing.
        is_dir: Whether the artifact is a directory (created empty) or a file.

    Yields:
        The temporary path, in the same directory as `final_path` (so the final
        rename is atomic on POSIX file systems).

    Raises:
        FileExistsError: If `final_path` exists and `overwrite` is False (checked
            before any work is done).
        FileNotFoundError: If the parent directory of `final_path` does not exist.
    """
    final_path = os.path.abspath(os.fspath(final_path))
    if os.path.lexists(final_path) and not overwrite:
        raise FileExistsError(
            f"Output {final_path!r} already exists; pass overwrite=True (--overwrite) to replace it"
        )
    parent = os.path.dirname(final_path)
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"Output directory {parent!r} does not exist")
    tmp = _temp_sibling(final_path, "tmp")
    _remove(tmp)
    if is_dir:
        os.makedirs(tmp)
    try:
        yield tmp
        replace_path(tmp, final_path, overwrite)
    except BaseException:
        _remove(tmp)
        raise
