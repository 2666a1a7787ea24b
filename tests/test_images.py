"""Decoding: every kind of image either comes out upright RGB or fails clearly."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from modules.errors import BadImageError
from modules.images import decode


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    """Return an image encoded in a format."""
    data = io.BytesIO()
    image.save(data, fmt, **options)
    return data.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """Return a PNG that declares a size and holds almost no data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + chunk(b"IEND", b"")
    )


def halves(size: tuple[int, int] = (40, 20)) -> Image.Image:
    """Return an image red on its left half and blue on its right half."""
    image = Image.new("RGB", size, (255, 0, 0))
    image.paste((0, 0, 255), (size[0] // 2, 0, size[0], size[1]))
    return image


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (b"hello, this is text and not a picture", "not an image"),
        (b'{"path": "/frames/1.jpg"}', "not an image"),
    ],
    ids=["empty", "text", "json"],
)
def test_bytes_that_are_not_images_are_refused(data: bytes, message: str) -> None:
    with pytest.raises(BadImageError, match=message):
        decode(data)


def test_truncated_jpeg_is_refused() -> None:
    data = encode(halves((400, 300)), "JPEG")

    with pytest.raises(BadImageError, match="truncated or corrupt"):
        decode(data[: len(data) // 2])


def test_png_declaring_30000_by_30000_pixels_is_refused_before_decoding() -> None:
    with pytest.raises(
        BadImageError, match="declares 30000x30000 pixels, over the limit"
    ):
        decode(png_header_only(30000, 30000))


@pytest.mark.parametrize(
    ("image", "fmt"),
    [
        (halves().convert("CMYK"), "JPEG"),
        (halves().convert("P"), "PNG"),
        (halves().convert("P"), "GIF"),
        (halves().convert("RGBA"), "PNG"),
        (halves(), "BMP"),
        (halves(), "TIFF"),
        (halves(), "WEBP"),
    ],
    ids=[
        "cmyk-jpeg",
        "palette-png",
        "gif",
        "rgba",
        "bmp",
        "tiff",
        "webp",
    ],
)
def test_colour_modes_and_formats_come_out_as_rgb(image: Image.Image, fmt: str) -> None:
    options = {"lossless": True} if fmt == "WEBP" else {}
    decoded = decode(encode(image, fmt, **options)).image
    pixels = np.asarray(decoded, dtype=np.int16)

    assert decoded.mode == "RGB" and decoded.size == (40, 20)
    assert pixels[10, 5] == pytest.approx([255, 0, 0], abs=40)
    assert pixels[10, 35] == pytest.approx([0, 0, 255], abs=40)


def test_grayscale_and_palette_with_transparency() -> None:
    grey = decode(encode(Image.new("L", (8, 8), 200), "PNG")).image
    transparent = Image.new("P", (8, 8), 1)
    transparent.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    data = encode(transparent, "PNG", transparency=0)

    assert np.asarray(grey)[0, 0].tolist() == [200, 200, 200]
    assert np.asarray(decode(data).image)[0, 0].tolist() == [10, 200, 30]


def test_sixteen_bit_images_are_scaled_not_clipped() -> None:
    ramp = np.array([[0, 1000, 32896, 65535]], dtype=np.uint16)
    data = encode(Image.fromarray(ramp), "PNG")

    decoded = np.asarray(decode(data).image)

    assert decoded[0, :, 0].tolist() == [0, 4, 128, 255]
    assert (decoded[0, :, 0] == decoded[0, :, 2]).all()


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_is_applied(orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(halves(), "JPEG", exif=exif, quality=95)

    decoded = decode(data)
    pixels = np.asarray(decoded.image, dtype=np.int16)

    if orientation == 3:  # rotated 180 degrees: blue is now on the left
        assert (decoded.width, decoded.height) == (40, 20)
        assert pixels[10, 5] == pytest.approx([0, 0, 255], abs=40)
    else:  # rotated a quarter turn: the halves are now top and bottom
        assert (decoded.width, decoded.height) == (20, 40)
        assert decoded.image.size == (20, 40)
        top, bottom = pixels[5, 10], pixels[35, 10]
        # Orientation 6 is shown turned clockwise, so the left (red) half rises.
        red_on_top = orientation == 6
        assert top == pytest.approx([255, 0, 0] if red_on_top else [0, 0, 255], abs=40)
        assert bottom == pytest.approx(
            [0, 0, 255] if red_on_top else [255, 0, 0], abs=40
        )


def test_large_jpeg_is_decoded_at_reduced_scale_but_reports_its_size() -> None:
    data = encode(halves((1920, 1080)), "JPEG")

    decoded = decode(data, fit=(227, 227))

    assert (decoded.width, decoded.height) == (1920, 1080)
    assert decoded.image.size == (480, 270) and decoded.reduced
    full = decode(data)
    assert full.image.size == (1920, 1080) and not full.reduced


def test_reduced_scale_respects_exif_rotation() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(halves((1600, 400)), "JPEG", exif=exif)

    decoded = decode(data, fit=(100, 300))

    # Stored 1600x400, upright 400x1600; the draft must keep 100x300 upright.
    assert (decoded.width, decoded.height) == (400, 1600)
    assert decoded.image.size == (100, 400)


def test_reduced_scale_never_goes_below_the_target() -> None:
    data = encode(halves((1280, 720)), "JPEG")

    assert decode(data, fit=(416, 416)).image.size == (1280, 720)
    assert decode(data, fit=(300, 300)).image.size == (640, 360)
