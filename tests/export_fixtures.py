"""Models and images shared by the export tests.

A randomly initialised FCN gives near-tied logits, so a class map comparison
between two runtimes would flip on rounding noise. `confident_fcn(variant)`
instead fits the score layers of a MobileNetV2 FCN-32s, FCN-16s or FCN-8s by
ridge regression to a synthetic scene task (coloured rectangles on a dark
background), coarse to fine, so its argmax has real margins and depends on every
path: the deep blocks through score_fr, upscore2 and upscore_pool4, and each skip.
The fixture checks this when it builds the model (`path_sensitivity`); a
conversion bug in any path then changes more pixels than any parity test allows.
"""

from __future__ import annotations

import os

import numpy as np

from kfcn import PAPER_VARIANTS as VARIANTS  # noqa: F401 - the export tests take it from here

HEIGHT, WIDTH = 64, 96
NUM_CLASSES = 4
_COLORS = np.array([[20, 20, 20], [220, 40, 40], [40, 200, 60], [50, 60, 230]], np.float32)


def synthetic_scenes(count: int, height: int = HEIGHT, width: int = WIDTH, seed: int = 0):
    """Noisy coloured rectangles; label = colour index. Returns uint8 images, int labels."""
    rng = np.random.default_rng(seed)
    images = np.zeros((count, height, width, 3), np.uint8)
    labels = np.zeros((count, height, width), np.int32)
    for i in range(count):
        label = np.zeros((height, width), np.int32)
        for _ in range(3):
            cls = rng.integers(1, NUM_CLASSES)
            y0, x0 = rng.integers(0, height - 16), rng.integers(0, width - 16)
            h, w = rng.integers(12, height // 2 + 8), rng.integers(12, width // 2 + 8)
            label[y0 : y0 + h, x0 : x0 + w] = cls
        image = _COLORS[label] + rng.normal(0, 12, (height, width, 3))
        images[i] = np.clip(image, 0, 255).astype(np.uint8)
        labels[i] = label
    return images, labels


# Every BatchNormalization output is standardized then shifted by this much, so the ReLU6
# after it works in its linear range (0 < x < 6 for ~98% of values).
_BN_SHIFT = 2.0


def _normalize_batchnorm_scales(model, images) -> None:
    """Sets every BatchNormalization to standardize its input, then add `_BN_SHIFT`.

    A freshly initialised network's activations shrink layer after layer (the BN
    moving variance starts at 1), leaving a few channels to dominate each tensor;
    int8 quantization then rounds the rest away. Standardizing each channel, layer by
    layer in graph order, keeps every channel in range. The shift keeps the ReLU6s
    nearly linear: a random ReLU network at zero mean scrambles its input (rounding
    noise grows layer by layer, to ~60% of the signal at out_relu in int8), whereas a
    nearly linear one passes the colours on to the deepest features.
    """
    import keras
    import tensorflow as tf

    layers = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    # The layers' calls in this model's graph (the trunk was built separately). One traced
    # function returns every input; each call sees the statistics set so far.
    inputs = keras.Model(
        model.input, [layer._inbound_nodes[-1].input_tensors[0] for layer in layers]
    )
    forward = tf.function(lambda x: inputs(x, training=False))
    images = tf.constant(images)
    for i, layer in enumerate(layers):  # graph order: layer i's input is final now
        x = forward(images)[i].numpy().astype(np.float64)
        mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2)) + 1e-6
        gamma, beta = np.ones_like(mean), np.full_like(mean, _BN_SHIFT)
        layer.set_weights([w.astype(np.float32) for w in (gamma, beta, mean, var)])


# The score layers of each variant, coarse to fine, and the layer holding the coarser
# prediction upsampled onto each skip (the first input of its fuse).
_SCORES = {
    "fcn32s": ("score_fr",),
    "fcn16s": ("score_fr", "score_pool4"),
    "fcn8s": ("score_fr", "score_pool4", "score_pool3"),
}
_STRIDES = {"score_fr": 32, "score_pool4": 16, "score_pool3": 8}
_UPSAMPLED = {"score_pool4": "upscore2c", "score_pool3": "upscore_pool4c"}
_UPSCORES = {
    "fcn32s": ("upscore",),
    "fcn16s": ("upscore2", "upscore16"),
    "fcn8s": ("upscore2", "upscore_pool4", "upscore8"),
}
# Ridge penalties (relative to the features' variance and the sample count): strong
# enough that int8 rounding of the features moves the scores little.
_LAMBDA = {"score_fr": 0.1, "score_pool4": 0.1, "score_pool3": 0.01}
FIT_IMAGES = 96
# A perturbed path must flip more pixels than the loosest parity tolerance (int8's 3%),
# so that a conversion bug in any path fails every parity test.
MIN_FLIPPED = 0.05


def _ridge(x, t, lam):
    """Ridge regression of t on x; returns (kernel [c, k], bias [k]).

    The features are centred and scaled by one common factor, not standardized per
    channel: int8 rounding adds the same absolute noise to every channel of a tensor, so
    low-variance channels should cost more, not be blown up to unit variance.
    """
    x = x.astype(np.float64)
    mean, std = x.mean(0), np.sqrt(x.var(0).mean()) + 1e-12
    xa = np.concatenate([(x - mean) / std, np.ones((len(x), 1))], 1)
    penalty = lam * len(x) * np.eye(xa.shape[1])
    penalty[-1, -1] = 0.0
    w = np.linalg.solve(xa.T @ xa + penalty, xa.T @ t)
    kernel = w[:-1] / std
    return kernel, w[-1] - (mean[:, None] * kernel).sum(0)


def _fit_score_layers(model, variant, images, labels):
    """Fits the score layers coarse to fine, each on what the coarser ones left over.

    The paper's staged training (32s, then 16s, then 8s) as ridge regressions: score_fr
    fits each stride-32 cell's class fractions (scaled to -2..6); each skip's score layer
    fits its cells' fractions minus the coarser prediction upsampled onto them.
    """
    import keras

    for name in _SCORES[variant]:
        layer = model.get_layer(name)
        layer.set_weights([np.zeros_like(v) for v in layer.get_weights()])
    for name in _SCORES[variant]:
        stride = _STRIDES[name]
        outputs = [model.get_layer(name).input]
        if name in _UPSAMPLED:
            outputs.append(model.get_layer(_UPSAMPLED[name]).output)
        got = keras.Model(model.input, outputs).predict(images, verbose=0, batch_size=16)
        features = np.asarray(got[0] if name in _UPSAMPLED else got)
        fh, fw = features.shape[1:3]
        # Each cell's class fractions: what a map of that stride can best represent.
        n, h, w = labels.shape
        onehot = np.eye(NUM_CLASSES)[labels[:, : h // stride * stride, : w // stride * stride]]
        fractions = onehot.reshape(n, h // stride, stride, w // stride, stride, -1).mean((2, 4))
        fh, fw = min(fh, fractions.shape[1]), min(fw, fractions.shape[2])
        targets = fractions[:, :fh, :fw] * 8.0 - 2.0
        if name in _UPSAMPLED:
            targets = targets - np.asarray(got[1])[:, :fh, :fw]
        x = features[:, :fh, :fw].reshape(-1, features.shape[-1])
        kernel, bias = _ridge(x, targets.reshape(-1, NUM_CLASSES), lam=_LAMBDA[name])
        model.get_layer(name).set_weights(
            [kernel.reshape(1, 1, -1, NUM_CLASSES).astype(np.float32), bias.astype(np.float32)]
        )


def path_sensitivity(model, variant, images) -> dict[str, float]:
    """Fraction of pixels whose argmax flips when one path of `variant` is perturbed.

    Each perturbation permutes the kernel entries of one group of layers: the deepest
    block (block_16), a score layer or an upsampling layer; the weights are restored after.
    """
    import tensorflow as tf

    forward = tf.function(lambda x: tf.argmax(model(x, training=False), axis=-1))
    before = forward(images).numpy()
    rng = np.random.default_rng(1)
    flipped = {}
    for prefix in ("block_16_", *_SCORES[variant], *_UPSCORES[variant]):
        layers = [layer for layer in model.layers if layer.name.startswith(prefix)]
        saved = [layer.get_weights() for layer in layers]
        for layer, weights in zip(layers, saved, strict=True):
            if weights:
                kernel = rng.permutation(weights[0].ravel()).reshape(weights[0].shape)
                layer.set_weights([kernel, *weights[1:]])
        flipped[prefix] = float(np.mean(forward(images).numpy() != before))
        for layer, weights in zip(layers, saved, strict=True):
            layer.set_weights(weights)
    return flipped


# Trunk weights after `_normalize_batchnorm_scales`, by seed: the same for every variant.
_TRUNKS: dict[int, dict[str, list]] = {}


def _prepare_trunk(model, images, seed: int) -> None:
    if seed not in _TRUNKS:
        _normalize_batchnorm_scales(model, images[:8])
        _TRUNKS[seed] = {
            layer.name: layer.get_weights()
            for layer in model.layers
            if layer.weights and not layer.name.startswith(("score", "upscore"))
        }
    for name, weights in _TRUNKS[seed].items():
        model.get_layer(name).set_weights(weights)


def confident_fcn(variant: str = "fcn8s", seed: int = 0):
    """A mobilenetv2 FCN whose outputs are confident and depend on every path.

    After `_normalize_batchnorm_scales`, the score layers are fitted coarse to fine
    (`_fit_score_layers`), so score_fr (through the deep blocks, upscore2 and
    upscore_pool4) and each skip carry part of the prediction. Checked on construction:
    perturbing the deepest block (block_16), any score layer or any upsampling layer
    flips more than `MIN_FLIPPED` of the pixels of held-out scenes.

    Raises:
        AssertionError: if a path moves too few pixels (the fixture would be blind to it).
    """
    import keras

    import kfcn

    keras.utils.set_random_seed(seed)
    model = kfcn.build_fcn(
        variant, backbone="mobilenetv2", num_classes=NUM_CLASSES, weights=None, dropout=0.0
    )
    images, labels = synthetic_scenes(FIT_IMAGES, seed=seed)
    images = images.astype(np.float32)
    _prepare_trunk(model, images, seed)
    _fit_score_layers(model, variant, images, labels)
    held_out = synthetic_scenes(8, seed=seed + 1000)[0].astype(np.float32)
    sensitivity = path_sensitivity(model, variant, held_out)
    weak = {path: f for path, f in sensitivity.items() if f <= MIN_FLIPPED}
    assert not weak, f"{variant}: perturbing these paths flips too few pixels: {weak}"
    return model


def cached_confident_model(tmp_path_factory, variant: str = "fcn8s"):
    """`confident_fcn(variant)`, saved once per test session and reloaded by every module."""
    from kfcn.export.artifacts import load_segmentation_model

    path = tmp_path_factory.getbasetemp() / f"confident_{variant}.keras"
    if not path.exists():
        model = confident_fcn(variant)
        tmp = path.with_suffix(".partial.keras")
        model.save(tmp)
        os.replace(tmp, path)
    return load_segmentation_model(path), str(path)


def tiny_kfcn_model(num_classes: int = 3):
    """A small model with the kfcn contract (Preprocess layer, logits at input size)."""
    import keras

    from kfcn.layers import Preprocess

    inputs = keras.Input((None, None, 3))
    x = Preprocess("tf")(inputs)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(x)
    outputs = keras.layers.Conv2D(num_classes, 1)(x)
    return keras.Model(inputs, outputs)


def write_images(directory, images, fmt: str = "png") -> list[str]:
    """Writes uint8 RGB images as files; returns their paths."""
    from PIL import Image

    os.makedirs(directory, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        path = os.path.join(directory, f"image_{i:03d}.{fmt}")
        Image.fromarray(np.asarray(image, np.uint8)).save(path)
        paths.append(path)
    return paths
