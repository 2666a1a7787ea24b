"""Check that the synthetic Custom Vision models answer what their builders promise."""

import io
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from PIL import Image

from tests import cvmodels

# Keep onnxruntime's stderr quiet: it warns about the legacy classLabel shape.
QUIET = 3
YOLO_METADATA = {
    "Image.BitmapPixelFormat": "Bgr8",
    "CustomVision.Postprocess.Method": "Yolo",
}


def _session(model: bytes) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = QUIET
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def _run(session: ort.InferenceSession, image: np.ndarray) -> dict[str, Any]:
    names = [output.name for output in session.get_outputs()]
    answers = session.run(None, {session.get_inputs()[0].name: image})
    return dict(zip(names, answers, strict=True))


def _dtype(float16: bool) -> type[np.floating]:
    return np.float16 if float16 else np.float32


def _tolerance(float16: bool) -> dict[str, float]:
    return {"rtol": 1e-3, "atol": 1e-3} if float16 else {"rtol": 1e-6, "atol": 0}


@pytest.mark.parametrize("float16", [False, True])
def test_compact_classifier_answers_its_probabilities(float16: bool) -> None:
    model = cvmodels.compact_classifier([0.1, 0.7, 0.2], float16=float16)
    session = _session(model)
    images = np.full((2, 3, 224, 224), 128, _dtype(float16))

    answer = _run(session, images)["model_output"]

    assert session.get_inputs()[0].shape == ["N", 3, 224, 224]
    output_type = "tensor(float16)" if float16 else "tensor(float)"
    assert session.get_inputs()[0].type == session.get_outputs()[0].type == output_type
    assert answer.dtype == _dtype(float16)
    expected = [[0.1, 0.7, 0.2]] * 2
    np.testing.assert_allclose(answer, expected, **_tolerance(float16))


def test_s1_classifier_has_a_fixed_signature_and_metadata() -> None:
    metadata = {"Image.BitmapPixelFormat": "Rgb8"}
    model = cvmodels.compact_classifier(
        [0.4, 0.6], size=300, batch=1, metadata=metadata
    )
    session = _session(model)

    answer = _run(session, np.zeros((1, 3, 300, 300), np.float32))["model_output"]

    assert session.get_inputs()[0].name == "data"
    assert session.get_inputs()[0].shape == [1, 3, 300, 300]
    assert session.get_modelmeta().custom_metadata_map == metadata
    np.testing.assert_allclose(answer, [[0.4, 0.6]], rtol=1e-6)


@pytest.mark.parametrize("float16", [False, True])
def test_probe_classifier_answers_channel_means(float16: bool) -> None:
    session = _session(cvmodels.probe_classifier(float16=float16))
    channels = np.array([0, 51, 255], np.float32).reshape(1, 3, 1, 1)
    image = np.broadcast_to(channels, (1, 3, 224, 224)).astype(_dtype(float16))

    answer = _run(session, image)["model_output"]

    assert answer.dtype == _dtype(float16)
    np.testing.assert_allclose(answer, [[0, 0.2, 1]], **_tolerance(float16))


def test_probe_classifier_tells_colour_order_and_range() -> None:
    session = _session(cvmodels.probe_classifier(size=8))
    decoded = Image.open(io.BytesIO(cvmodels.solid_image((255, 0, 0))))
    rgb = np.asarray(decoded.resize((8, 8)), np.float32).transpose(2, 0, 1)[None]

    as_bgr = _run(session, np.ascontiguousarray(rgb[:, ::-1]))["model_output"]
    as_unit_rgb = _run(session, rgb / 255)["model_output"]

    np.testing.assert_allclose(as_bgr, [[0, 0, 1]], rtol=1e-6)
    np.testing.assert_allclose(as_unit_rgb, [[1 / 255, 0, 0]], rtol=1e-6)


@pytest.mark.parametrize(
    ("multilabel", "opset", "probabilities"),
    [(False, 7, [0.2, 0.5, 0.3]), (True, 7, [0.9, 0.05, 0.7]), (False, 13, [0, 0, 1])],
)
def test_legacy_classifier_answers_label_and_loss_maps(
    multilabel: bool, opset: int, probabilities: list[float]
) -> None:
    labels = ["apple", "pear", "Negative"]
    model = cvmodels.legacy_classifier(
        labels, probabilities, multilabel=multilabel, opset=opset
    )
    session = _session(model)

    answer = _run(session, np.zeros((2, 3, 227, 227), np.float32))

    assert session.get_inputs()[0].shape == ["None", 3, 227, 227]
    best = labels[int(np.argmax(probabilities))]
    # Real exports answer classLabel as (1, N) for a batch; the builder keeps that.
    assert answer["classLabel"].tolist() == [[best, best]]
    assert len(answer["loss"]) == 2
    for scores in answer["loss"]:
        # ZipMap answers its keys sorted, not in label order.
        assert sorted(scores) == sorted(labels)
        answered = [scores[label] for label in labels]
        np.testing.assert_allclose(answered, probabilities, atol=1e-6)


def test_opset1_classifier_is_refused_by_onnxruntime() -> None:
    model = cvmodels.opset1_classifier()
    proto = onnx.load_from_string(model)

    assert proto.producer_name == "WinMLTools"
    assert [(o.domain, o.version) for o in proto.opset_import] == [("", 1)]
    assert proto.graph.node[0].attribute[0].name == "consumed_inputs"
    with pytest.raises(Exception, match=r"BatchNormalization\(1\)"):
        _session(model)


@pytest.mark.parametrize("float16", [False, True])
def test_grid_detector_answers_its_grid(float16: bool) -> None:
    grid = np.random.default_rng(7).normal(size=(1, 40, 13, 13)).astype(np.float32)
    model = cvmodels.grid_detector(grid, float16=float16, metadata=YOLO_METADATA)
    session = _session(model)

    answer = _run(session, np.zeros((1, 3, 416, 416), _dtype(float16)))

    assert session.get_modelmeta().custom_metadata_map == YOLO_METADATA
    assert answer["model_outputs0"].dtype == _dtype(float16)
    np.testing.assert_allclose(answer["model_outputs0"], grid, **_tolerance(float16))


@pytest.mark.parametrize("float16", [False, True])
def test_dynamic_grid_detector_follows_the_input_size(float16: bool) -> None:
    grid = np.arange(30, dtype=np.float32).reshape(1, 30, 1, 1) / 8
    session = _session(cvmodels.grid_detector(grid, input_size=None, float16=float16))

    answer = _run(session, np.ones((1, 3, 320, 256), _dtype(float16)))

    assert session.get_inputs()[0].shape == ["N", 3, "H", "W"]
    assert answer["model_outputs0"].shape == (1, 30, 10, 8)
    expected = np.broadcast_to(grid, (1, 30, 10, 8))
    np.testing.assert_allclose(answer["model_outputs0"], expected, rtol=1e-3)


@pytest.mark.parametrize("float16", [False, True])
def test_s1_detector_answers_its_detections(float16: bool) -> None:
    boxes = [[0.1, 0.2, 0.5, 0.6], [0.3, 0.3, 0.9, 1.0]]
    model = cvmodels.s1_detector(boxes, [0.9, 0.4], [2, 0], float16=float16)
    session = _session(model)

    answer = _run(session, np.zeros((1, 3, 320, 320), _dtype(float16)))

    assert session.get_inputs()[0].name == "image_tensor"
    assert answer["detected_classes"].dtype == np.int64
    assert answer["detected_classes"].tolist() == [[2, 0]]
    assert answer["detected_scores"].dtype == _dtype(float16)
    tolerance = _tolerance(float16)
    np.testing.assert_allclose(answer["detected_boxes"], [boxes], **tolerance)
    np.testing.assert_allclose(answer["detected_scores"], [[0.9, 0.4]], **tolerance)


def test_s1_detector_can_answer_no_detections() -> None:
    session = _session(cvmodels.s1_detector([], [], []))

    answer = _run(session, np.zeros((1, 3, 320, 320), np.float32))

    assert answer["detected_boxes"].shape == (1, 0, 4)
    assert answer["detected_classes"].shape == (1, 0)


def test_not_custom_vision_is_a_plain_relu() -> None:
    session = _session(cvmodels.not_custom_vision())

    answer = _run(session, np.linspace(-1, 1, 10, dtype=np.float32)[None])

    assert [i.name for i in session.get_inputs()] == ["x"]
    np.testing.assert_allclose(answer["y"][0, :5], 0)
    np.testing.assert_allclose(answer["y"][0, 5:], np.linspace(-1, 1, 10)[5:])


@pytest.mark.parametrize(
    ("mode", "fmt"), [("RGB", "PNG"), ("RGBA", "PNG"), ("L", "JPEG")]
)
def test_solid_image_decodes_to_one_colour(mode: str, fmt: str) -> None:
    encoded = cvmodels.solid_image((0, 128, 255), size=(20, 10), mode=mode, fmt=fmt)

    with Image.open(io.BytesIO(encoded)) as image:
        assert (image.format, image.mode, image.size) == (fmt, mode, (20, 10))
        colours = image.convert("RGB").getcolors()

    assert colours is not None and len(colours) == 1
    if mode != "L":
        assert colours[0][1] == (0, 128, 255)
