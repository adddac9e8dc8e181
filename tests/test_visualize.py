"""Palettes against published colours; overlays against the blend formula; plots written."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from kfcn import visualize

# PASCAL VOC devkit (VOCdevkit/VOCcode/VOClabelcolormap.m), classes 0..20.
VOC_PUBLISHED = [
    (0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0), (0, 0, 128), (128, 0, 128),
    (0, 128, 128), (128, 128, 128), (64, 0, 0), (192, 0, 0), (64, 128, 0), (192, 128, 0),
    (64, 0, 128), (192, 0, 128), (64, 128, 128), (192, 128, 128), (0, 64, 0), (128, 64, 0),
    (0, 192, 0), (128, 192, 0), (0, 64, 128),
]  # fmt: skip
# cityscapesScripts labels.py, by trainId.
CITYSCAPES_PUBLISHED = {
    0: (128, 64, 128), 1: (244, 35, 232), 2: (70, 70, 70), 5: (153, 153, 153),
    8: (107, 142, 35), 10: (70, 130, 180), 11: (220, 20, 60), 13: (0, 0, 142),
    18: (119, 11, 32),
}  # fmt: skip
# SegNet CamVid: Sky, Road, Pavement, Car, Bicyclist; void black.
CAMVID_PUBLISHED = {
    0: (128, 128, 128), 3: (128, 64, 128), 4: (60, 40, 222), 8: (64, 0, 128), 10: (0, 128, 192),
    11: (0, 0, 0),
}  # fmt: skip
# mmsegmentation ADE20KDataset: wall, building, sky, person (12), flag (149).
ADE20K_PUBLISHED = {
    0: (120, 120, 120), 1: (180, 120, 120), 2: (6, 230, 230), 12: (150, 5, 61),
    149: (92, 0, 255),
}  # fmt: skip


def test_voc_palette_is_the_devkit_colormap():
    colours = visualize.palette("voc")
    assert colours.shape == (256, 3) and colours.dtype == np.uint8
    np.testing.assert_array_equal(colours[:21], VOC_PUBLISHED)
    assert tuple(colours[255]) == (224, 224, 192)  # the void/boundary colour of VOC PNGs


@pytest.mark.parametrize(
    "name, length, published",
    [("cityscapes", 19, CITYSCAPES_PUBLISHED), ("camvid", 12, CAMVID_PUBLISHED),
     ("ade20k", 150, ADE20K_PUBLISHED)],
)  # fmt: skip
def test_named_palettes_have_published_colours(name, length, published):
    colours = visualize.palette(name)
    assert colours.shape == (length, 3)
    for index, rgb in published.items():
        assert tuple(colours[index]) == rgb, (name, index)


@pytest.mark.parametrize("count", [1, 2, 12, 150, 256])
def test_generic_palette_colours_are_distinct(count):
    colours = visualize.palette(count)
    assert colours.shape == (count, 3) and colours.dtype == np.uint8
    assert len({tuple(c) for c in colours.tolist()}) == count
    np.testing.assert_array_equal(colours, visualize.palette("generic", count))


def test_named_palette_cut_and_extended():
    np.testing.assert_array_equal(visualize.palette("voc", 21), VOC_PUBLISHED)
    extended = visualize.palette("cityscapes", 23)
    assert extended.shape == (23, 3)
    np.testing.assert_array_equal(extended[:19], visualize.palette("cityscapes"))
    assert len({tuple(c) for c in extended.tolist()}) == 23


@pytest.mark.parametrize("args", [("pascal",), ("generic",), (0,), ("voc", 0), (3, 4)])
def test_palette_errors(args):
    with pytest.raises(ValueError):
        visualize.palette(*args)


def test_colorize_indexes_the_palette_and_whitens_unknown_ids():
    colours = np.array([[1, 2, 3], [4, 5, 6]], np.uint8)
    class_map = np.array([[0, 1], [255, 1]])
    out = visualize.colorize(class_map, colours)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, [[[1, 2, 3], [4, 5, 6]], [[255, 255, 255], [4, 5, 6]]])


def _scene():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (60, 40, 3)).astype(np.uint8)
    class_map = np.zeros((60, 40), np.int64)
    class_map[20:, :] = 2
    class_map[50:, 30:] = 4
    return image, class_map


def test_overlay_without_legend_is_the_blend():
    image, class_map = _scene()
    colours = visualize.palette("voc", 5)
    out = visualize.overlay(image, class_map, colours, alpha=0.3, legend=False)
    expected = np.round(0.7 * image + 0.3 * colours[class_map].astype(np.float64))
    assert out.shape == image.shape
    np.testing.assert_allclose(out, expected, atol=1)


def test_overlay_legend_widens_and_shows_only_present_classes():
    image, class_map = _scene()
    colours = visualize.palette("voc", 5)
    names = ["background", "aeroplane", "bicycle", "bird", "boat"]
    out = visualize.overlay(image, class_map, colours, names, alpha=0.5)
    plain = visualize.overlay(image, class_map, colours, names, alpha=0.5, legend=False)
    assert out.shape[0] == 60 and out.shape[1] > 40
    np.testing.assert_array_equal(out[:, :40], plain)
    panel = {tuple(p) for p in out[:, 40:].reshape(-1, 3).tolist()}
    for present in (0, 2, 4):
        assert tuple(colours[present]) in panel
    for absent in (1, 3):
        assert tuple(colours[absent]) not in panel
    # A picture shorter than one legend row grows to hold it.
    short = visualize.overlay(image[:3], class_map[:3], colours, names)
    assert short.shape[0] > 3 and short.shape[1] > 40


def test_overlay_errors():
    image, class_map = _scene()
    with pytest.raises(ValueError, match="class_map"):
        visualize.overlay(image, class_map[:-1], visualize.palette(5))
    with pytest.raises(ValueError, match="alpha"):
        visualize.overlay(image, class_map, visualize.palette(5), alpha=1.5)


def test_confusion_matrix_png(tmp_path):
    matrix = np.array([[50, 2, 0], [5, 30, 1], [0, 0, 0]])
    path = tmp_path / "sub" / "confusion.png"
    visualize.plot_confusion_matrix(matrix, ["a", "b", "c"], str(path), normalize="true")
    with Image.open(path) as picture:
        assert picture.format == "PNG" and picture.width > 100
    with pytest.raises(ValueError, match="square"):
        visualize.plot_confusion_matrix(np.zeros((2, 3)), None, str(path))
    with pytest.raises(ValueError, match="normalize"):
        visualize.plot_confusion_matrix(matrix, None, str(path), normalize="rows")
    with pytest.raises(ValueError, match="class_names"):
        visualize.plot_confusion_matrix(matrix, ["a"], str(path))


def _write_events(logdir):
    """Scalars written the way kfcn.training.loop._scalar writes them."""
    import tensorflow as tf
    from tensorflow.core.framework import summary_pb2

    metadata = summary_pb2.SummaryMetadata()
    metadata.plugin_data.plugin_name = "scalars"
    series = {
        "train": {"loss": [3.0, 2.0, 1.5, 1.2], "learning_rate": [1e-3] * 4},
        "validation": {"mean_iou": [0.2, 0.4], "pixel_accuracy": [0.6, 0.8]},
    }
    for run, tags in series.items():
        writer = tf.summary.create_file_writer(os.path.join(logdir, run))
        with writer.as_default():
            for tag, values in tags.items():
                step_of = (lambda i: 10 * (i + 1)) if run == "train" else (lambda i: 20 * (i + 1))
                for i, value in enumerate(values):
                    tf.summary.write(tag, tf.constant(value, tf.float32), step_of(i), metadata)
        writer.close()
    return series


def test_training_curves_read_what_training_writes(tmp_path):
    logdir = tmp_path / "logs"
    series = _write_events(str(logdir))
    scalars = visualize.read_scalars(str(logdir))
    assert [v for _, v in scalars["train"]["loss"]] == pytest.approx(series["train"]["loss"])
    assert [s for s, _ in scalars["validation"]["mean_iou"]] == [20, 40]
    path = tmp_path / "curves.png"
    visualize.training_curves(str(logdir), str(path))
    with Image.open(path) as picture:
        assert picture.format == "PNG" and picture.width > 3 * picture.height / 2
    with pytest.raises(FileNotFoundError):
        visualize.training_curves(str(tmp_path / "empty"), str(path))


def test_figure_grid_png(tmp_path):
    image, class_map = _scene()
    colour = visualize.colorize(class_map, visualize.palette("voc"))
    titles = ["image", "FCN-32s", "FCN-16s", "FCN-8s", "ground truth"]
    path = tmp_path / "figure2.png"
    visualize.figure_grid([[image, colour, colour, colour, colour]] * 2, titles, str(path))
    with Image.open(path) as picture:
        assert picture.width > picture.height  # five columns, two rows
    with pytest.raises(ValueError, match="rows"):
        visualize.figure_grid([[image]], titles, str(path))


def test_plots_leave_pyplot_alone(tmp_path):
    code = (
        "import sys, numpy as np\n"
        "from kfcn import visualize\n"
        "assert 'matplotlib' not in sys.modules, 'matplotlib imported with kfcn.visualize'\n"
        f"visualize.plot_confusion_matrix(np.eye(2), None, {str(tmp_path / 'c.png')!r})\n"
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
