"""Telemetry: what a result or an error looks like on its output, and how often."""

import json
import uuid
from typing import Any

import pytest

from modules.errors import BadRequestError, FetchError
from modules.settings import AlertRule, Settings
from modules.telemetry import (
    ERRORS_OUTPUT,
    RESULTS_OUTPUT,
    OutputMessage,
    Telemetry,
    encode_within_limit,
    fired_alerts,
)

SHA256 = "0123456789abcdef" * 4


class Clock:
    """A monotonic clock that moves only when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def document(*predictions: tuple[str, float], version: str | None = None) -> dict:
    """Return a result document with predictions given as (tag, probability)."""
    return {
        "id": str(uuid.uuid4()),
        "project": None,
        "iteration": "it-1",
        "created": "2026-01-01T00:00:00.000Z",
        "predictions": [
            {"probability": probability, "tagId": index, "tagName": tag}
            for index, (tag, probability) in enumerate(predictions)
        ],
        "source": {"input": "images"},
        "image": {"width": 64, "height": 48},
        "model": {"sha256": SHA256, "flavor": "classifier-compact", "version": version},
        "timings": {"inferenceMs": 1.0},
    }


def send(
    telemetry: Telemetry,
    tag: str,
    settings: Settings,
    source: str | None = "cam1",
    probability: float = 0.9,
) -> OutputMessage | None:
    """Offer a result whose top tag is `tag` and return what telemetry makes of it."""
    return telemetry.result(
        document((tag, probability), ("other", 0.05)),
        settings,
        source=source,
        correlation_id=None,
    )


def tags_sent(
    telemetry: Telemetry,
    clock: Clock,
    settings: Settings,
    plan: list[tuple[float, str]],
) -> list[str | None]:
    """Offer results at the given times; return the top tag sent, or None, for each."""
    sent: list[str | None] = []
    for at, tag in plan:
        clock.now = at
        output = send(telemetry, tag, settings)
        sent.append(output.properties["topTag"] if output else None)
    return sent


def test_result_message_carries_routing_properties() -> None:
    result = document(("red", 0.123456), ("blue", 0.01))

    output = Telemetry(clock=Clock()).result(
        result, Settings(), source="cam1", correlation_id="corr-7"
    )

    assert output is not None
    assert output.output == RESULTS_OUTPUT
    assert output.properties == {
        "topTag": "red",
        "topProbability": "0.1235",
        "source": "cam1",
        "modelVersion": SHA256[:12],
        "alert": "false",
    }
    assert output.content_type == "application/json"
    assert output.content_encoding == "utf-8"
    assert output.message_id == result["id"]
    assert output.correlation_id == "corr-7"
    assert output.json() == result
    assert "alerts" not in output.json()


def test_model_version_label_wins_over_the_hash() -> None:
    output = Telemetry(clock=Clock()).result(
        document(("red", 0.5), version="2026-06"),
        Settings(),
        source=None,
        correlation_id=None,
    )

    assert output is not None
    assert output.properties["modelVersion"] == "2026-06"
    assert output.properties["source"] == "default"
    assert output.correlation_id is None


def test_result_without_predictions_has_an_empty_top_tag() -> None:
    output = Telemetry(clock=Clock()).result(
        document(), Settings(), source="cam1", correlation_id=None
    )

    assert output is not None
    assert output.properties["topTag"] == ""
    assert output.properties["topProbability"] == "0"


def test_body_is_utf8_json() -> None:
    output = Telemetry(clock=Clock()).result(
        document(("rouge-éclatant", 0.9)),
        Settings(),
        source="caméra",
        correlation_id=None,
    )

    assert output is not None
    assert "rouge-éclatant".encode() in output.body
    assert json.loads(output.body.decode("utf-8"))["predictions"][0]["tagName"] == (
        "rouge-éclatant"
    )


def test_alert_property_and_body_when_a_rule_fires() -> None:
    settings = Settings(
        alerts=(
            AlertRule("fire", frozenset({"red"}), 0.8),
            AlertRule("sky", frozenset({"blue"}), 0.8),
        )
    )
    telemetry = Telemetry(clock=Clock())

    fired = send(telemetry, "red", settings, source="a", probability=0.85)
    quiet = send(telemetry, "red", settings, source="b", probability=0.75)

    assert fired is not None and quiet is not None
    assert fired.properties["alert"] == "true"
    assert fired.json()["alerts"] == ["fire"]
    assert quiet.properties["alert"] == "false"
    assert "alerts" not in quiet.json()


def test_min_interval_holds_back_results_per_source() -> None:
    clock = Clock()
    telemetry = Telemetry(clock=clock)
    settings = Settings(min_interval_s=10.0)

    first = send(telemetry, "red", settings, source="cam1")
    clock.now += 9.9
    held = send(telemetry, "red", settings, source="cam1")
    other = send(telemetry, "red", settings, source="cam2")
    clock.now += 0.1
    due = send(telemetry, "red", settings, source="cam1")
    clock.now += 5
    held_again = send(telemetry, "red", settings, source="cam1")

    assert first is not None and other is not None and due is not None
    assert held is None and held_again is None
    assert telemetry.suppressed == 2


def test_results_without_a_source_share_the_default_one() -> None:
    telemetry = Telemetry(clock=Clock())
    settings = Settings(min_interval_s=10.0)

    first = send(telemetry, "red", settings, source=None)
    second = send(telemetry, "red", settings, source="default")

    assert first is not None
    assert second is None


def test_only_on_change_sends_when_the_top_tag_changes() -> None:
    clock = Clock()
    telemetry = Telemetry(clock=clock)
    settings = Settings(only_on_change=True)

    sent = tags_sent(
        telemetry,
        clock,
        settings,
        [(1, "red"), (2, "red"), (3, "blue"), (4, "blue"), (5, "red"), (6, "red")],
    )

    assert sent == ["red", None, "blue", None, "red", None]
    assert telemetry.suppressed == 3


def test_only_on_change_compares_with_the_last_result_sent() -> None:
    clock = Clock()
    telemetry = Telemetry(clock=clock)
    settings = Settings(only_on_change=True, min_interval_s=10.0)

    sent = tags_sent(
        telemetry,
        clock,
        settings,
        # blue at 5 is held back by the interval; at 12 it is still a change
        # from the last red sent, so it goes; at 15 nothing has changed; at 18
        # red is a change again but 10 s have not passed since blue was sent.
        [(0, "red"), (5, "blue"), (12, "blue"), (15, "blue"), (18, "red")],
    )

    assert sent == ["red", None, "blue", None, None]


def test_a_change_back_within_the_interval_is_no_change() -> None:
    clock = Clock()
    telemetry = Telemetry(clock=clock)
    settings = Settings(only_on_change=True, min_interval_s=10.0)

    sent = tags_sent(telemetry, clock, settings, [(0, "red"), (5, "blue"), (12, "red")])

    assert sent == ["red", None, None]


def test_alerts_bypass_the_interval_and_only_on_change() -> None:
    clock = Clock()
    telemetry = Telemetry(clock=clock)
    settings = Settings(
        min_interval_s=60.0,
        only_on_change=True,
        alerts=(AlertRule("fire", frozenset({"red"}), 0.5),),
    )

    sent = tags_sent(
        telemetry, clock, settings, [(0, "red"), (1, "red"), (2, "red"), (3, "blue")]
    )

    assert sent == ["red", "red", "red", None]
    assert telemetry.suppressed == 1


def test_a_sent_alert_counts_as_the_last_result_sent() -> None:
    clock = Clock()
    telemetry = Telemetry(clock=clock)
    settings = Settings(
        only_on_change=True, alerts=(AlertRule("fire", frozenset({"red"}), 0.5),)
    )

    sent = tags_sent(
        telemetry, clock, settings, [(0, "blue"), (1, "red"), (2, "blue"), (3, "blue")]
    )

    # After the red alert went out, blue is a change again.
    assert sent == ["blue", "red", "blue", None]


def test_fired_alerts_with_and_without_tags() -> None:
    settings = Settings(
        alerts=(
            AlertRule("anything-sure", frozenset(), 0.95),
            AlertRule("warm", frozenset({"red", "orange"}), 0.3),
            AlertRule("cold", frozenset({"blue"}), 0.3),
        )
    )
    predictions = document(("green", 0.96), ("orange", 0.3), ("blue", 0.29))[
        "predictions"
    ]

    assert fired_alerts(predictions, settings) == ["anything-sure", "warm"]
    assert fired_alerts(predictions, Settings()) == []
    assert fired_alerts([], settings) == []


def test_encode_within_limit_drops_the_least_probable_predictions() -> None:
    tags = [(f"tag{n:03d}", round(1 - n / 100, 2)) for n in range(60)]
    result = document(*tags)
    original = list(result["predictions"])
    limit = 2500
    assert len(json.dumps(result).encode()) > limit

    body = encode_within_limit(result, limit)

    encoded = json.loads(body)
    kept = len(encoded["predictions"])
    assert len(body) <= limit
    assert 0 < kept < len(original)
    assert encoded["predictions"] == original[:kept]
    assert encoded["truncated"] == {"predictions": len(original) - kept}
    # One more prediction would not have fitted: nothing was dropped needlessly.
    one_more = {
        **encoded,
        "predictions": original[: kept + 1],
        "truncated": {"predictions": len(original) - kept - 1},
    }
    assert len(json.dumps(one_more, ensure_ascii=False).encode()) > limit


def test_encode_within_limit_leaves_small_documents_untouched() -> None:
    result = document(("red", 0.9), ("blue", 0.1))
    expected = json.dumps(result, ensure_ascii=False).encode()

    body = encode_within_limit(result, len(expected))

    assert body == expected
    assert "truncated" not in json.loads(body)


def test_large_result_is_truncated_in_the_message() -> None:
    tags = [(f"tag{n:03d}-" + "x" * 2000, 1 - n / 200) for n in range(150)]

    output = Telemetry(clock=Clock()).result(
        document(*tags), Settings(), source="cam1", correlation_id=None
    )

    assert output is not None
    assert len(output.body) <= 240 * 1024
    assert output.json()["truncated"]["predictions"] > 0
    assert output.properties["topTag"] == tags[0][0]


@pytest.mark.parametrize(
    ("correlation_id", "message_id", "expected"),
    [("corr-1", "msg-1", "corr-1"), (None, "msg-1", "msg-1"), (None, None, None)],
)
def test_error_message_shape(
    correlation_id: str | None, message_id: str | None, expected: str | None
) -> None:
    error = BadRequestError(
        "a JSON reference must be an object", reason="bad-reference"
    )

    output = Telemetry(clock=Clock()).error(
        error, source="cam1", message_id=message_id, correlation_id=correlation_id
    )

    body: dict[str, Any] = output.json()
    assert output.output == ERRORS_OUTPUT
    assert output.properties == {"reason": "bad-reference", "source": "cam1"}
    assert output.content_type == "application/json"
    assert output.content_encoding == "utf-8"
    assert output.message_id == body["id"]
    assert output.correlation_id == expected
    assert body["reason"] == "bad-reference"
    assert body["detail"] == "a JSON reference must be an object"
    assert body["source"] == "cam1"
    assert body["messageId"] == message_id
    assert body["correlationId"] == correlation_id
    assert body["created"].endswith("Z")
    assert str(uuid.UUID(body["id"])) == body["id"]


def test_error_without_a_source_uses_the_default_one() -> None:
    telemetry = Telemetry(clock=Clock())

    first = telemetry.error(
        FetchError("nope"), source=None, message_id=None, correlation_id=None
    )
    second = telemetry.error(
        FetchError("nope"), source=None, message_id=None, correlation_id=None
    )

    assert first.properties == {"reason": "fetch-failed", "source": "default"}
    assert first.json()["source"] == "default"
    assert first.message_id != second.message_id
