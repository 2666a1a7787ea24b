"""Reported properties: patches merged, sent in turn, kept while edgeHub is away."""

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Any

from .connection import Connection

RETRY_DELAYS_S = (1.0, 2.0, 5.0, 10.0, 30.0)
FLUSH_TIMEOUT_S = 2.0

_LOGGER = logging.getLogger(__name__)


class Reporter:
    """Merge reported-property patches and send them, retrying failures.

    Newer values of a key replace older ones that were not sent yet, so a burst of
    progress reports costs one twin update, and nothing is lost while disconnected.
    """

    def __init__(
        self, connection: Connection, retry_delays_s: Sequence[float] = RETRY_DELAYS_S
    ) -> None:
        self._connection = connection
        self._retry_delays_s = tuple(retry_delays_s)
        self._pending: dict[str, Any] = {}
        self._wanted = asyncio.Event()

    def report(self, patch: dict[str, Any]) -> None:
        """Queue a patch; the running reporter sends it."""
        self._pending.update(patch)
        self._wanted.set()

    def wake(self) -> None:
        """Try again now, for example after a reconnect."""
        self._wanted.set()

    async def run(self) -> None:
        """Send queued patches until cancelled."""
        while True:
            await self._wanted.wait()
            self._wanted.clear()
            patch, self._pending = self._pending, {}
            if patch:
                await self._send(patch)

    async def flush(self, timeout_s: float = FLUSH_TIMEOUT_S) -> None:
        """Send what is still queued, once, giving up after timeout_s."""
        if not self._pending:
            return
        patch, self._pending = self._pending, {}
        with contextlib.suppress(ConnectionError, TimeoutError, OSError):
            await asyncio.wait_for(self._connection.report(patch), timeout_s)

    async def _send(self, patch: dict[str, Any]) -> None:
        for delay in (*self._retry_delays_s, None):
            try:
                await self._connection.report(patch)
                return
            except (ConnectionError, TimeoutError, OSError) as error:
                if delay is None:
                    break
                _LOGGER.debug("Reporting failed (%s); retrying in %.0f s", error, delay)
                await asyncio.sleep(delay)
        # Kept for the next attempt; values queued meanwhile are newer and win.
        self._pending = {**patch, **self._pending}
