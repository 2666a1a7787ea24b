"""Start `python main.py` as IoT Edge would, against an emulated edgeHub."""

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modules.demo import DEMO_EXPORT
from tests.edge_emulator import EdgeEmulator, OutputMessage

ROOT = Path(__file__).resolve().parents[1]
READY_TIMEOUT_S = 30.0
WAIT_S = 15.0


@dataclass
class RunningModule:
    """The module process and the emulated edge around it."""

    edge: EdgeEmulator
    process: subprocess.Popen[bytes]
    log: Path
    frames: Path | None = None

    def results(self, count: int, **kwargs: Any) -> list[OutputMessage]:
        """Wait for at least count messages on the results output."""
        return self.edge.wait_outputs(count, name="results", timeout=WAIT_S, **kwargs)

    def errors(self, count: int) -> list[OutputMessage]:
        """Wait for at least count messages on the errors output."""
        return self.edge.wait_outputs(count, name="errors", timeout=WAIT_S)

    def send(self, body: bytes, **kwargs: Any) -> None:
        """Send a message to the module's images input."""
        self.edge.send_input("images", body, **kwargs)

    def wait_reported(self, name: str, predicate: Any) -> dict[str, Any]:
        """Wait until the reported property name satisfies predicate; return it."""
        try:
            reported = self.edge.wait_reported(
                lambda r: name in r and predicate(r[name]), timeout=WAIT_S
            )
        except AssertionError as error:
            raise AssertionError(f"{error}\nmodule log:\n{self.log_text()}") from None
        return dict(reported[name])

    def log_text(self) -> str:
        """Return what the module logged so far."""
        return self.log.read_text(errors="replace")

    def stop(self) -> int:
        """Send SIGTERM and return the exit status."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=WAIT_S)

    def kill(self) -> None:
        """Kill the process if it still runs."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def launch_module(
    edge: EdgeEmulator,
    folder: Path,
    *,
    frames: Path | None = None,
    env: dict[str, str] | None = None,
    log_name: str = "module.log",
) -> RunningModule:
    """Start `python main.py` with the demo model inside the emulated IoT Edge."""
    log = folder / log_name
    variables = {
        **os.environ,
        **edge.env(),
        "RECONNECT_INTERVAL_S": "1",
        "MODEL_PATH": str(DEMO_EXPORT),
        "MODEL_STORE": str(folder / "model-store"),
        "HTTP_PORT": "0",
        **(env or {}),
    }
    with log.open("ab") as sink:
        process = subprocess.Popen(
            [sys.executable, str(ROOT / "main.py")],
            cwd=ROOT,
            env=variables,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    return RunningModule(edge, process, log, frames)


def start_module(
    edge: EdgeEmulator,
    folder: Path,
    *,
    frames: Path | None = None,
    env: dict[str, str] | None = None,
    log_name: str = "module.log",
) -> RunningModule:
    """Launch the module and wait until it reports ready."""
    ready_before = len(edge.reported_patches)
    running = launch_module(edge, folder, frames=frames, env=env, log_name=log_name)
    try:
        edge.wait_reported(
            lambda _: any(
                p.get("status") == "ready" for p in edge.reported_patches[ready_before:]
            ),
            timeout=READY_TIMEOUT_S,
        )
    except AssertionError as error:
        running.kill()
        raise AssertionError(f"{error}\nmodule log:\n{running.log_text()}") from None
    return running
