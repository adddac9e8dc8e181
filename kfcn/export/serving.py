"""TensorFlow Serving model directories: versioned, atomic, warmed up, configured.

Layout written by `export_for_serving(model, base_path, "fcn")`:

    base_path/
      models.config                  model_config_list text proto (all exported models)
      batching_parameters.txt        sample BatchingParameters text proto
      fcn/
        1/                           one SavedModel per version (see saved_model.py)
          saved_model.pb
          variables/
          assets.extra/tf_serving_warmup_requests

A version is built in `fcn/.tmp-<version>-<pid>/` and renamed to `fcn/<version>/`
when complete. TensorFlow Serving's file-system source only loads numeric
directories, so a server polling `fcn/` never sees a half-written version, and an
export killed midway leaves only a hidden temporary directory, removed by the next
export once its process is gone.

`--overwrite` of an existing version renames the old directory aside, renames the
new one into place and then deletes the old one: the server sees either the
complete old or the complete new version (it may unload and reload the version
between two polls). Prefer a new version number; overwriting a version a server
has loaded does not make it reload a different model for the same number in all
versions of TF Serving.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil

from kfcn.export import model_io
from kfcn.export import saved_model as saved_model_lib
from kfcn.files import replace_path, write_text_atomically

logger = logging.getLogger(__name__)

WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")
MODELS_CONFIG = "models.config"
BATCHING_PARAMETERS = "batching_parameters.txt"
DEFAULT_WARMUP_SIZES = ((360, 480), (512, 512))
_TMP_DIR = re.compile(r"^\.tmp-(\d+)-(\d+)$")
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")

BATCHING_NOTE = """\
# Sample TensorFlow Serving batching parameters for a kfcn segmentation model
# (tensorflow.serving.BatchingParameters, text format). Use with
#   tensorflow_model_server --enable_batching --batching_parameters_file=<this file>
#
# Batching concatenates the requests of one batch along the batch dimension, so
# every image in a batch must have the same height and width. With
# pad_variable_length_inputs false (as here) a batch that mixes sizes fails;
# with it true the smaller images would be zero-padded and their class_ids
# returned at the padded size, which is a wrong answer. So:
#   * if clients send one image size (e.g. camera frames resized client-side),
#     keep max_batch_size > 1 as below;
#   * if they send mixed sizes, set max_batch_size to 1 (or run without
#     --enable_batching), or run one model server per image size.
"""


@dataclasses.dataclass(frozen=True)
class ServingExport:
    """Paths written by `export_for_serving`.

    Attributes:
        model_dir: base_path/model_name.
        version: The version number written.
        version_dir: model_dir/<version>, the SavedModel.
        warmup_file: The warmup TFRecord inside the version.
        config_file: base_path/models.config, or None if not written.
        batching_file: base_path/batching_parameters.txt, or None if not written.
    """

    model_dir: str
    version: int
    version_dir: str
    warmup_file: str
    config_file: str | None
    batching_file: str | None


def existing_versions(model_dir: str | os.PathLike) -> list[int]:
    """Sorted version numbers (numeric subdirectories) under a model directory."""
    model_dir = os.fspath(model_dir)
    if not os.path.isdir(model_dir):
        return []
    return sorted(
        int(name)
        for name in os.listdir(model_dir)
        if name.isdigit() and os.path.isdir(os.path.join(model_dir, name))
    )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(model_dir: str | os.PathLike) -> list[str]:
    """Deletes `.tmp-<version>-<pid>` directories left by exports that died.

    Returns:
        The removed paths.
    """
    removed = []
    model_dir = os.fspath(model_dir)
    if not os.path.isdir(model_dir):
        return removed
    for name in os.listdir(model_dir):
        match = _TMP_DIR.match(name)
        if match and not _pid_alive(int(match.group(2))):
            path = os.path.join(model_dir, name)
            shutil.rmtree(path, ignore_errors=True)
            logger.warning("Removed %s left by an interrupted export", path)
            removed.append(path)
    return removed


def write_warmup_requests(
    path: str | os.PathLike,
    model_name: str,
    sizes=DEFAULT_WARMUP_SIZES,
    batch_size: int = 1,
    signatures=(saved_model_lib.SIGNATURE_IMAGES, saved_model_lib.SIGNATURE_BYTES),
    modality: str = "rgb",
) -> int:
    """Writes TF Serving warmup requests: a TFRecord of PredictionLog protos.

    One PredictRequest per signature and size, with a mid-gray image (uint8 tensor
    for `serving_default`, JPEG bytes for `serving_bytes`), so the server traces
    and allocates for typical sizes before it takes traffic.

    Args:
        path: Output file (normally <version>/assets.extra/tf_serving_warmup_requests).
        model_name: Name in each request's ModelSpec.
        sizes: (height, width) pairs.
        batch_size: Images per request.
        signatures: Signature names to warm up.
        modality: The model's inputs (`kfcn.export.model_io`): "rgb" (`images`,
            or `image_bytes`), "rgbd" (`rgb` uint8 and `depth` uint16, 2.5 m) or
            "rgb+hha" (`rgb` and `hha`, uint8); the last two have only
            `serving_default`.

    Returns:
        The number of records written.
    """
    import numpy as np
    import tensorflow as tf
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    records = 0
    os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
    with tf.io.TFRecordWriter(os.fspath(path)) as writer:
        for height, width in sizes:
            image = np.full((batch_size, int(height), int(width), 3), 128, np.uint8)
            for signature in signatures:
                if modality != "rgb":
                    inputs = {saved_model_lib.INPUT_RGB: tf.make_tensor_proto(image)}
                    if modality == "rgbd":
                        depth = np.full((batch_size, int(height), int(width), 1), 2500, np.uint16)
                        inputs[saved_model_lib.INPUT_DEPTH] = tf.make_tensor_proto(depth)
                    else:
                        inputs[saved_model_lib.INPUT_HHA] = tf.make_tensor_proto(image)
                elif signature == saved_model_lib.SIGNATURE_BYTES:
                    encoded = tf.io.encode_jpeg(image[0]).numpy()
                    inputs = {
                        saved_model_lib.INPUT_BYTES: tf.make_tensor_proto(
                            [encoded] * batch_size, dtype=tf.string
                        )
                    }
                else:
                    inputs = {saved_model_lib.INPUT_IMAGES: tf.make_tensor_proto(image)}
                request = predict_pb2.PredictRequest(
                    model_spec=model_pb2.ModelSpec(name=model_name, signature_name=signature)
                )
                for key, proto in inputs.items():
                    request.inputs[key].CopyFrom(proto)
                log = prediction_log_pb2.PredictionLog(
                    predict_log=prediction_log_pb2.PredictLog(request=request)
                )
                writer.write(log.SerializeToString())
                records += 1
    return records


def replay_warmup_requests(version_dir: str | os.PathLike) -> int:
    """Runs every warmup record through the SavedModel, as the server does at load.

    A warmup request that fails makes TF Serving refuse the version, so exports
    check this before publishing one.

    Returns:
        The number of records replayed.

    Raises:
        RuntimeError: If a record names an unknown signature or its run fails.
    """
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    version_dir = os.fspath(version_dir)
    path = os.path.join(version_dir, WARMUP_FILE)
    loaded = tf.saved_model.load(version_dir)
    count = 0
    for record in tf.data.TFRecordDataset(path):
        request = prediction_log_pb2.PredictionLog.FromString(record.numpy()).predict_log.request
        name = request.model_spec.signature_name or saved_model_lib.SIGNATURE_IMAGES
        if name not in loaded.signatures:
            raise RuntimeError(f"Warmup record {count} names unknown signature {name!r}")
        inputs = {k: tf.constant(tf.make_ndarray(v)) for k, v in request.inputs.items()}
        try:
            loaded.signatures[name](**inputs)
        except tf.errors.OpError as err:
            raise RuntimeError(f"Warmup record {count} ({name}) fails: {err.message}") from err
        count += 1
    return count


def write_model_server_config(
    config_path: str | os.PathLike,
    model_name: str,
    model_base_path: str,
    versions: list[int],
    keep_versions: int = 2,
) -> str:
    """Adds or updates one model in a `model_config_list` models.config file.

    The model is served with a `specific` version policy over its newest
    `keep_versions` versions, labelled "stable" (newest) and "previous".

    Args:
        config_path: The models.config file; other models in it are kept.
        model_name: Model name clients use.
        model_base_path: Model directory as the server sees it (e.g. /models/fcn in
            the tensorflow/serving container).
        versions: Existing version numbers.
        keep_versions: How many of the newest versions to serve.

    Returns:
        The text written.
    """
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    config_path = os.fspath(config_path)
    server_config = model_server_config_pb2.ModelServerConfig()
    if os.path.exists(config_path):
        with open(config_path, encoding="utf-8") as f:
            text_format.Parse(f.read(), server_config)
    kept = [c for c in server_config.model_config_list.config if c.name != model_name]
    del server_config.model_config_list.config[:]
    server_config.model_config_list.config.extend(kept)
    entry = server_config.model_config_list.config.add()
    entry.name = model_name
    entry.base_path = model_base_path
    entry.model_platform = "tensorflow"
    served = sorted(versions)[-keep_versions:]
    entry.model_version_policy.specific.versions.extend(served)
    entry.version_labels["stable"] = served[-1]
    if len(served) > 1:
        entry.version_labels["previous"] = served[-2]
    text = text_format.MessageToString(server_config)
    write_text_atomically(text, config_path)
    return text


def batching_parameters_class():
    """The tensorflow.serving.BatchingParameters message class.

    tensorflow-serving-api does not ship session_bundle_config_pb2, so the message
    is declared here with the field numbers and types of
    tensorflow_serving/servables/tensorflow/session_bundle_config.proto.
    """
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, wrappers_pb2

    pool = descriptor_pool.DescriptorPool()
    pool.Add(descriptor_pb2.FileDescriptorProto.FromString(wrappers_pb2.DESCRIPTOR.serialized_pb))
    file_proto = descriptor_pb2.FileDescriptorProto(
        name="kfcn/session_bundle_config_batching.proto",
        package="tensorflow.serving",
        syntax="proto3",
        dependency=["google/protobuf/wrappers.proto"],
    )
    message = file_proto.message_type.add(name="BatchingParameters")
    field = descriptor_pb2.FieldDescriptorProto
    for number, name, type_name in (
        (1, "max_batch_size", ".google.protobuf.Int64Value"),
        (2, "batch_timeout_micros", ".google.protobuf.Int64Value"),
        (3, "max_enqueued_batches", ".google.protobuf.Int64Value"),
        (4, "num_batch_threads", ".google.protobuf.Int64Value"),
        (5, "thread_pool_name", ".google.protobuf.StringValue"),
    ):
        message.field.add(
            name=name,
            number=number,
            type=field.TYPE_MESSAGE,
            type_name=type_name,
            label=field.LABEL_OPTIONAL,
        )
    message.field.add(
        name="allowed_batch_sizes", number=6, type=field.TYPE_INT64, label=field.LABEL_REPEATED
    )
    message.field.add(
        name="pad_variable_length_inputs",
        number=7,
        type=field.TYPE_BOOL,
        label=field.LABEL_OPTIONAL,
    )
    pool.Add(file_proto)
    return message_factory.GetMessageClass(
        pool.FindMessageTypeByName("tensorflow.serving.BatchingParameters")
    )


def write_batching_parameters(
    path: str | os.PathLike,
    max_batch_size: int = 8,
    batch_timeout_micros: int = 5000,
    num_batch_threads: int = 2,
    max_enqueued_batches: int = 32,
) -> str:
    """Writes a sample BatchingParameters text proto with a note on image sizes.

    Returns:
        The text written.
    """
    from google.protobuf import text_format

    params = batching_parameters_class()()
    params.max_batch_size.value = max_batch_size
    params.batch_timeout_micros.value = batch_timeout_micros
    params.num_batch_threads.value = num_batch_threads
    params.max_enqueued_batches.value = max_enqueued_batches
    sizes = sorted({1, 2, 4, max_batch_size} & set(range(1, max_batch_size + 1)))
    params.allowed_batch_sizes.extend(sizes)
    params.pad_variable_length_inputs = False
    text = BATCHING_NOTE + text_format.MessageToString(params, print_unknown_fields=False)
    # proto3 leaves false booleans out; state the choice explicitly.
    if "pad_variable_length_inputs" not in text:
        text += "pad_variable_length_inputs: false\n"
    write_text_atomically(text, path)
    return text


def export_for_serving(
    model,
    base_path: str | os.PathLike,
    model_name: str,
    *,
    version: int | None = None,
    overwrite: bool = False,
    include_probabilities: bool = True,
    max_pixels: int = saved_model_lib.DEFAULT_MAX_PIXELS,
    warmup_sizes=DEFAULT_WARMUP_SIZES,
    write_configs: bool = True,
    config_model_base_path: str | None = None,
    verify: bool = True,
    class_info=None,
) -> ServingExport:
    """Exports a kfcn model as one version of a TensorFlow Serving model.

    Args:
        model: A kfcn segmentation keras.Model (any kind `kfcn.export.model_io`
            describes: RGB-D, RGB-HHA and multi-task models get their own
            signature and warmup requests).
        base_path: Directory holding one subdirectory per model name.
        model_name: The model's name on the server (letters, digits, `_.-`).
        version: Version number (>= 1); default: the largest existing + 1.
        overwrite: Replace an existing version (see the module docstring).
        include_probabilities: Return `probabilities` beside `class_ids`.
        max_pixels: Largest height*width a request may send per image.
        warmup_sizes: (height, width) pairs for the warmup requests; empty for none.
        write_configs: Also write base_path/models.config and
            base_path/batching_parameters.txt.
        config_model_base_path: The model directory as the server sees it, for
            models.config; default: the absolute local path.
        verify: Reload the SavedModel, run both signatures and replay the warmup
            requests before publishing the version.
        class_info: A `kfcn.metadata.ClassInfo` to store in the version's
            assets.extra (written before the version is published).

    Returns:
        A `ServingExport` with the paths written.

    Raises:
        ValueError: For a bad `model_name`, `version` or model.
        FileExistsError: If the version exists and `overwrite` is False.
    """
    from kfcn.dilated_fcn import inference_model  # imports Keras: not at module import

    model = inference_model(model)  # drops auxiliary heads (training only)
    io = model_io.describe(model)
    if not isinstance(model_name, str) or not _MODEL_NAME.match(model_name):
        raise ValueError(
            "`model_name` must start with a letter or digit and hold only letters, digits, "
            f"'_', '.', '-'. Received: model_name={model_name!r}"
        )
    if version is not None and (int(version) != version or version < 1):
        raise ValueError(f"`version` must be an integer >= 1. Received: version={version!r}")
    base_path = os.path.abspath(os.fspath(base_path))
    model_dir = os.path.join(base_path, model_name)
    os.makedirs(model_dir, exist_ok=True)
    remove_stale_temporaries(model_dir)
    versions = existing_versions(model_dir)
    if version is None:
        version = (versions[-1] + 1) if versions else 1
    version = int(version)
    version_dir = os.path.join(model_dir, str(version))
    if os.path.exists(version_dir) and not overwrite:
        raise FileExistsError(
            f"Version {version} of model {model_name!r} already exists at {version_dir!r}; "
            "choose another --version (default: next free) or pass --overwrite"
        )

    # A non-numeric name: TF Serving ignores it while it is being written.
    tmp = os.path.join(model_dir, f".tmp-{version}-{os.getpid()}")
    os.makedirs(tmp)
    try:
        saved_model_lib.write_saved_model(
            model, tmp, include_probabilities=include_probabilities, max_pixels=max_pixels
        )
        if warmup_sizes:
            signatures = (saved_model_lib.SIGNATURE_IMAGES,)
            if io.modality == model_io.RGB:
                signatures += (saved_model_lib.SIGNATURE_BYTES,)
            write_warmup_requests(
                os.path.join(tmp, WARMUP_FILE),
                model_name,
                warmup_sizes,
                signatures=signatures,
                modality=io.modality,
            )
        if verify:
            saved_model_lib.verify_saved_model(tmp, include_probabilities)
            if warmup_sizes:
                replay_warmup_requests(tmp)
        if class_info is not None:
            from kfcn.metadata import write_class_info

            write_class_info(class_info, tmp)
        replace_path(tmp, version_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("Wrote version %d of %r to %s", version, model_name, version_dir)

    config_file = batching_file = None
    if write_configs:
        config_file = os.path.join(base_path, MODELS_CONFIG)
        write_model_server_config(
            config_file,
            model_name,
            config_model_base_path or model_dir,
            existing_versions(model_dir),
        )
        batching_file = os.path.join(base_path, BATCHING_PARAMETERS)
        write_batching_parameters(batching_file)
    return ServingExport(
        model_dir=model_dir,
        version=version,
        version_dir=version_dir,
        warmup_file=os.path.join(version_dir, WARMUP_FILE),
        config_file=config_file,
        batching_file=batching_file,
    )
