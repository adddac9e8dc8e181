"""SavedModel export with serving signatures that take images or encoded bytes.

Signatures (TF Model Garden style, one per input type):

- `serving_default`: `images`, uint8 [batch, height, width, 3], any height/width.
- `serving_bytes`: `image_bytes`, string [batch] of encoded JPEG or PNG images, all
  of one size per request. Grayscale images are replicated to RGB, the alpha
  channel of RGBA images is dropped.

Both return `class_ids` (int32 [batch, height, width], the per-pixel argmax at
exactly the input size) and, unless disabled, `probabilities` (float32 [batch,
height, width, num_classes], softmax of the logits). The kfcn model carries its
preprocessing, so the graph takes 0..255 RGB as is.

Bad requests fail inside the graph with `tf.debugging.assert_*`, so TensorFlow
Serving answers INVALID_ARGUMENT with a readable message: wrong channel count,
0-pixel images, images above `max_pixels`, empty strings, bytes that are neither
JPEG nor PNG, images of different sizes in one request, empty batches. The
channel dimension of `images` is left unknown in the signature on purpose: a
static 3 would let the graph optimizer fold the channel check away, and
TensorFlow Serving does not check fed shapes against the signature.

Models of the other kinds (`kfcn.export.model_io`):

- RGB-D (`modality="rgbd"`): `serving_default` takes `rgb`, uint8 [batch, height,
  width, 3], and `depth`, uint16 [batch, height, width, 1] as the NYUDv2 PNG holds
  it; no `serving_bytes`.
- RGB-HHA (`modality="rgb+hha"`): `serving_default` takes `rgb` and `hha`, uint8
  [batch, height, width, 3] each, of one size; no `serving_bytes`.
- Multi-task (`heads=`): every output per task, `class_ids_sem`, `class_ids_geo`,
  `probabilities_sem`, `probabilities_geo`, for each signature.

Loading needs TensorFlow only (no kfcn import):

    >>> serve = tf.saved_model.load(export_dir).signatures["serving_default"]
    >>> serve(images=tf.zeros([1, 360, 480, 3], tf.uint8))["class_ids"].shape
    TensorShape([1, 360, 480])
"""

from __future__ import annotations

import logging
import os

from kfcn.export import model_io
from kfcn.files import atomic_output

logger = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 4096 * 4096
SIGNATURE_IMAGES = "serving_default"
SIGNATURE_BYTES = "serving_bytes"
INPUT_IMAGES = "images"
INPUT_BYTES = "image_bytes"
INPUT_RGB = "rgb"
INPUT_DEPTH = "depth"
INPUT_HHA = "hha"
OUTPUT_CLASS_IDS = "class_ids"
OUTPUT_PROBABILITIES = "probabilities"

_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _serving_module_class():
    import tensorflow as tf

    class SegmentationServingModule(tf.Module):
        """Holds the Keras model and the two serving functions."""

        def __init__(self, model, include_probabilities: bool, max_pixels: int, io):
            super().__init__(name="kfcn_serving")
            self.model = model
            # Track the tf.Variables themselves: through the Keras model alone the
            # TF1-style loader (saved_model_cli, TF Serving) does not restore them.
            self.model_variables = [getattr(v, "value", v) for v in model.weights]
            self._include_probabilities = include_probabilities
            self._max_pixels = int(max_pixels)
            self._io = io
            any_shape = [None, None, None, None]
            if io.modality == model_io.RGBD:
                self.serving_default = tf.function(
                    self._serve_rgbd,
                    input_signature=[
                        tf.TensorSpec(any_shape, tf.uint8, INPUT_RGB),
                        tf.TensorSpec(any_shape, tf.uint16, INPUT_DEPTH),
                    ],
                )
                self.serving_bytes = None
            elif io.modality == model_io.RGB_HHA:
                self.serving_default = tf.function(
                    self._serve_rgb_hha,
                    input_signature=[
                        tf.TensorSpec(any_shape, tf.uint8, INPUT_RGB),
                        tf.TensorSpec(any_shape, tf.uint8, INPUT_HHA),
                    ],
                )
                self.serving_bytes = None
            else:
                self.serving_default = tf.function(
                    self._serve_images,
                    input_signature=[tf.TensorSpec(any_shape, tf.uint8, INPUT_IMAGES)],
                )
                self.serving_bytes = tf.function(
                    self._serve_bytes,
                    input_signature=[tf.TensorSpec([None], tf.string, INPUT_BYTES)],
                )

        def _check_size(self, height, width, what: str):
            pixels = tf.cast(height, tf.int64) * tf.cast(width, tf.int64)
            return [
                tf.debugging.assert_positive(
                    height, message=f"{what}: image height must be >= 1 (0-pixel image)"
                ),
                tf.debugging.assert_positive(
                    width, message=f"{what}: image width must be >= 1 (0-pixel image)"
                ),
                tf.debugging.assert_less_equal(
                    pixels,
                    tf.constant(self._max_pixels, tf.int64),
                    message=(
                        f"{what}: image has more pixels (height*width) than the limit "
                        f"max_pixels={self._max_pixels} set at export"
                    ),
                ),
            ]

        def _segment(self, images):
            logits = self.model(images, training=False)
            if not isinstance(logits, dict):
                logits = {None: logits}
            outputs = {}
            for task, task_logits in logits.items():
                # tf.argmax, not keras.ops.argmax: the latter lowers to ops TFLite and
                # some serving stacks handle badly.
                outputs[model_io.output_name(OUTPUT_CLASS_IDS, task)] = tf.argmax(
                    task_logits, axis=-1, output_type=tf.int32
                )
                if self._include_probabilities:
                    outputs[model_io.output_name(OUTPUT_PROBABILITIES, task)] = tf.nn.softmax(
                        tf.cast(task_logits, tf.float32), -1
                    )
            return outputs

        def _checked(self, tensor, name: str, channels: int, reference=None):
            """`tensor` after the batch, channel and size checks (and the same size as
            `reference`, the request's first input)."""
            shape = tf.shape(tensor)
            checks = [
                tf.debugging.assert_positive(
                    shape[0], message=f"`{name}` must hold at least one image (batch size 0)"
                ),
                tf.debugging.assert_equal(
                    shape[3],
                    channels,
                    message=f"`{name}` must be [batch, height, width, {channels}]; the last "
                    f"dimension is not {channels}",
                ),
                *self._check_size(shape[1], shape[2], f"`{name}`"),
            ]
            if reference is not None:
                checks.append(
                    tf.debugging.assert_equal(
                        shape[:3],
                        tf.shape(reference)[:3],
                        message=f"`{name}` must have the batch size, height and width of "
                        f"`{INPUT_RGB}`",
                    )
                )
            with tf.control_dependencies(checks):
                return tf.ensure_shape(tf.identity(tensor), [None, None, None, channels])

        def _serve_rgbd(self, rgb, depth):
            rgb = self._checked(rgb, INPUT_RGB, 3)
            depth = self._checked(depth, INPUT_DEPTH, 1, reference=rgb)
            images = tf.concat([tf.cast(rgb, tf.float32), tf.cast(depth, tf.float32)], -1)
            return self._segment(images)

        def _serve_rgb_hha(self, rgb, hha):
            rgb = self._checked(rgb, INPUT_RGB, 3)
            hha = self._checked(hha, INPUT_HHA, 3, reference=rgb)
            return self._segment({"rgb": tf.cast(rgb, tf.float32), "hha": tf.cast(hha, tf.float32)})

        def _serve_images(self, images):
            shape = tf.shape(images)
            checks = [
                tf.debugging.assert_positive(
                    shape[0], message="`images` must hold at least one image (batch size 0)"
                ),
                tf.debugging.assert_equal(
                    shape[3],
                    3,
                    message="`images` must be RGB: uint8 [batch, height, width, 3]; the last "
                    "dimension is not 3",
                ),
                *self._check_size(shape[1], shape[2], "`images`"),
            ]
            with tf.control_dependencies(checks):
                images = tf.ensure_shape(tf.identity(images), [None, None, None, 3])
            return self._segment(tf.cast(images, tf.float32))

        def _header_size(self, args):
            index, data = args
            length = tf.strings.length(data)
            is_jpeg = tf.equal(tf.strings.substr(data, 0, 3), _JPEG_MAGIC)
            is_png = tf.equal(tf.strings.substr(data, 0, 8), _PNG_MAGIC)
            checks = [
                tf.debugging.Assert(
                    length > 0,
                    [
                        "`image_bytes` holds an empty string; expected an encoded JPEG or PNG "
                        "image. Index:",
                        index,
                    ],
                ),
                tf.debugging.Assert(
                    tf.logical_or(is_jpeg, is_png),
                    [
                        "`image_bytes` element is not a JPEG or PNG image (unknown file "
                        "signature). Index:",
                        index,
                    ],
                ),
            ]
            with tf.control_dependencies(checks):

                def png_size():
                    with tf.control_dependencies(
                        [
                            tf.debugging.Assert(
                                length >= 24, ["`image_bytes`: truncated PNG header. Index:", index]
                            )
                        ]
                    ):
                        # IHDR: big-endian width then height at bytes 16..24.
                        wh = tf.io.decode_raw(
                            tf.strings.substr(data, 16, 8), tf.int32, little_endian=False
                        )
                    return tf.cast(tf.reverse(wh, [0]), tf.int64)

                def jpeg_size():
                    return tf.cast(tf.image.extract_jpeg_shape(data)[:2], tf.int64)

                size = tf.cond(is_jpeg, jpeg_size, png_size)
            return size

        def _decode(self, data):
            image = tf.io.decode_image(data, channels=3, dtype=tf.uint8, expand_animations=False)
            return tf.ensure_shape(image, [None, None, 3])

        def _serve_bytes(self, image_bytes):
            count = tf.shape(image_bytes, out_type=tf.int64)[0]
            with tf.control_dependencies(
                [
                    tf.debugging.assert_positive(
                        count, message="`image_bytes` must hold at least one image (batch size 0)"
                    )
                ]
            ):
                indices = tf.range(count)
            sizes = tf.map_fn(
                self._header_size,
                (indices, image_bytes),
                fn_output_signature=tf.TensorSpec([2], tf.int64),
            )
            checks = [
                tf.debugging.assert_equal(
                    sizes,
                    tf.broadcast_to(sizes[:1], tf.shape(sizes)),
                    message="all images of one `image_bytes` request must have the same height "
                    "and width; send images of other sizes in separate requests",
                ),
                *self._check_size(sizes[:, 0], sizes[:, 1], "`image_bytes`"),
            ]
            with tf.control_dependencies(checks):
                images = tf.map_fn(
                    self._decode,
                    tf.identity(image_bytes),
                    fn_output_signature=tf.TensorSpec([None, None, 3], tf.uint8),
                )
            return self._segment(tf.cast(images, tf.float32))

    return SegmentationServingModule


def build_serving_module(
    model, *, include_probabilities: bool = True, max_pixels: int = DEFAULT_MAX_PIXELS
):
    """Wraps a kfcn model in a tf.Module with the `images` and `image_bytes` functions.

    RGB-D and RGB-HHA models get one `serving_default` function of their two
    inputs instead (see the module docstring); multi-task models return each
    output per task.

    Args:
        model: A kfcn segmentation keras.Model (0..255 RGB in, logits out), or
            one of the other kinds `kfcn.export.model_io` describes.
        include_probabilities: Also return the softmax probabilities.
        max_pixels: Largest height*width accepted per image.

    Returns:
        A tf.Module with tf.functions `serving_default` and `serving_bytes`.

    Raises:
        ValueError: If `model` is not a kfcn model or `max_pixels` < 1.
    """
    io = model_io.describe(model)
    if int(max_pixels) < 1:
        raise ValueError(f"`max_pixels` must be >= 1. Received: max_pixels={max_pixels}")
    return _serving_module_class()(model, include_probabilities, max_pixels, io)


def signatures_of(module) -> dict:
    """The concrete functions to save as the SavedModel's signatures."""
    signatures = {SIGNATURE_IMAGES: module.serving_default.get_concrete_function()}
    if module.serving_bytes is not None:
        signatures[SIGNATURE_BYTES] = module.serving_bytes.get_concrete_function()
    return signatures


def example_inputs(signature, height: int, width: int, batch: int = 1) -> dict:
    """Mid-grey (depth 2.5 m) inputs for a kfcn signature, by its input names and dtypes.

    For `verify_saved_model` and the TF Serving warmup requests.
    """
    import numpy as np
    import tensorflow as tf

    specs = signature.structured_input_signature[1]
    inputs = {}
    for name, spec in specs.items():
        if spec.dtype == tf.string:
            image = np.full((height, width, 3), 128, np.uint8)
            inputs[name] = tf.constant([tf.io.encode_png(image).numpy()] * batch)
        elif name == INPUT_DEPTH:
            inputs[name] = tf.constant(np.full((batch, height, width, 1), 2500, np.uint16))
        else:
            inputs[name] = tf.constant(np.full((batch, height, width, 3), 128, np.uint8))
    return inputs


def write_saved_model(
    model,
    directory: str | os.PathLike,
    *,
    include_probabilities: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> None:
    """Writes the SavedModel into `directory` (no atomicity; see export_saved_model)."""
    import tensorflow as tf

    module = build_serving_module(
        model, include_probabilities=include_probabilities, max_pixels=max_pixels
    )
    tf.saved_model.save(module, os.fspath(directory), signatures=signatures_of(module))


def verify_saved_model(directory: str | os.PathLike, include_probabilities: bool = True) -> None:
    """Reloads a SavedModel and runs every signature on a small image.

    Raises:
        RuntimeError: If a signature is missing or returns the wrong shapes.
    """
    import tensorflow as tf

    loaded = tf.saved_model.load(os.fspath(directory))
    if SIGNATURE_IMAGES not in loaded.signatures:
        raise RuntimeError(f"SavedModel {directory!r} lacks signature {SIGNATURE_IMAGES!r}")
    inputs = loaded.signatures[SIGNATURE_IMAGES].structured_input_signature[1]
    if INPUT_IMAGES in inputs and SIGNATURE_BYTES not in loaded.signatures:
        raise RuntimeError(f"SavedModel {directory!r} lacks signature {SIGNATURE_BYTES!r}")
    for name, signature in loaded.signatures.items():
        outputs = signature(**example_inputs(signature, 37, 45))
        class_ids = [key for key in outputs if key.startswith(OUTPUT_CLASS_IDS)]
        if not class_ids:
            raise RuntimeError(f"SavedModel {directory!r}: {name} outputs {sorted(outputs)}")
        for key in class_ids:
            if tuple(outputs[key].shape) != (1, 37, 45):
                raise RuntimeError(
                    f"SavedModel {directory!r}: {name} returned {key} of shape "
                    f"{tuple(outputs[key].shape)} for a 37x45 image"
                )
            probabilities = OUTPUT_PROBABILITIES + key[len(OUTPUT_CLASS_IDS) :]
            if include_probabilities != (probabilities in outputs):
                raise RuntimeError(f"SavedModel {directory!r}: {name} outputs {sorted(outputs)}")


def export_saved_model(
    model,
    export_dir: str | os.PathLike,
    *,
    include_probabilities: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    overwrite: bool = False,
    verify: bool = True,
    class_info=None,
) -> str:
    """Exports a kfcn model as a SavedModel with `images` and `image_bytes` signatures.

    The SavedModel is written under a temporary name beside `export_dir` and
    renamed into place when complete (and verified), so `export_dir` never holds a
    partial export.

    Args:
        model: A kfcn segmentation keras.Model.
        export_dir: Destination directory; must not exist unless `overwrite`.
        include_probabilities: Also return per-class probabilities (large: H*W*C
            floats per image); False returns `class_ids` only.
        max_pixels: Largest height*width a request may send per image.
        overwrite: Replace an existing `export_dir`.
        verify: Reload the export and run both signatures before publishing it.
        class_info: A `kfcn.metadata.ClassInfo` to store in the SavedModel's
            assets.extra (written before the directory is published).

    Returns:
        The absolute path of the SavedModel directory.

    Raises:
        ValueError: If `model` is not a kfcn model.
        FileExistsError: If `export_dir` exists and `overwrite` is False.
    """
    from kfcn.dilated_fcn import inference_model  # imports Keras: not at module import

    model = inference_model(model)  # drops auxiliary heads (training only)
    model_io.describe(model)
    export_dir = os.path.abspath(os.fspath(export_dir))
    with atomic_output(export_dir, overwrite=overwrite, is_dir=True) as tmp:
        write_saved_model(
            model, tmp, include_probabilities=include_probabilities, max_pixels=max_pixels
        )
        if verify:
            verify_saved_model(tmp, include_probabilities)
        if class_info is not None:
            from kfcn.metadata import write_class_info

            write_class_info(class_info, tmp)
    logger.info("Wrote SavedModel %s", export_dir)
    return export_dir
