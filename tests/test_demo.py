"""The built-in demo export and its sample pictures, as `main.py` shows them."""

import io
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from modules.demo import DEMO_EXPORT, SAMPLE_SIZE_PX, sample_images
from modules.flavors import Flavor
from modules.model import CustomVisionModel
from tests import cvmodels

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "make_demo_export.py"
DEMO_ITERATION = "00000000-0000-4000-8000-00000000de70"
EXPORT_FILES = ["cvexport.manifest", "labels.txt", "model.onnx"]

# The specification of the demo model: its tags, in order, and their colours.
PROTOTYPES = {
    "red": (220, 40, 40),
    "orange": (240, 140, 30),
    "yellow": (235, 215, 50),
    "green": (50, 160, 60),
    "blue": (40, 80, 200),
    "purple": (130, 60, 160),
    "white": (240, 240, 240),
    "grey": (128, 128, 128),
    "black": (20, 20, 20),
}
SINGLE_COLOUR_SAMPLES = {
    "tomato.jpg": "red",
    "sky.jpg": "blue",
    "leaf.png": "green",
    "banana.jpg": "yellow",
    "snow.jpg": "white",
}
MIXED_SAMPLE = "meadow.jpg"
# Squared RGB distances closer than this are a tie float32 may settle either way.
NEAR_TIE = 50
EVERYDAY_COLOURS = [
    ((255, 0, 0), "red"),
    ((255, 165, 0), "orange"),
    ((255, 255, 0), "yellow"),
    ((0, 128, 0), "green"),
    ((0, 0, 255), "blue"),
    ((128, 0, 128), "purple"),
    ((255, 255, 255), "white"),
    ((169, 169, 169), "grey"),
    ((0, 0, 0), "black"),
]


@pytest.fixture(scope="module")
def demo_model() -> CustomVisionModel:
    """Load the committed demo export once for the module's tests."""
    return CustomVisionModel.load(DEMO_EXPORT)


@pytest.fixture(scope="module")
def samples() -> dict[str, bytes]:
    """Draw the sample pictures once for the module's tests."""
    return dict(sample_images())


def tags(model: CustomVisionModel, image: bytes) -> dict[str, float]:
    """Return every tag's probability for an image, most probable first."""
    return {p.tag_name: p.probability for p in model.score(image).predictions}


def run_script(*arguments: str | Path) -> subprocess.CompletedProcess[str]:
    """Run the demo export generator with this interpreter."""
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, arguments)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_demo_export_is_a_compact_classifier(demo_model: CustomVisionModel) -> None:
    identity = demo_model.identity

    assert identity.flavor is Flavor.CLASSIFIER
    assert identity.labels == tuple(PROTOTYPES)
    assert identity.iteration == DEMO_ITERATION
    assert not identity.multilabel and not identity.float16
    assert demo_model.contract.channel_order == "RGB"
    assert demo_model.contract.pixel_range == "0..255"


def test_demo_folder_is_data_not_a_package() -> None:
    # An __init__.py there would make `modules.demo` the folder instead of demo.py.
    assert sorted(path.name for path in DEMO_EXPORT.iterdir()) == EXPORT_FILES


def test_sample_images_are_fixed_scenes(samples: dict[str, bytes]) -> None:
    assert set(samples) == {*SINGLE_COLOUR_SAMPLES, MIXED_SAMPLE}
    assert dict(sample_images()) == samples
    for data in samples.values():
        assert Image.open(io.BytesIO(data)).size == SAMPLE_SIZE_PX


@pytest.mark.parametrize(("name", "colour"), SINGLE_COLOUR_SAMPLES.items())
def test_single_colour_samples_are_recognised(
    demo_model: CustomVisionModel, samples: dict[str, bytes], name: str, colour: str
) -> None:
    best, probability = next(iter(tags(demo_model, samples[name]).items()))

    assert best == colour
    assert probability > 0.8


def test_mixed_sample_shares_its_probability(
    demo_model: CustomVisionModel, samples: dict[str, bytes]
) -> None:
    scores = tags(demo_model, samples[MIXED_SAMPLE])

    assert next(iter(scores)) == "blue"
    assert scores["blue"] < 0.7
    assert scores["green"] > 0.1 and scores["grey"] > 0.1


@pytest.mark.parametrize("colour", PROTOTYPES)
def test_prototype_colours_are_confident(
    demo_model: CustomVisionModel, colour: str
) -> None:
    scores = tags(demo_model, cvmodels.solid_image(PROTOTYPES[colour]))

    assert next(iter(scores)) == colour
    assert scores[colour] > 0.9


@pytest.mark.parametrize(("rgb", "colour"), EVERYDAY_COLOURS)
def test_everyday_colours_get_their_names(
    demo_model: CustomVisionModel, rgb: tuple[int, int, int], colour: str
) -> None:
    assert next(iter(tags(demo_model, cvmodels.solid_image(rgb)))) == colour


def test_solid_colours_map_to_the_nearest_prototype(
    demo_model: CustomVisionModel,
) -> None:
    centres = np.array(list(PROTOTYPES.values()), np.float64)
    colours = np.random.default_rng(7).integers(0, 256, (40, 3))

    checked = 0
    for rgb in colours:
        distances = ((centres - rgb) ** 2).sum(axis=1)
        nearest, runner_up = np.sort(distances)[:2]
        if runner_up - nearest < NEAR_TIE:
            continue
        expected = list(PROTOTYPES)[int(np.argmin(distances))]
        image = cvmodels.solid_image((int(rgb[0]), int(rgb[1]), int(rgb[2])))
        assert next(iter(tags(demo_model, image))) == expected, rgb
        checked += 1

    assert checked > 30


def test_committed_export_is_what_the_script_generates() -> None:
    done = run_script("--check")

    assert done.returncode == 0, done.stderr


def test_script_check_notices_a_stale_export(tmp_path: Path) -> None:
    stale = tmp_path / "demo"
    shutil.copytree(DEMO_EXPORT, stale)
    (stale / "labels.txt").write_text("red\n")

    done = run_script("--check", "--folder", stale)

    assert done.returncode == 1
    assert "labels.txt" in done.stderr


def test_script_writes_the_committed_bytes(tmp_path: Path) -> None:
    done = run_script("--folder", tmp_path)

    assert done.returncode == 0, done.stderr
    for name in EXPORT_FILES:
        assert (tmp_path / name).read_bytes() == (DEMO_EXPORT / name).read_bytes()
