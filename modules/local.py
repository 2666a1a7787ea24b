"""The connection outside IoT Edge: outputs on stdout, the twin from a JSON file.

Outputs are printed one JSON line each, `{"output", "properties", "body"}`. Desired
properties come from a file shaped like the twin's desired section and are re-read
when it changes; acknowledgements go to the log. Lines on stdin are input messages:
a path to an image, or a JSON reference such as {"path": ...} or {"url": ...}.
"""

import asyncio
import concurrent.futures
import json
import logging
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from .connection import Callbacks
from .inputs import InputMessage
from .telemetry import OutputMessage

TWIN_POLL_S = 0.5
LOCAL_INPUT = "images"

_LOGGER = logging.getLogger(__name__)


class LocalConnection:
    """A stand-in for edgeHub on a laptop."""

    def __init__(
        self,
        *,
        twin_path: Path | None = None,
        samples: Sequence[tuple[str, bytes]] = (),
        stdin: TextIO | None = None,
        stdout: TextIO | None = None,
    ) -> None:
        self._twin_path = twin_path
        self._samples = samples
        self._stdin = stdin
        self._stdout = stdout or sys.stdout
        self._write_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._twin_version = 0
        self._twin_seen: tuple[float, int] | None = None
        self._closed = threading.Event()

    async def start(self, callbacks: Callbacks) -> None:
        """Apply the twin file, score the samples, then listen to stdin."""
        _LOGGER.info("Running outside IoT Edge: outputs go to stdout as JSON lines")
        if self._twin_path is not None:
            await self._read_twin(callbacks, full=True)
            self._spawn(self._watch_twin(callbacks), "twin-file-watcher")
        for name, data in self._samples:
            await callbacks.on_message(
                InputMessage(LOCAL_INPUT, data, {"source": name}, message_id=name)
            )
        if self._stdin is not None:
            loop = asyncio.get_running_loop()
            reader = threading.Thread(
                target=self._read_lines,
                args=(loop, callbacks),
                name="stdin-reader",
                daemon=True,
            )
            reader.start()

    async def send(self, message: OutputMessage) -> None:
        """Print the message as one JSON line."""
        line = json.dumps(
            {
                "output": message.output,
                "properties": dict(message.properties),
                "body": message.json(),
            },
            ensure_ascii=False,
        )
        async with self._write_lock:
            await asyncio.to_thread(self._write, line)

    async def report(self, patch: dict[str, Any]) -> None:
        """Log what would be reported to the twin."""
        _LOGGER.info("Reported properties: %s", json.dumps(patch, ensure_ascii=False))

    async def close(self) -> None:
        """Stop watching the twin file and reading stdin."""
        self._closed.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _write(self, line: str) -> None:
        self._stdout.write(line + "\n")
        self._stdout.flush()

    async def _watch_twin(self, callbacks: Callbacks) -> None:
        while True:
            await asyncio.sleep(TWIN_POLL_S)
            await self._read_twin(callbacks, full=True)

    async def _read_twin(self, callbacks: Callbacks, *, full: bool) -> None:
        assert self._twin_path is not None
        try:
            document = await asyncio.to_thread(self._load_if_changed, self._twin_path)
        except (OSError, ValueError) as error:
            _LOGGER.warning("Cannot use the twin file %s: %s", self._twin_path, error)
            return
        if document is not None:
            callbacks.on_desired(document, full)

    def _load_if_changed(self, path: Path) -> dict[str, Any] | None:
        status = path.stat()
        seen = (status.st_mtime, status.st_size)
        if seen == self._twin_seen:
            return None
        self._twin_seen = seen
        document = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(document, dict):
            raise ValueError(
                "it must hold a JSON object, like the twin's desired section"
            )
        desired = document.get("desired", document)
        if "$version" not in desired:
            # Each change of the file is a new desired version, as in IoT Hub.
            self._twin_version += 1
            desired = {**desired, "$version": self._twin_version}
        return dict(desired)

    def _read_lines(
        self, loop: asyncio.AbstractEventLoop, callbacks: Callbacks
    ) -> None:
        assert self._stdin is not None
        for line in self._stdin:
            if self._closed.is_set():
                return
            message = _line_message(line.strip())
            if message is None:
                continue
            handoff = asyncio.run_coroutine_threadsafe(
                callbacks.on_message(message), loop
            )
            try:
                handoff.result()
            except (concurrent.futures.CancelledError, RuntimeError):
                return

    def _spawn(self, coroutine: Any, name: str) -> None:
        task = asyncio.create_task(coroutine, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _line_message(line: str) -> InputMessage | None:
    if not line:
        return None
    if line.startswith("{"):
        return InputMessage(
            LOCAL_INPUT, line.encode("utf-8"), content_type="application/json"
        )
    try:
        data = Path(line).read_bytes()
    except OSError as error:
        _LOGGER.warning("Cannot read %s: %s", line, error.strerror)
        return None
    return InputMessage(LOCAL_INPUT, data, {"source": line}, message_id=line)
