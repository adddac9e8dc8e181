"""Running a trained net at a multiple of its input's resolution.

An FCN takes any input size, and the size it sees changes what it resolves: a
net trained on crops rescaled by 0.75-1.5 sees objects larger in training than
in a native-size test image (the train/test resolution discrepancy, Touvron et
al., "Fixing the train-test resolution discrepancy", NeurIPS 2019), and a
stride-8 score map resolves more of a thin pole at a larger input. One test
scale is a property of how the model is used, like mmsegmentation's test
`Resize`: `with_input_scale(model, 1.25)` returns a model that resizes its
images by 1.25 (`kfcn.layers.InputScale`, named "input_scale"), runs the net,
and resizes the logits back to the input's height and width
(`kfcn.layers.ResizeLike`, named "output_resize"), so predict, evaluate and
every export see a net that takes and returns native-size maps. It costs the
net's time at scale^2 the pixels.

The result is a flat functional model with the net's own layer names and a copy
of its weights; applied again it replaces the scale (1.0 removes both layers).
A preset's card may name its scale (`"input_scale"`), which `kfcn.from_preset`
applies; the `kfcn` commands take `--input_scale` for any `.keras` model or
preset (`scaled_model_file`).

Example:
    ```python
    import kfcn
    net = kfcn.from_preset("camvid_fcn4s_mobilenetv2", input_scale=1.0)
    model = kfcn.with_input_scale(net, 1.25)   # 360x480 in, 360x480 logits out
    kfcn.input_scale.input_scale_of(model)     # 1.25
    ```
"""

from __future__ import annotations

import math
import os
from typing import Any

#: Layer names of the resize in front of the net and of the one behind it.
INPUT_LAYER_NAME = "input_scale"
OUTPUT_LAYER_NAME = "output_resize"


def check_scale(scale: Any, name: str = "input_scale") -> float:
    """`scale` as a float; raises ValueError naming `name` unless finite and > 0."""
    try:
        value = float(scale)
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"`{name}` must be a finite number > 0. Received: {name}={scale!r}")
    return value


def input_scale_of(model: Any) -> float:
    """The scale `with_input_scale` gave `model` (1.0 for a plain net)."""
    from kfcn.layers import InputScale

    for layer in model.layers:
        if isinstance(layer, InputScale) and layer.name == INPUT_LAYER_NAME:
            return layer.scale
    return 1.0


def _is_pair_layer(layer: Any, kind: type, name: str) -> bool:
    return isinstance(layer, kind) and layer.name == name


def _clashing_names(model: Any) -> set[str]:
    """Layers named like the resize pair that are not one (their names are taken)."""
    from kfcn.layers import InputScale, ResizeLike

    kinds = {INPUT_LAYER_NAME: InputScale, OUTPUT_LAYER_NAME: ResizeLike}
    return {
        layer.name
        for layer in model.layers
        if layer.name in kinds and not isinstance(layer, kinds[layer.name])
    }


def with_input_scale(model: Any, scale: float) -> Any:
    """`model` run at `scale` times its input's height and width, logits at the input's.

    Args:
        model: A functional segmentation model with one image input and one
            logits output (e.g. any kfcn builder's net, or a model this
            function returned).
        scale: Resize factor of the images, a finite number > 0; 1.0 returns
            the plain net.

    Returns:
        A new functional model with the net's layer names and a copy of its
        weights: images -> `InputScale(scale)` -> net -> `ResizeLike` to the
        images' size. `model.class_info`, if set, is carried over.

    Raises:
        ValueError: If `scale` is not > 0, or `model` has several inputs or
            outputs, or already uses the layer names "input_scale" or
            "output_resize" for something else.
    """
    import keras
    from keras import tree

    from kfcn.layers import InputScale, ResizeLike
    from kfcn.surgery import copy_matching_layers

    scale = check_scale(scale, "scale")
    if not isinstance(model, keras.Model) or not hasattr(model, "inputs"):
        raise ValueError(f"`model` must be a functional Keras model. Received: {model!r}")
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ValueError(
            f"`model` {model.name!r} must have one image input and one logits output to be "
            f"rescaled; it has {len(model.inputs)} inputs and {len(model.outputs)} outputs"
        )
    clashes = _clashing_names(model)
    if clashes:
        raise ValueError(
            f"`model` {model.name!r} has layers named {sorted(clashes)} that with_input_scale "
            "did not make; it needs those names"
        )
    first = model.inputs[0]
    inputs = keras.Input(batch_shape=first.shape, dtype=first.dtype, name=first.name)
    scaled = inputs if scale == 1.0 else InputScale(scale, name=INPUT_LAYER_NAME)(inputs)

    def call(layer, *args, **kwargs):
        # Re-run the net on the new graph: an old resize pair is dropped, and
        # whatever read the images reads the scaled images.
        if _is_pair_layer(layer, InputScale, INPUT_LAYER_NAME):
            return scaled
        if _is_pair_layer(layer, ResizeLike, OUTPUT_LAYER_NAME):
            return args[0][0]
        args, kwargs = tree.map_structure(lambda t: scaled if t is inputs else t, (args, kwargs))
        return layer(*args, **kwargs)

    given = [inputs] if isinstance(model.input, (list, tuple)) else inputs
    copy = keras.models.clone_model(model, input_tensors=given, call_function=call)
    outputs = copy.outputs[0]
    if scale != 1.0:
        outputs = ResizeLike(name=OUTPUT_LAYER_NAME)([outputs, inputs])
    result = keras.Model(inputs, outputs, name=model.name)
    copy_matching_layers(model, result, "model")
    if getattr(model, "class_info", None) is not None:
        result.class_info = model.class_info
    return result


def scaled_model_file(path: str | os.PathLike, scale: float) -> str:
    """A `.keras` file of the model at `path` with `with_input_scale(model, scale)` applied.

    Written once (atomically, with the model's class names) under
    `kfcn.presets.cache_dir()/scaled/`, named after the source file's SHA-256
    and the scale, so an edited source gets a new file.

    Raises:
        ValueError: If `scale` is not > 0 or `path` is not a `.keras` model
            (a SavedModel or TFLite file cannot be rescaled: rescale the
            `.keras` file, then export it).
    """
    from kfcn import metadata
    from kfcn.presets import cache_dir, file_sha256

    scale = check_scale(scale)
    path = os.fspath(path)
    if metadata.model_format(path) != "keras":
        raise ValueError(
            f"a model is rescaled from a .keras file or a preset; {path!r} is not a .keras "
            "file (rescale the .keras model, then export it)"
        )
    stem = os.path.splitext(os.path.basename(path))[0]
    name = f"{stem}-{file_sha256(path)[:12]}-x{scale:g}.keras"
    target = os.path.join(cache_dir(), "scaled", name)
    if os.path.isfile(target):
        return target
    import kfcn

    model = kfcn.load_model(path, compile=False)
    scaled = with_input_scale(model, scale)
    metadata.save_model(scaled, target, metadata.read_class_info(path))
    return target
