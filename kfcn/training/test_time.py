"""The test-time settings of a training run: the model validation scores and that ships.

`kfcn train --input_scale S --logit_adjustment TAU` trains the net as usual and
validates, selects and saves it as it will be used: run at S times the input's
size (`kfcn.with_input_scale`) and with TAU of the loss's class weights taken
back out of its scores (`kfcn.with_logit_adjustment`, Menon et al., ICLR 2021).
Checkpoints and `best.weights.h5` hold the plain net; `model.keras` holds the
flat model those two functions return, so `kfcn evaluate` on it reproduces the
run's last validation, and `kfcn.input_scale.input_scale_of` and
`kfcn.logit_adjustment.offsets_of` read the settings back.

Validation runs a view of the training model (`TestTime.view`): the same layer
objects, and so the same variables (the weight average's too, when it is
swapped in), between the resize pair and before the adjustment, the layers the
flat model has. It creates no variable, so it is built once, in the
strategy's scope, for every worker alike.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any


@dataclasses.dataclass(frozen=True)
class TestTime:
    """How a run's net is used at test time.

    Attributes:
        input_scale: resize factor of the images (1.0: native size).
        offsets: logit offsets, one per class (`class_weight_offsets`), or None.
        tau: the logit adjustment's strength the offsets came from (0: none).
    """

    input_scale: float = 1.0
    offsets: tuple[float, ...] | None = None
    tau: float = 0.0

    @classmethod
    def from_settings(
        cls, input_scale: float, tau: float, class_weights: Sequence[float] | None
    ) -> TestTime:
        """The settings of a run: `tau` > 0 needs the loss's `class_weights`.

        Raises:
            ValueError: If `input_scale` is not > 0, `tau` is negative, or `tau`
                is > 0 without class weights.
        """
        from kfcn.input_scale import check_scale
        from kfcn.logit_adjustment import class_weight_offsets

        scale = check_scale(input_scale)
        if not tau:
            return cls(scale)
        if class_weights is None:
            raise ValueError(
                "`logit_adjustment` takes class weights out of the scores; the run trains "
                f"without them (class_weighting none). Received: logit_adjustment={tau!r}"
            )
        offsets = class_weight_offsets(class_weights, tau)
        return cls(scale, tuple(float(v) for v in offsets), float(tau))

    @property
    def is_identity(self) -> bool:
        """Whether the net is used as trained."""
        return self.input_scale == 1.0 and not (self.offsets and any(self.offsets))

    def view(self, model: Any) -> Any:
        """`model` as used at test time, sharing its layers and variables (for validation).

        Returns `model` itself when there is nothing to change.
        """
        if self.is_identity:
            return model
        import keras

        from kfcn.input_scale import INPUT_LAYER_NAME, OUTPUT_LAYER_NAME
        from kfcn.layers import InputScale, LogitAdjustment, ResizeLike
        from kfcn.logit_adjustment import LAYER_NAME

        _check_single(model)
        first = model.inputs[0]
        images = keras.Input(batch_shape=first.shape, dtype=first.dtype, name="images")
        # float32 whatever the run's dtype policy: the flat model's layers are float32.
        x = images
        if self.input_scale != 1.0:
            x = InputScale(self.input_scale, name=INPUT_LAYER_NAME, dtype="float32")(x)
        logits = model(x)
        if self.input_scale != 1.0:
            logits = ResizeLike(name=OUTPUT_LAYER_NAME, dtype="float32")([logits, images])
        if self.offsets is not None:
            logits = LogitAdjustment(self.offsets, name=LAYER_NAME, dtype="float32")(logits)
        return keras.Model(images, logits, name=f"{model.name}_test_time")

    def apply(self, model: Any) -> Any:
        """The flat model that ships: `with_logit_adjustment(with_input_scale(model))`."""
        if self.is_identity:
            return model
        from kfcn.input_scale import with_input_scale
        from kfcn.logit_adjustment import with_logit_adjustment

        _check_single(model)
        if self.input_scale != 1.0:
            model = with_input_scale(model, self.input_scale)
        return with_logit_adjustment(model, self.offsets)

    def to_dict(self) -> dict[str, Any]:
        """For result.json."""
        return {
            "input_scale": self.input_scale,
            "logit_adjustment": None
            if self.offsets is None
            else {"tau": self.tau, "offsets": list(self.offsets)},
        }


def _check_single(model: Any) -> None:
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ValueError(
            "`input_scale` and `logit_adjustment` need a net with one image input and one "
            f"logits output; {model.name!r} has {len(model.inputs)} inputs and "
            f"{len(model.outputs)} outputs"
        )
