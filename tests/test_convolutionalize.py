"""convolutionalize(): the classifier's own scores at its native size, maps beyond."""

import keras
import numpy as np
import pytest

import kfcn


def _images(size, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(-1, 1, (batch, size[0], size[1], 3)).astype("float32")


@pytest.mark.parametrize(
    "make",
    [
        lambda: keras.applications.VGG16(weights=None),
        # Global-average-pooling classifiers (random weights, raw logits).
        lambda: keras.applications.MobileNetV2(
            alpha=0.35, weights=None, classifier_activation=None
        ),
        lambda: keras.applications.ResNet50(weights=None, classifier_activation=None),
        lambda: keras.applications.MobileNetV3Small(
            weights=None, input_shape=(224, 224, 3), classifier_activation=None
        ),
    ],
    ids=["vgg16", "mobilenetv2", "resnet50", "mobilenetv3small"],
)
def test_native_size_equals_classifier(make):
    classifier = make()
    fcn = kfcn.convolutionalize(classifier)
    x = _images((224, 224))
    expected = classifier.predict(x, verbose=0)
    scores = fcn.predict(x, verbose=0)
    assert scores.shape == (2, 1, 1, expected.shape[-1])
    scale = np.abs(expected).max()
    assert scale > 0
    np.testing.assert_allclose(scores[:, 0, 0], expected, rtol=1e-4, atol=1e-4 * scale)


def test_vgg16_heatmap_and_names():
    classifier = keras.applications.VGG16(weights=None, classifier_activation=None)
    fcn = kfcn.convolutionalize(classifier)
    assert fcn.get_layer("fc6").kernel.shape == (7, 7, 512, 4096)
    assert fcn.get_layer("fc7").kernel.shape == (1, 1, 4096, 4096)
    assert fcn.get_layer("predictions").kernel.shape == (1, 1, 4096, 1000)
    # 384x512 -> pool5 12x16 -> 7x7 valid fc6 -> 6x10 heatmap.
    x = _images((384, 512), batch=1)
    heatmap = fcn.predict(x, verbose=0)
    assert heatmap.shape == (1, 6, 10, 1000)


def test_window_pooling_equals_mean_of_position_scores():
    classifier = keras.applications.MobileNetV2(
        alpha=0.35, weights=None, classifier_activation=None
    )
    fcn = kfcn.convolutionalize(classifier)
    x = _images((288, 256), batch=1)
    heatmap = fcn.predict(x, verbose=0)
    assert heatmap.shape == (1, 3, 2, 1000)
    none = kfcn.convolutionalize(classifier, pooling="none")
    per_position = none.predict(x, verbose=0)
    assert per_position.shape == (1, 9, 8, 1000)
    # Window pooling of the 1x1 scores (linear) equals scoring the pooled window.
    np.testing.assert_allclose(
        heatmap[0, 1, 1], per_position[0, 1:8, 1:8].mean(axis=(0, 1)), rtol=1e-4, atol=1e-4
    )


def test_bad_classifiers():
    with pytest.raises(ValueError, match="`classifier`.*Flatten or global pooling"):
        kfcn.convolutionalize(keras.applications.VGG16(include_top=False, weights=None))
    with pytest.raises(ValueError, match="`classifier` must have a fixed input size"):
        inputs = keras.Input((None, None, 3))
        x = keras.layers.Conv2D(4, 3)(inputs)
        x = keras.layers.GlobalAveragePooling2D()(x)
        kfcn.convolutionalize(keras.Model(inputs, keras.layers.Dense(2)(x)))
    with pytest.raises(ValueError, match="`pooling`"):
        kfcn.convolutionalize(keras.applications.VGG16(weights=None), pooling="max")
