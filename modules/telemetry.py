"""Telemetry: result and error messages, their routing properties, and their rate."""

import json
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import ScorerError
from .results import utc_now
from .settings import Settings

RESULTS_OUTPUT = "results"
ERRORS_OUTPUT = "errors"
# edgeHub accepts 256 KiB per message, properties included; keep room for them.
MAX_BODY_BYTES = 240 * 1024
MAX_TRACKED_SOURCES = 1024
DEFAULT_SOURCE = "default"


@dataclass(frozen=True)
class OutputMessage:
    """A message for one of the module's outputs, as UTF-8 JSON."""

    output: str
    body: bytes = field(repr=False)
    properties: Mapping[str, str]
    message_id: str
    correlation_id: str | None = None
    content_type: str = "application/json"
    content_encoding: str = "utf-8"

    def json(self) -> Any:
        """Return the body parsed."""
        return json.loads(self.body)


@dataclass
class _SourceState:
    last_sent: float
    top_tag: str | None


class Telemetry:
    """Turn results and errors into output messages; hold back what the rate forbids."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._sources: OrderedDict[str, _SourceState] = OrderedDict()
        self.suppressed = 0

    def result(
        self,
        document: dict[str, Any],
        settings: Settings,
        *,
        source: str | None,
        correlation_id: str | None,
    ) -> OutputMessage | None:
        """Return the result message, or None when the rate settings hold it back."""
        predictions = document["predictions"]
        top = predictions[0] if predictions else None
        top_tag = top["tagName"] if top else None
        alerts = fired_alerts(predictions, settings)
        name, now = source or DEFAULT_SOURCE, self._clock()
        if not alerts and not self._due(name, top_tag, settings, now):
            self.suppressed += 1
            return None
        # Alerts bypass the rate, yet later results are compared with them too.
        self._record(name, top_tag, now)
        if alerts:
            document["alerts"] = alerts
        properties = {
            "topTag": top_tag or "",
            "topProbability": f"{top['probability']:.4f}" if top else "0",
            "source": source or DEFAULT_SOURCE,
            "modelVersion": _model_version(document["model"]),
            # Always set, so that routes can split results without sending twice.
            "alert": "true" if alerts else "false",
        }
        body = encode_within_limit(document)
        return OutputMessage(
            RESULTS_OUTPUT, body, properties, document["id"], correlation_id
        )

    def error(
        self,
        error: ScorerError,
        *,
        source: str | None,
        message_id: str | None,
        correlation_id: str | None,
    ) -> OutputMessage:
        """Return the errors-output message for a rejected or failed input."""
        document = {
            "id": str(uuid.uuid4()),
            "created": utc_now(),
            "reason": error.reason,
            "detail": str(error),
            "source": source or DEFAULT_SOURCE,
            "messageId": message_id,
            "correlationId": correlation_id,
        }
        properties = {"reason": error.reason, "source": source or DEFAULT_SOURCE}
        body = json.dumps(document, ensure_ascii=False).encode("utf-8")
        return OutputMessage(
            ERRORS_OUTPUT,
            body,
            properties,
            document["id"],
            correlation_id or message_id,
        )

    def _due(
        self, source: str, top_tag: str | None, settings: Settings, now: float
    ) -> bool:
        state = self._sources.get(source)
        if state is None:
            return True
        # Compared with the last result sent, so a change held back by the interval
        # is still sent once the interval has passed.
        if settings.only_on_change and top_tag == state.top_tag:
            return False
        return now - state.last_sent >= settings.min_interval_s

    def _record(self, source: str, top_tag: str | None, now: float) -> None:
        state = self._sources.get(source)
        if state is not None:
            state.last_sent, state.top_tag = now, top_tag
            self._sources.move_to_end(source)  # the least recently sent go first
            return
        self._sources[source] = _SourceState(now, top_tag)
        if len(self._sources) > MAX_TRACKED_SOURCES:
            self._sources.popitem(last=False)


def fired_alerts(predictions: list[dict[str, Any]], settings: Settings) -> list[str]:
    """Return the names of the alert rules the predictions trigger."""
    return [
        rule.name
        for rule in settings.alerts
        if any(rule.fires(p["tagName"], p["probability"]) for p in predictions)
    ]


def encode_within_limit(document: dict[str, Any], limit: int = MAX_BODY_BYTES) -> bytes:
    """Encode a result, dropping its least probable predictions until it fits."""
    body = json.dumps(document, ensure_ascii=False).encode("utf-8")
    predictions = document["predictions"]
    total = len(predictions)
    keep = total
    while len(body) > limit and keep > 0:
        # Predictions are roughly the same size: aim straight for what should fit.
        keep = min(keep - 1, int(keep * limit / len(body)))
        document["predictions"] = predictions[:keep]
        document["truncated"] = {"predictions": total - keep}
        body = json.dumps(document, ensure_ascii=False).encode("utf-8")
    return body


def _model_version(model: Mapping[str, Any]) -> str:
    return str(model.get("version") or model["sha256"][:12])
