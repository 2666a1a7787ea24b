"""The built-in demo export and sample pictures, to try the module with nothing else.

The export in the demo folder tags an image with the colour nearest its mean colour
(scripts/make_demo_export.py builds it); the pictures are drawn here at run time.
"""

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageDraw

# A data folder, not a package: an __init__.py there would shadow this module.
DEMO_EXPORT = Path(__file__).with_name("demo")

SAMPLE_SIZE_PX = (640, 480)
NOISE_SEED = 20261203
NOISE_LEVEL = 12
JPEG_QUALITY = 90

Colour = tuple[int, int, int]


def sample_images() -> list[tuple[str, bytes]]:
    """Draw the sample pictures and return each with its file name, encoded."""
    rng = np.random.default_rng(NOISE_SEED)
    return [(name, _encode(_grainy(draw(), rng), name)) for name, draw in _SCENES]


def _tomato() -> Image.Image:
    image = Image.new("RGB", SAMPLE_SIZE_PX, (175, 30, 40))
    draw = ImageDraw.Draw(image)
    draw.ellipse((110, 50, 530, 450), fill=(220, 40, 35))
    draw.ellipse((200, 110, 300, 170), fill=(245, 125, 115))
    draw.polygon([(300, 40), (340, 40), (380, 90), (320, 75), (260, 90)], (60, 130, 45))
    return image


def _sky() -> Image.Image:
    image = _vertical_gradient((25, 65, 185), (80, 125, 220))
    draw = ImageDraw.Draw(image)
    for left, top in ((80, 90), (400, 60), (300, 300)):
        draw.ellipse((left, top, left + 120, top + 40), fill=(245, 245, 250))
        draw.ellipse((left + 30, top - 20, left + 90, top + 30), fill=(245, 245, 250))
    return image


def _leaf() -> Image.Image:
    image = Image.new("RGB", SAMPLE_SIZE_PX, (65, 135, 50))
    draw = ImageDraw.Draw(image)
    outline = [(60, 400), (200, 120), (420, 40), (590, 60), (520, 260), (300, 420)]
    draw.polygon(outline, fill=(50, 165, 60))
    draw.line([(60, 400), (560, 80)], fill=(30, 105, 40), width=8)
    for start in (150, 250, 350, 450):
        rise = 400 - (start - 60) * 320 // 500
        draw.line([(start, rise), (start + 60, rise + 90)], fill=(30, 105, 40), width=4)
        draw.line(
            [(start, rise), (start - 20, rise - 100)], fill=(30, 105, 40), width=4
        )
    return image


def _banana() -> Image.Image:
    image = Image.new("RGB", SAMPLE_SIZE_PX, (240, 220, 110))
    draw = ImageDraw.Draw(image)
    draw.arc((60, -260, 580, 400), start=25, end=155, fill=(235, 210, 40), width=110)
    for centre_x in (136, 504):
        draw.ellipse((centre_x - 14, 190, centre_x + 14, 226), fill=(90, 60, 30))
    return image


def _snow() -> Image.Image:
    image = _vertical_gradient((225, 232, 242), (250, 250, 252))
    draw = ImageDraw.Draw(image)
    draw.ellipse((-200, 260, 500, 700), fill=(238, 240, 246))
    draw.ellipse((300, 300, 900, 650), fill=(205, 212, 228))
    draw.polygon([(470, 130), (420, 260), (520, 260)], fill=(40, 90, 60))
    draw.rectangle((462, 260, 478, 290), fill=(90, 60, 40))
    return image


def _meadow() -> Image.Image:
    width, height = SAMPLE_SIZE_PX
    image = Image.new("RGB", SAMPLE_SIZE_PX, (50, 160, 60))
    # The mean of sky and grass lies between blue, green and grey, which share the
    # probability; sky over a little more than half the frame puts blue first.
    ImageDraw.Draw(image).rectangle((0, 0, width, height * 52 // 100), (40, 80, 200))
    return image


def _vertical_gradient(top: Colour, bottom: Colour) -> Image.Image:
    width, height = SAMPLE_SIZE_PX
    rows = np.linspace(top, bottom, height).round().astype(np.uint8)
    return Image.fromarray(np.repeat(rows[:, np.newaxis], width, axis=1))


def _grainy(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Add deterministic film grain, the same on every channel."""
    width, height = image.size
    # Specks of 2x2 pixels keep the PNG sample quick to compress.
    specks = rng.integers(0, 2 * NOISE_LEVEL + 1, (height // 2, width // 2), np.uint8)
    grain = Image.fromarray(specks).resize(image.size, Image.Resampling.NEAREST)
    # ImageChops.add clips to 0..255; the offset centres the grain on zero.
    return ImageChops.add(image, Image.merge("RGB", [grain] * 3), offset=-NOISE_LEVEL)


def _encode(image: Image.Image, name: str) -> bytes:
    buffer = io.BytesIO()
    if name.endswith(".png"):
        # Grain is noise, which no zlib level compresses much: take the fastest.
        image.save(buffer, format="PNG", compress_level=1)
    else:
        image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


_SCENES: list[tuple[str, Callable[[], Image.Image]]] = [
    ("tomato.jpg", _tomato),
    ("sky.jpg", _sky),
    ("leaf.png", _leaf),
    ("banana.jpg", _banana),
    ("snow.jpg", _snow),
    ("meadow.jpg", _meadow),
]
