"""Tests of the validating image/label readers in kfcn.data.images."""

import logging
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from kfcn.data import images
from kfcn.data.images import DataError, check_pair, read_header, read_image, read_label


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch):
    # Conversion warnings are logged once per kind per process; tests need a clean slate.
    monkeypatch.setattr(images, "_warned_kinds", set())


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_raw_png(path, array: np.ndarray, colour_type: int, bit_depth: int) -> None:
    """Encodes a PNG by hand (independent of PIL), e.g. for 16-bit RGB which PIL cannot write."""
    height, width = array.shape[:2]
    dtype = ">u2" if bit_depth == 16 else "u1"
    rows = array.astype(dtype).reshape(height, -1)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    data = (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(raw))
        + _png_chunk(b"IEND", b"")
    )
    path.write_bytes(data)


def _rgb(h=6, w=8, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_read_image_rgb_png_exact(tmp_path):
    array = _rgb()
    Image.fromarray(array).save(tmp_path / "a.png")
    out = read_image(tmp_path / "a.png")
    assert out.dtype == np.uint8 and out.shape == (6, 8, 3)
    np.testing.assert_array_equal(out, array)


def test_read_image_grayscale_converted_with_one_warning(tmp_path, caplog):
    gray = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
    Image.fromarray(gray, mode="L").save(tmp_path / "g1.png")
    Image.fromarray(gray, mode="L").save(tmp_path / "g2.png")
    with caplog.at_level(logging.DEBUG, logger="kfcn.data.images"):
        out = read_image(tmp_path / "g1.png")
        read_image(tmp_path / "g2.png")
    np.testing.assert_array_equal(out, np.stack([gray] * 3, axis=-1))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "g1.png" in warnings[0].getMessage() and "converted to RGB" in warnings[0].getMessage()


def test_read_image_rgba_drops_alpha(tmp_path, caplog):
    rgba = np.concatenate([_rgb(), np.full((6, 8, 1), 7, np.uint8)], axis=-1)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    with caplog.at_level(logging.WARNING):
        out = read_image(tmp_path / "a.png")
    np.testing.assert_array_equal(out, rgba[..., :3])
    assert "mode RGBA" in caplog.text and "a.png" in caplog.text


def test_read_image_palette_uses_colours(tmp_path):
    index = np.array([[0, 1], [2, 1]], np.uint8)
    im = Image.fromarray(index, mode="P")
    im.putpalette([10, 20, 30, 40, 50, 60, 70, 80, 90] + [0] * 759)
    im.save(tmp_path / "p.png")
    out = read_image(tmp_path / "p.png")
    expected = np.array([[[10, 20, 30], [40, 50, 60]], [[70, 80, 90], [40, 50, 60]]], np.uint8)
    np.testing.assert_array_equal(out, expected)


def test_read_image_16bit_gray_scaled(tmp_path, caplog):
    values = np.array([[0, 65535, 257 * 100], [128, 129, 257 * 3]], np.uint16)
    write_raw_png(tmp_path / "g16.png", values, colour_type=0, bit_depth=16)
    with caplog.at_level(logging.WARNING):
        out = read_image(tmp_path / "g16.png")
    # v / 257 rounded: 128/257 = 0.498 -> 0, 129/257 = 0.502 -> 1.
    expected = np.array([[0, 255, 100], [0, 1, 3]], np.uint8)
    np.testing.assert_array_equal(out[..., 0], expected)
    np.testing.assert_array_equal(out[..., 2], expected)
    assert "16-bit" in caplog.text and "g16.png" in caplog.text


def test_read_image_16bit_rgb_reduced(tmp_path, caplog):
    values = np.zeros((2, 3, 3), np.uint16)
    values[0, 0] = (0xFFFF, 0, 0x8080)
    values[1, 2] = (0x0101, 0xFEFE, 0x8080)
    write_raw_png(tmp_path / "c16.png", values, colour_type=2, bit_depth=16)
    with caplog.at_level(logging.WARNING):
        out = read_image(tmp_path / "c16.png")
    assert out.dtype == np.uint8 and out.shape == (2, 3, 3)
    np.testing.assert_array_equal(out[0, 0], [255, 0, 128])
    np.testing.assert_array_equal(out[1, 2], [1, 254, 128])
    assert "16-bit" in caplog.text and "c16.png" in caplog.text
    assert read_header(tmp_path / "c16.png").bit_depth == 16


def test_read_image_empty_file(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"empty\.png.*empty"):
        read_image(tmp_path / "empty.png")


def test_read_image_not_an_image(tmp_path):
    (tmp_path / "junk.png").write_bytes(b"this is not a picture" * 10)
    with pytest.raises(DataError, match=r"junk\.png"):
        read_image(tmp_path / "junk.png")


def test_read_image_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nothere\.png"):
        read_image(tmp_path / "nothere.png")


def test_read_image_truncated(tmp_path):
    Image.fromarray(_rgb(40, 50)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut\.png.*(truncated|corrupt)"):
        read_image(tmp_path / "cut.png")
    with pytest.raises(DataError, match=r"cut\.png"):
        read_header(tmp_path / "cut.png")


def test_read_header_detects_missing_iend_and_bad_crc(tmp_path):
    Image.fromarray(_rgb(40, 50)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "noend.png").write_bytes(data[:-12])
    with pytest.raises(DataError, match=r"noend\.png.*truncated"):
        read_header(tmp_path / "noend.png")
    corrupt = bytearray(data)
    corrupt[60] ^= 0xFF  # inside the IDAT chunk: its CRC no longer matches
    (tmp_path / "flip.png").write_bytes(bytes(corrupt))
    with pytest.raises(DataError, match=r"flip\.png"):
        read_header(tmp_path / "flip.png")
    header = read_header(tmp_path / "full.png")
    assert (header.format, header.mode, header.size, header.bit_depth) == (
        "PNG",
        "RGB",
        (40, 50),
        8,
    )


def test_read_label_gray_and_void(tmp_path):
    values = np.array([[0, 1, 11], [10, 255, 3]], np.uint8)
    Image.fromarray(values, mode="L").save(tmp_path / "l.png")
    out = read_label(tmp_path / "l.png", num_classes=11, ignore_label=255, void_labels=(11,))
    expected = np.array([[0, 1, 255], [10, 255, 3]], np.uint8)
    np.testing.assert_array_equal(out, expected)
    assert out.dtype == np.uint8


def test_read_label_palette_reads_indices_not_colours(tmp_path):
    index = np.array([[0, 1, 2], [255, 2, 1]], np.uint8)
    im = Image.fromarray(index, mode="P")
    # Colours whose gray levels differ from the indices, as in VOC masks.
    palette = [0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * (3 * 252) + [224, 224, 192]
    im.putpalette(palette)
    im.save(tmp_path / "voc.png")
    out = read_label(tmp_path / "voc.png", num_classes=21, ignore_label=255)
    np.testing.assert_array_equal(out, index)


def test_read_label_rejects_rgb_mask(tmp_path):
    Image.fromarray(_rgb(), mode="RGB").save(tmp_path / "rgb.png")
    with pytest.raises(DataError, match=r"rgb\.png.*single-channel index image; got mode RGB"):
        read_label(tmp_path / "rgb.png", num_classes=3, ignore_label=255)


def test_read_label_rgb_with_palette(tmp_path):
    mask = np.zeros((2, 2, 3), np.uint8)
    mask[0, 1] = (128, 0, 0)
    mask[1, 0] = (0, 128, 0)
    mask[1, 1] = (255, 255, 255)
    Image.fromarray(mask).save(tmp_path / "c.png")
    palette = {(0, 0, 0): 0, (128, 0, 0): 1, (0, 128, 0): 2, (255, 255, 255): 255}
    out = read_label(tmp_path / "c.png", num_classes=3, ignore_label=255, palette=palette)
    np.testing.assert_array_equal(out, [[0, 1], [2, 255]])
    mask[0, 0] = (1, 2, 3)
    Image.fromarray(mask).save(tmp_path / "c2.png")
    with pytest.raises(DataError, match=r"c2\.png.*not in the palette: \(1,2,3\)"):
        read_label(tmp_path / "c2.png", num_classes=3, ignore_label=255, palette=palette)


def test_read_label_bad_values_listed(tmp_path):
    values = np.array([[0, 1, 7], [12, 255, 2]], np.uint8)
    Image.fromarray(values, mode="L").save(tmp_path / "bad.png")
    with pytest.raises(DataError, match=r"bad\.png.*values 7, 12 are neither classes \(0\.\.2\)"):
        read_label(tmp_path / "bad.png", num_classes=3, ignore_label=255)


def test_read_label_16bit_values(tmp_path):
    write_raw_png(tmp_path / "l16.png", np.array([[0, 2], [1, 300]], np.uint16), 0, 16)
    with pytest.raises(DataError, match=r"l16\.png.*300"):
        read_label(tmp_path / "l16.png", num_classes=3, ignore_label=255)


def test_read_label_argument_checks(tmp_path):
    Image.fromarray(np.zeros((2, 2), np.uint8)).save(tmp_path / "z.png")
    with pytest.raises(ValueError, match="num_classes=0"):
        read_label(tmp_path / "z.png", num_classes=0, ignore_label=255)
    with pytest.raises(ValueError, match="ignore_label=300"):
        read_label(tmp_path / "z.png", num_classes=2, ignore_label=300)


def test_check_pair_names_both_files():
    with pytest.raises(DataError, match=r"img\.png \(8x6\).*lab\.png \(8x5\)"):
        check_pair(np.zeros((6, 8, 3)), np.zeros((5, 8)), "img.png", "lab.png")
    check_pair(np.zeros((6, 8, 3)), np.zeros((6, 8)), "img.png", "lab.png")


def test_read_header_truncated_jpeg(tmp_path):
    Image.fromarray(_rgb(64, 64)).save(tmp_path / "full.jpg", quality=90)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(DataError, match=r"cut\.jpg: truncated JPEG"):
        read_header(tmp_path / "cut.jpg")
    # Trailing bytes after the end-of-image marker are tolerated.
    (tmp_path / "tail.jpg").write_bytes(data + b"\x00" * 100)
    assert read_header(tmp_path / "tail.jpg").format == "JPEG"
    with pytest.raises(DataError, match=r"cut\.jpg"):
        read_image(tmp_path / "cut.jpg")


def test_read_label_low_bit_depth_gray_png_keeps_indices(tmp_path):
    # A 4-bit grayscale PNG whose samples are class indices (PIL shows them stretched to 0..255).
    values = np.array([[0, 1, 2, 3], [4, 5, 6, 15]], np.uint8)
    packed = (values[:, 0::2] << 4 | values[:, 1::2]).astype(np.uint8)
    write_raw_png(tmp_path / "g4.png", packed, colour_type=0, bit_depth=8)
    # Rewrite IHDR as 4-bit, 4 pixels wide: the packed bytes hold two samples each.
    data = bytearray((tmp_path / "g4.png").read_bytes())
    ihdr = struct.pack(">IIBBBBB", 4, 2, 4, 0, 0, 0, 0)
    data[8:33] = _png_chunk(b"IHDR", ihdr)
    (tmp_path / "g4.png").write_bytes(bytes(data))
    out = read_label(tmp_path / "g4.png", num_classes=16, ignore_label=255)
    np.testing.assert_array_equal(out, values)
