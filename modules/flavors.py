"""Recognise which Custom Vision export flavor a graph is, and what tensor it expects.

Custom Vision never changes a flavor's input and output names or sizes between
iterations, so the signature alone says how to feed a model and read its outputs.
The tensor contract (colour order, pixel range) comes from the metadata inside the
ONNX file when it has one; metadata_properties.json describes the service's own
pipeline and is trusted only for the resize method and the YOLO settings.
"""

import enum
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .errors import BadModelError
from .onnxgraph import GraphFacts

PIXEL_FORMAT_KEY = "Image.BitmapPixelFormat"
PIXEL_RANGE_KEY = "Image.NominalPixelRange"
POSTPROCESS_KEY = "CustomVision.Postprocess.Method"
RESIZE_KEY = "CustomVision.Preprocess.ResizeMethod"
CROP_KEY = "CustomVision.Preprocess.CropMethod"
TARGET_WIDTH_KEY = "CustomVision.Preprocess.TargetWidth"
TARGET_HEIGHT_KEY = "CustomVision.Preprocess.TargetHeight"
BIASES_KEY = "CustomVision.Postprocess.Yolo.Biases"
NMS_KEY = "CustomVision.Postprocess.Yolo.NmsThreshold"

# Anchors (width, height in grid cells) of the compact detector, from the export's code.
DEFAULT_ANCHORS = (
    (0.573, 0.677),
    (1.87, 2.06),
    (3.34, 5.47),
    (7.88, 3.53),
    (9.77, 9.17),
)
DEFAULT_NMS_IOU = 0.45
GRID_STRIDE = 32
DEFAULT_DETECTOR_PIXELS = 512 * 512
FIRST_RUNNABLE_OPSET = 7
S1_CLASSIFIER_SIZE = 300

S1_DETECTOR_OUTPUTS = ("detected_boxes", "detected_scores", "detected_classes")
GRID_OUTPUT = "model_outputs0"
LEGACY_MAP_OUTPUT = "loss"

_TENSOR_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
_RANGES = {
    "NominalRange_0_255": (1.0, 0.0),
    "Normalized_0_1": (1.0 / 255.0, 0.0),
    "Normalized_1_1": (2.0 / 255.0, -1.0),
}


class Flavor(enum.StrEnum):
    """The export flavors the module can run."""

    CLASSIFIER_ONNX12 = "classifier-onnx12"
    CLASSIFIER = "classifier-compact"
    CLASSIFIER_S1 = "classifier-compact-s1"
    DETECTOR = "detector-compact"
    DETECTOR_S1 = "detector-compact-s1"

    @property
    def is_detector(self) -> bool:
        """Say whether predictions of this flavor carry bounding boxes."""
        return self in (Flavor.DETECTOR, Flavor.DETECTOR_S1)

    @property
    def description(self) -> str:
        """Return a name a person recognises from the Custom Vision portal."""
        return _DESCRIPTIONS[self]


_DESCRIPTIONS = {
    Flavor.CLASSIFIER_ONNX12: "classifier, ONNX 1.2 export (2018-2019)",
    Flavor.CLASSIFIER: "classifier, compact domain",
    Flavor.CLASSIFIER_S1: "classifier, compact [S1] domain",
    Flavor.DETECTOR: "object detector, compact domain (YOLO grid)",
    Flavor.DETECTOR_S1: "object detector, compact [S1] domain",
}


class Resize(enum.StrEnum):
    """How an image is brought to the model's input size."""

    STRETCH = "Stretch"
    SHORTER_SIDE_CROP = "ByShorterSide"
    PIXEL_COUNT_ALIGN32 = "ByPixelCountAlign32"


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of a graph, as onnxruntime describes it."""

    name: str
    type: str
    shape: tuple[int | str | None, ...]

    def describe(self) -> str:
        """Return the spec as `name type [dims]`."""
        dims = ", ".join("?" if not isinstance(d, int) else str(d) for d in self.shape)
        return f"{self.name} {self.type} [{dims}]"


@dataclass(frozen=True)
class InputContract:
    """What the model's image input needs: size, colour order, range and type."""

    name: str
    dtype: type[np.floating]
    size: tuple[int, int] | None  # (width, height); None when the graph is dynamic
    bgr: bool
    scale: float
    offset: float
    resize: Resize = Resize.STRETCH
    resize_target: tuple[int, int] | None = None  # (width, height) before cropping
    batch: bool = True

    @property
    def channel_order(self) -> str:
        """Return BGR or RGB."""
        return "BGR" if self.bgr else "RGB"

    @property
    def pixel_range(self) -> str:
        """Return the value range fed to the model, as text."""
        low = self.offset
        high = 255.0 * self.scale + self.offset
        return f"{low:g}..{high:g}"

    def target_size(self, width: int, height: int) -> tuple[int, int]:
        """Return the (width, height) an image of this size is resized to."""
        if self.size is not None and self.resize is not Resize.SHORTER_SIDE_CROP:
            return self.size
        if self.resize is Resize.SHORTER_SIDE_CROP:
            side = min(self.resize_target or self.size or (width, height))
            ratio = side / min(width, height)
            return max(1, round(width * ratio)), max(1, round(height * ratio))
        target = self.resize_target or (0, 0)
        return align32_size(width, height, target[0] * target[1])


@dataclass(frozen=True)
class Recognised:
    """A flavor with everything needed to feed it and decode its outputs."""

    flavor: Flavor
    contract: InputContract
    outputs: tuple[str, ...]
    multilabel: bool
    anchors: tuple[tuple[float, float], ...] = DEFAULT_ANCHORS
    nms_iou: float = DEFAULT_NMS_IOU

    @property
    def float16(self) -> bool:
        """Say whether this is an OnnxFloat16 export."""
        return self.contract.dtype is np.float16


@dataclass(frozen=True)
class _Graph:
    """What recognition looks at: the image input, outputs, metadata and facts."""

    image: TensorSpec
    outputs: Mapping[str, TensorSpec]
    metadata: Mapping[str, str]
    properties: Mapping[str, str]
    facts: GraphFacts

    @property
    def settings(self) -> dict[str, str]:
        """Return the export's settings; the model's own metadata wins."""
        return {**self.properties, **self.metadata}

    def contract(self, *, bgr_default: bool) -> InputContract:
        """Return the input contract, with the flavor's colour order as default."""
        height, width = self.image.shape[2], self.image.shape[3]
        fixed = isinstance(width, int) and isinstance(height, int)
        size = (width, height) if fixed else None
        pixel_format = self.metadata.get(PIXEL_FORMAT_KEY)
        bgr = bgr_default
        if pixel_format in ("Bgr8", "Rgb8"):
            bgr = pixel_format == "Bgr8"
        range_name = self.metadata.get(PIXEL_RANGE_KEY, "")
        scale, offset = _RANGES.get(range_name, (1.0, 0.0))
        resize, target = _resize(size, self.settings)
        return InputContract(
            name=self.image.name,
            dtype=_TENSOR_TYPES[self.image.type],
            size=size,
            bgr=bgr,
            scale=scale,
            offset=offset,
            resize=resize,
            resize_target=target,
            batch=not isinstance(self.image.shape[0], int),
        )

    def multilabel(self) -> bool:
        """Say whether the classifier scores tags independently."""
        method = self.settings.get(POSTPROCESS_KEY)
        if method:
            return method == "ClassificationMultiLabel"
        return self.facts.last_activation == "Sigmoid"


def check_runnable(facts: GraphFacts) -> None:
    """Refuse the 2018 opset-1 exports with a message that says what to do."""
    opset = facts.default_opset
    if opset is not None and opset < FIRST_RUNNABLE_OPSET:
        raise BadModelError(
            f"this is a 2018 'ONNX 1.0' export (operator set {opset}, produced by "
            f"{facts.producer or 'an unknown tool'}); onnxruntime runs operator set "
            f"{FIRST_RUNNABLE_OPSET} and newer. Export the iteration again from "
            "Custom Vision as ONNX."
        )


def recognise(
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    metadata: Mapping[str, str],
    properties: Mapping[str, str],
    facts: GraphFacts,
) -> Recognised:
    """Return the flavor of a graph, or raise BadModelError saying what was found."""
    if len(inputs) == 1 and _is_image_input(inputs[0]):
        named = {output.name: output for output in outputs}
        graph = _Graph(inputs[0], named, metadata, properties, facts)
        for detect in (_s1_detector, _grid_detector, _onnx12_classifier, _classifier):
            found = detect(graph)
            if found is not None:
                return found
    raise BadModelError(_not_an_export(inputs, outputs))


def align32_size(width: int, height: int, pixels: int) -> tuple[int, int]:
    """Return about `pixels` pixels, aspect ratio kept, sides multiples of 32."""
    ratio = math.sqrt((pixels or DEFAULT_DETECTOR_PIXELS) / (width * height))
    return (
        max(GRID_STRIDE, round(width * ratio / GRID_STRIDE) * GRID_STRIDE),
        max(GRID_STRIDE, round(height * ratio / GRID_STRIDE) * GRID_STRIDE),
    )


def _s1_detector(graph: _Graph) -> Recognised | None:
    if not all(name in graph.outputs for name in S1_DETECTOR_OUTPUTS):
        return None
    contract = graph.contract(bgr_default=False)
    return Recognised(Flavor.DETECTOR_S1, contract, S1_DETECTOR_OUTPUTS, False)


def _grid_detector(graph: _Graph) -> Recognised | None:
    grid = graph.outputs.get(GRID_OUTPUT)
    if grid is None or len(grid.shape) != 4:
        return None
    contract = graph.contract(bgr_default=True)
    settings = graph.settings
    anchors = _anchors(settings.get(BIASES_KEY))
    iou = _float(settings.get(NMS_KEY)) or DEFAULT_NMS_IOU
    channels = grid.shape[1]
    if isinstance(channels, int) and channels % len(anchors):
        raise BadModelError(
            f"{GRID_OUTPUT} has {channels} channels, which is not a multiple of "
            f"its {len(anchors)} anchors"
        )
    return Recognised(Flavor.DETECTOR, contract, (GRID_OUTPUT,), False, anchors, iou)


def _onnx12_classifier(graph: _Graph) -> Recognised | None:
    loss = graph.outputs.get(LEGACY_MAP_OUTPUT)
    if loss is None or not loss.type.startswith("seq(map(string"):
        return None
    contract = graph.contract(bgr_default=True)
    multilabel = graph.multilabel()
    return Recognised(
        Flavor.CLASSIFIER_ONNX12, contract, (LEGACY_MAP_OUTPUT,), multilabel
    )


def _classifier(graph: _Graph) -> Recognised | None:
    vectors = [
        output
        for output in graph.outputs.values()
        if output.type in _TENSOR_TYPES and len(output.shape) == 2
    ]
    if len(vectors) != 1:
        return None
    s1 = graph.image.shape[2] == S1_CLASSIFIER_SIZE
    flavor = Flavor.CLASSIFIER_S1 if s1 else Flavor.CLASSIFIER
    contract = graph.contract(bgr_default=not s1)
    return Recognised(flavor, contract, (vectors[0].name,), graph.multilabel())


def _is_image_input(spec: TensorSpec) -> bool:
    if spec.type not in _TENSOR_TYPES or len(spec.shape) != 4:
        return False
    return spec.shape[1] == 3


def _resize(
    size: tuple[int, int] | None, settings: Mapping[str, str]
) -> tuple[Resize, tuple[int, int] | None]:
    method = settings.get(RESIZE_KEY)
    width = int(_float(settings.get(TARGET_WIDTH_KEY)))
    height = int(_float(settings.get(TARGET_HEIGHT_KEY)))
    target = (width, height) if width > 0 and height > 0 else None
    if method == Resize.SHORTER_SIDE_CROP and size is not None:
        return Resize.SHORTER_SIDE_CROP, target
    if size is None:
        # A dynamic input is fed the export's own way: about 512x512 pixels, aligned.
        return Resize.PIXEL_COUNT_ALIGN32, target
    return Resize.STRETCH, None


def _anchors(text: str | None) -> tuple[tuple[float, float], ...]:
    try:
        values = [float(value) for value in json.loads(text or "[]")]
    except (ValueError, TypeError):
        values = []
    if len(values) < 2 or len(values) % 2:
        return DEFAULT_ANCHORS
    return tuple(zip(values[0::2], values[1::2], strict=True))


def _float(text: str | None) -> float:
    try:
        return float(text or 0.0)
    except ValueError:
        return 0.0


def _not_an_export(inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]) -> str:
    found_in = "; ".join(spec.describe() for spec in inputs) or "none"
    found_out = "; ".join(spec.describe() for spec in outputs) or "none"
    return (
        "not a Custom Vision export: found inputs "
        f"({found_in}) and outputs ({found_out}); expected one image input "
        "[N, 3, H, W] (data or image_tensor) with a classifier's probability vector "
        f"or {LEGACY_MAP_OUTPUT} map, the detector output {GRID_OUTPUT}, or the "
        f"[S1] detector outputs {', '.join(S1_DETECTOR_OUTPUTS)}"
    )
