"""The model runtime on the real exports and on synthetic models of every flavor."""

import hashlib
import io
import json
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from modules.errors import BadModelError
from modules.flavors import Flavor
from modules.model import CustomVisionModel, ScoreOptions
from tests import cvmodels

RED = (255, 0, 0)
Export = Callable[..., Path]

# pen.jpg is the borderline image: Pen 0.558 with a full decode and bilinear stretch.
REAL_EXPECTATIONS = [
    ("office-fruit-onnx12", "apple.jpg", "apple", 1.0),
    ("office-fruit-onnx12", "grapes.jpg", "grapes", 1.0),
    ("office-fruit-onnx12", "pear.jpg", "pear", 1.0),
    ("office-fruit-onnx12", "pen.jpg", "Pen", 0.558),
    ("hemlock-cherry-onnx12", "japanese_cherry_6.jpg", "JapaneseCherry", 1.0),
    ("hemlock-cherry-onnx12", "test_image.jpg", "hemlock", 1.0),
    ("cat-or-dog-onnx12", "kitten_224.png", "cat", 1.0),
]


def top(model: CustomVisionModel, image: bytes, **options: float) -> tuple[str, float]:
    """Return the most probable tag and its probability."""
    best = model.score(image, ScoreOptions(**options)).predictions[0]
    return best.tag_name, best.probability


@pytest.mark.parametrize(("folder", "image", "tag", "probability"), REAL_EXPECTATIONS)
def test_real_exports_give_their_published_results(
    fixtures_dir: Path, folder: str, image: str, tag: str, probability: float
) -> None:
    model = CustomVisionModel.load(fixtures_dir / folder)
    data = (fixtures_dir / folder / "images" / image).read_bytes()

    full = model.score(data, draft=False).predictions
    assert (full[0].tag_name, full[0].probability) == pytest.approx(
        (tag, probability), abs=0.01
    )
    assert model.score(data).predictions[0].tag_name == tag


def test_real_export_results_are_sorted_and_complete(fixtures_dir: Path) -> None:
    model = CustomVisionModel.load(fixtures_dir / "office-fruit-onnx12")
    data = (fixtures_dir / "office-fruit-onnx12/images/pen.jpg").read_bytes()

    predictions = model.score(data, draft=False).predictions

    assert [p.tag_name for p in predictions][:2] == ["Pen", "apple"]
    assert {p.tag_id: p.tag_name for p in predictions} == dict(
        enumerate(["apple", "grapes", "pear", "Pen"])
    )
    probabilities = [p.probability for p in predictions]
    assert probabilities == sorted(probabilities, reverse=True)
    assert sum(probabilities) == pytest.approx(1.0, abs=1e-4)


def test_real_multilabel_export_is_recognised(fixtures_dir: Path) -> None:
    model = CustomVisionModel.load(fixtures_dir / "computer-multilabel-onnx12")

    assert model.identity.multilabel
    assert model.identity.labels == (
        "controller",
        "keyboard",
        "laptop",
        "monitor",
        "mouse",
    )
    assert model.contract.bgr and model.contract.pixel_range == "0..255"


def test_wrong_colour_order_or_range_would_misclassify(fixtures_dir: Path) -> None:
    """Show that the contract the module uses is the one that matters."""
    model = CustomVisionModel.load(fixtures_dir / "office-fruit-onnx12")
    pear = Image.open(fixtures_dir / "office-fruit-onnx12/images/pear.jpg").convert(
        "RGB"
    )
    tensor = model.preprocess(pear)

    as_rgb = model.decode(model.infer(tensor[:, ::-1].copy()), ScoreOptions())
    as_unit = model.decode(model.infer(tensor / 255), ScoreOptions())

    assert model.decode(model.infer(tensor), ScoreOptions())[0].tag_name == "pear"
    assert as_rgb[0].tag_name == "apple"
    assert as_unit[0].tag_name == "apple"


def test_identity_names_the_model_file(fixtures_dir: Path) -> None:
    path = fixtures_dir / "hemlock-cherry-onnx12/model.onnx"

    model = CustomVisionModel.load(path)

    assert model.identity.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert model.identity.flavor is Flavor.CLASSIFIER_ONNX12


def test_scoring_from_several_threads_gives_the_same_results(
    fixtures_dir: Path,
) -> None:
    model = CustomVisionModel.load(fixtures_dir / "office-fruit-onnx12", threads=1)
    images = sorted((fixtures_dir / "office-fruit-onnx12/images").glob("*.jpg"))
    expected = {path.name: top(model, path.read_bytes()) for path in images}
    seen: list[tuple[str, tuple[str, float]]] = []
    lock = threading.Lock()

    def work() -> None:
        for path in images * 3:
            result = top(model, path.read_bytes())
            with lock:
                seen.append((path.name, result))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(seen) == 4 * 3 * len(images)
    assert all(result == expected[name] for name, result in seen)


def test_compact_classifier(write_export: Export) -> None:
    folder = write_export(cvmodels.compact_classifier([0.1, 0.6, 0.3]), ["a", "b", "c"])

    model = CustomVisionModel.load(folder)
    predictions = model.score(cvmodels.solid_image(RED)).predictions

    assert model.identity.flavor is Flavor.CLASSIFIER
    assert [(p.tag_id, p.tag_name) for p in predictions] == [
        (1, "b"),
        (2, "c"),
        (0, "a"),
    ]
    assert [p.probability for p in predictions] == pytest.approx([0.6, 0.3, 0.1])
    assert all(p.box is None for p in predictions)


def test_threshold_and_maximum(write_export: Export) -> None:
    model = CustomVisionModel.load(
        write_export(cvmodels.compact_classifier([0.1, 0.6, 0.3]), ["a", "b", "c"])
    )
    image = cvmodels.solid_image(RED)

    above = model.score(image, ScoreOptions(threshold=0.25)).predictions
    first = model.score(image, ScoreOptions(max_predictions=1)).predictions

    assert [p.tag_name for p in above] == ["b", "c"]
    assert [p.tag_name for p in first] == ["b"]


def test_s1_classifier(write_export: Export) -> None:
    model_bytes = cvmodels.compact_classifier([0.7, 0.3], size=300, batch=1)
    model = CustomVisionModel.load(write_export(model_bytes, ["fire", "smoke"]))

    assert model.identity.flavor is Flavor.CLASSIFIER_S1
    assert top(model, cvmodels.solid_image(RED)) == ("fire", pytest.approx(0.7))


def test_float16_classifier(write_export: Export) -> None:
    model_bytes = cvmodels.compact_classifier([0.25, 0.75], float16=True)
    model = CustomVisionModel.load(write_export(model_bytes, ["x", "y"]))

    assert model.identity.float16
    assert model.contract.dtype is np.float16
    assert top(model, cvmodels.solid_image(RED)) == ("y", pytest.approx(0.75, abs=1e-3))


def test_bare_onnx12_model_takes_labels_from_its_label_map(tmp_path: Path) -> None:
    path = tmp_path / "bare.onnx"
    labels = ["zebra", "Apple", "mango"]
    path.write_bytes(cvmodels.legacy_classifier(labels, [0.2, 0.5, 0.3]))

    model = CustomVisionModel.load(path)
    predictions = model.score(cvmodels.solid_image(RED)).predictions

    assert model.identity.labels == tuple(labels)
    assert [(p.tag_id, p.tag_name) for p in predictions] == [
        (1, "Apple"),
        (2, "mango"),
        (0, "zebra"),
    ]
    assert [p.probability for p in predictions] == pytest.approx([0.5, 0.3, 0.2])


def test_bare_onnx_takes_labels_from_a_labels_file_beside_it(tmp_path: Path) -> None:
    path = tmp_path / "any-name.onnx"
    path.write_bytes(cvmodels.compact_classifier([0.2, 0.8]))
    (tmp_path / "labels.txt").write_text("no dog\r\ndog\r\n")

    assert CustomVisionModel.load(path).identity.labels == ("no dog", "dog")


def test_bare_onnx_without_labels_numbers_its_tags(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(cvmodels.compact_classifier([0.2, 0.8]))

    model = CustomVisionModel.load(path)

    assert model.identity.labels == ("0", "1")
    assert top(model, cvmodels.solid_image(RED)) == ("1", pytest.approx(0.8))


def test_labels_that_do_not_match_the_model_are_refused(write_export: Export) -> None:
    folder = write_export(cvmodels.compact_classifier([0.2, 0.8]), ["a", "b", "c"])

    with pytest.raises(BadModelError, match="3 labels but its model scores 2 tags"):
        CustomVisionModel.load(folder)


def test_onnx12_labels_must_name_the_map_keys(write_export: Export) -> None:
    model_bytes = cvmodels.legacy_classifier(["cat", "dog"], [0.4, 0.6])

    with pytest.raises(BadModelError, match="do not match the tags"):
        CustomVisionModel.load(write_export(model_bytes, ["cat", "wolf"]))


def test_2018_opset1_export_is_refused_with_advice(tmp_path: Path) -> None:
    path = tmp_path / "old.onnx"
    path.write_bytes(cvmodels.opset1_classifier())

    with pytest.raises(BadModelError, match=r"2018 'ONNX 1.0' export \(operator set 1"):
        CustomVisionModel.load(path)


def test_a_model_that_is_not_a_custom_vision_export_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.onnx"
    path.write_bytes(cvmodels.not_custom_vision())

    with pytest.raises(BadModelError) as caught:
        CustomVisionModel.load(path)

    message = str(caught.value)
    assert "not a Custom Vision export" in message
    assert (
        "x tensor(float) [1, 10]" in message and "expected one image input" in message
    )


def test_bytes_that_are_not_onnx_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"\xff" * 64)

    with pytest.raises(BadModelError, match="not an ONNX model"):
        CustomVisionModel.load(path)


# Probe: the model answers each fed channel's mean / 255, so a red image shows what
# channel order and range reached the graph.
PROBE_CASES = [
    ({}, 224, [0, 0, 1]),
    ({}, 300, [1, 0, 0]),
    ({"Image.BitmapPixelFormat": "Rgb8"}, 224, [1, 0, 0]),
    ({"Image.BitmapPixelFormat": "Bgr8"}, 300, [0, 0, 1]),
    ({"Image.NominalPixelRange": "NominalRange_0_255"}, 224, [0, 0, 1]),
    ({"Image.NominalPixelRange": "Normalized_0_1"}, 224, [0, 0, 1 / 255]),
    ({"Image.NominalPixelRange": "Normalized_1_1"}, 224, [-1 / 255, -1 / 255, 1 / 255]),
    (
        {
            "Image.BitmapPixelFormat": "Rgb8",
            "Image.NominalPixelRange": "Normalized_0_1",
        },
        300,
        [1 / 255, 0, 0],
    ),
]


@pytest.mark.parametrize(("metadata", "size", "expected"), PROBE_CASES)
@pytest.mark.parametrize("float16", [False, True])
def test_probe_sees_the_colour_order_and_range_fed(
    write_export: Export,
    metadata: dict[str, str],
    size: int,
    expected: list[float],
    float16: bool,
) -> None:
    model_bytes = cvmodels.probe_classifier(
        size=size, float16=float16, metadata=metadata
    )
    model = CustomVisionModel.load(write_export(model_bytes, ["c0", "c1", "c2"]))

    # The probe's outputs are means, not probabilities: keep the negative ones too.
    everything = ScoreOptions(threshold=-1.0)
    predictions = model.score(cvmodels.solid_image(RED), everything).predictions
    fed = {p.tag_id: p.probability for p in predictions}

    assert [fed[0], fed[1], fed[2]] == pytest.approx(expected, abs=2e-3)


@pytest.mark.parametrize(
    ("model_bytes", "first_channel", "scale"),
    [
        (cvmodels.grid_detector(np.zeros((1, 35, 13, 13), np.float32)), 0, 1.0),
        (cvmodels.s1_detector([[0, 0, 1, 1]], [0.9], [0]), 255, 1.0),
        (
            cvmodels.s1_detector(
                [[0, 0, 1, 1]],
                [0.9],
                [0],
                metadata={"Image.NominalPixelRange": "Normalized_0_1"},
            ),
            255,
            1 / 255,
        ),
    ],
    ids=["grid-bgr", "s1-rgb", "s1-unit"],
)
def test_detectors_are_fed_their_flavors_colour_order(
    write_export: Export, model_bytes: bytes, first_channel: int, scale: float
) -> None:
    model = CustomVisionModel.load(write_export(model_bytes, ["a", "b"]))
    red = Image.new("RGB", (50, 40), RED)

    tensor = model.preprocess(red)

    assert tensor[0, :, 0, 0] == pytest.approx(
        np.array([first_channel, 0, 255 - first_channel]) * scale
    )


def grid_with_three_candidates() -> np.ndarray:
    """Return a 13x13, 5-anchor, 2-tag grid with hand-chosen cells."""
    grid = np.zeros((5, 7, 13, 13), np.float32)
    grid[:, 4] = -20.0  # objectness ~2e-9 everywhere else
    # Cell (6, 6), anchor 0: centre (0.5, 0.5), objectness 0.8, tags 0.25 / 0.75.
    grid[0, 4, 6, 6] = np.log(4.0)
    grid[0, 6, 6, 6] = np.log(3.0)
    # Cell (0, 0), anchor 4: objectness 0.5, tags 0.9 / 0.1; its box leaves the image.
    grid[4, 4, 0, 0] = 0.0
    grid[4, 5, 0, 0] = np.log(9.0)
    # Cell (6, 6), anchor 1 resized to anchor 0's box: objectness 0.5, tags 1/4, 3/4.
    grid[1, 2, 6, 6] = np.log(0.573 / 1.87)
    grid[1, 3, 6, 6] = np.log(0.677 / 2.06)
    grid[1, 4, 6, 6] = 0.0
    grid[1, 6, 6, 6] = np.log(3.0)
    return grid.reshape(1, 35, 13, 13)


def test_grid_detector_decodes_hand_worked_boxes(write_export: Export) -> None:
    model_bytes = cvmodels.grid_detector(grid_with_three_candidates())
    model = CustomVisionModel.load(write_export(model_bytes, ["cup", "pen"]))

    predictions = model.score(cvmodels.solid_image(RED)).predictions

    # The anchor-1 duplicates overlap anchor 0's box fully: per-tag NMS removes both.
    assert [(p.tag_name, round(p.probability, 4)) for p in predictions] == [
        ("pen", 0.6),
        ("cup", 0.45),
        ("cup", 0.2),
    ]
    centre = predictions[0].box
    assert centre is not None
    assert (centre.left, centre.top) == pytest.approx(
        (0.5 - 0.573 / 26, 0.5 - 0.677 / 26)
    )
    assert (centre.width, centre.height) == pytest.approx((0.573 / 13, 0.677 / 13))
    corner = predictions[1].box
    assert corner is not None
    assert (corner.left, corner.top) == (0.0, 0.0)
    assert corner.width == pytest.approx(0.5 / 13 + 9.77 / 26)
    assert corner.height == pytest.approx(0.5 / 13 + 9.17 / 26)
    assert predictions[2].box == centre


def test_grid_detector_threshold_maximum_and_metadata_anchors(
    write_export: Export,
) -> None:
    biases = [1.3, 1.3, 1.87, 2.06, 3.34, 5.47, 7.88, 3.53, 9.77, 9.17]
    metadata = {"CustomVision.Postprocess.Yolo.Biases": json.dumps(biases)}
    model_bytes = cvmodels.grid_detector(
        grid_with_three_candidates(), metadata=metadata
    )
    model = CustomVisionModel.load(write_export(model_bytes, ["cup", "pen"]))
    image = cvmodels.solid_image(RED)

    above = model.score(image, ScoreOptions(threshold=0.3)).predictions
    first = model.score(image, ScoreOptions(max_predictions=1)).predictions

    # Anchor 0 is now 1.3 cells wide: the anchor-1 box overlaps it by IoU 0.23 only,
    # so its "pen" at 0.375 survives NMS this time.
    assert [p.probability for p in above] == pytest.approx([0.6, 0.45, 0.375])
    assert len(first) == 1 and first[0].box is not None
    assert first[0].box.width == pytest.approx(1.3 / 13)


def test_dynamic_grid_detector_is_fed_about_512x512_pixels(
    write_export: Export,
) -> None:
    cell = np.zeros((1, 35, 1, 1), np.float32)
    cell[0, 4::7] = -20.0
    cell[0, 4] = 5.0  # anchor 0 is confident in every cell, and sure of tag "a"
    cell[0, 5] = 10.0
    model_bytes = cvmodels.grid_detector(cell, input_size=None)
    model = CustomVisionModel.load(write_export(model_bytes, ["a", "b"]))
    image = cvmodels.solid_image(RED, size=(640, 480), fmt="JPEG")

    predictions = model.score(image, ScoreOptions(max_predictions=1000)).predictions

    # 640x480 to about 512*512 pixels, sides multiples of 32: 576x448, 18x14 cells.
    assert len(predictions) == 18 * 14
    assert predictions[0].box is not None
    assert predictions[0].box.width == pytest.approx(0.573 / 18, rel=1e-3)
    assert predictions[0].box.height == pytest.approx(0.677 / 14, rel=1e-3)


def test_grid_detector_follows_the_exports_target_pixel_count(
    write_export: Export,
) -> None:
    cell = np.zeros((1, 35, 1, 1), np.float32)
    cell[0, 4::7] = -20.0
    cell[0, 4] = 5.0
    cell[0, 5] = 10.0
    model_bytes = cvmodels.grid_detector(cell, input_size=None)
    properties = {
        "CustomVision.Preprocess.ResizeMethod": "ByPixelCountAlign32",
        "CustomVision.Preprocess.TargetWidth": "320",
        "CustomVision.Preprocess.TargetHeight": "320",
    }
    folder = write_export(
        model_bytes, ["a", "b"], {"metadata_properties.json": json.dumps(properties)}
    )
    model = CustomVisionModel.load(folder)
    image = cvmodels.solid_image(RED, size=(640, 480))

    predictions = model.score(image, ScoreOptions(max_predictions=1000)).predictions

    assert len(predictions) == 12 * 9


def test_float16_grid_detector(write_export: Export) -> None:
    model_bytes = cvmodels.grid_detector(grid_with_three_candidates(), float16=True)
    model = CustomVisionModel.load(write_export(model_bytes, ["cup", "pen"]))

    predictions = model.score(cvmodels.solid_image(RED)).predictions

    assert model.identity.float16 and model.identity.flavor is Flavor.DETECTOR
    assert [p.probability for p in predictions] == pytest.approx(
        [0.6, 0.45, 0.2], abs=2e-3
    )


@pytest.mark.parametrize("float16", [False, True])
def test_s1_detector_turns_corners_into_clipped_boxes(
    write_export: Export, float16: bool
) -> None:
    model_bytes = cvmodels.s1_detector(
        [[0.1, 0.2, 0.5, 0.6], [-0.1, 0.5, 0.3, 1.2], [0.2, 0.2, 0.3, 0.3]],
        [0.6, 0.9, 0.05],
        [1, 0, 1],
        float16=float16,
    )
    model = CustomVisionModel.load(write_export(model_bytes, ["box", "can"]))

    predictions = model.score(cvmodels.solid_image(RED)).predictions

    assert model.identity.flavor is Flavor.DETECTOR_S1
    assert [(p.tag_name, p.tag_id) for p in predictions] == [("box", 0), ("can", 1)]
    assert [p.probability for p in predictions] == pytest.approx([0.9, 0.6], abs=1e-3)
    boxes = [p.box for p in predictions]
    assert boxes[0] is not None and boxes[1] is not None
    first = (boxes[0].left, boxes[0].top, boxes[0].width, boxes[0].height)
    second = (boxes[1].left, boxes[1].top, boxes[1].width, boxes[1].height)
    assert first == pytest.approx((0.0, 0.5, 0.3, 0.5), abs=1e-3)
    assert second == pytest.approx((0.1, 0.2, 0.4, 0.4), abs=1e-3)


def test_shorter_side_crop_from_the_export_metadata(write_export: Export) -> None:
    properties = {
        "CustomVision.Preprocess.ResizeMethod": "ByShorterSide",
        "CustomVision.Preprocess.CropMethod": "OneCropCenter",
        "CustomVision.Preprocess.TargetWidth": "256.0",
        "CustomVision.Preprocess.TargetHeight": "256.0",
    }
    model_bytes = cvmodels.probe_classifier(
        metadata={"Image.BitmapPixelFormat": "Rgb8"}
    )
    folder = write_export(
        model_bytes,
        ["r", "g", "b"],
        {"metadata_properties.json": json.dumps(properties)},
    )
    model = CustomVisionModel.load(folder)
    # Red left and right thirds, blue middle: a centre crop keeps mostly blue.
    image = Image.new("RGB", (768, 256), RED)
    image.paste((0, 0, 255), (256, 0, 512, 256))
    data = io.BytesIO()
    image.save(data, "PNG")

    fed = {p.tag_name: p.probability for p in model.score(data.getvalue()).predictions}

    assert model.preprocess(image).shape == (1, 3, 224, 224)
    assert fed["b"] > 0.99 and fed["r"] < 0.01
