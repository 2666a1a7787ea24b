"""What the module needs from its connection, inside IoT Edge or outside it."""

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from .inputs import InputMessage
from .telemetry import OutputMessage

MethodResult = tuple[int, Any]


@dataclass(frozen=True)
class Callbacks:
    """What a connection calls, always on the module's own event loop."""

    # Awaited for every input message; it waits while the module's queue is full.
    on_message: Callable[[InputMessage], Awaitable[None]]
    # A desired document: the whole desired section (full) or a patch.
    on_desired: Callable[[dict[str, Any], bool], None]
    on_method: Callable[[str, Any], Awaitable[MethodResult]]
    on_connection: Callable[[bool], None]


class Connection(Protocol):
    """A way to IoT Hub: edgeHub inside IoT Edge, or a local stand-in."""

    async def start(self, callbacks: Callbacks) -> None:
        """Connect, start delivering inputs, and hand over the whole desired section."""

    async def send(self, message: OutputMessage) -> None:
        """Send a message on one of the module's outputs."""

    async def report(self, patch: dict[str, Any]) -> None:
        """Patch the reported properties."""

    async def close(self) -> None:
        """Stop delivering inputs and disconnect."""
