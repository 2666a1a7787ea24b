"""A loaded Custom Vision export: feed it an image, get Custom Vision predictions."""

import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import onnxruntime as ort
from PIL import Image

from . import images
from .errors import BadModelError
from .export import ExportFiles, read_export
from .flavors import (
    Flavor,
    InputContract,
    Recognised,
    Resize,
    TensorSpec,
    check_runnable,
    recognise,
)
from .onnxgraph import GraphFacts, GraphFormatError, read_graph_facts
from .postprocess import Prediction, classify, decode_corners, decode_grid, select

DETECTOR_THRESHOLD = 0.10
DETECTOR_MAX_PREDICTIONS = 20
_ORT_ERROR_SEVERITY = 3
_WARMUP_SIZE = (512, 512)

_T = TypeVar("_T")

_LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScoreOptions:
    """Per-request limits; None means the flavor's default."""

    threshold: float | None = None
    max_predictions: int | None = None
    tags: frozenset[str] = frozenset()  # empty: every tag


@dataclass(frozen=True)
class ModelIdentity:
    """What identifies the running model in results, logs and the twin."""

    sha256: str
    flavor: Flavor
    labels: tuple[str, ...]
    iteration: str | None
    exported: str | None
    float16: bool
    multilabel: bool
    origin: str
    version: str | None = None  # the label a rollout gave it, if any

    def to_json(self) -> dict[str, Any]:
        """Return the identity as a JSON object."""
        return {
            "sha256": self.sha256,
            "version": self.version,
            "flavor": self.flavor.value,
            "float16": self.float16,
            "multilabel": self.multilabel,
            "iteration": self.iteration,
            "exported": self.exported,
            "labels": list(self.labels),
        }


@dataclass(frozen=True)
class Scored:
    """The predictions for one image, with its size and where the time went."""

    predictions: list[Prediction]
    width: int
    height: int
    timings_ms: dict[str, float] = field(default_factory=dict)


class CustomVisionModel:
    """An onnxruntime session for one export, safe to call from several threads."""

    def __init__(
        self,
        session: ort.InferenceSession,
        recognised: Recognised,
        identity: ModelIdentity,
    ) -> None:
        self._session = session
        self._recognised = recognised
        self.identity = identity

    @classmethod
    def load(cls, path: Path, *, threads: int | None = None) -> "CustomVisionModel":
        """Load an export from a folder, zip or .onnx file and warm it up."""
        return cls.from_files(read_export(path), threads=threads)

    @classmethod
    def from_files(
        cls, files: ExportFiles, *, threads: int | None = None
    ) -> "CustomVisionModel":
        """Build a model from export files already read and checked."""
        facts = _graph_facts(files.model)
        check_runnable(facts)
        session = _session(files.model, threads)
        recognised = _recognise(session, files, facts)
        labels = _labels(files, facts, session, recognised)
        identity = ModelIdentity(
            sha256=hashlib.sha256(files.model).hexdigest(),
            flavor=recognised.flavor,
            labels=labels,
            iteration=files.manifest.iteration_id if files.manifest else None,
            exported=files.manifest.exported_date if files.manifest else None,
            float16=recognised.float16,
            multilabel=recognised.multilabel,
            origin=files.origin,
        )
        model = cls(session, recognised, identity)
        model._warm_up()
        _LOGGER.info(
            "Loaded %s from %s: sha256 %s, %d tags, providers %s",
            recognised.flavor.description,
            files.origin,
            identity.sha256[:12],
            len(labels),
            ", ".join(session.get_providers()),
        )
        return model

    @property
    def contract(self) -> InputContract:
        """Return what the model's input needs."""
        return self._recognised.contract

    @property
    def decode_fit(self) -> tuple[int, int] | None:
        """Return the smallest (w, h) a decoded image must keep for this model."""
        contract = self.contract
        if contract.resize is Resize.PIXEL_COUNT_ALIGN32:
            target = contract.resize_target or _WARMUP_SIZE
            side = int(np.sqrt(target[0] * target[1]))
            return side, side
        if contract.resize is Resize.SHORTER_SIDE_CROP:
            side = min(contract.resize_target or contract.size or _WARMUP_SIZE)
            return side, side
        return contract.size

    def score(
        self, data: bytes, options: ScoreOptions | None = None, *, draft: bool = True
    ) -> Scored:
        """Decode image bytes and return their predictions, timed by stage."""
        started = time.perf_counter()
        decoded = images.decode(data, self.decode_fit if draft else None)
        decoded_at = time.perf_counter()
        tensor = self.preprocess(decoded.image, reduced=decoded.reduced)
        prepared_at = time.perf_counter()
        outputs = self.infer(tensor)
        inferred_at = time.perf_counter()
        predictions = self.decode(outputs, options or ScoreOptions())
        finished_at = time.perf_counter()
        timings = {
            "decode": _ms(decoded_at - started),
            "preprocess": _ms(prepared_at - decoded_at),
            "inference": _ms(inferred_at - prepared_at),
            "postprocess": _ms(finished_at - inferred_at),
        }
        return Scored(predictions, decoded.width, decoded.height, timings)

    def preprocess(self, image: Image.Image, *, reduced: bool = False) -> np.ndarray:
        """Resize an RGB image and lay it out as the model's NCHW input tensor."""
        contract = self.contract
        size = contract.target_size(*image.size)
        if image.size != size:
            image = image.resize(size, _resampling(image.size, size, reduced))
        if contract.resize is Resize.SHORTER_SIDE_CROP and contract.size:
            image = _centre_crop(image, contract.size)
        pixels = np.asarray(image, dtype=np.uint8)
        if contract.bgr:
            pixels = pixels[:, :, ::-1]
        tensor = pixels.transpose(2, 0, 1)[np.newaxis].astype(np.float32, order="C")
        if contract.scale != 1.0:
            tensor *= contract.scale
        if contract.offset:
            tensor += contract.offset
        return tensor if contract.dtype is np.float32 else tensor.astype(contract.dtype)

    def infer(self, tensor: np.ndarray) -> list[Any]:
        """Run the session on a ready input tensor."""
        feed = {self.contract.name: tensor}
        return self._session.run(list(self._recognised.outputs), feed)

    def decode(self, outputs: Sequence[Any], options: ScoreOptions) -> list[Prediction]:
        """Turn the session's outputs for one image into sorted predictions."""
        flavor = self._recognised.flavor
        labels = self.identity.labels
        if flavor.is_detector:
            threshold = _default(options.threshold, DETECTOR_THRESHOLD)
            limit = _default(options.max_predictions, DETECTOR_MAX_PREDICTIONS)
            found = self._detections(outputs, labels, threshold)
        else:
            threshold = _default(options.threshold, 0.0)
            limit = options.max_predictions
            found = classify(self._probabilities(outputs), labels)
        if options.tags:
            found = [p for p in found if p.tag_name in options.tags]
        return select(found, threshold, limit)

    def _probabilities(self, outputs: Sequence[Any]) -> np.ndarray:
        if self._recognised.flavor is Flavor.CLASSIFIER_ONNX12:
            scores = outputs[0][0]
            return np.array([scores[label] for label in self.identity.labels])
        return np.asarray(outputs[0][0], dtype=np.float32)

    def _detections(
        self, outputs: Sequence[Any], labels: Sequence[str], threshold: float
    ) -> list[Prediction]:
        recognised = self._recognised
        if recognised.flavor is Flavor.DETECTOR_S1:
            boxes, scores, classes = (np.asarray(output)[0] for output in outputs)
            return decode_corners(boxes, scores, classes, labels, threshold=threshold)
        return decode_grid(
            np.asarray(outputs[0])[0],
            recognised.anchors,
            labels,
            threshold=threshold,
            iou=recognised.nms_iou,
        )

    def _warm_up(self) -> None:
        width, height = self.contract.size or _WARMUP_SIZE
        blank = Image.new("RGB", (width, height))
        outputs = self.infer(self.preprocess(blank))
        if self._recognised.flavor is Flavor.CLASSIFIER_ONNX12:
            _check_map_labels(outputs[0][0], self.identity.labels)
        self.decode(outputs, ScoreOptions())


def _graph_facts(model: bytes) -> GraphFacts:
    try:
        return read_graph_facts(model)
    except GraphFormatError as error:
        raise BadModelError(f"not an ONNX model: {error}") from error


def _session(model: bytes, threads: int | None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or 0
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = _ORT_ERROR_SEVERITY
    try:
        return ort.InferenceSession(
            model, sess_options=options, providers=["CPUExecutionProvider"]
        )
    except Exception as error:  # onnxruntime raises several unrelated types
        raise BadModelError(f"onnxruntime cannot load the model: {error}") from error


def _recognise(
    session: ort.InferenceSession, files: ExportFiles, facts: GraphFacts
) -> Recognised:
    inputs = [TensorSpec(i.name, i.type, tuple(i.shape)) for i in session.get_inputs()]
    outputs = [
        TensorSpec(o.name, o.type, tuple(o.shape)) for o in session.get_outputs()
    ]
    metadata = dict(session.get_modelmeta().custom_metadata_map)
    return recognise(inputs, outputs, metadata, files.properties, facts)


def _labels(
    files: ExportFiles,
    facts: GraphFacts,
    session: ort.InferenceSession,
    recognised: Recognised,
) -> tuple[str, ...]:
    count = _tag_count(session, recognised)
    labels = files.labels or facts.zipmap_labels
    if labels is None:
        return tuple(str(index) for index in range(count or 0))
    if count is not None and len(labels) != count:
        raise BadModelError(
            f"the export has {len(labels)} labels but its model scores {count} tags"
        )
    return labels


def _tag_count(session: ort.InferenceSession, recognised: Recognised) -> int | None:
    outputs = {output.name: output for output in session.get_outputs()}
    shape = outputs[recognised.outputs[0]].shape
    if recognised.flavor is Flavor.DETECTOR:
        channels = shape[1]
        anchors = len(recognised.anchors)
        return channels // anchors - 5 if isinstance(channels, int) else None
    if recognised.flavor in (Flavor.CLASSIFIER, Flavor.CLASSIFIER_S1):
        return shape[1] if isinstance(shape[1], int) else None
    return None


def _check_map_labels(scores: dict[str, float], labels: Sequence[str]) -> None:
    if set(scores) != set(labels):
        raise BadModelError(
            f"the labels ({', '.join(labels)}) do not match the tags the model scores "
            f"({', '.join(sorted(scores))})"
        )


def _resampling(
    source: tuple[int, int], target: tuple[int, int], reduced: bool
) -> Image.Resampling:
    """Pick the filter: bilinear, as the exports' own code resizes, unless the JPEG
    decoder already reduced the image, whose DCT scaling is an area average: the
    rest of the reduction is then an area average too (BOX), a third cheaper."""
    shrinking = source[0] >= target[0] and source[1] >= target[1]
    if reduced and shrinking:
        return Image.Resampling.BOX
    return Image.Resampling.BILINEAR


def _centre_crop(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    width, height = image.size
    left, top = (width - size[0]) // 2, (height - size[1]) // 2
    return image.crop((left, top, left + size[0], top + size[1]))


def _default(value: _T | None, fallback: _T) -> _T:
    return fallback if value is None else value


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)
