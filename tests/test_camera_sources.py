"""Camera sources driven by the twin, in the module as IoT Edge runs it."""

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import cvmodels
from tests.edge_emulator import EdgeEmulator
from tests.model_server import ModelServer, Served
from tests.module_process import WAIT_S, RunningModule, start_module

RED = cvmodels.solid_image((220, 40, 40), size=(64, 48), fmt="JPEG")
BLUE = cvmodels.solid_image((40, 80, 200), size=(64, 48), fmt="PNG")


@pytest.fixture
def module(edge_emulator: EdgeEmulator, tmp_path: Path) -> Iterator[RunningModule]:
    """Start the module serving the demo export."""
    running = start_module(edge_emulator, tmp_path)
    try:
        yield running
    finally:
        running.kill()


def set_sources(module: RunningModule, sources: Any) -> dict[str, Any]:
    """Patch the desired sources and return their acknowledgement."""
    version = module.edge.patch_desired({"sources": sources})
    return module.wait_reported("sources", lambda ack: ack.get("av") == version)


def source_states(module: RunningModule) -> dict[str, Any]:
    """Return the sources' states from the status direct method."""
    status, state = module.edge.invoke_method("status", {}, timeout=WAIT_S)
    assert status == 200
    return dict(state["sourceStates"])


def test_sources_are_added_changed_and_removed_live(
    module: RunningModule, model_server: ModelServer
) -> None:
    door = model_server.serve("/door.jpg", Served(RED))
    yard = model_server.serve("/yard.png", Served(BLUE)) + "?token=SECRETTOKEN"

    added = set_sources(module, {"door": {"url": door, "intervalS": 0.1}})
    first = module.edge.wait_outputs(
        2, name="results", predicate=lambda m: m.properties["source"] == "door"
    )
    both = set_sources(
        module,
        # A twin patch merges objects: switching to fps must remove intervalS.
        {
            "door": {"fps": 5, "intervalS": None},
            "yard": {"url": yard, "intervalS": 0.1},
        },
    )
    from_yard = module.edge.wait_outputs(
        1, name="results", predicate=lambda m: m.properties["source"] == "yard"
    )
    only_yard = set_sources(
        module, {"door": None, "yard": {"url": yard, "enabled": False}}
    )
    states = source_states(module)

    assert added["ac"] == 200 and both["ac"] == 200 and only_yard["ac"] == 200
    body = first[0].json()
    assert body["source"]["name"] == "door" and body["source"]["input"] == "camera"
    assert body["predictions"][0]["tagName"] == "red"
    assert from_yard[0].json()["predictions"][0]["tagName"] == "blue"
    assert set(states) == {"yard"} and states["yard"]["state"] == "disabled"
    assert "SECRETTOKEN" not in module.log_text()
    assert "SECRETTOKEN" not in str(module.edge.reported_patches)


def test_invalid_sources_are_refused_and_the_old_ones_keep_running(
    module: RunningModule, model_server: ModelServer
) -> None:
    door = model_server.serve("/door.jpg", Served(RED))
    set_sources(module, {"door": {"url": door, "intervalS": 0.1}})

    refused = set_sources(module, {"door": {"url": door, "intervalS": -1}})
    before = len(module.edge.outputs("results"))
    module.edge.wait_outputs(before + 2, name="results")

    assert refused["ac"] == 400 and "door" in refused["ad"]
    assert source_states(module)["door"]["state"] == "ok"


def test_source_results_follow_the_telemetry_rules(
    module: RunningModule, model_server: ModelServer
) -> None:
    door = model_server.serve("/door.jpg", Served(RED))
    version = module.edge.patch_desired({"onlyOnChange": True})
    module.wait_reported("onlyOnChange", lambda ack: ack.get("av") == version)
    set_sources(module, {"door": {"url": door, "intervalS": 0.05}})
    module.edge.wait_outputs(1, name="results")
    taken = source_states(module)["door"]["frames"]

    # Wait for several more frames: none of them changes the top tag.
    for _ in range(200):
        if source_states(module)["door"]["frames"] >= taken + 5:
            break
    alert = module.edge.patch_desired(
        {"alerts": [{"name": "redAlert", "tags": ["red"], "minProbability": 0.5}]}
    )
    module.wait_reported("alerts", lambda ack: ack.get("av") == alert)
    alerted = module.edge.wait_outputs(
        1, name="results", predicate=lambda m: m.properties.get("alert") == "true"
    )

    results = module.edge.outputs("results")
    unalerted = [m for m in results if m.properties["alert"] == "false"]
    assert len(unalerted) == 1
    assert alerted[0].json()["alerts"] == ["redAlert"]
    assert alerted[0].properties["source"] == "door"


def test_a_camera_returning_garbage_produces_errors(
    module: RunningModule, model_server: ModelServer
) -> None:
    broken = model_server.serve("/broken.jpg", Served(b"<html>login required</html>"))

    set_sources(module, {"lobby": {"url": broken, "intervalS": 0.1}})
    errors = module.errors(2)

    assert {e.json()["reason"] for e in errors} == {"bad-image"}
    assert {e.properties["source"] for e in errors} == {"lobby"}
    assert source_states(module)["lobby"]["state"] == "ok"
    assert module.edge.outputs("results") == []
    # Every frame is an error message, but the log warns once per cause.
    assert module.log_text().count("Rejected input from lobby") == 1
