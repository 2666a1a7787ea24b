"""The connection inside IoT Edge: azure-iot-device's module client talking to edgeHub.

The SDK calls handlers on its own threads; every call is handed to the module's loop.
Order at start matters (connect, handlers, then a full twin read): a handler set
before the first connect can lose the twin for good. After a reconnect the module
reads the twin again, because IoT Hub keeps no patches for a disconnected module.
"""

import asyncio
import concurrent.futures
import itertools
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

from azure.iot.device import Message, MethodRequest, MethodResponse
from azure.iot.device.aio import IoTHubModuleClient
from azure.iot.device.exceptions import ClientError

from .connection import Callbacks
from .inputs import InputMessage
from .telemetry import OutputMessage

EDGE_VARIABLES = (
    "IOTEDGE_IOTHUBHOSTNAME",
    "IOTEDGE_DEVICEID",
    "IOTEDGE_MODULEID",
    "IOTEDGE_GATEWAYHOSTNAME",
    "IOTEDGE_MODULEGENERATIONID",
    "IOTEDGE_WORKLOADURI",
    "IOTEDGE_APIVERSION",
)
# How long an SDK thread waits for room in the module's queue before giving up.
HANDOFF_TIMEOUT_S = 60.0
CONNECT_RETRY_S = (1.0, 2.0, 5.0, 10.0, 30.0)

_LOGGER = logging.getLogger(__name__)


def inside_iot_edge() -> bool:
    """Say whether the IoT Edge runtime started this process."""
    return all(os.environ.get(name) for name in EDGE_VARIABLES)


class EdgeConnection:
    """Inputs, outputs, twin and direct methods through edgeHub."""

    def __init__(
        self,
        *,
        retry_interval_s: float = 5.0,
        factory: Callable[[], IoTHubModuleClient] | None = None,
    ) -> None:
        interval = max(1, round(retry_interval_s))
        self._factory = factory or (
            lambda: IoTHubModuleClient.create_from_edge_environment(
                connection_retry_interval=interval
            )
        )
        self._client: IoTHubModuleClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._callbacks: Callbacks | None = None
        self._twin_reads: set[asyncio.Task[None]] = set()

    async def start(self, callbacks: Callbacks) -> None:
        """Connect, subscribe to inputs, and apply the whole desired section."""
        self._loop = asyncio.get_running_loop()
        self._callbacks = callbacks
        client = await self._until_connected()
        _LOGGER.info("Connected to edgeHub")
        # Setting a handler subscribes and waits for it: keep that off the loop.
        await asyncio.to_thread(self._set_handlers, client)
        await self._read_twin()

    async def send(self, message: OutputMessage) -> None:
        """Send a message on an output."""
        outgoing = Message(
            message.body,
            message_id=message.message_id,
            content_encoding=message.content_encoding,
            content_type=message.content_type,
        )
        outgoing.custom_properties = dict(message.properties)
        if message.correlation_id:
            outgoing.correlation_id = message.correlation_id
        await self._call(lambda c: c.send_message_to_output(outgoing, message.output))

    async def report(self, patch: dict[str, Any]) -> None:
        """Patch the reported properties."""
        await self._call(lambda c: c.patch_twin_reported_properties(patch))

    async def close(self) -> None:
        """Disconnect and release the SDK's threads and sockets."""
        for task in self._twin_reads:
            task.cancel()
        if self._client is not None:
            try:
                await self._client.shutdown()
            except ClientError as error:
                _LOGGER.warning("Disconnecting from edgeHub failed: %s", error)
            _LOGGER.info("Disconnected from edgeHub")

    async def _until_connected(self) -> IoTHubModuleClient:
        """Create the client and connect, retrying while edgeHub is not up yet."""
        for attempt in itertools.count():
            try:
                if self._client is None:
                    # The workload API is called synchronously and without a timeout.
                    self._client = await asyncio.to_thread(self._factory)
                await self._client.connect()
                return self._client
            except (ClientError, OSError) as error:
                delay = CONNECT_RETRY_S[min(attempt, len(CONNECT_RETRY_S) - 1)]
                log = _LOGGER.warning if attempt == 0 else _LOGGER.debug
                log("Cannot reach edgeHub yet (%s); retrying every few seconds", error)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    def _set_handlers(self, client: IoTHubModuleClient) -> None:
        client.on_connection_state_change = self._on_connection_state_change
        client.on_twin_desired_properties_patch_received = self._on_desired_patch
        client.on_method_request_received = self._on_method_request
        client.on_message_received = self._on_message_received

    async def _read_twin(self) -> None:
        assert self._callbacks is not None
        twin = await self._call(lambda c: c.get_twin())
        self._callbacks.on_desired(dict(twin.get("desired", {})), True)

    async def _call(
        self, operation: Callable[[IoTHubModuleClient], Awaitable[Any]]
    ) -> Any:
        if self._client is None:
            raise ConnectionError("not connected to edgeHub yet")
        try:
            return await operation(self._client)
        except ClientError as error:
            raise ConnectionError(f"edgeHub: {error}") from error

    def _on_message_received(self, message: Message) -> None:
        assert self._callbacks is not None and self._loop is not None
        incoming = InputMessage(
            input_name=message.input_name or "",
            body=_as_bytes(message.data),
            properties=dict(message.custom_properties or {}),
            message_id=message.message_id,
            correlation_id=message.correlation_id,
            content_type=message.content_type,
        )
        handoff = asyncio.run_coroutine_threadsafe(
            self._callbacks.on_message(incoming), self._loop
        )
        try:
            # Waiting here is the back-pressure: edgeHub keeps what is not taken yet.
            handoff.result(HANDOFF_TIMEOUT_S)
        except concurrent.futures.TimeoutError:
            handoff.cancel()
            _LOGGER.error("Dropped an input message: the module is not taking any")

    def _on_desired_patch(self, patch: dict[str, Any]) -> None:
        assert self._callbacks is not None and self._loop is not None
        self._loop.call_soon_threadsafe(self._callbacks.on_desired, dict(patch), False)

    def _on_method_request(self, request: MethodRequest) -> None:
        assert self._loop is not None
        asyncio.run_coroutine_threadsafe(self._answer(request), self._loop)

    def _on_connection_state_change(self) -> None:
        assert self._loop is not None
        connected = bool(self._client and self._client.connected)
        self._loop.call_soon_threadsafe(self._connection_changed, connected)

    def _connection_changed(self, connected: bool) -> None:
        assert self._callbacks is not None
        self._callbacks.on_connection(connected)
        if connected:
            task = asyncio.create_task(self._reread_twin(), name="twin-reread")
            self._twin_reads.add(task)
            task.add_done_callback(self._twin_reads.discard)

    async def _reread_twin(self) -> None:
        try:
            await self._read_twin()
        except ConnectionError as error:
            _LOGGER.warning("Reading the twin after reconnecting failed: %s", error)

    async def _answer(self, request: MethodRequest) -> None:
        assert self._callbacks is not None
        try:
            status, payload = await self._callbacks.on_method(
                request.name, request.payload
            )
        except Exception:
            _LOGGER.exception("Direct method %s failed", request.name)
            status, payload = 500, {"reason": "method-failed"}
        response = MethodResponse.create_from_method_request(request, status, payload)
        try:
            await self._call(lambda c: c.send_method_response(response))
        except ConnectionError as error:
            _LOGGER.warning(
                "Could not answer direct method %s: %s", request.name, error
            )


def _as_bytes(data: Any) -> bytes:
    if isinstance(data, bytes | bytearray):
        return bytes(data)
    return str(data).encode("utf-8") if data is not None else b""
