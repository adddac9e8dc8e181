"""torchvision and mmsegmentation checkpoints, into Keras models named as their modules.

A torch state dict maps ``<module path>.<parameter>`` to a tensor. kfcn's
ResNets (`kfcn.models.resnet`) name each Keras layer by its torch module path
with "." replaced by "_", so ``layer1.0.conv1.weight`` is the kernel of layer
``layer1_0_conv1`` and ``stem.1.running_var`` the moving variance of ``stem_1``.
Saving the state dict as .npz needs only numpy in the torch environment::

    sd = torch.load("resnet50_v1c.pth", map_location="cpu")
    sd = sd.get("state_dict", sd)  # mmcv checkpoints wrap it
    np.savez("resnet50_v1c.npz", **{k: v.numpy() for k, v in sd.items()})

Conversions: convolution weights OIHW -> HWIO (transposed convolutions IOHW ->
HWOI, the same permutation), linear weights transposed, BatchNorm ``weight``,
``bias``, ``running_mean``, ``running_var`` -> ``gamma``, ``beta``,
``moving_mean``, ``moving_variance``; ``num_batches_tracked`` is skipped.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence

import keras
import numpy as np

logger = logging.getLogger(__name__)

# Key prefixes that wrap a whole network: mmseg's segmentor puts the backbone
# under "backbone.", DataParallel checkpoints start with "module.".
_WRAPPER_PREFIXES = ("module.", "backbone.")
# The module roots of a ResNet: their layers in the model must all be loaded.
_RESNET_ROOTS = ("conv1", "bn1", "stem", "layer1", "layer2", "layer3", "layer4", "fc")
_SKIPPED_PARAMETERS = ("num_batches_tracked",)
_LISTED = 20


def _variables(layer) -> dict[str, object]:
    """torch parameter name -> Keras variable, for one layer."""
    if isinstance(layer, keras.layers.BatchNormalization):
        pairs = {
            "weight": layer.gamma,
            "bias": layer.beta,
            "running_mean": layer.moving_mean,
            "running_var": layer.moving_variance,
        }
    elif isinstance(layer, (keras.layers.Conv2D, keras.layers.Conv2DTranspose, keras.layers.Dense)):
        pairs = {"weight": layer.kernel, "bias": layer.bias}
    else:
        return {}
    return {key: variable for key, variable in pairs.items() if variable is not None}


def _to_keras(layer, parameter: str, value: np.ndarray) -> np.ndarray:
    if parameter != "weight" or isinstance(layer, keras.layers.BatchNormalization):
        return value
    if isinstance(layer, keras.layers.Dense):
        return value.T  # (out, in) -> (in, out)
    return np.transpose(value, (2, 3, 1, 0))  # OIHW -> HWIO; IOHW -> HWOI


def _layers_by_name(model: keras.Model) -> dict[str, keras.layers.Layer]:
    """Every layer with weights, nested models walked through, by name."""
    found: dict[str, keras.layers.Layer] = {}

    def walk(layers):
        for layer in layers:
            if isinstance(layer, keras.Model):
                walk(layer.layers)
                continue
            if not _variables(layer):
                continue
            other = found.setdefault(layer.name, layer)
            if other is not layer:
                raise ValueError(
                    f"`model` has two layers named {layer.name!r}: a torch state dict cannot "
                    f"tell them apart. Received: model={model.name!r}"
                )

    walk(model.layers)
    return found


def _split_key(key: str) -> tuple[str, str]:
    """``backbone.layer1.0.conv1.weight`` -> (``layer1_0_conv1``, ``weight``)."""
    for prefix in _WRAPPER_PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix) :]
    path, _, parameter = key.rpartition(".")
    return path.replace(".", "_"), parameter


def _in_scope(name: str, roots: set[str]) -> bool:
    return any(name == root or name.startswith(root + "_") for root in roots)


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_LISTED])
    more = f" ... and {len(items) - _LISTED} more" if len(items) > _LISTED else ""
    return f"{shown}{more}"


def load_torch_state_dict(
    model: keras.Model,
    npz_path: str | os.PathLike,
    strict: bool = True,
    skip_prefixes: Sequence[str] = (),
) -> list[str]:
    """Loads a torchvision or mmseg state dict (saved as .npz) into `model` by layer name.

    Works on kfcn's ResNets (`kfcn.models.resnet`) and on any model containing
    their layers: an FCN built on them (`kfcn.build_fcn8s(backbone=
    "resnet50_v1c")`, whose trunk layers keep their names) or a model nesting
    the ResNet. Keys may carry mmseg's "backbone." or DataParallel's "module."
    prefix. `fc.*` tensors are skipped when the model has no `fc` layer (a
    classifier checkpoint loaded into a backbone). Nothing is assigned unless
    every check passes.

    Args:
        model: The Keras model.
        npz_path: The state dict, saved as
            `np.savez(path, **{k: v.numpy() for k, v in state_dict.items()})`.
        strict: Require every tensor of the file to be used, and every weight
            of the model's ResNet layers (`conv1`, `bn1`, `stem_*`,
            `layer1_*` .. `layer4_*`, `fc`) and of any layer the file names to
            be assigned, as torch's `load_state_dict(strict=True)`. Layers
            outside those (an FCN's score layers) are left as they are.
        skip_prefixes: Key prefixes to ignore (e.g. `("decode_head.",
            "auxiliary_head.")` to load only the backbone of an mmseg
            segmentor checkpoint).

    Returns:
        The names of the layers loaded.

    Raises:
        ValueError: If the file is missing or unreadable, a tensor's shape does
            not fit its layer, or (with `strict`) tensors are unused or model
            weights missing; the message lists them (the first 20).
    """
    if not (isinstance(npz_path, (str, os.PathLike)) and os.path.isfile(npz_path)):
        raise ValueError(
            f"`npz_path` must be an existing .npz file. Received: npz_path={npz_path!r}"
        )
    try:
        with np.load(npz_path, allow_pickle=False) as archive:
            tensors = {key: archive[key] for key in archive.files}
    except (OSError, ValueError) as error:
        raise ValueError(
            f"`npz_path` could not be read as a numpy .npz archive. "
            f"Received: npz_path={npz_path!r}. Cause: {error}"
        ) from error

    layers = _layers_by_name(model)
    assignments: dict[int, tuple] = {}
    unused, mismatched, skipped = [], [], []
    roots = set(_RESNET_ROOTS)
    for key, value in tensors.items():
        name, parameter = _split_key(key)
        if parameter in _SKIPPED_PARAMETERS or any(key.startswith(p) for p in skip_prefixes):
            skipped.append(key)
            continue
        layer = layers.get(name)
        if layer is None and re.fullmatch(r"fc(_.*)?", name) and "fc" not in layers:
            skipped.append(key)  # the classifier of a checkpoint, loaded into a backbone
            continue
        variable = _variables(layer).get(parameter) if layer is not None else None
        if variable is None:
            unused.append(f"{key} {tuple(value.shape)}")
            continue
        roots.add(name.split("_")[0])
        converted = _to_keras(layer, parameter, np.asarray(value))
        if tuple(converted.shape) != tuple(variable.shape):
            mismatched.append(
                f"{key} {tuple(value.shape)} -> {layer.name}/{variable.name} "
                f"{tuple(variable.shape)}"
            )
            continue
        assignments[id(variable)] = (variable, converted, layer.name)

    missing = [
        f"{layer.name}/{variable.name} {tuple(variable.shape)}"
        for layer in layers.values()
        if _in_scope(layer.name, roots)
        for variable in _variables(layer).values()
        if id(variable) not in assignments
    ]
    problems = []
    if mismatched:
        problems.append(f"{len(mismatched)} shape(s) do not fit: {_listing(mismatched)}")
    if strict and unused:
        problems.append(f"{len(unused)} tensor(s) match no layer weight: {_listing(unused)}")
    if strict and missing:
        problems.append(f"{len(missing)} model weight(s) not in the file: {_listing(missing)}")
    if problems:
        raise ValueError(
            f"`npz_path` does not fit model {model.name!r} (torch names map to Keras layer "
            "names with '.' replaced by '_'; pass strict=False to load what fits). "
            + "; ".join(problems)
            + f". Received: npz_path={os.fspath(npz_path)!r}"
        )
    if unused or missing:
        logger.warning(
            "load_torch_state_dict(strict=False): %d unused tensor(s) (%s), %d weight(s) left "
            "as they were (%s).",
            len(unused),
            _listing(unused),
            len(missing),
            _listing(missing),
        )
    for variable, value, _ in assignments.values():
        variable.assign(value.astype(variable.dtype))
    loaded = sorted({layer_name for _, _, layer_name in assignments.values()})
    logger.info(
        "Loaded %d tensors into %d layers of %s from %s (%d skipped).",
        len(assignments),
        len(loaded),
        model.name,
        os.fspath(npz_path),
        len(skipped),
    )
    return loaded
