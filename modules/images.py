"""Decode image bytes into an upright RGB image, safely and no larger than needed."""

import io
import logging
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import BadImageError

MAX_IMAGE_BYTES = 64 * 1024 * 1024
MAX_IMAGE_PIXELS = 50_000_000
FORMATS = ("JPEG", "PNG", "BMP", "GIF", "TIFF", "WEBP")
# JPEG draft decoding is worth it only when it can at least halve each side.
DRAFT_MIN_SCALE = 2
_TRANSPOSED_ORIENTATIONS = frozenset({5, 6, 7, 8})
_EXIF_ORIENTATION = 0x0112

# The module checks pixel counts itself, right after reading the header, so that an
# oversized image is one clear error rather than Pillow's warning or bomb error.
Image.MAX_IMAGE_PIXELS = None

_LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class DecodedImage:
    """An upright RGB image and the size of the original it came from."""

    image: Image.Image
    width: int
    height: int
    format: str
    reduced: bool = False  # decoded at a reduced scale (JPEG draft mode)


def decode(
    data: bytes,
    fit: tuple[int, int] | None = None,
    *,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> DecodedImage:
    """Decode bytes into RGB; JPEGs at reduced scale when fit (w, h) is much smaller."""
    if not data:
        raise BadImageError("the image is empty: 0 bytes")
    if len(data) > MAX_IMAGE_BYTES:
        raise BadImageError(
            f"the image is {len(data)} bytes, over the {MAX_IMAGE_BYTES}-byte limit"
        )
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as opened:
            return _decode_opened(opened, fit, max_pixels)
    except BadImageError:
        raise
    except UnidentifiedImageError as error:
        raise BadImageError(
            "not an image: the bytes are not JPEG, PNG, BMP, GIF, TIFF or WebP"
        ) from error
    except (
        OSError,
        ValueError,
        SyntaxError,
        EOFError,
        Image.DecompressionBombError,
    ) as error:
        raise BadImageError(f"the image is truncated or corrupt: {error}") from error


def _decode_opened(
    opened: Image.Image, fit: tuple[int, int] | None, max_pixels: int
) -> DecodedImage:
    width, height = opened.size
    if width < 1 or height < 1 or width * height > max_pixels:
        raise BadImageError(
            f"the image declares {width}x{height} pixels, over the limit of "
            f"{max_pixels} pixels"
        )
    image_format = opened.format or "unknown"
    orientation = _orientation(opened)
    if orientation in _TRANSPOSED_ORIENTATIONS:
        width, height = height, width
        fit = (fit[1], fit[0]) if fit else None
    stored_size = opened.size
    if fit and image_format in ("JPEG", "MPO"):
        _draft(opened, fit)

    opened.load()
    reduced = opened.size != stored_size
    upright = ImageOps.exif_transpose(opened) if orientation > 1 else opened
    rgb = to_rgb(upright)
    return DecodedImage(rgb, width, height, image_format, reduced)


def to_rgb(image: Image.Image) -> Image.Image:
    """Return the image in RGB mode, scaling high bit depths rather than clipping."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return _deep_to_rgb(image)
    if image.mode in ("P", "PA", "LA", "La", "RGBa") or "transparency" in image.info:
        image = image.convert("RGBA")
    try:
        return image.convert("RGB")
    except ValueError as error:
        raise BadImageError(
            f"the image's colour mode {image.mode} cannot be converted to RGB"
        ) from error


def _deep_to_rgb(image: Image.Image) -> Image.Image:
    values = np.asarray(image, dtype=np.float64)
    peak = float(values.max(initial=0.0))
    if image.mode == "F" and peak <= 1.0:
        values = values * 255.0
    elif image.mode.startswith("I;16") or peak > 255.0:
        # 16-bit samples: map 0..65535 onto 0..255.
        values = values / 257.0
    grey = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")


def _orientation(image: Image.Image) -> int:
    try:
        value = image.getexif().get(_EXIF_ORIENTATION, 1)
    except (OSError, ValueError, SyntaxError) as error:
        # A damaged EXIF block should not cost the image; it is scored as stored.
        _LOGGER.debug("Ignoring unreadable EXIF data: %s", error)
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _draft(image: Image.Image, fit: tuple[int, int]) -> None:
    width, height = image.size
    if width < fit[0] * DRAFT_MIN_SCALE or height < fit[1] * DRAFT_MIN_SCALE:
        return
    image.draft("RGB", fit)
