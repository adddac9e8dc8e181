"""Shift-and-stitch: dense output from a strided net by running it on shifted inputs.

Long, Shelhamer and Darrell (TPAMI 2017), section 3.2: a net with output stride
``f`` gives dense predictions if it is run on the ``f**2`` copies of the input
shifted by ``(dy, dx)``, ``0 <= dy, dx < f``, and the outputs are interlaced so
that each prediction lands on the pixel at the centre of its receptive field.
The paper shows that this is filter rarefaction (`kfcn.dilate` to output
stride 1) computed the slow way: the two agree away from the image border,
where only their zero padding differs. It costs ``f**2`` forward passes; the
paper prefers learned upsampling (its Table, section 4.2).
"""

from __future__ import annotations

import keras

from kfcn.dilation import model_stride
from kfcn.layers import Interlace, ShiftStack


def shift_and_stitch(model: keras.Model, factor: int, value: float = 0.0) -> keras.Model:
    """Wraps a strided model into one whose output is `factor` times denser.

    The input is stacked with its shifted copies along the batch axis
    (`kfcn.layers.ShiftStack`), `model` runs once on the stack, and the
    outputs are interlaced (`kfcn.layers.Interlace`). With ``factor`` equal to
    the model's stride the output is dense (stride 1); a smaller `factor`
    dividing the stride shifts by ``stride // factor`` pixels and gives stride
    ``stride // factor``.

    Args:
        model: A Keras model taking one image batch and returning one map at
            stride `stride` on it (a trunk, or an FCN's scores before upsampling).
        factor: Shifts per axis, >= 1, dividing the model's stride.
        value: Pixel value the shifted copies are padded with at the
            bottom/right (in the model's input units).

    Returns:
        A `keras.Model` holding `model` (shared, not copied). On an image whose
        sides are multiples of the stride, its output sampled every `factor`
        pixels from pixel 0 is `model`'s output exactly (copy 0 is the image
        itself).

    Raises:
        ValueError: If `factor` is not an integer >= 1 dividing the model's stride.

    Example:
        >>> x = keras.Input((None, None, 3))
        >>> net = keras.Model(x, keras.layers.Conv2D(8, 3, strides=4, padding="same")(x))
        >>> kfcn.shift_and_stitch(net, factor=4)(np.zeros((1, 32, 48, 3))).shape
        TensorShape([1, 32, 48, 8])
    """
    stride = model_stride(model)
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1 or stride % factor:
        raise ValueError(
            f"`factor` must be an integer >= 1 dividing the model's stride {stride}. "
            f"Received: factor={factor!r}"
        )
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ValueError(
            "`model` must take one image input and return one map. Received: "
            f"{len(model.inputs)} inputs and {len(model.outputs)} outputs"
        )
    images = keras.Input(batch_shape=model.inputs[0].shape, dtype=model.inputs[0].dtype)
    stacked = ShiftStack(factor, step=stride // factor, value=value, name="shift")(images)
    stitched = Interlace(factor, name="stitch")(model(stacked))
    return keras.Model(images, stitched, name=f"{model.name}_shift_and_stitch{factor}")
