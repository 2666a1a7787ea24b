"""Outside IoT Edge: `python main.py` prints results and reads its twin from a file."""

import json
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from modules.demo import sample_images
from tests import cvmodels

ROOT = Path(__file__).resolve().parents[1]
WAIT_S = 30.0
# The top tag of each built-in sample, as the demo export's specification has it.
SAMPLE_TOP_TAGS = {
    "tomato.jpg": "red",
    "sky.jpg": "blue",
    "leaf.png": "green",
    "banana.jpg": "yellow",
    "snow.jpg": "white",
    "meadow.jpg": "blue",
}
REPORTED = "Reported properties: "


class Lines:
    """Read a pipe line by line on a thread, so a test can wait with a deadline."""

    def __init__(self, pipe: IO[str]) -> None:
        self.seen: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, args=(pipe,), daemon=True)
        self._reader.start()

    def wait_for(self, wanted: Callable[[str], bool], timeout: float = WAIT_S) -> str:
        """Return the next line that is wanted, failing after timeout seconds."""
        while True:
            try:
                line = self._lines.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(self._story("no wanted line in time")) from None
            if line is None:
                raise AssertionError(self._story("the pipe closed"))
            if wanted(line):
                return line

    def join(self) -> None:
        """Wait for the reader to reach the end of the pipe."""
        self._reader.join(WAIT_S)

    def _read(self, pipe: IO[str]) -> None:
        for line in iter(pipe.readline, ""):
            self.seen.append(line.rstrip("\n"))
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def _story(self, what: str) -> str:
        return f"{what}; lines so far:\n" + "\n".join(self.seen)


class LocalModule:
    """`python main.py` running outside IoT Edge, its stdout and stderr read."""

    def __init__(self, store: Path, *arguments: str, stdin: Any) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "main.py"), *arguments],
            cwd=ROOT,
            env=_local_environment(store),
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
        )
        assert self.process.stdout is not None and self.process.stderr is not None
        self.stdout = Lines(self.process.stdout)
        self.stderr = Lines(self.process.stderr)

    def output(self, wanted: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """Return the next output line, parsed, that is wanted."""
        line = self.stdout.wait_for(lambda text: wanted(json.loads(text)))
        return dict(json.loads(line))

    def reported(self, wanted: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """Return the next reported-properties patch in the log that is wanted."""
        line = self.stderr.wait_for(
            lambda text: REPORTED in text and wanted(_reported_patch(text))
        )
        return _reported_patch(line)

    def send(self, line: str) -> None:
        """Write one line to the module's stdin."""
        assert self.process.stdin is not None
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def stop(self) -> int:
        """Send SIGTERM, as IoT Edge does, and return the exit status."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(WAIT_S)

    def close(self) -> None:
        """Kill the process if it still runs and release its pipes."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(WAIT_S)
        self.stdout.join()
        self.stderr.join()
        for pipe in (self.process.stdin, self.process.stdout, self.process.stderr):
            if pipe is not None:
                pipe.close()


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., LocalModule]]:
    """Return a function starting the module locally; kill what it started after."""
    started: list[LocalModule] = []

    def run(*arguments: str, stdin: Any = subprocess.DEVNULL) -> LocalModule:
        module = LocalModule(tmp_path / "model-store", *arguments, stdin=stdin)
        started.append(module)
        return module

    try:
        yield run
    finally:
        for module in started:
            module.close()


def is_result(output: dict[str, Any]) -> bool:
    return output["output"] == "results"


@pytest.mark.timeout(60)
def test_prints_a_result_line_per_sample_and_stops_on_sigterm(
    start: Callable[..., LocalModule],
) -> None:
    module = start()

    outputs = [module.output(is_result) for _ in SAMPLE_TOP_TAGS]
    status = module.stop()

    by_source = {o["properties"]["source"]: o for o in outputs}
    assert sorted(by_source) == sorted(name for name, _ in sample_images())
    assert {s: o["properties"]["topTag"] for s, o in by_source.items()} == (
        SAMPLE_TOP_TAGS
    )
    tomato = by_source["tomato.jpg"]
    assert set(tomato) == {"output", "properties", "body"}
    assert set(tomato["properties"]) >= {"topTag", "topProbability", "modelVersion"}
    top = tomato["body"]["predictions"][0]
    assert top["tagName"] == "red"
    assert top["probability"] > 0.9
    assert tomato["properties"]["topProbability"] == f"{top['probability']:.4f}"
    assert len(tomato["body"]["predictions"]) == 9
    assert tomato["body"]["image"] == {"width": 640, "height": 480}
    assert status == 0, module.stderr.seen


@pytest.mark.timeout(60)
def test_twin_file_is_applied_and_reread_when_it_changes(
    start: Callable[..., LocalModule], tmp_path: Path
) -> None:
    twin = tmp_path / "twin.json"
    twin.write_text(json.dumps({"threshold": 0.9, "maxPredictions": 1}))
    module = start("--twin", str(twin))

    acks = module.reported(lambda patch: "threshold" in patch)
    outputs = [module.output(is_result) for _ in SAMPLE_TOP_TAGS]
    twin.write_text(json.dumps({"threshold": 3, "tags": ["red"]}))
    refused = module.reported(lambda patch: "threshold" in patch)

    assert acks["threshold"] == {"value": 0.9, "ac": 200, "av": 1, "ad": "applied"}
    assert acks["maxPredictions"]["ac"] == 200
    kept = {o["properties"]["source"]: o["body"]["predictions"] for o in outputs}
    assert all(len(predictions) <= 1 for predictions in kept.values())
    assert all(p["probability"] >= 0.9 for ps in kept.values() for p in ps)
    assert [p["tagName"] for p in kept["tomato.jpg"]] == ["red"]
    # The meadow's top tag is blue at about 0.51: below the threshold.
    assert kept["meadow.jpg"] == []
    assert refused["threshold"]["ac"] == 400
    assert refused["threshold"]["av"] == 2
    assert refused["threshold"]["value"] == 3
    assert "threshold must be between 0 and 1" in refused["threshold"]["ad"]
    assert refused["tags"]["ac"] == 200
    assert refused["maxPredictions"] == {
        "value": None,
        "ac": 200,
        "av": 2,
        "ad": "default restored",
    }


@pytest.mark.timeout(60)
def test_lines_on_stdin_are_scored_or_refused(
    start: Callable[..., LocalModule], tmp_path: Path
) -> None:
    image = tmp_path / "blue.png"
    image.write_bytes(cvmodels.solid_image((0, 0, 255), (80, 60)))
    module = start(stdin=subprocess.PIPE)

    module.send(str(image))
    scored = module.output(lambda o: o["properties"].get("source") == str(image))
    module.send(json.dumps({"path": str(image), "source": "shared-volume"}))
    refused = module.output(lambda o: o["output"] == "errors")
    status = module.stop()

    assert scored["output"] == "results"
    assert scored["properties"]["topTag"] == "blue"
    assert scored["body"]["predictions"][0]["tagName"] == "blue"
    assert scored["body"]["image"] == {"width": 80, "height": 60}
    assert refused["properties"]["reason"] == "path-not-allowed"
    assert refused["body"]["reason"] == "path-not-allowed"
    assert str(image) in refused["body"]["detail"]
    assert status == 0, module.stderr.seen


def _local_environment(store: Path) -> dict[str, str]:
    """Return this environment without IoT Edge's variables or module settings."""
    unwanted = {"MODEL_PATH", "TWIN_FILE", "SCORER_WORKERS", "RECONNECT_INTERVAL_S"}
    environment = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("IOTEDGE_") and name not in unwanted
    }
    # A store of its own, so no model rolled out elsewhere replaces the demo.
    environment["MODEL_STORE"] = str(store)
    environment["HTTP_PORT"] = "0"
    return environment


def _reported_patch(line: str) -> dict[str, Any]:
    return dict(json.loads(line.split(REPORTED, 1)[1]))
