"""Models and images shared by the export tests.

A randomly initialised FCN gives near-tied logits, so a class map comparison
between two runtimes would flip on rounding noise. `confident_fcn8s` instead
fits the FCN-8s score layers by ridge regression to a synthetic scene task
(coloured rectangles on a dark background), so its argmax has real margins and
is right on ~83% of held-out pixels (background alone is 69%).
"""

from __future__ import annotations

import os

import numpy as np

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


def _normalize_batchnorm_scales(model, images) -> None:
    """Sets every BatchNormalization to divide by its input's RMS (mean kept at 0).

    A freshly initialised network's activations shrink layer after layer (the BN
    moving variance starts at 1), leaving a few channels to dominate each tensor;
    int8 quantization then rounds the rest away. Rescaling each channel to unit
    RMS, layer by layer in graph order, keeps every channel in range.
    """
    import keras

    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            # The layer's call in this model's graph (the trunk was built separately).
            node_input = layer._inbound_nodes[-1].input_tensors[0]
            x = np.asarray(keras.Model(model.input, node_input)(images, training=False))
            mean_square = np.square(x.astype(np.float64)).mean(axis=(0, 1, 2))
            gamma, beta, moving_mean, _ = layer.get_weights()
            layer.set_weights(
                [gamma, beta, np.zeros_like(moving_mean), (mean_square + 1e-12).astype(np.float32)]
            )


def confident_fcn8s(seed: int = 0):
    """A mobilenetv2 FCN-8s whose outputs are confident (see module docstring).

    After `_normalize_batchnorm_scales`, score_fr and score_pool4 are zeroed and
    score_pool3 is the ridge-regression fit of one-hot targets on the pool3
    features of synthetic scenes.
    """
    import keras

    import kfcn

    keras.utils.set_random_seed(seed)
    model = kfcn.build_fcn8s(
        backbone="mobilenetv2", num_classes=NUM_CLASSES, weights=None, dropout=0.0
    )
    images, labels = synthetic_scenes(32, seed=seed)
    images = images.astype(np.float32)
    _normalize_batchnorm_scales(model, images[:8])
    features = keras.Model(model.input, model.get_layer("score_pool3").input)
    f = np.asarray(features.predict(images, verbose=0, batch_size=16))
    fh, fw = f.shape[1:3]
    targets = labels[:, 4::8, 4::8][:, :fh, :fw]  # label at each stride-8 cell centre
    x = f[:, : targets.shape[1], : targets.shape[2]].reshape(-1, f.shape[-1]).astype(np.float64)
    t = np.eye(NUM_CLASSES)[targets.reshape(-1)] * 8.0 - 2.0
    mean, std = x.mean(0), x.std(0) + 1e-12
    xa = np.concatenate([(x - mean) / std, np.ones((len(x), 1))], 1)
    w = np.linalg.solve(xa.T @ xa + 0.1 * np.eye(xa.shape[1]), xa.T @ t)
    w[:-1] /= std[:, None]
    w[-1] -= (mean[:, None] * w[:-1]).sum(0)
    for name in ("score_fr", "score_pool4"):
        layer = model.get_layer(name)
        layer.set_weights([np.zeros_like(v) for v in layer.get_weights()])
    model.get_layer("score_pool3").set_weights(
        [w[:-1].reshape(1, 1, -1, NUM_CLASSES).astype(np.float32), w[-1].astype(np.float32)]
    )
    return model


def cached_confident_model(tmp_path_factory):
    """`confident_fcn8s`, saved once per test session and reloaded by every module."""
    from kfcn.export.artifacts import load_segmentation_model

    path = tmp_path_factory.getbasetemp() / "confident_fcn8s.keras"
    if not path.exists():
        model = confident_fcn8s()
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
