"""What a kfcn model takes and returns, for the exporters: inputs by modality, outputs by task.

`kfcn.build_fcn` makes four kinds of model (any may have `heads`):

====================  =======================================  ==========================
modality              Keras input                              exported inputs (SavedModel)
====================  =======================================  ==========================
"rgb" / "hha"         `images` [b, h, w, 3]                    `images` uint8 [b, h, w, 3]
"rgbd"                `images` [b, h, w, 4] (RGB, raw depth)   `rgb` uint8 [b, h, w, 3] and
                                                               `depth` uint16 [b, h, w, 1]
"rgb+hha"             dict `rgb`, `hha` [b, h, w, 3]           `rgb`, `hha` uint8 [b, h, w, 3]
====================  =======================================  ==========================

The RGB-D SavedModel takes two tensors rather than one uint16 [b, h, w, 4]: a
client holds an 8-bit colour image and a 16-bit depth map (NYUDv2's PNGs), and
sends each in its own type, so colour cannot arrive out of 0..255 and requests
stay small; the graph concatenates them as the Keras model expects.

Outputs: one logits tensor, or a dict `{task: logits}` (SIFT Flow's "sem" and
"geo"); exported outputs are then suffixed by the task (`class_ids_sem`,
`probabilities_geo`, `logits_sem`).
"""

from __future__ import annotations

import dataclasses

from kfcn.export.artifacts import check_segmentation_model

RGB, RGBD, RGB_HHA = "rgb", "rgbd", "rgb+hha"


@dataclasses.dataclass(frozen=True)
class ModelIO:
    """A kfcn model's inputs and outputs.

    Attributes:
        modality: "rgb" (3-channel images: RGB or HHA), "rgbd" or "rgb+hha".
        tasks: Number of classes per task; `{None: C}` for a single-output model.
        name: The model's name, for messages.
    """

    modality: str
    tasks: dict
    name: str = "model"

    @property
    def multi_task(self) -> bool:
        """True when the model returns a dict of logits per task."""
        return None not in self.tasks

    @property
    def single(self) -> bool:
        """One 3-channel image input and one logits output (what every format takes)."""
        return self.modality == RGB and not self.multi_task

    def output_names(self, base: str) -> dict:
        """Task -> exported output name: `base` for one task, `base_<task>` for several."""
        return {task: output_name(base, task) for task in self.tasks}

    def describe(self) -> str:
        """E.g. "RGB-D input, tasks sem (33 classes), geo (3 classes)"."""
        kind = {RGB: "image input", RGBD: "RGB-D input", RGB_HHA: "RGB and HHA inputs"}
        if self.multi_task:
            heads = ", ".join(f"{task} ({count} classes)" for task, count in self.tasks.items())
            return f"{kind[self.modality]}, tasks {heads}"
        return f"{kind[self.modality]}, {self.tasks[None]} classes"


def output_name(base: str, task: str | None) -> str:
    """`class_ids` for a single-task model, `class_ids_sem` for task "sem"."""
    return base if task is None else f"{base}_{task}"


def describe(model, source: str = "model") -> ModelIO:
    """Classifies a kfcn model's inputs and outputs.

    Args:
        model: A keras.Model from `kfcn.build_fcn` (after `kfcn.inference_model`:
            auxiliary outputs are refused).
        source: Where the model came from, for error messages.

    Returns:
        A `ModelIO`.

    Raises:
        ValueError: If the model is none of the kinds in the module docstring.
    """
    import keras

    if not isinstance(model, keras.Model):
        raise ValueError(f"{source} is not a keras.Model. Received: {type(model).__name__}")
    inputs, outputs = model.input, model.output
    if not isinstance(inputs, dict) and not isinstance(outputs, dict):
        if len(model.inputs) == 1 and tuple(model.inputs[0].shape)[-1:] == (4,):
            _check_logits(model.outputs[0], source)
            _check_kfcn(model, source)
            return ModelIO(RGBD, {None: int(model.outputs[0].shape[-1])}, model.name)
        classes = check_segmentation_model(model, source=source)
        return ModelIO(RGB, {None: classes}, model.name)
    if isinstance(inputs, dict):
        if set(inputs) != {"rgb", "hha"}:
            raise ValueError(
                f"{source} takes inputs {sorted(inputs)}; kfcn exports dict inputs only for "
                "two-stream models taking {'rgb', 'hha'} (modality='rgb+hha')"
            )
        for key, tensor in inputs.items():
            if len(tensor.shape) != 4 or tensor.shape[-1] != 3:
                raise ValueError(
                    f"{source}: input {key!r} has shape {tuple(tensor.shape)}, expected "
                    "(batch, height, width, 3)"
                )
        modality = RGB_HHA
    else:
        channels = tuple(model.inputs[0].shape)[-1]
        if len(model.inputs) != 1 or channels not in (3, 4):
            raise ValueError(
                f"{source} is not a kfcn segmentation model: expected one image input with 3 "
                f"or 4 channels, got {len(model.inputs)} inputs"
            )
        modality = RGBD if channels == 4 else RGB
    if isinstance(outputs, dict):
        aux = sorted(key for key in outputs if str(key).startswith("aux"))
        if aux:
            raise ValueError(
                f"{source} has auxiliary outputs {aux}; export kfcn.inference_model(model)"
            )
        tasks = {key: _check_logits(tensor, source) for key, tensor in outputs.items()}
    else:
        tasks = {None: _check_logits(outputs, source)}
    _check_kfcn(model, source)
    return ModelIO(modality, tasks, model.name)


def _check_logits(tensor, source) -> int:
    shape = tuple(tensor.shape)
    if len(shape) != 4 or shape[-1] is None:
        raise ValueError(
            f"{source} is not a kfcn segmentation model: output shape {shape}, expected "
            "(batch, height, width, num_classes) logits"
        )
    return int(shape[-1])


def _check_kfcn(model, source) -> None:
    import keras

    if not any(
        (keras.saving.get_registered_name(type(layer)) or "").startswith("kfcn>")
        for layer in model.layers
    ):
        raise ValueError(
            f"{source} is not a kfcn model: it has no kfcn layers (kfcn models carry their "
            "preprocessing). Build it with kfcn.build_fcn()."
        )


def refuse(io: ModelIO, what: str, reason: str) -> None:
    """Raises the one-line refusal of a format that cannot take this model.

    Raises:
        ValueError: "<what> cannot take model '<name>' (<kind>): <reason>".
    """
    raise ValueError(f"{what} cannot take model {io.name!r} ({io.describe()}): {reason}")
