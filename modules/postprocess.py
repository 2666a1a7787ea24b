"""Turn Custom Vision model outputs into predictions shaped like the prediction API."""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# The grid detector scores every anchor of every cell for every tag; past this many
# candidates, the lowest can never survive the maximum count and only slow NMS down.
MAX_NMS_CANDIDATES = 2000


@dataclass(frozen=True, slots=True)
class BoundingBox:
    """A box normalized to the image: left, top, width and height in 0..1."""

    left: float
    top: float
    width: float
    height: float

    @classmethod
    def from_corners(cls, x1: float, y1: float, x2: float, y2: float) -> "BoundingBox":
        """Build a box from corners, clipped to the image."""
        left, top = min(max(x1, 0.0), 1.0), min(max(y1, 0.0), 1.0)
        right, bottom = min(max(x2, 0.0), 1.0), min(max(y2, 0.0), 1.0)
        return cls(left, top, max(right - left, 0.0), max(bottom - top, 0.0))


@dataclass(frozen=True, slots=True)
class Prediction:
    """One tag found in an image, with a box for detectors."""

    tag_id: int
    tag_name: str
    probability: float
    box: BoundingBox | None = None

    def to_json(self) -> dict[str, Any]:
        """Return the prediction with the Custom Vision field names."""
        document: dict[str, Any] = {
            "probability": self.probability,
            "tagId": self.tag_id,
            "tagName": self.tag_name,
        }
        if self.box is not None:
            document["boundingBox"] = {
                "left": self.box.left,
                "top": self.box.top,
                "width": self.box.width,
                "height": self.box.height,
            }
        return document


def classify(probabilities: np.ndarray, labels: Sequence[str]) -> list[Prediction]:
    """Return one prediction per tag from a probability vector."""
    values = np.asarray(probabilities, dtype=np.float64).reshape(-1)
    return [
        Prediction(index, tag_name(labels, index), float(value))
        for index, value in enumerate(values)
    ]


def select(
    predictions: Sequence[Prediction], threshold: float, limit: int | None
) -> list[Prediction]:
    """Keep predictions at or above threshold, most probable first, at most limit."""
    kept = sorted(
        (p for p in predictions if p.probability >= threshold),
        key=lambda p: p.probability,
        reverse=True,
    )
    return kept if limit is None else kept[:limit]


def decode_grid(
    grid: np.ndarray,
    anchors: Sequence[tuple[float, float]],
    labels: Sequence[str],
    *,
    threshold: float,
    iou: float,
) -> list[Prediction]:
    """Decode a YOLOv2-style grid [A*(5+C), H, W] into boxes after per-tag NMS."""
    count = len(anchors)
    channels, rows, cols = grid.shape
    cells = grid.astype(np.float32).reshape(count, channels // count, rows, cols)
    anchor = np.asarray(anchors, dtype=np.float32)

    centre_x = (_sigmoid(cells[:, 0]) + np.arange(cols)[None, None, :]) / cols
    centre_y = (_sigmoid(cells[:, 1]) + np.arange(rows)[None, :, None]) / rows
    half_w = np.exp(cells[:, 2]) * anchor[:, 0, None, None] / cols / 2
    half_h = np.exp(cells[:, 3]) * anchor[:, 1, None, None] / rows / 2
    scores = _softmax(cells[:, 5:], axis=1) * _sigmoid(cells[:, 4])[:, None]

    a, tag, r, c = _candidates(scores, threshold)
    corners = np.stack(
        [
            centre_x[a, r, c] - half_w[a, r, c],
            centre_y[a, r, c] - half_h[a, r, c],
            centre_x[a, r, c] + half_w[a, r, c],
            centre_y[a, r, c] + half_h[a, r, c],
        ],
        axis=1,
    )
    return _boxes(corners, scores[a, tag, r, c], tag, labels, iou)


def decode_corners(
    corners: np.ndarray,
    scores: np.ndarray,
    classes: np.ndarray,
    labels: Sequence[str],
    *,
    threshold: float,
) -> list[Prediction]:
    """Decode the [S1] detector's corner boxes, which its graph already suppressed."""
    scores = scores.astype(np.float64).reshape(-1)
    keep = scores >= threshold
    return [
        Prediction(int(tag), tag_name(labels, tag), float(score), _corners(box))
        for box, score, tag in zip(
            corners.reshape(-1, 4)[keep].astype(np.float64).tolist(),
            scores[keep],
            classes.reshape(-1)[keep],
            strict=True,
        )
    ]


def suppress(
    corners: np.ndarray, scores: np.ndarray, iou_threshold: float
) -> list[int]:
    """Return the indices greedy non-maximum suppression keeps, best first."""
    order = np.argsort(-scores, kind="stable")
    areas = (corners[:, 2] - corners[:, 0]) * (corners[:, 3] - corners[:, 1])
    kept: list[int] = []
    while order.size:
        best, rest = order[0], order[1:]
        kept.append(int(best))
        low = np.maximum(corners[best, :2], corners[rest, :2])
        high = np.minimum(corners[best, 2:], corners[rest, 2:])
        overlap = np.prod(np.clip(high - low, 0.0, None), axis=1)
        union = areas[best] + areas[rest] - overlap
        iou = np.divide(overlap, union, out=np.zeros_like(overlap), where=union > 0)
        order = rest[iou <= iou_threshold]
    return kept


def tag_name(labels: Sequence[str], tag: int | np.integer) -> str:
    """Return the label of a tag index, or the index itself when labels are short."""
    index = int(tag)
    return labels[index] if 0 <= index < len(labels) else str(index)


def _corners(box: Sequence[float]) -> BoundingBox:
    return BoundingBox.from_corners(box[0], box[1], box[2], box[3])


def _candidates(scores: np.ndarray, threshold: float) -> tuple[np.ndarray, ...]:
    flat = scores.reshape(-1)
    chosen = np.flatnonzero(flat >= threshold)
    if chosen.size > MAX_NMS_CANDIDATES:
        top = np.argpartition(-flat[chosen], MAX_NMS_CANDIDATES - 1)
        chosen = chosen[top[:MAX_NMS_CANDIDATES]]
    return np.unravel_index(chosen, scores.shape)


def _boxes(
    corners: np.ndarray,
    scores: np.ndarray,
    tags: np.ndarray,
    labels: Sequence[str],
    iou: float,
) -> list[Prediction]:
    found: list[Prediction] = []
    for tag in np.unique(tags):
        members = np.flatnonzero(tags == tag)
        for index in suppress(corners[members], scores[members], iou):
            member = members[index]
            box = _corners(corners[member].astype(np.float64).tolist())
            name = tag_name(labels, tag)
            found.append(Prediction(int(tag), name, float(scores[member]), box))
    return found


def _sigmoid(values: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -values))


def _softmax(values: np.ndarray, axis: int) -> np.ndarray:
    shifted = np.exp(values - values.max(axis=axis, keepdims=True))
    return shifted / shifted.sum(axis=axis, keepdims=True)
