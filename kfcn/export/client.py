"""Clients for a kfcn model behind TensorFlow Serving, returning numpy label maps.

`RestClient` speaks the REST API (`POST /v1/models/<name>[/versions/<v> |
/labels/<l>]:predict`, port 8501); `GrpcClient` the gRPC PredictionService (port
8500) with the 4 MB default message limits raised, since a probability map of a
512x512 image over 21 classes alone is 22 MB.

Both send either encoded images (JPEG/PNG bytes, signature `serving_bytes`) or
uint8 arrays (signature `serving_default`) and return `class_ids` as an int32
array [batch, height, width] (and `probabilities` when asked).

Example:
    >>> client = GrpcClient("localhost:8500", "fcn")
    >>> label_map = client.predict_bytes([open("street.jpg", "rb").read()])[0]
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from collections.abc import Sequence

import numpy as np

from kfcn.export.saved_model import (
    INPUT_BYTES,
    INPUT_IMAGES,
    OUTPUT_CLASS_IDS,
    OUTPUT_PROBABILITIES,
    SIGNATURE_BYTES,
    SIGNATURE_IMAGES,
)

DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024


class ServingError(RuntimeError):
    """The server rejected a request; `code` is the gRPC status or HTTP code."""

    def __init__(self, message: str, code: str | int | None = None):
        super().__init__(message)
        self.code = code


def _as_images(images) -> np.ndarray:
    array = np.asarray(images)
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(
            "`images` must be uint8 [batch, height, width, 3] or [height, width, 3]. "
            f"Received shape {array.shape}"
        )
    if array.dtype != np.uint8:
        raise ValueError(f"`images` must be uint8 (0..255 RGB). Received dtype {array.dtype}")
    return array


def _as_bytes_list(encoded: Sequence[bytes] | bytes) -> list[bytes]:
    if isinstance(encoded, bytes | bytearray):
        encoded = [encoded]
    encoded = [bytes(e) for e in encoded]
    if not encoded:
        raise ValueError("`encoded_images` must hold at least one encoded image")
    return encoded


class RestClient:
    """TensorFlow Serving REST client.

    Args:
        url: Server root, e.g. "http://localhost:8501".
        model_name: Model name on the server.
        version: Specific version to query, or None.
        label: Version label to query (e.g. "stable"), or None.
        timeout: Seconds per request.
    """

    def __init__(
        self,
        url: str,
        model_name: str,
        version: int | None = None,
        label: str | None = None,
        timeout: float = 60.0,
    ):
        if version is not None and label is not None:
            raise ValueError(
                f"Pass `version` or `label`, not both. Received: version={version}, label={label!r}"
            )
        path = f"/v1/models/{model_name}"
        if version is not None:
            path += f"/versions/{int(version)}"
        elif label is not None:
            path += f"/labels/{label}"
        self.predict_url = url.rstrip("/") + path + ":predict"
        self.timeout = timeout

    def _post(self, body: dict) -> dict:
        data = json.dumps(body).encode()
        request = urllib.request.Request(
            self.predict_url, data=data, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as err:
            payload = err.read().decode(errors="replace")
            try:
                message = json.loads(payload).get("error", payload)
            except ValueError:
                message = payload
            raise ServingError(
                f"HTTP {err.code} from {self.predict_url}: {message}", err.code
            ) from None

    @staticmethod
    def _parse(response: dict, with_probabilities: bool) -> dict[str, np.ndarray]:
        if "predictions" in response:  # row ("instances") format
            rows = response["predictions"]
            if rows and isinstance(rows[0], dict):
                outputs = {key: np.asarray([row[key] for row in rows]) for key in rows[0]}
            else:  # a single output is returned bare
                outputs = {OUTPUT_CLASS_IDS: np.asarray(rows)}
        else:  # columnar ("inputs") format
            raw = response["outputs"]
            outputs = (
                {k: np.asarray(v) for k, v in raw.items()}
                if isinstance(raw, dict)
                else {OUTPUT_CLASS_IDS: np.asarray(raw)}
            )
        result = {OUTPUT_CLASS_IDS: outputs[OUTPUT_CLASS_IDS].astype(np.int32)}
        if with_probabilities:
            if OUTPUT_PROBABILITIES not in outputs:
                raise ServingError("The model was exported without `probabilities`")
            result[OUTPUT_PROBABILITIES] = outputs[OUTPUT_PROBABILITIES].astype(np.float32)
        return result

    def predict_bytes(
        self, encoded_images: Sequence[bytes] | bytes, with_probabilities: bool = False
    ) -> np.ndarray | dict[str, np.ndarray]:
        """Segments encoded JPEG/PNG images (all of one size) via `serving_bytes`.

        Returns:
            int32 label maps [batch, height, width], or a dict with `class_ids` and
            `probabilities` if `with_probabilities`.
        """
        instances = [
            {"b64": base64.b64encode(e).decode("ascii")} for e in _as_bytes_list(encoded_images)
        ]
        body = {"signature_name": SIGNATURE_BYTES, "instances": instances}
        outputs = self._parse(self._post(body), with_probabilities)
        return outputs if with_probabilities else outputs[OUTPUT_CLASS_IDS]

    def predict_images(
        self, images, with_probabilities: bool = False
    ) -> np.ndarray | dict[str, np.ndarray]:
        """Segments uint8 RGB images via `serving_default` (columnar "inputs" format)."""
        array = _as_images(images)
        body = {"signature_name": SIGNATURE_IMAGES, "inputs": {INPUT_IMAGES: array.tolist()}}
        outputs = self._parse(self._post(body), with_probabilities)
        return outputs if with_probabilities else outputs[OUTPUT_CLASS_IDS]


class GrpcClient:
    """TensorFlow Serving gRPC PredictionService client.

    Args:
        target: "host:port" of the gRPC endpoint (default port 8500).
        model_name: Model name on the server.
        version: Specific version, or None for the server's choice.
        label: Version label (e.g. "stable"), or None.
        timeout: Seconds per request.
        max_message_bytes: Send/receive size limit; gRPC's default of 4 MB is too
            small for probability maps.
    """

    def __init__(
        self,
        target: str,
        model_name: str,
        version: int | None = None,
        label: str | None = None,
        timeout: float = 60.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ):
        import grpc
        from tensorflow_serving.apis import prediction_service_pb2_grpc

        if version is not None and label is not None:
            raise ValueError(
                f"Pass `version` or `label`, not both. Received: version={version}, label={label!r}"
            )
        self.model_name = model_name
        self.version = version
        self.label = label
        self.timeout = timeout
        self.channel = grpc.insecure_channel(
            target,
            options=[
                ("grpc.max_send_message_length", max_message_bytes),
                ("grpc.max_receive_message_length", max_message_bytes),
            ],
        )
        self.stub = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> GrpcClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _predict(self, signature: str, key: str, proto, with_probabilities: bool):
        import grpc
        import tensorflow as tf
        from tensorflow_serving.apis import predict_pb2

        request = predict_pb2.PredictRequest()
        request.model_spec.name = self.model_name
        request.model_spec.signature_name = signature
        if self.version is not None:
            request.model_spec.version.value = int(self.version)
        elif self.label is not None:
            request.model_spec.version_label = self.label
        request.inputs[key].CopyFrom(proto)
        request.output_filter.append(OUTPUT_CLASS_IDS)
        if with_probabilities:
            request.output_filter.append(OUTPUT_PROBABILITIES)
        try:
            response = self.stub.Predict(request, timeout=self.timeout)
        except grpc.RpcError as err:
            raise ServingError(
                f"{err.code().name} from PredictionService: {err.details()}", err.code().name
            ) from None
        outputs = {k: tf.make_ndarray(v) for k, v in response.outputs.items()}
        class_ids = outputs[OUTPUT_CLASS_IDS].astype(np.int32)
        if with_probabilities:
            probabilities = outputs[OUTPUT_PROBABILITIES]
            return {OUTPUT_CLASS_IDS: class_ids, OUTPUT_PROBABILITIES: probabilities}
        return class_ids

    def predict_bytes(
        self, encoded_images: Sequence[bytes] | bytes, with_probabilities: bool = False
    ) -> np.ndarray | dict[str, np.ndarray]:
        """Segments encoded JPEG/PNG images (all of one size) via `serving_bytes`."""
        import tensorflow as tf

        proto = tf.make_tensor_proto(_as_bytes_list(encoded_images), dtype=tf.string)
        return self._predict(SIGNATURE_BYTES, INPUT_BYTES, proto, with_probabilities)

    def predict_images(
        self, images, with_probabilities: bool = False
    ) -> np.ndarray | dict[str, np.ndarray]:
        """Segments uint8 RGB images via `serving_default`."""
        import tensorflow as tf

        proto = tf.make_tensor_proto(_as_images(images))
        return self._predict(SIGNATURE_IMAGES, INPUT_IMAGES, proto, with_probabilities)
