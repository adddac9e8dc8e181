"""What every exporter shares: loading and checking the model, input sizes.

Artifacts are written through `kfcn.files` (the one atomic writer): built under a
temporary name beside their destination and renamed into place only when
complete, so a reader (a model server polling a directory, a build step picking
up a file) never sees a half-written one, and a failed or killed export leaves
nothing at the destination.
"""

from __future__ import annotations

import logging
import os
import zipfile

logger = logging.getLogger(__name__)


def check_input_size(
    size: tuple[int, int] | list[int], name: str = "input_size"
) -> tuple[int, int]:
    """Checks an image size given as (height, width) and returns it as ints.

    Text such as "512x512" is the command line's business: `kfcn.cli.args.parse_size`
    is the one parser. For callers of the earlier API an "HxW" string is still
    accepted and handed to that parser (the bare "N" form is refused here, as it
    was: a library call should say both sides).

    Args:
        size: (height, width), positive integers.
        name: The argument's name, for the error message.

    Returns:
        (height, width).

    Raises:
        ValueError: If the size is not two positive integers.
    """
    if isinstance(size, str):
        from kfcn.cli.args import parse_size

        if "x" not in size.lower():
            raise ValueError(f"`{name}` must be (height, width). Received: {name}={size!r}")
        return parse_size(size, name)
    try:
        height, width = (int(v) for v in size)
    except (TypeError, ValueError):
        raise ValueError(
            f"`{name}` must be (height, width), two positive integers. Received: {name}={size!r}"
        ) from None
    if height < 1 or width < 1 or (height, width) != tuple(size):
        raise ValueError(f"`{name}` must be two positive integers. Received: {name}={size!r}")
    return height, width


def check_segmentation_model(model, source: str = "model", require_kfcn: bool = True) -> int:
    """Checks that a Keras model follows the kfcn contract.

    The contract (kfcn.build_fcn): one input of RGB images (batch, H, W, 3) with any
    H and W, one output of logits (batch, H, W, num_classes) at the input's size.

    Args:
        model: A keras.Model.
        source: Where the model came from, for error messages.
        require_kfcn: Also require kfcn layers (the exporters rely on the model
            carrying its preprocessing); False accepts any model of that shape.

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
    if require_kfcn and not kfcn_layers:
        raise ValueError(
            f"{source} is not a kfcn model: it has no kfcn layers (kfcn models carry their "
            "preprocessing as a kfcn>Preprocess layer). Build it with kfcn.build_fcn()."
        )
    return int(out_shape[-1])


def load_segmentation_model(path: str | os.PathLike, require_kfcn: bool = True):
    """Loads a .keras file with `kfcn.load_model` and checks it is a segmentation model.

    Args:
        path: A .keras file written by `model.save()`.
        require_kfcn: See `check_segmentation_model`.

    Returns:
        The keras.Model without auxiliary outputs (`kfcn.inference_model`): one of
        the kinds `kfcn.export.model_io.describe` accepts (with `require_kfcn`), else
        one RGB input and one logits output.

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
    from kfcn.dilated_fcn import inference_model

    model = inference_model(model)  # drops auxiliary heads (training only)
    if require_kfcn:
        # Any kind of kfcn model: RGB-D, RGB-HHA and multi-task ones too.
        from kfcn.export.model_io import describe

        describe(model, source=f"`model` {path!r}")
    else:
        check_segmentation_model(model, source=f"`model` {path!r}", require_kfcn=False)
    return model
