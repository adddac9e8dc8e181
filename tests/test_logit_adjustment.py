"""kfcn.logit_adjustment: class weights taken back out of a net's scores.

References here are numpy: -tau * log(w) by hand, softmax(z) / w renormalised
for tau = 1, and the net's logits plus the offsets.
"""

import numpy as np
import pytest
from test_cli_export import NUM_CLASSES, moving_fcn8s

from kfcn.input_scale import with_input_scale
from kfcn.logit_adjustment import class_weight_offsets, offsets_of, with_logit_adjustment

IMAGE = np.random.default_rng(8).integers(0, 256, (2, 37, 53, 3)).astype(np.float32)
WEIGHTS = np.linspace(0.4, 2.8, NUM_CLASSES)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.fixture(scope="module")
def net():
    return moving_fcn8s(seed=4)


def test_offsets_by_hand():
    np.testing.assert_allclose(
        class_weight_offsets([0.5, 1.0, 2.0, 0.0]), [np.log(2), 0.0, -np.log(2), 0.0], rtol=1e-6
    )
    np.testing.assert_allclose(
        class_weight_offsets([0.25, 4.0], tau=0.5), [np.log(2), -np.log(2)], rtol=1e-6
    )
    np.testing.assert_array_equal(class_weight_offsets([0.3, 3.0], tau=0.0), [0.0, 0.0])


@pytest.mark.parametrize(
    ("weights", "tau", "message"),
    [
        ([1.0, -0.5], 1.0, "`class_weights` must be >= 0"),
        ([1.0, float("nan")], 1.0, "`class_weights` must be finite numbers"),
        ([], 1.0, "`class_weights` must be finite numbers"),
        ([1.0, 2.0], -1.0, "`tau` must be a finite number >= 0"),
        ([1.0, 2.0], float("inf"), "`tau` must be a finite number >= 0"),
    ],
)
def test_bad_weights_or_tau_name_the_argument(weights, tau, message):
    with pytest.raises(ValueError, match=message):
        class_weight_offsets(weights, tau)


def test_adjusted_logits_are_the_net_plus_the_offsets(net):
    offsets = class_weight_offsets(WEIGHTS, tau=0.5)
    model = with_logit_adjustment(net, offsets)
    logits = np.asarray(net(IMAGE))
    np.testing.assert_allclose(np.asarray(model(IMAGE)), logits + offsets, atol=1e-5)
    assert model.layers[-1].name == "score_adjust"
    np.testing.assert_allclose(offsets_of(model), offsets)
    assert offsets_of(net) is None and model.count_params() == net.count_params()
    # The offsets change decisions: some pixel's class moves.
    assert (np.argmax(logits + offsets, -1) != np.argmax(logits, -1)).any()


def test_tau_one_gives_the_posterior_divided_by_the_weights(net):
    model = with_logit_adjustment(net, class_weight_offsets(WEIGHTS, tau=1.0))
    want = _softmax(np.asarray(net(IMAGE), np.float64)) / WEIGHTS
    want /= want.sum(-1, keepdims=True)
    np.testing.assert_allclose(_softmax(np.asarray(model(IMAGE), np.float64)), want, atol=1e-5)


def test_replacing_and_removing(net):
    first = with_logit_adjustment(net, class_weight_offsets(WEIGHTS, 1.0))
    second = with_logit_adjustment(first, class_weight_offsets(WEIGHTS, 0.25))
    assert sum(layer.name == "score_adjust" for layer in second.layers) == 1
    logits = np.asarray(net(IMAGE))
    np.testing.assert_allclose(
        np.asarray(second(IMAGE)), logits + class_weight_offsets(WEIGHTS, 0.25), atol=1e-5
    )
    for removed in (
        with_logit_adjustment(first, None),
        with_logit_adjustment(first, [0] * NUM_CLASSES),
    ):
        assert [layer.name for layer in removed.layers] == [layer.name for layer in net.layers]
        np.testing.assert_array_equal(np.asarray(removed(IMAGE)), logits)


def test_input_scale_and_adjustment_commute_and_survive_each_other(net, tmp_path):
    import kfcn
    from kfcn.input_scale import input_scale_of

    offsets = class_weight_offsets(WEIGHTS, 0.5)
    a = with_input_scale(with_logit_adjustment(net, offsets), 1.25)
    b = with_logit_adjustment(with_input_scale(net, 1.25), offsets)
    np.testing.assert_allclose(np.asarray(a(IMAGE)), np.asarray(b(IMAGE)), atol=1e-4)
    assert input_scale_of(a) == input_scale_of(b) == 1.25
    np.testing.assert_allclose(offsets_of(a), offsets)
    path = tmp_path / "both.keras"
    a.save(path)
    loaded = kfcn.load_model(path, compile=False)
    np.testing.assert_allclose(np.asarray(loaded(IMAGE)), np.asarray(a(IMAGE)), atol=1e-6)
    np.testing.assert_allclose(offsets_of(loaded), offsets)


def test_offsets_must_match_the_classes(net):
    with pytest.raises(ValueError, match=f"one value per class \\({NUM_CLASSES}\\)"):
        with_logit_adjustment(net, [0.1, 0.2])
    two = __import__("keras").Model(net.input, [net.output, net.output])
    with pytest.raises(ValueError, match="one logits output"):
        with_logit_adjustment(two, [0.0] * NUM_CLASSES)


@pytest.mark.slow
def test_tflite_runs_scaled_and_adjusted_net_on_the_gpu_delegate(net):
    import tensorflow as tf

    from kfcn.export import gpu_compat
    from kfcn.export.tflite import convert, rebuild_static

    offsets = class_weight_offsets(WEIGHTS, 0.5)
    model = with_logit_adjustment(with_input_scale(net, 1.25), offsets)
    flatbuffer = convert(rebuild_static(model, (37, 53)), "none")
    gpu = gpu_compat.check_gpu_compatibility(flatbuffer)
    assert gpu.ok, gpu.format()
    interpreter = tf.lite.Interpreter(model_content=flatbuffer)
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], IMAGE[:1])
    interpreter.invoke()
    got = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    want = np.asarray(with_input_scale(net, 1.25)(IMAGE[:1])) + offsets
    np.testing.assert_allclose(got, want, atol=1e-3 * np.abs(want).max())
