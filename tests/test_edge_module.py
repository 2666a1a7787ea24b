"""The module as IoT Edge runs it: `python main.py` with the real SDK, against an
emulated edgeHub."""

import base64
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import cvmodels
from tests.edge_emulator import EdgeEmulator, OutputMessage
from tests.loopback import free_port
from tests.module_process import WAIT_S, RunningModule, launch_module, start_module

SILENT_ADDRESS = "127.254.253.252"  # nothing listens on 8883 there
RED = cvmodels.solid_image((220, 40, 40), size=(64, 48), fmt="JPEG")
BLUE = cvmodels.solid_image((40, 80, 200), size=(64, 48), fmt="PNG")


@pytest.fixture
def module(edge_emulator: EdgeEmulator, tmp_path: Path) -> Iterator[RunningModule]:
    """Start `python main.py` in the emulated IoT Edge and wait until it is ready."""
    frames = tmp_path / "frames"
    frames.mkdir()
    edge_emulator.set_desired({"allowedPaths": [str(frames)], "project": "fruit-line"})
    running = start_module(edge_emulator, tmp_path, frames=frames)
    try:
        yield running
    finally:
        running.kill()


def top_tag(message: OutputMessage) -> str:
    """Return the most probable tag of a result message."""
    return str(message.json()["predictions"][0]["tagName"])


def test_image_message_produces_a_routable_result(module: RunningModule) -> None:
    module.send(RED, properties={"source": "door", "camera": "cam-1"}, message_id="m-1")

    [result] = module.results(1)
    body = result.json()

    assert result.content_type == "application/json"
    assert result.content_encoding == "utf-8"
    assert result.correlation_id == "m-1"
    assert result.properties["topTag"] == "red"
    assert result.properties["source"] == "door"
    assert float(result.properties["topProbability"]) > 0.9
    assert result.properties["modelVersion"] == body["model"]["sha256"][:12]
    assert result.properties["alert"] == "false"
    assert body["project"] == "fruit-line"
    assert body["source"]["name"] == "door"
    assert body["source"]["messageId"] == "m-1"
    assert body["source"]["properties"] == {"source": "door", "camera": "cam-1"}
    assert body["image"] == {"width": 64, "height": 48}
    assert top_tag(result) == "red"
    assert len(body["predictions"]) == 9


def test_reference_by_path_is_scored(module: RunningModule) -> None:
    frame = module.frames / "blue.png"
    frame.write_bytes(BLUE)

    module.send(json.dumps({"path": str(frame), "source": "yard"}).encode())

    [result] = module.results(1)
    assert top_tag(result) == "blue"
    assert result.json()["source"]["path"] == str(frame)
    assert result.properties["source"] == "yard"


def test_threshold_patch_changes_results_and_is_acknowledged(
    module: RunningModule,
) -> None:
    version = module.edge.patch_desired({"threshold": 0.5})
    ack = module.edge.wait_reported(
        lambda r: r.get("threshold", {}).get("av") == version, timeout=WAIT_S
    )["threshold"]
    module.send(RED)
    first = module.results(1)[0]

    refused = module.edge.patch_desired({"threshold": 7})
    bad_ack = module.edge.wait_reported(
        lambda r: r.get("threshold", {}).get("av") == refused, timeout=WAIT_S
    )["threshold"]
    module.send(RED)
    second = module.results(2)[1]

    assert ack == {"value": 0.5, "ac": 200, "av": version, "ad": "applied"}
    assert [p["tagName"] for p in first.json()["predictions"]] == ["red"]
    assert bad_ack["ac"] == 400 and bad_ack["value"] == 7
    assert "between 0 and 1" in bad_ack["ad"]
    assert [p["tagName"] for p in second.json()["predictions"]] == ["red"]


def test_bad_messages_become_errors_and_good_ones_still_score(
    module: RunningModule, tmp_path: Path
) -> None:
    outside = tmp_path / "secret.png"
    outside.write_bytes(RED)
    bad = [
        (b"", "bad-image"),
        (b"just some words", "bad-image"),
        (b'{"path": ', "bad-json"),
        (json.dumps({"path": str(outside)}).encode(), "path-not-allowed"),
        (json.dumps({"url": "http://example.com/x.jpg"}).encode(), "host-not-allowed"),
    ]

    module.send(RED, message_id="good-1")
    for index, (body, _reason) in enumerate(bad):
        module.send(body, message_id=f"bad-{index}", properties={"source": "cam"})
    module.send(BLUE, message_id="good-2")

    errors = module.errors(len(bad))
    results = module.results(2)
    by_id = {e.json()["messageId"]: e.json() for e in errors}
    assert [by_id[f"bad-{i}"]["reason"] for i in range(len(bad))] == [
        reason for _body, reason in bad
    ]
    assert all(e.properties["reason"] == e.json()["reason"] for e in errors)
    assert all(e.json()["detail"] for e in errors)
    assert all(e.properties["source"] == "cam" for e in errors)
    assert [top_tag(r) for r in results] == ["red", "blue"]
    assert module.process.poll() is None


def test_broker_restart_reconnects_and_applies_nothing_twice(
    module: RunningModule,
) -> None:
    version = module.edge.patch_desired({"maxPredictions": 2})
    module.edge.wait_reported(
        lambda r: r.get("maxPredictions", {}).get("av") == version, timeout=WAIT_S
    )
    module.send(RED)
    module.results(1)
    reads_before = module.edge.twin_gets

    module.edge.restart_broker()
    module.edge.wait_twin_gets(reads_before + 1, timeout=WAIT_S)
    later = module.edge.patch_desired({"threshold": 0.2})
    module.edge.wait_reported(
        lambda r: r.get("threshold", {}).get("av") == later, timeout=WAIT_S
    )
    module.send(BLUE)
    results = module.results(2)

    assert module.log_text().count("Desired maxPredictions applied") == 1
    acks = [
        p["maxPredictions"]
        for p in module.edge.reported_patches
        if "maxPredictions" in p
    ]
    assert all(ack["av"] == version for ack in acks)
    assert top_tag(results[1]) == "blue"
    assert len(results[1].json()["predictions"]) <= 2


def test_direct_methods_answer(module: RunningModule) -> None:
    module.send(RED)
    module.results(1)

    status, state = module.edge.invoke_method("status", timeout=WAIT_S)
    ok, result = module.edge.invoke_method(
        "score", {"image": base64.b64encode(BLUE).decode()}, timeout=WAIT_S
    )
    refused, problem = module.edge.invoke_method(
        "score", {"image": "***"}, timeout=WAIT_S
    )
    missing, _ = module.edge.invoke_method("reboot", {}, timeout=WAIT_S)

    assert status == 200
    assert state["status"] == "ready"
    assert state["counts"]["scored"] == 1
    assert state["activeModel"]["flavor"] == "classifier-compact"
    assert ok == 200 and result["predictions"][0]["tagName"] == "blue"
    assert refused == 400 and problem["reason"] == "bad-request"
    assert missing == 404


def test_sigterm_stops_the_module_cleanly(module: RunningModule) -> None:
    module.send(RED)
    module.results(1)

    started = time.monotonic()
    status = module.stop()

    assert status == 0
    assert time.monotonic() - started < 10
    log = module.log.read_text()
    assert "Stopping" in log and "Disconnected from edgeHub" in log
    assert "Traceback" not in log


def test_unreachable_edgehub_is_retried_while_http_serves_and_sigterm_stops(
    edge_emulator: EdgeEmulator, tmp_path: Path
) -> None:
    port = free_port()
    # A loopback address where no broker listens: edgeHub is not up yet.
    env = {"IOTEDGE_GATEWAYHOSTNAME": SILENT_ADDRESS, "HTTP_PORT": str(port)}
    running = launch_module(edge_emulator, tmp_path, env=env)
    try:
        health = _wait_http(f"http://127.0.0.1:{port}/healthz")
        _wait_for_line(running.log, "Cannot reach edgeHub yet")
        status = running.stop()
    finally:
        running.kill()

    assert health == 200
    assert status == 0
    text = running.log_text()
    assert text.count("Cannot reach edgeHub yet") == 1
    assert "Traceback" not in text


def _wait_http(url: str) -> int:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                return int(response.status)
        except urllib.error.HTTPError as error:
            return int(error.code)
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing answered at {url}")


def _wait_for_line(log: Path, text: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if text in log.read_text(errors="replace"):
            return
        time.sleep(0.05)
    raise AssertionError(f"the module never logged {text!r}:\n{log.read_text()}")
