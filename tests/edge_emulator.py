"""Emulate IoT Edge, edgeHub over mosquitto and the workload API, for the real SDK."""

import asyncio
import base64
import copy
import hashlib
import hmac
import itertools
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import paho.mqtt.client as mqtt
import pytest
from aiohttp import web

TLS_PORT = 8883  # The SDK always connects to edgeHub on 8883; it cannot be changed.
API_VERSION = "2019-01-30"
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
WAIT_TIMEOUT_S = 5.0
HARNESS_CLIENT_ID = "edgehub-emulator"
# Explicit topics: a bare "#" does not match topics that start with "$".
EDGEHUB_TOPICS = (
    "$iothub/twin/GET/#",
    "$iothub/twin/PATCH/properties/reported/#",
    "devices/+/modules/+/messages/events/#",
    "$iothub/methods/res/#",
)
SYSTEM_PROPERTIES = {
    "$.on": "output_name",
    "$.mid": "message_id",
    "$.cid": "correlation_id",
    "$.ct": "content_type",
    "$.ce": "content_encoding",
}
MAX_UNIX_SOCKET_PATH_BYTES = 107
OPENSSL_CONFIG = """\
[req]
distinguished_name = dn
[dn]
[ca_ext]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[server_ext]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = {san}
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
"""

_LOGGER = logging.getLogger(__name__)
_T = TypeVar("_T")


class EdgeTimeoutError(AssertionError):
    """A wait on the emulated edge ran out of time."""


@dataclass(frozen=True)
class OutputMessage:
    """One message a module sent upstream through the emulated edgeHub."""

    module_id: str
    body: bytes
    output_name: str | None = None
    message_id: str | None = None
    correlation_id: str | None = None
    content_type: str | None = None
    content_encoding: str | None = None
    properties: dict[str, str] = field(default_factory=dict)

    def json(self) -> Any:
        """Decode the body as JSON."""
        return json.loads(self.body)


def mosquitto_path() -> str | None:
    """Find the mosquitto broker, which Debian installs outside a user's PATH."""
    if os.access("/usr/sbin/mosquitto", os.X_OK):
        return "/usr/sbin/mosquitto"
    return shutil.which("mosquitto")


def missing_tools() -> list[str]:
    """List the programs the emulator needs but cannot find."""
    missing = [] if mosquitto_path() else ["mosquitto"]
    return missing + ([] if shutil.which("openssl") else ["openssl"])


def require_tools(missing: list[str], environ: Mapping[str, str]) -> None:
    """Skip without the emulator's tools, or fail on CI, which must never skip."""
    if not missing:
        return
    reason = f"the IoT Edge emulator needs {' and '.join(missing)} (apt-get install)"
    if environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason}; CI must not skip these tests")
    pytest.skip(reason)


@pytest.fixture
def edge_emulator(tmp_path: Path) -> Iterator["EdgeEmulator"]:
    """Yield a started emulated IoT Edge and stop it afterwards."""
    require_tools(missing_tools(), os.environ)
    with EdgeEmulator(tmp_path, random_loopback_address()) as emulator:
        yield emulator


def random_loopback_address() -> str:
    """Return an address in 127.0.0.0/8, so test runs side by side never share 8883."""
    second, third, fourth = (secrets.randbelow(254) + 1 for _ in range(3))
    return f"127.{second}.{third}.{fourth}"


class EdgeEmulator:
    """Stand in for edgeHub and the workload API so the real SDK can connect."""

    def __init__(
        self,
        directory: Path,
        address: str = "127.0.0.1",
        *,
        device_id: str = "emulated-device",
        module_id: str = "customvision",
        hub_hostname: str = "emulated-hub.azure-devices.net",
    ) -> None:
        self.directory = Path(directory)
        self.address = address
        self.device_id = device_id
        self.module_id = module_id
        self.hub_hostname = hub_hostname
        self.generation_id = secrets.token_hex(8)
        # The SDK checks the gateway name against the certificate's SAN.
        self.gateway_hostname = "localhost" if address == "127.0.0.1" else address
        self.workload_socket = self.directory / "workload.sock"

        self._changed = threading.Condition()
        self._desired: dict[str, Any] = {}
        self._desired_version = 1
        self._reported: dict[str, Any] = {}
        self._reported_version = 1
        self._reported_patches: list[dict[str, Any]] = []
        self._twin_gets = 0
        self._outputs: list[OutputMessage] = []
        self._method_responses: dict[str, tuple[int, Any]] = {}
        self._method_ids = itertools.count(1)
        self._errors: list[str] = []
        self._subscribe_mid: int | None = None
        self._sessions = 0

        self._broker: _Broker | None = None
        self._workload: _WorkloadApi | None = None
        self._client: mqtt.Client | None = None

    def __enter__(self) -> "EdgeEmulator":
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self, timeout: float = START_TIMEOUT_S) -> None:
        """Make certificates, then start the workload API, mosquitto and edgeHub."""
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop the harness client, the broker and the workload API."""
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()
            self._client = None
        if self._broker is not None:
            self._broker.stop()
            self._broker = None
        if self._workload is not None:
            self._workload.stop()
            self._workload = None

    def restart_broker(self, timeout: float = START_TIMEOUT_S) -> None:
        """Restart mosquitto on the same ports and persistence, as an outage would."""
        assert self._broker is not None, "the emulator is not started"
        self._broker.stop()
        with self._changed:
            sessions = self._sessions
        self._broker.start()
        self._wait_broker_ready(sessions, timeout)

    def env(self) -> dict[str, str]:
        """Return the IOTEDGE_* variables edgeAgent would give the module."""
        return {
            "IOTEDGE_IOTHUBHOSTNAME": self.hub_hostname,
            "IOTEDGE_DEVICEID": self.device_id,
            "IOTEDGE_MODULEID": self.module_id,
            "IOTEDGE_GATEWAYHOSTNAME": self.gateway_hostname,
            "IOTEDGE_MODULEGENERATIONID": self.generation_id,
            "IOTEDGE_WORKLOADURI": f"unix://{self.workload_socket}",
            "IOTEDGE_APIVERSION": API_VERSION,
        }

    @property
    def desired(self) -> dict[str, Any]:
        """Return a copy of the desired properties, with their $version."""
        with self._changed:
            return self._desired_doc()

    @property
    def reported(self) -> dict[str, Any]:
        """Return a copy of the reported properties, with their $version."""
        with self._changed:
            return self._reported_doc()

    @property
    def reported_patches(self) -> list[dict[str, Any]]:
        """Return every reported patch the module sent, oldest first."""
        with self._changed:
            return copy.deepcopy(self._reported_patches)

    @property
    def twin_gets(self) -> int:
        """Return how many full twin reads were answered."""
        with self._changed:
            return self._twin_gets

    @property
    def errors(self) -> list[str]:
        """Return what the harness could not understand from the module."""
        with self._changed:
            return list(self._errors)

    def set_desired(self, doc: dict[str, Any]) -> None:
        """Replace the desired properties without telling the module."""
        with self._changed:
            self._desired = copy.deepcopy(doc)
            self._desired_version += 1

    def patch_desired(
        self, patch: dict[str, Any], timeout: float = WAIT_TIMEOUT_S
    ) -> int:
        """Merge a patch into the desired properties, push it, return its version."""
        with self._changed:
            self._desired_version += 1
            version = self._desired_version
            _merge_patch(self._desired, patch)
            # The SDK drops a desired patch whose body lacks "$version".
            body = json.dumps({**patch, "$version": version}).encode()
            topic = f"$iothub/twin/PATCH/properties/desired/?$version={version}"
            # Queued under the lock, like twin replies, so the two keep their order.
            sent = self._enqueue(topic, body)
        _await_ack(sent, topic, timeout)
        return version

    def send_input(
        self,
        input_name: str,
        body: bytes,
        properties: dict[str, str] | None = None,
        message_id: str | None = None,
        correlation_id: str | None = None,
        content_type: str | None = None,
        timeout: float = WAIT_TIMEOUT_S,
    ) -> None:
        """Deliver a message to one of the module's inputs, as a route would."""
        system = {"$.mid": message_id, "$.cid": correlation_id, "$.ct": content_type}
        pairs = [(key, value) for key, value in system.items() if value is not None]
        pairs += sorted((properties or {}).items())
        query = urllib.parse.urlencode(pairs, quote_via=urllib.parse.quote)
        name = urllib.parse.quote(input_name, safe="")
        base = f"devices/{self.device_id}/modules/{self.module_id}"
        self._publish(f"{base}/inputs/{name}/{query}", body, timeout)

    def outputs(self, name: str | None = None) -> list[OutputMessage]:
        """Return the upstream messages seen so far, optionally of one output."""
        with self._changed:
            return [out for out in self._outputs if _named(out, name)]

    def wait_outputs(
        self,
        count: int,
        name: str | None = None,
        predicate: Callable[[OutputMessage], bool] | None = None,
        timeout: float = WAIT_TIMEOUT_S,
    ) -> list[OutputMessage]:
        """Wait until at least count matching upstream messages arrived; return all."""

        def matching() -> list[OutputMessage] | None:
            found = [
                out
                for out in self._outputs
                if _named(out, name) and (predicate is None or predicate(out))
            ]
            return found if len(found) >= count else None

        what = f"{count} upstream message(s) on output {name!r} matching {predicate}"
        return self._wait(what, matching, self._describe_outputs, timeout)

    def wait_reported(
        self,
        predicate: Callable[[dict[str, Any]], bool],
        timeout: float = WAIT_TIMEOUT_S,
    ) -> dict[str, Any]:
        """Wait until the reported properties satisfy predicate; return them."""

        def satisfied() -> dict[str, Any] | None:
            doc = self._reported_doc()
            return doc if predicate(doc) else None

        def seen() -> str:
            return f"reported {self._reported_doc()}, patches {self._reported_patches}"

        return self._wait(
            f"reported properties matching {predicate}", satisfied, seen, timeout
        )

    def wait_twin_gets(self, count: int, timeout: float = WAIT_TIMEOUT_S) -> int:
        """Wait until at least count full twin reads were answered; return the count."""

        def enough() -> int | None:
            return self._twin_gets if self._twin_gets >= count else None

        def seen() -> str:
            return f"{self._twin_gets} twin read(s)"

        return self._wait(f"{count} twin read(s) by the module", enough, seen, timeout)

    def wait_connected(self, timeout: float = WAIT_TIMEOUT_S) -> None:
        """Wait until the module connected, which its first twin read proves."""
        self.wait_twin_gets(1, timeout)

    def invoke_method(
        self, name: str, payload: Any = None, timeout: float = WAIT_TIMEOUT_S
    ) -> tuple[int, Any]:
        """Call a direct method on the module; return its status and payload."""
        with self._changed:
            rid = str(next(self._method_ids))
        quoted = urllib.parse.quote(name, safe="")
        topic = f"$iothub/methods/POST/{quoted}/?$rid={rid}"
        self._publish(topic, json.dumps(payload).encode(), timeout)

        def answered() -> tuple[int, Any] | None:
            return self._method_responses.get(rid)

        def seen() -> str:
            return f"responses to $rid {sorted(self._method_responses)}"

        what = f"a response to method {name!r} ($rid={rid})"
        response = self._wait(what, answered, seen, timeout)
        with self._changed:
            del self._method_responses[rid]
        return response

    def _start(self, timeout: float) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        paths = _make_certificates(self.directory, self.address)
        self._workload = _WorkloadApi(
            self.workload_socket,
            paths.ca_cert.read_text(),
            self.module_id,
            self.generation_id,
        )
        self._workload.start(timeout)

        harness_port = _free_port(self.address)
        self._broker = _Broker(
            self.directory, self.address, harness_port, paths, self._on_broker_exit
        )
        self._broker.start()
        self._client = self._make_client()
        self._client.connect_async(self.address, harness_port)
        self._client.loop_start()
        self._wait_broker_ready(0, timeout)

    def _make_client(self) -> mqtt.Client:
        client = mqtt.Client(client_id=HARNESS_CLIENT_ID, clean_session=False)
        # Reconnect quickly after restart_broker; the paho default waits up to 120 s.
        client.reconnect_delay_set(min_delay=0.05, max_delay=0.25)
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        return client

    def _wait_broker_ready(self, sessions: int, timeout: float) -> None:
        assert self._broker is not None

        def ready() -> bool | None:
            return self._sessions > sessions or self._broker.exited() or None

        self._wait(
            "the harness to subscribe on mosquitto", ready, self._broker.log, timeout
        )
        if self._broker.exited():
            raise RuntimeError(
                f"mosquitto exited; is {self.address}:{TLS_PORT} taken by another"
                f" emulator or test run? {self._broker.log()}"
            )
        _check_tls(self.address, self.gateway_hostname, self._broker.paths.ca_cert)

    def _wait(
        self,
        what: str,
        ready: Callable[[], _T | None],
        seen: Callable[[], str],
        timeout: float,
    ) -> _T:
        with self._changed:
            # Test for None, not truth: a wait may legitimately yield 0 or [].
            if self._changed.wait_for(lambda: ready() is not None, timeout):
                return ready()  # type: ignore[return-value]
            errors = f"; harness errors: {self._errors}" if self._errors else ""
            raise EdgeTimeoutError(
                f"waited {timeout} s for {what}; saw {seen()}{errors}"
            )

    def _publish(self, topic: str, payload: bytes, timeout: float) -> None:
        _await_ack(self._enqueue(topic, payload), topic, timeout)

    def _enqueue(self, topic: str, payload: bytes) -> mqtt.MQTTMessageInfo:
        assert self._client is not None, "the emulator is not started"
        return self._client.publish(topic, payload, qos=1)

    def _on_broker_exit(self) -> None:
        with self._changed:
            self._changed.notify_all()

    def _on_connect(
        self, client: mqtt.Client, userdata: object, flags: dict[str, int], rc: int
    ) -> None:
        if rc != mqtt.CONNACK_ACCEPTED:
            _LOGGER.warning("Harness refused by mosquitto: %s", mqtt.connack_string(rc))
            return
        # Subscribe again even with a restored session: a fresh broker has none.
        _, mid = client.subscribe([(topic, 1) for topic in EDGEHUB_TOPICS])
        with self._changed:
            self._subscribe_mid = mid

    def _on_subscribe(
        self, client: mqtt.Client, userdata: object, mid: int, granted: tuple[int, ...]
    ) -> None:
        with self._changed:
            if mid != self._subscribe_mid:
                return
            if 0x80 in granted:
                self._errors.append(f"mosquitto refused a subscription: {granted}")
            self._sessions += 1
            self._changed.notify_all()

    def _on_message(
        self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage
    ) -> None:
        # paho's network thread dies on an exception, so keep it alive and report.
        try:
            self._dispatch(message.topic, message.payload)
        except Exception as error:
            _LOGGER.exception("Harness could not handle %s", message.topic)
            with self._changed:
                self._errors.append(f"{message.topic}: {error!r}")
                self._changed.notify_all()

    def _dispatch(self, topic: str, payload: bytes) -> None:
        if topic.startswith("$iothub/twin/GET/"):
            self._answer_twin_get(_topic_query(topic)["$rid"])
        elif topic.startswith("$iothub/twin/PATCH/properties/reported/"):
            self._apply_reported(_topic_query(topic)["$rid"], json.loads(payload))
        elif topic.startswith("$iothub/methods/res/"):
            self._record_method_response(topic, payload)
        elif "/messages/events/" in topic:
            self._record_output(_parse_output(topic, payload))
        else:
            raise ValueError("unexpected topic")

    def _answer_twin_get(self, rid: str) -> None:
        with self._changed:
            twin = {"desired": self._desired_doc(), "reported": self._reported_doc()}
            # Reply under the lock: a desired patch queued after this snapshot
            # must reach the module after it, or the SDK would go back a version.
            self._reply_twin(f"200/?$rid={rid}", json.dumps(twin).encode())
            self._twin_gets += 1
            self._changed.notify_all()

    def _apply_reported(self, rid: str, patch: dict[str, Any]) -> None:
        with self._changed:
            _merge_patch(self._reported, patch)
            self._reported_version += 1
            version = self._reported_version
            self._reported_patches.append(patch)
            self._changed.notify_all()
        self._reply_twin(f"204/?$rid={rid}&$version={version}", b"")

    def _reply_twin(self, status_and_query: str, body: bytes) -> None:
        # No waiting for the PUBACK here: this runs on paho's own network thread.
        self._enqueue(f"$iothub/twin/res/{status_and_query}", body)

    def _record_method_response(self, topic: str, payload: bytes) -> None:
        status = int(topic.split("/")[3])
        body = json.loads(payload) if payload else None
        with self._changed:
            self._method_responses[_topic_query(topic)["$rid"]] = (status, body)
            self._changed.notify_all()

    def _record_output(self, output: OutputMessage) -> None:
        with self._changed:
            self._outputs.append(output)
            self._changed.notify_all()

    def _desired_doc(self) -> dict[str, Any]:
        return {**copy.deepcopy(self._desired), "$version": self._desired_version}

    def _reported_doc(self) -> dict[str, Any]:
        return {**copy.deepcopy(self._reported), "$version": self._reported_version}

    def _describe_outputs(self) -> str:
        summaries = [
            f"{out.output_name!r}: {out.body[:120]!r}" for out in self._outputs[-10:]
        ]
        return f"{len(self._outputs)} upstream message(s), last ones {summaries}"


@dataclass(frozen=True)
class _CertificatePaths:
    ca_cert: Path
    server_cert: Path
    server_key: Path


class _Broker:
    """Run mosquitto as a child process with its own configuration."""

    def __init__(
        self,
        directory: Path,
        address: str,
        harness_port: int,
        paths: _CertificatePaths,
        on_exit: Callable[[], None],
    ) -> None:
        self.paths = paths
        self._config = directory / "mosquitto.conf"
        self._log = directory / "mosquitto.log"
        self._on_exit = on_exit
        self._process: subprocess.Popen[bytes] | None = None
        self._watcher: threading.Thread | None = None
        persistence = directory / "mosquitto-data"
        persistence.mkdir(exist_ok=True)
        self._config.write_text(
            _mosquitto_config(address, harness_port, paths, persistence)
        )

    def start(self) -> None:
        """Start mosquitto; readiness is for the caller to prove by connecting."""
        executable = mosquitto_path()
        if executable is None:
            raise RuntimeError("mosquitto is not installed")
        with self._log.open("ab") as log:
            self._process = subprocess.Popen(
                [executable, "-c", str(self._config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self._watcher = threading.Thread(
            target=self._watch, args=(self._process,), name="mosquitto", daemon=True
        )
        self._watcher.start()

    def stop(self) -> None:
        """Stop mosquitto with SIGTERM, which also saves its persistence file."""
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
        try:
            self._process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        if self._watcher is not None:
            self._watcher.join()
        self._process = None

    def exited(self) -> bool:
        """Tell whether the current mosquitto process has ended."""
        return self._process is None or self._process.poll() is not None

    def log(self) -> str:
        """Return the end of mosquitto's log."""
        text = self._log.read_text(errors="replace") if self._log.exists() else ""
        return "mosquitto log:\n" + text[-3000:]

    def _watch(self, process: "subprocess.Popen[bytes]") -> None:
        process.wait()
        self._on_exit()


class _WorkloadApi:
    """Serve the IoT Edge workload API on a unix socket from its own thread."""

    def __init__(
        self, socket_path: Path, ca_pem: str, module_id: str, generation_id: str
    ) -> None:
        if len(os.fsencode(socket_path)) > MAX_UNIX_SOCKET_PATH_BYTES:
            raise ValueError(f"unix socket path too long for Linux: {socket_path}")
        self._socket_path = socket_path
        self._ca_pem = ca_pem
        self._module_id = module_id
        self._generation_id = generation_id
        self._key = secrets.token_bytes(32)
        self._started = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._error: BaseException | None = None
        # The SDK calls this API synchronously and without a timeout, so it must
        # never share an event loop with a client that is being created.
        self._thread = threading.Thread(
            target=self._run, name="workload-api", daemon=True
        )

    def start(self, timeout: float) -> None:
        """Start serving and wait until the socket accepts connections."""
        self._thread.start()
        if not self._started.wait(timeout):
            raise EdgeTimeoutError(f"workload API did not start in {timeout} s")
        if self._error is not None:
            raise RuntimeError("workload API failed to start") from self._error

    def stop(self) -> None:
        """Stop serving and join the thread."""
        if self._loop is not None and self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
        if self._thread.is_alive():
            self._thread.join(STOP_TIMEOUT_S)

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as error:
            self._error = error
            self._started.set()

    async def _serve(self) -> None:
        # A socket file left by an earlier run would make the bind fail.
        self._socket_path.unlink(missing_ok=True)
        app = web.Application()
        app.router.add_get("/trust-bundle", self._trust_bundle)
        app.router.add_post("/modules/{module}/genid/{genid}/sign", self._sign)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            await web.UnixSite(runner, str(self._socket_path)).start()
            self._stopping = asyncio.Event()
            self._loop = asyncio.get_running_loop()
            self._started.set()
            await self._stopping.wait()
        finally:
            await runner.cleanup()

    async def _trust_bundle(self, request: web.Request) -> web.Response:
        return web.json_response({"certificate": self._ca_pem})

    async def _sign(self, request: web.Request) -> web.Response:
        if (request.match_info["module"], request.match_info["genid"]) != (
            self._module_id,
            self._generation_id,
        ):
            raise web.HTTPNotFound(text="unknown module or generation id")
        # The SDK sends JSON without a Content-Type, so request.json() is no use.
        body = json.loads(await request.read())
        digest = hmac.new(self._key, base64.b64decode(body["data"]), hashlib.sha256)
        return web.json_response({"digest": base64.b64encode(digest.digest()).decode()})


def _make_certificates(directory: Path, address: str) -> _CertificatePaths:
    san = "DNS:localhost,IP:127.0.0.1"
    if address != "127.0.0.1":
        san += f",IP:{address}"
    config = directory / "openssl.cnf"
    config.write_text(OPENSSL_CONFIG.format(san=san))
    paths = _CertificatePaths(
        directory / "ca.pem", directory / "server.pem", directory / "server.key"
    )
    ca_key, csr = directory / "ca.key", directory / "server.csr"
    new_ec_key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]
    _openssl(
        ["req", "-x509", *new_ec_key, "-nodes", "-days", "2", "-config", str(config)],
        ["-extensions", "ca_ext", "-subj", "/CN=IoT Edge emulator CA"],
        ["-keyout", str(ca_key), "-out", str(paths.ca_cert)],
    )
    _openssl(
        ["req", "-new", *new_ec_key, "-nodes", "-config", str(config)],
        ["-subj", "/CN=localhost", "-keyout", str(paths.server_key), "-out", str(csr)],
    )
    _openssl(
        ["x509", "-req", "-in", str(csr), "-days", "2", "-out", str(paths.server_cert)],
        ["-CA", str(paths.ca_cert), "-CAkey", str(ca_key), "-CAcreateserial"],
        ["-extfile", str(config), "-extensions", "server_ext"],
    )
    return paths


def _openssl(*argument_groups: list[str]) -> None:
    command = ["openssl", *itertools.chain.from_iterable(argument_groups)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr}")


def _mosquitto_config(
    address: str, harness_port: int, paths: _CertificatePaths, persistence: Path
) -> str:
    lines = [
        "per_listener_settings false",
        "allow_anonymous true",
        "persistence true",
        f"persistence_location {persistence}/",
        "log_dest stdout",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        f"listener {harness_port} {address}",
        f"listener {TLS_PORT} {address}",
        f"cafile {paths.ca_cert}",
        f"certfile {paths.server_cert}",
        f"keyfile {paths.server_key}",
        "tls_version tlsv1.2",
    ]
    # As root, mosquitto would switch to its own user and could not read the key.
    if os.geteuid() == 0:
        lines.insert(0, "user root")
    return "\n".join(lines) + "\n"


def _await_ack(sent: mqtt.MQTTMessageInfo, topic: str, timeout: float) -> None:
    sent.wait_for_publish(timeout)
    if not sent.is_published():
        raise EdgeTimeoutError(f"mosquitto did not acknowledge {topic} in {timeout} s")


def _free_port(address: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((address, 0))
        return int(probe.getsockname()[1])


def _check_tls(address: str, hostname: str, ca_cert: Path) -> None:
    context = ssl.create_default_context(cafile=str(ca_cert))
    with (
        socket.create_connection((address, TLS_PORT), timeout=WAIT_TIMEOUT_S) as raw,
        context.wrap_socket(raw, server_hostname=hostname),
    ):
        pass


def _merge_patch(target: dict[str, Any], patch: Mapping[str, Any]) -> None:
    """Apply a JSON merge patch in place: null deletes, objects merge."""
    for key, value in patch.items():
        if key == "$version":
            continue
        if value is None:
            target.pop(key, None)
        elif isinstance(value, Mapping):
            child = target.get(key)
            if not isinstance(child, dict):
                child = target[key] = {}
            _merge_patch(child, value)
        else:
            target[key] = copy.deepcopy(value)


def _topic_query(topic: str) -> dict[str, str]:
    return _parse_properties(topic.partition("?")[2])


def _parse_properties(encoded: str) -> dict[str, str]:
    # Split by hand: parse_qs would turn "+" into a space, which the SDK does not.
    properties = {}
    for pair in filter(None, encoded.split("&")):
        key, _, value = pair.partition("=")
        properties[urllib.parse.unquote(key)] = urllib.parse.unquote(value)
    return properties


def _parse_output(topic: str, payload: bytes) -> OutputMessage:
    base, _, encoded = topic.partition("/messages/events/")
    properties = _parse_properties(encoded)
    system = {
        name: properties.pop(key)
        for key, name in SYSTEM_PROPERTIES.items()
        if key in properties
    }
    return OutputMessage(
        module_id=base.split("/")[3], body=payload, properties=properties, **system
    )


def _named(output: OutputMessage, name: str | None) -> bool:
    return name is None or output.output_name == name
