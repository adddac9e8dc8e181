"""Bilinear upsampling kernels against the paper's formula, computed by hand."""

import numpy as np
import pytest

from kfcn import bilinear


def _reference(size):
    # The reference's surgery.upsample_filt, written out element by element.
    factor = (size + 1) // 2
    center = factor - 1 if size % 2 == 1 else factor - 0.5
    out = np.empty((size, size))
    for i in range(size):
        for j in range(size):
            out[i, j] = (1 - abs(i - center) / factor) * (1 - abs(j - center) / factor)
    return out


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 7, 16, 32, 63, 64])
def test_kernel_matches_formula(size):
    np.testing.assert_allclose(bilinear.bilinear_kernel(size), _reference(size), atol=1e-7)


def test_known_values():
    # k=4 (x2 upsampling): f=2, c=1.5 -> ramp (0.25, 0.75, 0.75, 0.25).
    ramp = np.array([0.25, 0.75, 0.75, 0.25])
    np.testing.assert_allclose(bilinear.bilinear_kernel(4), np.outer(ramp, ramp))
    # k=3: f=2, c=1 -> ramp (0.5, 1, 0.5).
    np.testing.assert_allclose(bilinear.bilinear_kernel(3)[1], [0.5, 1.0, 0.5])


def test_weights_are_per_class_diagonal():
    weights = bilinear.bilinear_upsampling_weights(4, 3)
    assert weights.shape == (4, 4, 3, 3)
    for a in range(3):
        for b in range(3):
            expected = _reference(4) if a == b else np.zeros((4, 4))
            np.testing.assert_allclose(weights[:, :, a, b], expected, atol=1e-7)


@pytest.mark.parametrize("bad", [0, -2, 2.5, "4", True])
def test_bad_size(bad):
    with pytest.raises(ValueError, match="size"):
        bilinear.bilinear_kernel(bad)


def test_initializer_rejects_non_square():
    with pytest.raises(ValueError, match="shape"):
        bilinear.BilinearInitializer()((4, 4, 2, 3))
