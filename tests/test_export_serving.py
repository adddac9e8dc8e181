"""TF Serving export: layout, atomic versions, warmup records, configs, REST/gRPC clients.

The tensorflow_model_server binary cannot be installed here, so the client tests
run against stand-ins on 127.0.0.1: a gRPC PredictionService built from
tensorflow-serving-api's generated service and a small http.server REST endpoint.
Both load the exported SavedModel with TensorFlow and run the requested
signature, as the real server does; they stand in for it, they are not it.
"""

import base64
import http.server
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent import futures

import numpy as np
import pytest
import tensorflow as tf
from export_fixtures import VARIANTS, cached_confident_model, synthetic_scenes, tiny_kfcn_model
from google.protobuf import text_format

from kfcn.export import client as client_lib
from kfcn.export import serving

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WARMUP_SIZES = ((64, 96), (48, 80))
MAX_MESSAGE = 64 * 1024 * 1024
# Softmax outputs of two float32 graphs: the fixtures' logits pass through every path
# (~60 layers), whose rounding differs by up to ~1e-5 between the graphs.
PROBABILITY_ATOL = 5e-5


def _keras_reference(model, images):
    logits = np.asarray(model(np.asarray(images, np.float32), training=False), np.float64)
    top2 = np.sort(logits, -1)[..., -2:]
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return logits.argmax(-1), e / e.sum(-1, keepdims=True), top2[..., 1] - top2[..., 0]


def _assert_same_class_map(class_ids, reference, margin):
    assert class_ids.shape == reference.shape
    clear = margin > 1e-3
    np.testing.assert_array_equal(class_ids[clear], reference[clear])
    assert np.mean(class_ids == reference) >= 0.999


class _Models:
    """Resolves (name, version, label) to a loaded SavedModel under a base path."""

    def __init__(self, base_path):
        self.base_path = base_path
        self._cache = {}

    def signature(self, name, version, label, signature_name):
        from tensorflow_serving.config import model_server_config_pb2

        model_dir = os.path.join(self.base_path, name)
        if not os.path.isdir(model_dir):
            raise LookupError(f"Servable not found for request: Latest({name})")
        if label:
            config = model_server_config_pb2.ModelServerConfig()
            with open(os.path.join(self.base_path, serving.MODELS_CONFIG)) as f:
                text_format.Parse(f.read(), config)
            entry = next(c for c in config.model_config_list.config if c.name == name)
            version = entry.version_labels[label]
        version = version or max(serving.existing_versions(model_dir))
        key = (name, version)
        if key not in self._cache:
            self._cache[key] = tf.saved_model.load(os.path.join(model_dir, str(version)))
        return self._cache[key].signatures[signature_name or "serving_default"]


def _start_grpc_stand_in(base_path):
    """A PredictionService on 127.0.0.1 that runs the exported SavedModel (stand-in)."""
    import grpc
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    models = _Models(base_path)

    class Servicer(prediction_service_pb2_grpc.PredictionServiceServicer):
        def Predict(self, request, context):  # noqa: N802 (gRPC method name)
            spec = request.model_spec
            try:
                fn = models.signature(
                    spec.name,
                    spec.version.value if spec.HasField("version") else None,
                    spec.version_label,
                    spec.signature_name,
                )
            except LookupError as err:
                context.abort(grpc.StatusCode.NOT_FOUND, str(err))
            inputs = {k: tf.constant(tf.make_ndarray(v)) for k, v in request.inputs.items()}
            try:
                outputs = fn(**inputs)
            except tf.errors.InvalidArgumentError as err:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, err.message)
            keys = list(request.output_filter) or list(outputs)
            response = predict_pb2.PredictResponse()
            response.model_spec.CopyFrom(spec)
            for key in keys:
                response.outputs[key].CopyFrom(tf.make_tensor_proto(outputs[key].numpy()))
            return response

    options = [
        ("grpc.max_send_message_length", MAX_MESSAGE),
        ("grpc.max_receive_message_length", MAX_MESSAGE),
    ]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=options)
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(Servicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def _start_rest_stand_in(base_path):
    """A TF Serving-like REST :predict endpoint on 127.0.0.1 (stand-in)."""
    models = _Models(base_path)
    route = re.compile(r"^/v1/models/([^/:]+)(?:/versions/(\d+)|/labels/([^/:]+))?:predict$")

    def decode(value):
        if isinstance(value, dict) and set(value) == {"b64"}:
            return base64.b64decode(value["b64"])
        if isinstance(value, list):
            return [decode(v) for v in value]
        return value

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _reply(self, code, body):
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self):  # noqa: N802 (http.server method name)
            match = route.match(self.path)
            if not match:
                return self._reply(404, {"error": f"Malformed request: POST {self.path}"})
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            try:
                fn = models.signature(
                    match.group(1),
                    int(match.group(2) or 0) or None,
                    match.group(3),
                    body.get("signature_name"),
                )
            except LookupError as err:
                return self._reply(404, {"error": str(err)})
            ((input_name, spec),) = fn.structured_input_signature[1].items()
            if "instances" in body:
                value = decode(body["instances"])
            else:
                value = decode(body["inputs"])
                value = value[input_name] if isinstance(value, dict) else value
            try:
                outputs = fn(**{input_name: tf.constant(value, dtype=spec.dtype)})
            except tf.errors.InvalidArgumentError as err:
                return self._reply(400, {"error": err.message})
            outputs = {k: v.numpy().tolist() for k, v in outputs.items()}
            if "instances" in body:
                count = len(next(iter(outputs.values())))
                rows = [{k: v[i] for k, v in outputs.items()} for i in range(count)]
                return self._reply(200, {"predictions": rows})
            return self._reply(200, {"outputs": outputs})

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1]


# Every variant: the fixtures' outputs depend on every path (deep blocks, upscore2,
# upscore_pool4, skips), so a conversion bug in any of them breaks the client parity tests.
# Tests of the layout, warmup and configs run on FCN-8s only (`_FCN8S_ONLY`).
@pytest.fixture(scope="module", params=VARIANTS)
def served(request, tmp_path_factory):
    model, _ = cached_confident_model(tmp_path_factory, request.param)
    base = tmp_path_factory.mktemp("serving")
    result = serving.export_for_serving(model, base, "fcn", warmup_sizes=WARMUP_SIZES)
    return model, base, result


_FCN8S_ONLY = pytest.mark.parametrize("served", ["fcn8s"], indirect=True)


@pytest.fixture(scope="module")
def grpc_target(served):
    server, port = _start_grpc_stand_in(str(served[1]))
    yield f"127.0.0.1:{port}"
    server.stop(None)


@pytest.fixture(scope="module")
def rest_url(served):
    server, port = _start_rest_stand_in(str(served[1]))
    yield f"http://127.0.0.1:{port}"
    server.shutdown()


@pytest.fixture(scope="module")
def scenes():
    return synthetic_scenes(2, seed=11)[0]


@_FCN8S_ONLY
def test_layout(served):
    _, base, result = served
    assert sorted(os.listdir(base)) == ["batching_parameters.txt", "fcn", "models.config"]
    assert os.listdir(base / "fcn") == ["1"]
    assert result.version == 1 and result.version_dir == str(base / "fcn" / "1")
    version_dir = base / "fcn" / "1"
    assert (version_dir / "saved_model.pb").is_file()
    assert (version_dir / "variables").is_dir()
    assert (version_dir / "assets.extra" / "tf_serving_warmup_requests").is_file()


@_FCN8S_ONLY
def test_warmup_records_parse_back(served):
    from tensorflow_serving.apis import prediction_log_pb2

    _, base, result = served
    seen = set()
    loaded = tf.saved_model.load(result.version_dir)
    for record in tf.data.TFRecordDataset(result.warmup_file):
        log = prediction_log_pb2.PredictionLog.FromString(record.numpy())
        request = log.predict_log.request
        assert request.model_spec.name == "fcn"
        signature = request.model_spec.signature_name
        ((key, proto),) = request.inputs.items()
        value = tf.make_ndarray(proto)
        if signature == "serving_bytes":
            assert key == "image_bytes" and value.dtype == object and value.shape == (1,)
            size = tuple(tf.io.decode_jpeg(value[0]).shape[:2])
        else:
            assert key == "images" and value.dtype == np.uint8 and value.shape[3] == 3
            size = value.shape[1:3]
        seen.add((signature, tuple(size)))
        # The server replays each record at load; it must run.
        outputs = loaded.signatures[signature](**{key: tf.constant(value)})
        assert tuple(outputs["class_ids"].shape) == (1, *size)
    signatures = ("serving_default", "serving_bytes")
    assert seen == {(s, size) for s in signatures for size in WARMUP_SIZES}


@_FCN8S_ONLY
def test_models_config_and_batching_parse_back(served):
    from tensorflow_serving.config import model_server_config_pb2

    _, base, _ = served
    config = model_server_config_pb2.ModelServerConfig()
    text_format.Parse((base / "models.config").read_text(), config)
    (entry,) = config.model_config_list.config
    assert entry.name == "fcn" and entry.model_platform == "tensorflow"
    assert entry.base_path == str(base / "fcn")
    assert list(entry.model_version_policy.specific.versions) == [1]
    assert dict(entry.version_labels) == {"stable": 1}

    text = (base / "batching_parameters.txt").read_text()
    assert "same height and width" in text and "max_batch_size to 1" in text
    params = serving.batching_parameters_class()()
    text_format.Parse(text, params)
    assert params.max_batch_size.value == 8
    assert params.allowed_batch_sizes[-1] == params.max_batch_size.value  # TF Serving rule
    assert list(params.allowed_batch_sizes) == sorted(params.allowed_batch_sizes)
    assert params.pad_variable_length_inputs is False
    assert params.num_batch_threads.value >= 1


def test_versions_overwrite_and_configs(tmp_path):
    from tensorflow_serving.config import model_server_config_pb2

    model = tiny_kfcn_model()
    kwargs = dict(warmup_sizes=[(8, 8)], config_model_base_path="/models/tiny", verify=False)
    first = serving.export_for_serving(model, tmp_path, "tiny", **kwargs)
    second = serving.export_for_serving(model, tmp_path, "tiny", **kwargs)
    assert (first.version, second.version) == (1, 2)
    with pytest.raises(FileExistsError, match="Version 2 of model 'tiny' already exists"):
        serving.export_for_serving(model, tmp_path, "tiny", version=2, **kwargs)
    marker = tmp_path / "tiny" / "2" / "old-marker"
    marker.write_text("old")
    serving.export_for_serving(model, tmp_path, "tiny", version=2, overwrite=True, **kwargs)
    assert not marker.exists() and (tmp_path / "tiny" / "2" / "saved_model.pb").exists()
    assert sorted(os.listdir(tmp_path / "tiny")) == ["1", "2"]
    serving.export_for_serving(model, tmp_path, "other", **kwargs)

    config = model_server_config_pb2.ModelServerConfig()
    text_format.Parse((tmp_path / "models.config").read_text(), config)
    entries = {c.name: c for c in config.model_config_list.config}
    assert set(entries) == {"tiny", "other"}
    assert list(entries["tiny"].model_version_policy.specific.versions) == [1, 2]
    assert dict(entries["tiny"].version_labels) == {"stable": 2, "previous": 1}
    assert entries["tiny"].base_path == "/models/tiny"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(model_name="bad name"), "model_name"),
        (dict(model_name="../up"), "model_name"),
        (dict(model_name="ok", version=0), "version"),
    ],
)
def test_bad_names_and_versions(tmp_path, kwargs, message):
    name = kwargs.pop("model_name")
    with pytest.raises(ValueError, match=message):
        serving.export_for_serving(tiny_kfcn_model(), tmp_path, name, **kwargs)
    assert not (tmp_path / "ok").exists() or os.listdir(tmp_path / "ok") == []


def test_grpc_client_bytes_images_label_and_errors(served, grpc_target, scenes):
    model = served[0]
    ids, probs, margin = _keras_reference(model, scenes)
    with client_lib.GrpcClient(grpc_target, "fcn") as client:
        png = [tf.io.encode_png(im).numpy() for im in scenes]
        _assert_same_class_map(client.predict_bytes(png), ids, margin)
        out = client.predict_images(scenes, with_probabilities=True)
        _assert_same_class_map(out["class_ids"], ids, margin)
        np.testing.assert_allclose(out["probabilities"], probs, atol=PROBABILITY_ATOL)
        with pytest.raises(client_lib.ServingError, match="not a JPEG or PNG") as err:
            client.predict_bytes([b"GIF89a not really"])
        assert err.value.code == "INVALID_ARGUMENT"
    labelled = client_lib.GrpcClient(grpc_target, "fcn", label="stable")
    _assert_same_class_map(labelled.predict_images(scenes), ids, margin)
    labelled.close()


@_FCN8S_ONLY
def test_grpc_response_over_4mb(served, grpc_target):
    """512x544x4 float32 probabilities are 4.5 MB, above gRPC's 4 MB default."""
    image = np.tile(synthetic_scenes(1, seed=3)[0], (8, 6, 1))[:, :512, :544]
    assert image.shape == (1, 512, 544, 3)
    with client_lib.GrpcClient(grpc_target, "fcn") as client:
        out = client.predict_images(image, with_probabilities=True)
    assert out["probabilities"].nbytes > 4 * 1024 * 1024
    ids, _, margin = _keras_reference(served[0], image)
    _assert_same_class_map(out["class_ids"], ids, margin)
    with client_lib.GrpcClient(grpc_target, "fcn", max_message_bytes=4 * 1024 * 1024) as small:
        with pytest.raises(client_lib.ServingError, match="RESOURCE_EXHAUSTED"):
            small.predict_images(image, with_probabilities=True)


def test_rest_client_bytes_images_and_errors(served, rest_url, scenes):
    model = served[0]
    ids, probs, margin = _keras_reference(model, scenes)
    client = client_lib.RestClient(rest_url, "fcn", version=1)
    jpeg = [tf.io.encode_png(im).numpy() for im in scenes]
    _assert_same_class_map(client.predict_bytes(jpeg), ids, margin)
    out = client.predict_images(scenes, with_probabilities=True)
    _assert_same_class_map(out["class_ids"], ids, margin)
    np.testing.assert_allclose(out["probabilities"], probs, atol=PROBABILITY_ATOL)
    with pytest.raises(client_lib.ServingError, match="empty string") as err:
        client.predict_bytes([b""])
    assert err.value.code == 400
    labelled = client_lib.RestClient(rest_url, "fcn", label="stable")
    _assert_same_class_map(labelled.predict_bytes(jpeg), ids, margin)
    with pytest.raises(client_lib.ServingError, match="404"):
        client_lib.RestClient(rest_url, "nope").predict_bytes(jpeg)


@pytest.mark.slow
def test_killed_export_leaves_no_version_and_rerun_succeeds(tmp_path):
    model_path = tmp_path / "tiny.keras"
    tiny_kfcn_model().save(model_path)
    base = tmp_path / "models"
    command = [
        sys.executable,
        os.path.join(REPO, "export", "serving.py"),
        "--model",
        str(model_path),
        "--base_path",
        str(base),
        "--model_name",
        "fcn",
    ]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    model_dir = base / "fcn"
    saw_tmp = False
    deadline = time.monotonic() + 240
    while process.poll() is None and time.monotonic() < deadline:
        if model_dir.is_dir() and any(n.startswith(".tmp-") for n in os.listdir(model_dir)):
            saw_tmp = True
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    process.wait(timeout=60)
    assert saw_tmp, "the export finished before its temporary directory was seen"
    entries = os.listdir(model_dir)
    assert not [n for n in entries if n.isdigit()], entries
    assert [n for n in entries if n.startswith(".tmp-")]  # left behind, ignored by servers

    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert os.listdir(model_dir) == ["1"]  # stale temporary removed, version 1 complete
    assert (model_dir / "1" / "saved_model.pb").is_file()
