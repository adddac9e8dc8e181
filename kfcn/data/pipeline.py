"""tf.data input pipelines: augmented fixed-size training batches and native-size evaluation.

Training (`train_pipeline`): shard per input pipeline (`tf.distribute.InputContext`), shuffle
(reshuffled every epoch), repeat, then in one parallel map: decode, random scale (bilinear for the
image, nearest for the label so label values stay class indices) with random crop (optionally
re-drawn while one class dominates it, mmsegmentation's `cat_max_ratio`), optional photometric
jitter or mmsegmentation's `PhotoMetricDistortion` on the RGB channels, padding to the crop size
where the scaled image is smaller (RGB with the ImageNet mean, other channels with 0, label with
the ignore label, so padding is neutral after the model's mean subtraction and excluded from the
loss), random horizontal flip; then fixed-size batches and AUTOTUNE prefetching. The crop window
is cut from the source image before resizing, so upscaling costs no more than resizing one crop.

"image" may be one tensor (RGB uint8 [H, W, 3], or RGB-D uint16 [H, W, 4]) or a dict of them
({"rgb": ..., "hha": ...}), and "label" one [H, W] map or a dict of them ({"sem": ..., "geo":
...}): every entry gets the same scale, crop and flip, and batches keep the nesting.

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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import tensorflow as tf

from kfcn.layers import IMAGENET_MEAN_RGB

__all__ = [
    "acceptable_crop",
    "attach_file_source",
    "distortion_params",
    "eval_pipeline",
    "photometric_distortion",
    "train_pipeline",
]

PHOTOMETRIC = ("none", "jitter", "mmseg")

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


def distortion_params(seed: tf.Tensor) -> dict[str, tf.Tensor]:
    """Draws the random choices of mmsegmentation's `PhotoMetricDistortion` (default ranges).

    Each of brightness, contrast, saturation and hue is applied with probability 0.5; contrast
    comes before saturation/hue or after them with probability 0.5.

    Args:
        seed: int64 [2] stateless seed.

    Returns:
        Dict of scalars: "brightness" (delta in [-32, 32], 0 when off), "contrast" and
        "saturation" (factors in [0.5, 1.5), 1 when off), "hue" (shift in OpenCV's 8-bit hue
        units of 2 degrees, an integer in [-18, 17] as numpy's `randint(-18, 18)`, 0 when off),
        "contrast_first" (bool).
    """
    u = tf.random.stateless_uniform([9], seed, dtype=tf.float32)
    on = u[:4] < 0.5
    return {
        "brightness": tf.where(on[0], -32.0 + 64.0 * u[4], 0.0),
        "contrast": tf.where(on[1], 0.5 + u[5], 1.0),
        "saturation": tf.where(on[2], 0.5 + u[6], 1.0),
        "hue": tf.where(on[3], tf.floor(36.0 * u[7]) - 18.0, 0.0),
        "contrast_first": u[8] < 0.5,
    }


def photometric_distortion(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """mmsegmentation's `PhotoMetricDistortion` on a float RGB image in 0..255.

    Brightness (add a delta in [-32, 32]), then contrast (multiply by [0.5, 1.5]) either here
    or last, saturation (multiply HSV saturation by [0.5, 1.5]) and hue (rotate by up to 36
    degrees), each with probability 0.5 and each clipped to 0..255, as mmseg's
    `mmseg/datasets/transforms/transforms.py`. mmseg rounds to uint8 after each step and
    goes through OpenCV's 8-bit HSV; this works in float (no rounding between steps).

    Args:
        image: float32 [H, W, 3], RGB in 0..255.
        seed: int64 [2] stateless seed (`distortion_params`).

    Returns:
        float32 [H, W, 3] in 0..255.
    """
    p = distortion_params(seed)
    x = tf.clip_by_value(image + p["brightness"], 0.0, 255.0)
    x = tf.clip_by_value(x * tf.where(p["contrast_first"], p["contrast"], 1.0), 0.0, 255.0)

    def saturation_and_hue(x: tf.Tensor) -> tf.Tensor:
        hsv = tf.image.rgb_to_hsv(x / 255.0)
        hue = tf.math.floormod(hsv[..., 0] + p["hue"] / 180.0, 1.0)
        saturation = tf.clip_by_value(hsv[..., 1] * p["saturation"], 0.0, 1.0)
        rgb = tf.image.hsv_to_rgb(tf.stack([hue, saturation, hsv[..., 2]], axis=-1))
        return tf.clip_by_value(rgb * 255.0, 0.0, 255.0)

    changes_colour = (p["saturation"] != 1.0) | (p["hue"] != 0.0)
    x = tf.cond(changes_colour, lambda: saturation_and_hue(x), lambda: x)
    return tf.clip_by_value(x * tf.where(p["contrast_first"], 1.0, p["contrast"]), 0.0, 255.0)


def acceptable_crop(label: tf.Tensor, ignore_label: int, cat_max_ratio: float) -> tf.Tensor:
    """mmseg's `RandomCrop` test: at least two classes and none above `cat_max_ratio`.

    Pixels of `ignore_label` are not counted (mmseg's `cnt[labels != ignore_index]`).

    Args:
        label: integer [h, w] label crop with values 0..255.
        ignore_label: the ignore value.
        cat_max_ratio: the largest share one class may have (strictly less).

    Returns:
        bool scalar.
    """
    values = tf.reshape(tf.cast(label, tf.int32), [-1])
    counts = tf.math.bincount(values, minlength=256, maxlength=256)
    counts = tf.where(tf.range(256) == ignore_label, 0, counts)
    share = tf.math.divide_no_nan(
        tf.cast(tf.reduce_max(counts), tf.float64), tf.cast(tf.reduce_sum(counts), tf.float64)
    )
    return (tf.math.count_nonzero(counts) > 1) & (share < cat_max_ratio)


def _leaves(structure: Any, what: str) -> list[tuple[str | None, tf.Tensor]]:
    """(key, tensor) of a tensor (key None) or a flat dict of tensors, keys sorted."""
    if not isinstance(structure, Mapping):
        return [(None, structure)]
    nested = [key for key, value in structure.items() if isinstance(value, Mapping)]
    if nested or not structure:
        raise ValueError(
            f'`"{what}"` must be a tensor or a flat dict of tensors. Received keys: '
            f"{sorted(structure)}"
        )
    return sorted(structure.items())


def _rebuild(structure: Any, values: list[tf.Tensor]) -> Any:
    if not isinstance(structure, Mapping):
        return values[0]
    return dict(zip(sorted(structure), values, strict=True))


def _rgb_channels(key: str | None, channels: int | None) -> int:
    """How many leading channels of an image leaf are RGB: 3 for a tensor of >= 3 channels
    (RGB, or RGB then depth), 3 for the "rgb" entry of a dict, else 0."""
    if channels is None:
        raise ValueError(
            f"Image entry {key or 'image'!r} needs a known number of channels (static shape "
            "[H, W, C]); use tf.ensure_shape in the loader. Received: channels=None"
        )
    if key is None or key == "rgb":
        return 3 if channels >= 3 else 0
    return 0


def _common_size(images: list, labels: list) -> tuple[tf.Tensor, tf.Tensor]:
    """(height, width) of the first label, checked against every other entry."""
    height, width = tf.shape(labels[0][1])[0], tf.shape(labels[0][1])[1]
    if len(images) + len(labels) == 2:
        return height, width
    checks = [
        tf.debugging.assert_equal(
            tf.shape(t)[:2],
            tf.stack([height, width]),
            message=f"{what} entry {k!r} differs in size from the other entries",
        )
        for what, leaves in (("image", images), ("label", labels))
        for k, t in leaves
    ]
    with tf.control_dependencies(checks):
        return tf.identity(height), tf.identity(width)


def _colour(
    image: tf.Tensor, n_rgb: int, photometric: str, jitter_seeds: tf.Tensor, seed: tf.Tensor
) -> tf.Tensor:
    """Photometric augmentation of the first `n_rgb` channels; the others pass through."""
    if photometric == "none" or not n_rgb:
        return image
    colour = image[..., :n_rgb]
    if photometric == "jitter":
        colour = _photometric(colour, jitter_seeds)
    else:
        colour = photometric_distortion(colour, seed)
    return tf.concat([colour, image[..., n_rgb:]], axis=-1) if image.shape[-1] > n_rgb else colour


def _pad_image(
    image: tf.Tensor, paddings: list, inside: tf.Tensor, n_rgb: int, mean: Sequence[float]
) -> tf.Tensor:
    """Pads with `mean` on the RGB channels and 0 on the others."""
    padded = tf.pad(image, paddings + [[0, 0]])
    if not n_rgb:
        return padded
    fill = tf.constant(list(mean) + [0.0] * (image.shape[-1] - n_rgb), tf.float32)
    # Padding with 0 and adding fill * (1 - inside) keeps real pixels bit-exact.
    return padded + (1.0 - inside) * fill


def _augment_fn(
    *,
    crop_size: tuple[int, int],
    scale_range: tuple[float, float],
    flip: bool,
    photometric: str,
    cat_max_ratio: float,
    ignore_label: int,
    mean: Sequence[float],
    seed: int,
) -> Callable[[dict[str, Any], tf.Tensor], tuple[Any, Any]]:
    crop_h, crop_w = crop_size
    lo, hi = scale_range
    scaled = (lo, hi) != (1.0, 1.0)

    def crop_label(label, y, x, win_h, win_w, size) -> tf.Tensor:
        label = label[y : y + win_h, x : x + win_w]
        if size is None:
            return label
        # Nearest keeps every label value an existing class or the ignore label.
        label = tf.image.resize(label[:, :, None], size, method="nearest")[:, :, 0]
        # Rounding up the window can overshoot the crop by a pixel or so.
        return label[:crop_h, :crop_w]

    def redraw(label, y, x, win_h, win_w, size, height, width, key) -> tuple[tf.Tensor, tf.Tensor]:
        """mmseg's cat_max_ratio: up to 10 re-draws while one class dominates the crop."""
        extra = tf.random.experimental.stateless_split(
            tf.random.experimental.stateless_fold_in(key, 1), num=2
        )
        ys = tf.concat(
            [[y], tf.random.stateless_uniform([10], extra[0], 0, height - win_h + 1, tf.int32)], 0
        )
        xs = tf.concat(
            [[x], tf.random.stateless_uniform([10], extra[1], 0, width - win_w + 1, tf.int32)], 0
        )

        def rejected(i: tf.Tensor) -> tf.Tensor:
            crop = crop_label(label, ys[i], xs[i], win_h, win_w, size)
            return (i < 10) & tf.logical_not(acceptable_crop(crop, ignore_label, cat_max_ratio))

        (i,) = tf.while_loop(rejected, lambda i: (i + 1,), (tf.constant(0),))
        return ys[i], xs[i]

    def augment(element: dict[str, Any], index: tf.Tensor) -> tuple[Any, Any]:
        key = tf.stack([tf.constant(seed, tf.int64), tf.cast(index, tf.int64)])
        seeds = tf.random.experimental.stateless_split(key, num=10)
        images = _leaves(element["image"], "image")
        labels = _leaves(element["label"], "label")
        rgb = [_rgb_channels(k, t.shape[-1]) for k, t in images]
        height, width = _common_size(images, labels)
        scale = tf.random.stateless_uniform([], seeds[4], lo, hi)
        # Cut the source window that covers one crop at this scale before resizing, so a 2x
        # upscale resizes a crop-sized region instead of the whole image (same distribution as
        # rescale-then-crop, up to rounding, at a fraction of the cost).
        win_h = tf.minimum(height, tf.cast(tf.math.ceil(crop_h / scale), tf.int32))
        win_w = tf.minimum(width, tf.cast(tf.math.ceil(crop_w / scale), tf.int32))
        y = tf.random.stateless_uniform([], seeds[7], 0, height - win_h + 1, dtype=tf.int32)
        x = tf.random.stateless_uniform([], seeds[9], 0, width - win_w + 1, dtype=tf.int32)
        size = None
        if scaled:
            size = tf.cast(tf.stack([win_h, win_w]), tf.float32) * scale
            size = tf.maximum(tf.cast(tf.round(size), tf.int32), 1)
        if cat_max_ratio < 1.0:
            checked = dict(labels).get("sem", labels[0][1])
            y, x = redraw(checked, y, x, win_h, win_w, size, height, width, key)
        distortion_seed = tf.random.experimental.stateless_fold_in(key, 2)
        out_images = []
        for (_, image), n_rgb in zip(images, rgb, strict=True):
            image = tf.cast(image[y : y + win_h, x : x + win_w], tf.float32)
            if scaled:
                image = tf.image.resize(image, size, method="bilinear")[:crop_h, :crop_w]
            out_images.append(_colour(image, n_rgb, photometric, seeds[:4], distortion_seed))
        out_labels = [crop_label(t, y, x, win_h, win_w, size) for _, t in labels]
        height, width = tf.shape(out_labels[0])[0], tf.shape(out_labels[0])[1]
        pad_h = crop_h - height
        pad_w = crop_w - width
        # Place a too-small image at a random position inside the crop.
        top = tf.random.stateless_uniform([], seeds[5], 0, pad_h + 1, dtype=tf.int32)
        left = tf.random.stateless_uniform([], seeds[6], 0, pad_w + 1, dtype=tf.int32)
        paddings = [[top, pad_h - top], [left, pad_w - left]]
        inside = tf.pad(tf.ones([height, width, 1], tf.float32), paddings + [[0, 0]])
        out_images = [
            _pad_image(t, paddings, inside, n_rgb, mean)
            for t, n_rgb in zip(out_images, rgb, strict=True)
        ]
        out_labels = [
            tf.pad(tf.cast(t, tf.int32), paddings, constant_values=ignore_label) for t in out_labels
        ]
        if flip:
            mirror = tf.random.stateless_uniform([], seeds[8]) < 0.5
            out_images, out_labels = (
                [tf.cond(mirror, lambda t=t: tf.reverse(t, [1]), lambda t=t: t) for t in leaves]
                for leaves in (out_images, out_labels)
            )
        out_images = [tf.ensure_shape(t, [crop_h, crop_w, t.shape[-1]]) for t in out_images]
        out_labels = [tf.ensure_shape(t, [crop_h, crop_w]) for t in out_labels]
        return _rebuild(element["image"], out_images), _rebuild(element["label"], out_labels)

    return augment


def train_pipeline(
    dataset: tf.data.Dataset,
    *,
    global_batch_size: int,
    crop_size: int | Sequence[int] = (512, 512),
    scale_range: Sequence[float] = (0.5, 2.0),
    flip: bool = True,
    photometric: bool | str = False,
    cat_max_ratio: float = 1.0,
    ignore_label: int = 255,
    input_context: tf.distribute.InputContext | None = None,
    shuffle_buffer: int = 512,
    seed: int | None = None,
    deterministic: bool | None = None,
    mean: Sequence[float] = IMAGENET_MEAN_RGB,
) -> tf.data.Dataset:
    """Builds the infinite training input pipeline of random crops.

    Args:
        dataset: dataset of {"image": ..., "label": ..., ...} dicts, e.g. from
            `kfcn.data.load_dataset`. "image" is a [H, W, C] tensor (uint8 RGB, or e.g. uint16
            RGB then depth) or a dict of them (e.g. {"rgb": ..., "hha": ...}); "label" a
            [H, W] tensor or a dict of them (e.g. {"sem": ..., "geo": ...}). Every entry gets
            the same scale, crop and flip.
        global_batch_size: batch size over all replicas.
        crop_size: (height, width) of the training crops (or one int for a square).
        scale_range: (min, max) of the uniform random rescaling factor; (1, 1) disables it.
        flip: random horizontal mirroring (image and label together).
        photometric: colour augmentation of the RGB channels only (a tensor image's channels
            0..2, the "rgb" entry of a dict image): False or "none"; True or "jitter" (random
            brightness, contrast, saturation and hue, clipped to 0..255); "mmseg"
            (mmsegmentation's `PhotoMetricDistortion`, see `photometric_distortion`).
        cat_max_ratio: mmsegmentation's `RandomCrop(cat_max_ratio=...)`: while one class
            covers `cat_max_ratio` or more of the crop's labelled pixels (or fewer than two
            classes are present), draw the crop again, up to 10 times (the 11th draw is kept
            unchecked, as mmseg). The label checked is the "label" tensor, or the "sem" entry
            of a dict label (else its first key). 1.0 (default) never re-draws; mmseg's
            configs use 0.75.
        ignore_label: label value of padding (and of the dataset's void pixels).
        input_context: from `strategy.distribute_datasets_from_function`; shards the data by
            `input_pipeline_id` of `num_input_pipelines` and batches per replica.
        shuffle_buffer: buffer of decoded elements for datasets without a file table, e.g. tfds
            (512 VOC-sized images hold about 300 MB); file-table datasets shuffle all their file
            names instead, before decoding.
        seed: makes shuffling and augmentation reproducible (with `deterministic`).
        deterministic: keep element order under parallel decoding. Default: True when `seed` is
            given, else False (slightly faster).
        mean: padding value of the RGB channels (default the ImageNet mean, as the model's
            `PadToMultiple` pads); other channels (depth, HHA) are padded with 0.

    Returns:
        Dataset of (images float32 [b, crop_h, crop_w, C] in 0..255, labels int32
        [b, crop_h, crop_w]), each a tensor or a dict as in `dataset`, repeating forever, b
        the per-replica batch size.

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
    mode = {False: "none", True: "jitter"}.get(photometric, photometric)
    if mode not in PHOTOMETRIC:
        raise ValueError(
            "`photometric` must be False, True or one of 'none', 'jitter', 'mmseg'. "
            f"Received: photometric={photometric!r}"
        )
    if not 0.0 < float(cat_max_ratio) <= 1.0:
        raise ValueError(
            f"`cat_max_ratio` must be in (0, 1]. Received: cat_max_ratio={cat_max_ratio}"
        )
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
        photometric=mode,
        cat_max_ratio=float(cat_max_ratio),
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


def _to_eval(element: dict[str, Any]) -> tuple[Any, Any, tf.Tensor]:
    return (
        tf.nest.map_structure(lambda t: tf.cast(t, tf.float32), element["image"]),
        tf.nest.map_structure(lambda t: tf.cast(t, tf.int32), element["label"]),
        element["name"],
    )


def eval_pipeline(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """Builds the evaluation pipeline: whole images at native size, one per batch, in order.

    Args:
        dataset: dataset of {"image": ..., "label": ..., "name": string}, image and label
            tensors or dicts of tensors as for `train_pipeline`.

    Returns:
        Dataset of (image float32 [1, H, W, C], label int32 [1, H, W], name string [1]), image
        and label with the nesting of `dataset`, one pass in dataset order.
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
