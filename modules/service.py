"""The running module: inputs queued, scored and published; settings in the twin."""

import asyncio
import base64
import binascii
import contextlib
import json
import logging
from datetime import UTC, datetime
from typing import Any

import aiohttp

from .connection import Callbacks, Connection, MethodResult
from .download import DownloadPolicy
from .errors import BadRequestError, BadSettingError, ScorerError, http_status
from .http_api import HttpApi
from .inputs import (
    InputMessage,
    describe_reference,
    fetch_allowed_url,
    is_reference,
    parse_reference,
    read_allowed_file,
)
from .metrics import render_metrics
from .model import ScoreOptions
from .reporter import Reporter
from .results import result_document
from .rollout import MODEL_PROPERTY, Rollout
from .scorer import Scorer
from .settings import (
    ACCEPTED,
    FAILED,
    REJECTED,
    Ack,
    DesiredState,
    Settings,
    apply_setting,
)
from .sources import SourceManager, parse_sources
from .store import ModelStore, StoredModel
from .telemetry import OutputMessage, Telemetry
from .urls import redact_url_field

IMAGES_INPUT = "images"
SOURCES_PROPERTY = "sources"
MAX_WARNED_CAUSES = 1024
CAMERA_INPUT = "camera"
QUEUE_SIZE = 32
DRAIN_TIMEOUT_S = 5.0
# Reported counts and source states: often enough to watch, rare enough for quotas.
STATS_INTERVAL_S = 60.0
SEND_RETRY_S = (0.5, 1.0, 2.0, 5.0, 10.0)

_UNCHANGED = object()

_LOGGER = logging.getLogger(__name__)


class Service:
    """Run the pipeline: source, decode, score, telemetry, connection."""

    def __init__(
        self,
        connection: Connection,
        scorer: Scorer,
        *,
        workers: int = 1,
        queue_size: int = QUEUE_SIZE,
        store: ModelStore | None = None,
        stored_model: StoredModel | None = None,
        download_policy: DownloadPolicy | None = None,
        http_port: int | None = None,
    ) -> None:
        self._connection = connection
        self._scorer = scorer
        self._store = store
        self._stored_model = stored_model
        self._download_policy = download_policy
        self._rollout: Rollout | None = None
        self._http_api = (
            HttpApi(self, port=http_port) if http_port is not None else None
        )
        self._telemetry = Telemetry()
        self._rejections = _Rejections()
        self._settings = Settings()
        self._desired = DesiredState()
        self._queue: asyncio.Queue[InputMessage] = asyncio.Queue(queue_size)
        self._workers = workers
        self._tasks: set[asyncio.Task[None]] = set()
        self._reporter = Reporter(connection)
        self._accepting = False
        self._connected = False
        self._started_at = datetime.now(UTC).isoformat(timespec="seconds")
        self._http: aiohttp.ClientSession | None = None
        self._sources: SourceManager | None = None
        self.ready = asyncio.Event()  # set once connected and taking inputs

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until stop is set, then finish or reject queued work and disconnect."""
        self._http = aiohttp.ClientSession()
        self._sources = SourceManager(self._http, self.handle_frame)
        if self._store is not None:
            self._rollout = Rollout(
                self._scorer,
                self._store,
                self._http,
                self.report,
                self._download_policy,
            )
            await self._rollout.start(self._stored_model)
        try:
            for index in range(self._workers):
                self._spawn(self._work(), f"scoring-worker-{index}")
            self._spawn(self._reporter.run(), "twin-reporter")
            self._spawn(self._stats_loop(), "stats-reporter")
            self._accepting = True
            await self._start_http_api()
            if await self._start_connection(stop):
                self.ready.set()
                self.report({"status": "ready", **self._state()})
                _LOGGER.info("Ready: scoring input %r", IMAGES_INPUT)
                await stop.wait()
            _LOGGER.info("Stopping")
            await self._drain()
        finally:
            self._accepting = False
            await self._sources.close()
            if self._http_api is not None:
                await self._http_api.close()
            if self._rollout is not None:
                await self._rollout.close()
            await self._cancel_tasks()
            await self._connection.close()
            await self._http.close()

    async def _start_http_api(self) -> None:
        if self._http_api is None:
            return
        try:
            await self._http_api.start()
        except OSError as error:
            # Scoring inputs and cameras matters more than the API: go on without it.
            _LOGGER.error("The HTTP API cannot listen: %s; running without it", error)
            await self._http_api.close()
            self._http_api = None

    async def _start_connection(self, stop: asyncio.Event) -> bool:
        """Start the connection unless stop comes first; say whether it started."""
        starting = asyncio.create_task(self._connection.start(self._callbacks()))
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if starting.done():
            starting.result()
            return True
        starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)
        return False

    def _callbacks(self) -> Callbacks:
        return Callbacks(
            on_message=self.submit,
            on_desired=self.apply_desired,
            on_method=self.call_method,
            on_connection=self._on_connection,
        )

    async def submit(self, message: InputMessage) -> None:
        """Queue an input message, waiting while the queue is full."""
        if not self._accepting:
            error = ScorerError("the module is shutting down", reason="shutting-down")
            await self._publish_error(error, message, None)
            return
        await self._queue.put(message)

    def apply_desired(self, document: dict[str, Any], full: bool) -> None:
        """Apply what changed in a desired document and acknowledge each property."""
        version, changes = self._desired.changes(document, full=full)
        model = changes.pop(MODEL_PROPERTY, _UNCHANGED)
        acks: dict[str, Any] = {}
        for name, value in changes.items():
            if name == SOURCES_PROPERTY:
                ack = self._apply_sources(value, version)
            else:
                self._settings, ack = apply_setting(
                    self._settings, name, value, version
                )
            acks[name] = ack.to_json()
            _log_ack(name, ack)
        if acks:
            self.report(acks)
        # After the other settings: a patch may allow a host and name a model on it.
        if model is not _UNCHANGED:
            self._request_model(model, version)

    async def call_method(self, name: str, payload: Any) -> MethodResult:
        """Answer a direct method."""
        if name == "status":
            return 200, self.status()
        if name == "score":
            return await self._score_method(payload)
        if name == "rollback" and self._rollout is not None:
            return await self._rollout.rollback()
        return 404, {"reason": "unknown-method", "detail": f"no method named {name}"}

    def status(self) -> dict[str, Any]:
        """Return the module's state, as the reported properties show it."""
        return {"status": "ready" if self._accepting else "stopping", **self._state()}

    async def handle_frame(self, name: str, frame: bytes) -> None:
        """Score a frame a camera source took, like an input message from it."""
        await self.handle(InputMessage(CAMERA_INPUT, frame, {"source": name}))

    def _apply_sources(self, value: Any, version: int | None) -> Ack:
        shown = _redacted_sources(value)
        try:
            specs = parse_sources(value)
        except BadSettingError as error:
            return Ack(shown, REJECTED, version, f"{error}; the previous sources stay")
        if self._sources is None:
            return Ack(shown, REJECTED, version, "sources cannot run yet")
        self._sources.apply(specs)
        running = sum(spec.enabled for spec in specs.values())
        return Ack(
            shown, ACCEPTED, version, f"{running} of {len(specs)} sources running"
        )

    def _request_model(self, value: Any, version: int | None) -> None:
        if self._rollout is None:
            detail = "the model store is unusable (see the module's log); no rollout"
            ack = Ack(redact_url_field(value), FAILED, version, detail)
            self.report({MODEL_PROPERTY: ack.to_json()})
            return
        self._rollout.request(value, version, self._settings)

    async def score_image(
        self,
        data: bytes,
        *,
        threshold: float | None,
        max_predictions: int | None,
        origin: dict[str, Any],
    ) -> dict[str, Any]:
        """Score image bytes for the HTTP API, publishing the result if set to."""
        if not self._accepting:
            raise ScorerError("the module is shutting down", reason="shutting-down")
        settings = self._settings
        options = ScoreOptions(
            settings.threshold if threshold is None else threshold,
            settings.max_predictions if max_predictions is None else max_predictions,
            settings.tags,
        )
        scored, identity = await self._scorer.score(data, options)
        document = result_document(scored, identity, origin, project=settings.project)
        if settings.http_results:
            output = self._telemetry.result(
                dict(document), settings, source=origin.get("http"), correlation_id=None
            )
            if output is not None:
                await self._send(output)
        return document

    async def fetch_image(self, url: str) -> bytes:
        """Fetch an image from a host in allowedHosts."""
        assert self._http is not None
        try:
            return await fetch_allowed_url(
                self._http, url, self._settings.allowed_hosts
            )
        except ScorerError:
            self._scorer.reject()
            raise

    def health(self) -> tuple[bool, str]:
        """Say whether the module can score now, and if not, why."""
        identity = self._scorer.identity
        if not self._accepting:
            return False, "the module is starting or stopping"
        if identity is None:
            return False, "no model is loaded; roll one out through the twin"
        return True, f"serving {identity.flavor.value} {identity.sha256[:12]}"

    def metrics_text(self) -> str:
        """Return the Prometheus exposition of the module's counters and latencies."""
        sources = self._sources.states() if self._sources else {}
        return render_metrics(
            self._scorer, self._telemetry, self._queue.qsize(), sources
        )

    def report(self, patch: dict[str, Any]) -> None:
        """Queue a reported-properties patch; the reporter sends and retries it."""
        self._reporter.report(patch)

    async def handle(self, message: InputMessage) -> OutputMessage | None:
        """Score one input message and publish its result or its error."""
        source = message.properties.get("source") or message.properties.get("camera")
        try:
            data, origin = await self._image_of(message)
            source = origin.pop("source", None) or source
            options = self._options()
            scored, identity = await self._scorer.score(data, options)
        except ScorerError as error:
            await self._publish_error(error, message, source)
            return None
        self._rejections.recovered(source or message.input_name)
        origin.update(self._forwarded(message, source))
        document = result_document(
            scored,
            identity,
            origin,
            project=self._settings.project,
        )
        output = self._telemetry.result(
            document,
            self._settings,
            source=source,
            correlation_id=message.correlation_id or message.message_id,
        )
        if output is not None:
            await self._send(output)
        return output

    async def _work(self) -> None:
        while True:
            message = await self._queue.get()
            try:
                await self.handle(message)
            except Exception:
                _LOGGER.exception("Unexpected failure handling a message")
            finally:
                self._queue.task_done()

    async def _image_of(self, message: InputMessage) -> tuple[bytes, dict[str, Any]]:
        origin: dict[str, Any] = {"input": message.input_name}
        if not is_reference(message):
            return message.body, origin
        try:
            reference = parse_reference(message.body)
            origin.update(describe_reference(reference))
            if reference.source:
                origin["source"] = reference.source
            if reference.path is not None:
                data = await read_allowed_file(
                    reference.path, self._settings.allowed_paths
                )
            else:
                assert reference.url is not None and self._http is not None
                data = await fetch_allowed_url(
                    self._http, reference.url, self._settings.allowed_hosts
                )
        except ScorerError:
            self._scorer.reject()
            raise
        return data, origin

    def _options(self) -> ScoreOptions:
        settings = self._settings
        return ScoreOptions(settings.threshold, settings.max_predictions, settings.tags)

    def _forwarded(self, message: InputMessage, source: str | None) -> dict[str, Any]:
        chosen = {
            name: message.properties[name]
            for name in self._settings.forward_properties
            if name in message.properties
        }
        ids = {"messageId": message.message_id, "correlationId": message.correlation_id}
        forwarded: dict[str, Any] = {k: v for k, v in ids.items() if v is not None}
        if source:
            forwarded["name"] = source
        if chosen:
            forwarded["properties"] = chosen
        return forwarded

    async def _publish_error(
        self, error: ScorerError, message: InputMessage, source: str | None
    ) -> None:
        self._rejections.log(source or message.input_name, error)
        output = self._telemetry.error(
            error,
            source=source,
            message_id=message.message_id,
            correlation_id=message.correlation_id,
        )
        await self._send(output)

    async def _send(self, output: OutputMessage) -> None:
        for attempt, delay in enumerate((*SEND_RETRY_S, None)):
            try:
                await self._connection.send(output)
                return
            except (ConnectionError, TimeoutError, OSError) as error:
                if delay is None:
                    _LOGGER.error(
                        "Dropped a %s message after %d tries: %s",
                        output.output,
                        attempt + 1,
                        error,
                    )
                    return
                _LOGGER.debug("Sending failed (%s); retrying in %.1f s", error, delay)
                await asyncio.sleep(delay)

    async def _score_method(self, payload: Any) -> MethodResult:
        try:
            message = _method_message(payload)
            output = await self._score_for_method(message)
        except ScorerError as error:
            return http_status(error), {"reason": error.reason, "detail": str(error)}
        return 200, output

    async def _score_for_method(self, message: InputMessage) -> dict[str, Any]:
        data, origin = await self._image_of(message)
        scored, identity = await self._scorer.score(data, self._options())
        origin.pop("source", None)
        return result_document(
            scored,
            identity,
            {**origin, "input": "$method"},
            project=self._settings.project,
        )

    def _on_connection(self, connected: bool) -> None:
        if connected == self._connected:
            return
        self._connected = connected
        if connected:
            _LOGGER.info("Connection to edgeHub restored")
            self._reporter.wake()
        else:
            _LOGGER.warning("Connection to edgeHub lost; the SDK is reconnecting")

    async def _stats_loop(self) -> None:
        reported: dict[str, Any] = {}
        while True:
            await asyncio.sleep(STATS_INTERVAL_S)
            current = {
                "counts": self._counts(),
                "sourceStates": self._sources.states() if self._sources else {},
            }
            changed = {k: v for k, v in current.items() if v != reported.get(k)}
            if changed:
                self.report(changed)
                reported = current

    def _state(self) -> dict[str, Any]:
        identity = self._scorer.identity
        state = {
            "startedAt": self._started_at,
            "activeModel": identity.to_json() if identity else None,
            "counts": self._counts(),
            "sourceStates": self._sources.states() if self._sources else {},
        }
        if self._rollout is not None:
            state["activeModel"] = self._rollout.active_model()
            state["lastModelFailure"] = self._rollout.last_failure
        return state

    def _counts(self) -> dict[str, int]:
        counts = self._scorer.counts
        return {
            "scored": counts.scored,
            "rejected": counts.rejected,
            "failed": counts.failed,
            "suppressed": self._telemetry.suppressed,
        }

    async def _drain(self) -> None:
        self._accepting = False
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._queue.join(), DRAIN_TIMEOUT_S)
        while not self._queue.empty():
            message = self._queue.get_nowait()
            self._queue.task_done()
            error = ScorerError(
                "the module stopped before scoring it", reason="shutting-down"
            )
            await self._publish_error(error, message, None)
        await self._reporter.flush()

    def _spawn(self, coroutine: Any, name: str) -> None:
        task = asyncio.create_task(coroutine, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _cancel_tasks(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _method_message(payload: Any) -> InputMessage:
    if not isinstance(payload, dict):
        raise BadRequestError(
            'the payload must be {"image": base64} or {"path": ...} or {"url": ...}',
            reason="bad-request",
        )
    if "image" in payload:
        try:
            data = base64.b64decode(payload["image"], validate=True)
        except (binascii.Error, TypeError, ValueError) as error:
            raise BadRequestError(
                f"image is not base64: {error}", reason="bad-request"
            ) from error
        return InputMessage("$method", data)
    return InputMessage(
        "$method", json.dumps(payload).encode(), content_type="application/json"
    )


class _Rejections:
    """Log a rejected input at WARNING once per source and reason, until it recovers.

    A camera that keeps sending garbage would otherwise write a warning per frame;
    every rejection still goes to the errors output.
    """

    def __init__(self) -> None:
        self._warned: set[tuple[str, str]] = set()

    def log(self, origin: str, error: ScorerError) -> None:
        """Log one rejection."""
        key = (origin, error.reason)
        if key in self._warned:
            _LOGGER.debug("Rejected input from %s again: %s", origin, error)
            return
        if len(self._warned) >= MAX_WARNED_CAUSES:
            self._warned.clear()
        self._warned.add(key)
        _LOGGER.warning("Rejected input from %s: %s", origin, error)

    def recovered(self, origin: str) -> None:
        """Forget the warnings for an origin that sent a good input."""
        if self._warned:
            self._warned = {key for key in self._warned if key[0] != origin}


def _redacted_sources(value: Any) -> Any:
    if not isinstance(value, dict):
        return value
    return {name: redact_url_field(spec) for name, spec in value.items()}


def _log_ack(name: str, ack: Ack) -> None:
    if ack.code >= 400:
        _LOGGER.warning("Desired %s refused (%d): %s", name, ack.code, ack.description)
    else:
        _LOGGER.info("Desired %s %s (version %s)", name, ack.description, ack.version)
