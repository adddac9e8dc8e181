"""tf.data input pipelines: augmented fixed-size training batches and native-size evaluation.

Training (`train_pipeline`): shard per input pipeline (`tf.distribute.InputContext`), shuffle
(reshuffled every epoch), repeat, then in one parallel map: decode, random scale (bilinear for the
image, nearest for the label so label values stay class indices) with random crop, optional
photometric jitter, padding to the crop size where the scaled image is smaller (image with the
ImageNet mean, label with the ignore label, so padding is neutral after the model's mean
subtraction and excluded from the loss), random horizontal flip; then fixed-size batches and
AUTOTUNE prefetching. The crop window is cut from the source image before resizing, so upscaling
costs no more than resizing one crop.

The FCN paper (Long et al., CVPR 2015, Sec. 4.3) trains on whole images and reports that
random jittering by mirroring and translating up to 32 pixels gave no improvement; random scale
and crop are the standard recipe of later work (DeepLab, PSPNet) and let images of any size be
batched, which the paper's batch-of-one whole-image training does not need.

Datasets from `kfcn.data.listfile` carry their file table, so sharding and shuffling act on file
names before any decoding (each worker decodes only its own files, and the shuffle buffer can
hold the whole split at no memory cost). Other datasets (e.g. tfds) are sharded and shuffled as
decoded elements.

Randomness is stateless and keyed by (seed, element counter), so with a fixed `seed` and
`deterministic=True` the batches are reproducible.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import tensorflow as tf

from kfcn.layers import IMAGENET_MEAN_RGB

__all__ = ["attach_file_source", "eval_pipeline", "train_pipeline"]

_SOURCE_ATTR = "_kfcn_file_source"


@dataclass(frozen=True)
class _FileSource:
    """A dataset's undecoded file table and the function that decodes one entry."""

    files: tf.data.Dataset
    decode: Callable[[Any], dict[str, tf.Tensor]]


def attach_file_source(
    dataset: tf.data.Dataset,
    files: tf.data.Dataset,
    decode: Callable[[Any], dict[str, tf.Tensor]],
) -> tf.data.Dataset:
    """Records that `dataset` is `files.map(decode)`, so pipelines can shard before decoding.

    Any transformation of `dataset` (take, filter, ...) returns a new object without the record,
    and pipelines then treat it as an opaque dataset, which stays correct.

    Args:
        dataset: the decoded dataset, equal to `files.map(decode)`.
        files: dataset of undecoded entries (file names and flags).
        decode: maps one entry of `files` to an {"image", "label", "name"} dict.

    Returns:
        `dataset`, with the record attached.
    """
    object.__setattr__(dataset, _SOURCE_ATTR, _FileSource(files, decode))
    return dataset


def _file_source(dataset: tf.data.Dataset) -> _FileSource | None:
    source = getattr(dataset, _SOURCE_ATTR, None)
    return source if isinstance(source, _FileSource) else None


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(value, int):
        value = (value, value)
    value = tuple(int(v) for v in value)
    if len(value) != 2 or min(value) < 1:
        raise ValueError(
            f"`{name}` must be a positive int or (height, width). Received: {name}={value}"
        )
    return value


def _photometric(image: tf.Tensor, seeds: tf.Tensor) -> tf.Tensor:
    """Brightness, contrast, saturation and hue jitter on a 0..255 float image, clipped."""
    x = image / 255.0
    x = tf.image.stateless_random_brightness(x, 32.0 / 255.0, seeds[0])
    x = tf.image.stateless_random_contrast(x, 0.5, 1.5, seeds[1])
    x = tf.image.stateless_random_saturation(tf.clip_by_value(x, 0.0, 1.0), 0.5, 1.5, seeds[2])
    x = tf.image.stateless_random_hue(tf.clip_by_value(x, 0.0, 1.0), 0.05, seeds[3])
    return tf.clip_by_value(x * 255.0, 0.0, 255.0)


def _augment_fn(
    *,
    crop_size: tuple[int, int],
    scale_range: tuple[float, float],
    flip: bool,
    photometric: bool,
    ignore_label: int,
    mean: Sequence[float],
    seed: int,
) -> Callable[[dict[str, tf.Tensor], tf.Tensor], tuple[tf.Tensor, tf.Tensor]]:
    crop_h, crop_w = crop_size
    lo, hi = scale_range
    mean_rgb = tf.constant(mean, tf.float32)

    def augment(element: dict[str, tf.Tensor], index: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        seeds = tf.random.experimental.stateless_split(
            tf.stack([tf.constant(seed, tf.int64), tf.cast(index, tf.int64)]), num=10
        )
        image, label = element["image"], element["label"]
        height, width = tf.shape(label)[0], tf.shape(label)[1]
        scale = tf.random.stateless_uniform([], seeds[4], lo, hi)
        # Cut the source window that covers one crop at this scale before resizing, so a 2x
        # upscale resizes a crop-sized region instead of the whole image (same distribution as
        # rescale-then-crop, up to rounding, at a fraction of the cost).
        win_h = tf.minimum(height, tf.cast(tf.math.ceil(crop_h / scale), tf.int32))
        win_w = tf.minimum(width, tf.cast(tf.math.ceil(crop_w / scale), tf.int32))
        y = tf.random.stateless_uniform([], seeds[7], 0, height - win_h + 1, dtype=tf.int32)
        x = tf.random.stateless_uniform([], seeds[9], 0, width - win_w + 1, dtype=tf.int32)
        image = tf.cast(image[y : y + win_h, x : x + win_w], tf.float32)
        label = label[y : y + win_h, x : x + win_w]
        if (lo, hi) != (1.0, 1.0):
            size = tf.cast(tf.stack([win_h, win_w]), tf.float32) * scale
            size = tf.maximum(tf.cast(tf.round(size), tf.int32), 1)
            image = tf.image.resize(image, size, method="bilinear")
            # Nearest keeps every label value an existing class or the ignore label.
            label = tf.image.resize(label[:, :, None], size, method="nearest")[:, :, 0]
            # Rounding up the window can overshoot the crop by a pixel or so.
            image, label = image[:crop_h, :crop_w], label[:crop_h, :crop_w]
        if photometric:
            image = _photometric(image, seeds[:4])
        height, width = tf.shape(label)[0], tf.shape(label)[1]
        pad_h = crop_h - height
        pad_w = crop_w - width
        # Place a too-small image at a random position inside the crop.
        top = tf.random.stateless_uniform([], seeds[5], 0, pad_h + 1, dtype=tf.int32)
        left = tf.random.stateless_uniform([], seeds[6], 0, pad_w + 1, dtype=tf.int32)
        paddings = [[top, pad_h - top], [left, pad_w - left]]
        # Padding with 0 and adding mean * (1 - inside) keeps real pixels bit-exact.
        inside = tf.pad(tf.ones([height, width, 1], tf.float32), paddings + [[0, 0]])
        image = tf.pad(image, paddings + [[0, 0]]) + (1.0 - inside) * mean_rgb
        label = tf.pad(tf.cast(label, tf.int32), paddings, constant_values=ignore_label)
        if flip:
            mirror = tf.random.stateless_uniform([], seeds[8]) < 0.5
            image = tf.cond(mirror, lambda: tf.reverse(image, [1]), lambda: image)
            label = tf.cond(mirror, lambda: tf.reverse(label, [1]), lambda: label)
        image = tf.ensure_shape(image, [crop_h, crop_w, 3])
        label = tf.ensure_shape(label, [crop_h, crop_w])
        return image, label

    return augment


def train_pipeline(
    dataset: tf.data.Dataset,
    *,
    global_batch_size: int,
    crop_size: int | Sequence[int] = (512, 512),
    scale_range: Sequence[float] = (0.5, 2.0),
    flip: bool = True,
    photometric: bool = False,
    ignore_label: int = 255,
    input_context: tf.distribute.InputContext | None = None,
    shuffle_buffer: int = 512,
    seed: int | None = None,
    deterministic: bool | None = None,
    mean: Sequence[float] = IMAGENET_MEAN_RGB,
) -> tf.data.Dataset:
    """Builds the infinite training input pipeline of random crops.

    Args:
        dataset: dataset of {"image": uint8 [H, W, 3], "label": uint8 [H, W], ...} dicts, e.g.
            from `kfcn.data.load_dataset`.
        global_batch_size: batch size over all replicas.
        crop_size: (height, width) of the training crops (or one int for a square).
        scale_range: (min, max) of the uniform random rescaling factor; (1, 1) disables it.
        flip: random horizontal mirroring (image and label together).
        photometric: random brightness, contrast, saturation and hue, clipped to 0..255.
        ignore_label: label value of padding (and of the dataset's void pixels).
        input_context: from `strategy.distribute_datasets_from_function`; shards the data by
            `input_pipeline_id` of `num_input_pipelines` and batches per replica.
        shuffle_buffer: buffer of decoded elements for datasets without a file table, e.g. tfds
            (512 VOC-sized images hold about 300 MB); file-table datasets shuffle all their file
            names instead, before decoding.
        seed: makes shuffling and augmentation reproducible (with `deterministic`).
        deterministic: keep element order under parallel decoding. Default: True when `seed` is
            given, else False (slightly faster).
        mean: RGB padding value of the image (default the ImageNet mean, as the model's
            `PadToMultiple` pads).

    Returns:
        Dataset of (images float32 [b, crop_h, crop_w, 3] in 0..255, labels int32
        [b, crop_h, crop_w]), repeating forever, b the per-replica batch size.

    Raises:
        ValueError: invalid arguments, or fewer files than input pipelines.
    """
    if global_batch_size < 1:
        raise ValueError(
            f"`global_batch_size` must be >= 1. Received: global_batch_size={global_batch_size}"
        )
    crop = _pair(crop_size, "crop_size")
    lo, hi = (float(s) for s in scale_range)
    if not 0 < lo <= hi:
        raise ValueError(
            f"`scale_range` must be (min, max) with 0 < min <= max. Received: "
            f"scale_range={tuple(scale_range)}"
        )
    if len(mean) != 3:
        raise ValueError(f"`mean` must have 3 values (RGB). Received: mean={tuple(mean)}")
    batch_size = global_batch_size
    num_pipelines, pipeline_id = 1, 0
    if input_context is not None:
        batch_size = input_context.get_per_replica_batch_size(global_batch_size)
        num_pipelines = input_context.num_input_pipelines
        pipeline_id = input_context.input_pipeline_id
    if deterministic is None:
        deterministic = seed is not None
    base_seed = random.getrandbits(31) if seed is None else int(seed)
    # Each input pipeline draws different augmentations from the same user seed.
    aug_seed = base_seed * 1_000_003 + pipeline_id
    augment = _augment_fn(
        crop_size=crop,
        scale_range=(lo, hi),
        flip=flip,
        photometric=photometric,
        ignore_label=ignore_label,
        mean=tuple(float(m) for m in mean),
        seed=aug_seed,
    )

    source = _file_source(dataset)
    if source is not None:
        elements = source.files
        decode = source.decode
    else:
        elements = dataset

        def decode(element: Any) -> Any:
            return element

    if num_pipelines > 1:
        count = int(elements.cardinality())
        if 0 <= count < num_pipelines:
            raise ValueError(
                f"Cannot shard {count} examples over {num_pipelines} input pipelines; each "
                "pipeline needs at least one example."
            )
        elements = elements.shard(num_pipelines, pipeline_id)
    if source is not None:
        # File names are tiny: shuffle the whole (sharded) list.
        buffer = int(elements.cardinality())
        buffer = buffer if buffer > 0 else shuffle_buffer
    else:
        buffer = shuffle_buffer
    elements = elements.shuffle(
        buffer,
        seed=None if seed is None else base_seed + pipeline_id,
        reshuffle_each_iteration=True,
    )
    elements = elements.repeat()
    indexed = tf.data.Dataset.zip((elements, tf.data.Dataset.counter()))
    batches = indexed.map(
        lambda element, index: augment(decode(element), index),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=deterministic,
    )
    batches = batches.batch(batch_size, drop_remainder=True)
    return batches.prefetch(tf.data.AUTOTUNE)


def _to_eval(element: dict[str, tf.Tensor]) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    return (
        tf.cast(element["image"], tf.float32),
        tf.cast(element["label"], tf.int32),
        element["name"],
    )


def eval_pipeline(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """Builds the evaluation pipeline: whole images at native size, one per batch, in order.

    Args:
        dataset: dataset of {"image": uint8 [H, W, 3], "label": uint8 [H, W], "name": string}.

    Returns:
        Dataset of (image float32 [1, H, W, 3] in 0..255, label int32 [1, H, W],
        name string [1]), one pass in dataset order.
    """
    source = _file_source(dataset)
    if source is not None:
        decoded = source.files.map(
            lambda entry: _to_eval(source.decode(entry)),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
    else:
        decoded = dataset.map(_to_eval, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return decoded.batch(1).prefetch(tf.data.AUTOTUNE)
