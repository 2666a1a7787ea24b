"""Reported-property patches: merged, retried while the connection fails, kept."""

import asyncio
from typing import Any

from modules.reporter import Reporter
from modules.telemetry import OutputMessage


class FlakyConnection:
    """A connection whose reports fail a given number of times, then succeed."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.reported: list[dict[str, Any]] = []
        self.attempts = 0
        self.delivered = asyncio.Event()
        self.exhausted = asyncio.Event()

    async def start(self, callbacks: Any) -> None:
        """Do nothing: this connection only reports."""

    async def send(self, message: OutputMessage) -> None:
        """Do nothing: this connection only reports."""

    async def report(self, patch: dict[str, Any]) -> None:
        """Fail while failures remain, else record the patch."""
        self.attempts += 1
        if self.failures:
            self.failures -= 1
            if not self.failures:
                self.exhausted.set()
            raise ConnectionError("edgeHub is away")
        self.reported.append(dict(patch))
        self.delivered.set()

    async def close(self) -> None:
        """Do nothing."""


async def test_patches_queued_together_are_merged_newest_first() -> None:
    connection = FlakyConnection(failures=0)
    reporter = Reporter(connection)
    reporter.report({"model": {"ac": 202, "ad": "10 MB"}, "status": "ready"})
    reporter.report({"model": {"ac": 202, "ad": "20 MB"}})

    running = asyncio.create_task(reporter.run())
    await asyncio.wait_for(connection.delivered.wait(), 5)
    running.cancel()

    assert connection.reported == [
        {"model": {"ac": 202, "ad": "20 MB"}, "status": "ready"}
    ]


async def test_failed_reports_are_retried_until_they_go_through() -> None:
    connection = FlakyConnection(failures=2)
    reporter = Reporter(connection, retry_delays_s=(0.0, 0.0, 0.0))
    reporter.report({"threshold": {"ac": 200}})

    running = asyncio.create_task(reporter.run())
    await asyncio.wait_for(connection.delivered.wait(), 5)
    running.cancel()

    assert connection.attempts == 3
    assert connection.reported == [{"threshold": {"ac": 200}}]


async def test_a_patch_that_keeps_failing_is_kept_and_newer_values_win() -> None:
    connection = FlakyConnection(failures=2)
    reporter = Reporter(connection, retry_delays_s=(0.0,))
    reporter.report({"counts": {"scored": 1}, "status": "ready"})
    running = asyncio.create_task(reporter.run())
    await asyncio.wait_for(connection.exhausted.wait(), 5)
    reporter.report({"counts": {"scored": 2}})

    await asyncio.wait_for(connection.delivered.wait(), 5)
    running.cancel()

    assert connection.reported == [{"counts": {"scored": 2}, "status": "ready"}]


async def test_flush_sends_what_is_left_once() -> None:
    connection = FlakyConnection(failures=0)
    reporter = Reporter(connection)
    reporter.report({"status": "stopping"})

    await reporter.flush()
    await reporter.flush()

    assert connection.reported == [{"status": "stopping"}]
