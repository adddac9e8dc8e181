"""kfcn.shift_and_stitch against the strided net it wraps and against filter rarefaction.

Long et al. (TPAMI 2017), section 3.2: shift-and-stitch runs the net on the
``f**2`` shifted inputs and interlaces the outputs; it equals filter
rarefaction (`kfcn.dilate(model, output_stride=1)`) except where padding is
read. The border band where they may differ is derived here from the layers
(`reach`) rather than fitted, and shown to be needed.
"""

import keras
import numpy as np
import pytest

import kfcn
from kfcn.layers import Interlace, ShiftStack

SIZE = (96, 128)
# (kind, kernel, strides, filters): a chain of stride 8 with strided convolutions
# and pooling, 'same' padding (TensorFlow's: (k - s) // 2 before on even sizes).
CHAIN = [
    ("conv", 3, 2, 8),
    ("conv", 3, 1, 8),
    ("max", 3, 2, None),
    ("conv", 5, 1, 12),
    ("conv", 3, 2, 12),
    ("conv", 3, 1, 16),
]
STRIDE = 8


def chain_model():
    rng = np.random.default_rng(0)
    images = keras.Input((None, None, 3), name="images")
    x = keras.layers.Rescaling(1 / 127.5, offset=-1, name="scale")(images)
    for i, (kind, kernel, strides, filters) in enumerate(CHAIN):
        if kind == "max":
            x = keras.layers.MaxPooling2D(kernel, strides, padding="same", name=f"pool{i}")(x)
            continue
        x = keras.layers.Conv2D(filters, kernel, strides, padding="same", name=f"conv{i}")(x)
        x = keras.layers.BatchNormalization(name=f"bn{i}")(x)
        x = keras.layers.ReLU(name=f"relu{i}")(x) if i < len(CHAIN) - 1 else x
    model = keras.Model(images, x, name="chain")
    values = []
    for w in model.weights:
        if w.name == "moving_variance":
            values.append(rng.uniform(0.5, 2.0, w.shape))
        else:
            values.append(rng.normal(0, 0.5, w.shape))
    model.set_weights([v.astype("float32") for v in values])
    return model


def reach(chain):
    """Input pixels read before and after a feature's centre row, through every window.

    A layer at input stride S with kernel k pads (k - s) // 2 before on a size
    divisible by its stride s (TensorFlow's "same"), so output j reads inputs
    s*j - pad .. s*j - pad + k - 1: it reaches S * pad before and S * (k - 1 - pad)
    after, in pixels. The reaches add up along the chain.
    """
    before = after = 0
    stride = 1
    for _, kernel, strides, _ in chain:
        pad = max(kernel - strides, 0) // 2
        before += stride * pad
        after += stride * (kernel - 1 - pad)
        stride *= strides
    return before, after


def images(seed=1, size=SIZE, batch=2):
    return np.random.default_rng(seed).uniform(0, 255, (batch, *size, 3)).astype("float32")


@pytest.fixture(scope="module")
def chain():
    return chain_model()


def test_sampled_on_the_original_grid_equals_the_model(chain):
    dense = kfcn.shift_and_stitch(chain, factor=STRIDE)
    x = images()
    out = keras.ops.convert_to_numpy(dense(x))
    expected = keras.ops.convert_to_numpy(chain(x))
    assert out.shape == (2, *SIZE, 16)
    # Copy (0, 0) is the image itself: exact everywhere, borders included.
    np.testing.assert_array_equal(out[:, ::STRIDE, ::STRIDE], expected)


def test_interlacing_places_each_shift(chain):
    """Output [8i + dy, 8j + dx] is the net on the image shifted by (dy, dx), run alone."""
    dense = kfcn.shift_and_stitch(chain, factor=STRIDE)
    x = images(batch=1)
    out = keras.ops.convert_to_numpy(dense(x))
    for dy, dx in [(1, 0), (0, 5), (3, 7), (7, 7)]:
        shifted = np.zeros_like(x)
        shifted[:, : SIZE[0] - dy, : SIZE[1] - dx] = x[:, dy:, dx:]
        alone = keras.ops.convert_to_numpy(chain(shifted))
        np.testing.assert_allclose(out[:, dy::STRIDE, dx::STRIDE], alone, rtol=1e-5, atol=1e-4)


def test_equals_filter_rarefaction_away_from_the_border(chain):
    """Shift-and-stitch is filter rarefaction (Long et al., 3.2), except in a border band.

    Output row p has its centre on image row p + offset and reads image rows
    p - before .. p + after (`reach`, the same for both nets: rarefaction spreads
    each window by the input stride it lost). The dilated net reads no padding
    when those rows lie in the image: p >= before and p <= H - 1 - after. The
    copy shifted by t = p mod 8 computes its own strided maps, which start at
    image row t: it reads no padding when p - t >= before, and, as its bottom
    rows past H - t are `value` padding, when p <= H - 1 - after. So the two
    agree on rows p with 8 * (p // 8) >= before and p <= H - 1 - after (and the
    same for columns); in the band outside they differ, except on the lattice
    (p divisible by 8), where both are the original net's output.
    """
    before, after = reach(CHAIN)
    assert (before, after) == (18, 32)  # by hand: 0+2*1+2*0+4*2+4*0+8*1, 2+2+4+8+8+8
    x = images()
    stitched = keras.ops.convert_to_numpy(kfcn.shift_and_stitch(chain, factor=STRIDE)(x))
    dilated = keras.ops.convert_to_numpy(kfcn.dilate(chain, output_stride=1)(x))
    assert stitched.shape == dilated.shape == (2, *SIZE, 16)

    def inside(size):
        p = np.arange(size)
        return (STRIDE * (p // STRIDE) >= before) & (p <= size - 1 - after)

    mask = inside(SIZE[0])[:, None] & inside(SIZE[1])[None, :]
    assert mask.sum() == (63 - 24 + 1) * (95 - 24 + 1)
    scale = np.abs(dilated).max()
    diff = np.abs(stitched - dilated).max(axis=(0, 3))
    assert diff[mask].max() <= 1e-4 * scale
    # The band is tight: just outside each of its four edges outputs differ (rows
    # 64 and columns 96 are on the lattice, where both equal the original net).
    for band in (diff[23, 24:96], diff[65, 24:96], diff[24:64, 23], diff[24:64, 97]):
        assert band.max() > 1e-3 * scale


def test_factor_below_the_stride(chain):
    """factor 2 on a stride-8 net shifts by 4 pixels and gives stride 4."""
    coarse = kfcn.shift_and_stitch(chain, factor=2)
    x = images(seed=4)
    out = keras.ops.convert_to_numpy(coarse(x))
    assert out.shape == (2, SIZE[0] // 4, SIZE[1] // 4, 16)
    np.testing.assert_array_equal(out[:, ::2, ::2], keras.ops.convert_to_numpy(chain(x)))
    # Away from the border it is filter rarefaction to output stride 4.
    dilated = keras.ops.convert_to_numpy(kfcn.dilate(chain, output_stride=4)(x))
    np.testing.assert_allclose(
        out[:, 8:12, 8:20], dilated[:, 8:12, 8:20], atol=1e-4 * np.abs(dilated).max()
    )


def test_saves_and_loads(chain, tmp_path):
    dense = kfcn.shift_and_stitch(chain, factor=4)
    assert not any(isinstance(layer, keras.layers.Lambda) for layer in dense.layers)
    path = tmp_path / "stitched.keras"
    dense.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    x = images(size=(32, 48))
    np.testing.assert_allclose(loaded(x), dense(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad", [3, 0, 16, 2.0, True])
def test_factor_checked(chain, bad):
    with pytest.raises(ValueError, match=rf"`factor` must .* stride 8\. Received: factor={bad!r}"):
        kfcn.shift_and_stitch(chain, factor=bad)


def test_name_is_the_function_after_import():
    import kfcn.stitching  # noqa: F401 - a submodule named shift_and_stitch would replace it

    assert callable(kfcn.shift_and_stitch) and kfcn.shift_and_stitch.__name__ == "shift_and_stitch"


def test_stack_and_interlace_are_inverse_bookkeeping():
    x = np.arange(2 * 4 * 6, dtype=np.float32).reshape(2, 4, 6, 1)
    stacked = keras.ops.convert_to_numpy(ShiftStack(2, value=-1.0)(x))
    assert stacked.shape == (8, 4, 6, 1)
    np.testing.assert_array_equal(stacked[2 * 3 + 1, :3, :5], x[1, 1:, 1:])  # copy (1, 1)
    assert (stacked[2 * 3 + 1, 3] == -1).all() and (stacked[2 * 3 + 1, :, 5] == -1).all()
    # Interlace the copies' top-left pixels: the image back, one pixel per copy.
    y = keras.ops.convert_to_numpy(Interlace(2)(stacked[:, :1, :1]))
    np.testing.assert_array_equal(y, x[:, :2, :2])
    for layer in (ShiftStack(4, step=2, value=3.0), Interlace(4)):
        clone = keras.layers.deserialize(keras.layers.serialize(layer))
        assert clone.get_config() == layer.get_config()
