"""Prove the IoT Edge emulator works with the real SDK in another process."""

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.edge_emulator import (
    EdgeEmulator,
    EdgeTimeoutError,
    OutputMessage,
    require_tools,
)

MODULE_READY_TIMEOUT_S = 10.0
MODULE_EXIT_TIMEOUT_S = 10.0
# The SDK's first reconnect comes 10 ms after a drop, then every
# connection_retry_interval seconds (10 by default); the script asks for 1.
RECONNECT_TIMEOUT_S = 8.0

SDK_CLIENT_SCRIPT = """\
import asyncio
import json
import signal

from azure.iot.device import Message, MethodResponse
from azure.iot.device.aio import IoTHubModuleClient


async def main() -> None:
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stopping.set)
    client = IoTHubModuleClient.create_from_edge_environment(
        connection_retry_interval=1
    )
    await client.connect()

    def on_patch(patch):
        visible = {k: v for k, v in patch.items() if not k.startswith("$")}
        report = {"desired_version": patch["$version"], "last_desired": visible}
        asyncio.run_coroutine_threadsafe(
            client.patch_twin_reported_properties(report), loop
        )

    def on_message(message):
        seen = {
            "input": message.input_name,
            "data": message.data.decode(),
            "message_id": message.message_id,
            "correlation_id": message.correlation_id,
            "content_type": message.content_type,
            "custom": message.custom_properties,
        }
        echo = Message(
            json.dumps(seen),
            message_id="echo-" + str(message.message_id),
            content_encoding="utf-8",
            content_type="application/json",
        )
        echo.correlation_id = message.message_id
        echo.custom_properties["echoed"] = "yes"
        asyncio.run_coroutine_threadsafe(
            client.send_message_to_output(echo, "echo"), loop
        )

    def on_method(request):
        if request.name == "ping":
            status, payload = 200, {"pong": request.payload}
        else:
            status, payload = 404, {"error": "no such method"}
        response = MethodResponse.create_from_method_request(request, status, payload)
        asyncio.run_coroutine_threadsafe(client.send_method_response(response), loop)

    client.on_twin_desired_properties_patch_received = on_patch
    client.on_message_received = on_message
    client.on_method_request_received = on_method
    twin = await client.get_twin()
    await client.patch_twin_reported_properties(
        {"ready": True, "desired_seen": twin["desired"]["$version"]}
    )
    await stopping.wait()
    await client.shutdown()


asyncio.run(main())
"""


@pytest.fixture
def sdk_module(edge_emulator: EdgeEmulator, tmp_path: Path) -> Iterator[EdgeEmulator]:
    """Run the SDK client script until it reports itself ready."""
    with _running_module(edge_emulator, tmp_path):
        edge_emulator.wait_reported(lambda r: r.get("ready"), MODULE_READY_TIMEOUT_S)
        yield edge_emulator


@contextlib.contextmanager
def _running_module(emulator: EdgeEmulator, directory: Path) -> Iterator[None]:
    """Run the SDK client script, then stop it with SIGTERM and demand exit code 0."""
    script = directory / "sdk_client.py"
    script.write_text(SDK_CLIENT_SCRIPT)
    # Output goes to the inherited descriptors, so pytest shows it on failure.
    process = subprocess.Popen(
        [sys.executable, str(script)], env={**os.environ, **emulator.env()}
    )
    try:
        yield
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(MODULE_EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    assert process.returncode == 0, f"SDK client exited with {process.returncode}"


def test_module_connects_and_reads_twin(
    edge_emulator: EdgeEmulator,
    tmp_path: Path,
) -> None:
    edge_emulator.set_desired({"threshold": 0.5})
    version = edge_emulator.desired["$version"]

    with _running_module(edge_emulator, tmp_path):
        edge_emulator.wait_connected(MODULE_READY_TIMEOUT_S)
        reported = edge_emulator.wait_reported(lambda r: r.get("ready"))

    assert reported["desired_seen"] == version
    assert edge_emulator.reported_patches[0] == {"ready": True, "desired_seen": version}
    assert edge_emulator.twin_gets >= 1
    assert edge_emulator.errors == []


def test_input_message_is_echoed_upstream(sdk_module: EdgeEmulator) -> None:
    properties = {"camera": "door", "path": "/frames/a b&c=d+e.jpg"}
    sdk_module.send_input(
        "images",
        b'{"frame": 1}',
        properties=properties,
        message_id="m-1",
        correlation_id="c-1",
        content_type="application/json",
    )

    [echo] = sdk_module.wait_outputs(1, name="echo")
    assert echo.json() == {
        "input": "images",
        "data": '{"frame": 1}',
        "message_id": "m-1",
        "correlation_id": "c-1",
        "content_type": "application/json",
        "custom": properties,
    }
    assert echo == OutputMessage(
        module_id=sdk_module.module_id,
        body=echo.body,
        output_name="echo",
        message_id="echo-m-1",
        correlation_id="m-1",
        content_type="application/json",
        content_encoding="utf-8",
        properties={"echoed": "yes"},
    )


def test_desired_patch_reaches_module(sdk_module: EdgeEmulator) -> None:
    version = sdk_module.patch_desired({"threshold": 0.8, "model": {"name": "a"}})

    reported = sdk_module.wait_reported(lambda r: r.get("desired_version") == version)
    assert reported["last_desired"] == {"threshold": 0.8, "model": {"name": "a"}}

    sdk_module.patch_desired({"threshold": None})
    assert sdk_module.desired == {"model": {"name": "a"}, "$version": version + 1}


def test_direct_method_round_trip(sdk_module: EdgeEmulator) -> None:
    assert sdk_module.invoke_method("ping", {"n": 1}) == (200, {"pong": {"n": 1}})
    assert sdk_module.invoke_method("reboot") == (404, {"error": "no such method"})


def test_broker_restart_catches_module_up(sdk_module: EdgeEmulator) -> None:
    twin_gets = sdk_module.twin_gets

    sdk_module.restart_broker()
    sdk_module.wait_twin_gets(twin_gets + 1, RECONNECT_TIMEOUT_S)
    version = sdk_module.patch_desired({"threshold": 0.9})
    sdk_module.send_input("images", b"after restart", message_id="m-2")

    sdk_module.wait_reported(lambda r: r.get("desired_version") == version)
    [echo] = sdk_module.wait_outputs(1, name="echo")
    assert echo.json()["data"] == "after restart"


def test_wait_timeout_says_what_was_seen(edge_emulator: EdgeEmulator) -> None:
    with pytest.raises(EdgeTimeoutError, match=r"output 'echo'.*saw 0 upstream"):
        edge_emulator.wait_outputs(1, name="echo", timeout=0.05)


@pytest.mark.parametrize(
    ("environ", "outcome"),
    [({}, pytest.skip.Exception), ({"CI": "true"}, pytest.fail.Exception)],
)
def test_missing_tools_skip_except_on_ci(
    environ: dict[str, str], outcome: type[BaseException]
) -> None:
    require_tools([], environ)
    with pytest.raises(outcome, match="mosquitto"):
        require_tools(["mosquitto"], environ)
