"""Camera sources: snapshot URLs polled and MJPEG streams read, newest frame only.

Each enabled source runs two tasks joined by a one-frame mailbox: a fetcher that
takes frames at the source's pace and a scorer that hands them on. A frame the
scorer has not taken yet is replaced by the next one and counted as dropped, so a
slow scorer costs frames, never memory, and never slows the camera down.
"""

import asyncio
import hashlib
import logging
import math
import random
import re
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote, urlsplit

import aiohttp
from aiohttp import hdrs

from .errors import BadSettingError, FetchError
from .urls import host_of, redact

MAX_SOURCES = 16
MAX_NAME_CHARS = 64
MIN_INTERVAL_S = 0.05
MAX_INTERVAL_S = 86_400.0
MAX_FPS = 20.0
DEFAULT_INTERVAL_S = 1.0
FETCH_TIMEOUT_S = 10.0
BACKOFF_BASE_S = 1.0
BACKOFF_MAX_S = 60.0
MAX_FRAME_BYTES = 16 * 1024 * 1024
MJPEG_TYPE = "multipart/x-mixed-replace"

_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_KEYS = frozenset({"url", "intervalS", "fps", "enabled", "skipIdentical"})
_CHUNK_BYTES = 64 * 1024
_MAX_LINE_BYTES = 8 * 1024
_MAX_PART_HEADERS = 32
_MAX_PREAMBLE_BYTES = 64 * 1024
_MAX_BACKOFF_DOUBLINGS = 62

FrameHandler = Callable[[str, bytes], Awaitable[None]]

_LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class SourceSpec:
    """One camera as the twin describes it."""

    name: str
    url: str = field(repr=False)  # may hold credentials
    interval_s: float
    enabled: bool = True
    skip_identical: bool = False


def parse_sources(value: Any) -> dict[str, SourceSpec]:
    """Validate the desired property `sources` into specs by name."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadSettingError(
            f"sources must be an object of named sources, not {_kind(value)}"
        )
    # A null entry is how a twin patch removes a key.
    entries = {name: spec for name, spec in value.items() if spec is not None}
    if len(entries) > MAX_SOURCES:
        raise BadSettingError(
            f"sources holds {len(entries)} sources; at most {MAX_SOURCES} are allowed"
        )
    return {name: _source(name, spec) for name, spec in entries.items()}


def backoff_delay(failures: int, base_s: float, max_s: float, jitter: float) -> float:
    """Return the pause after `failures` failures in a row, `jitter` being in [0, 1)."""
    doublings = min(max(failures - 1, 0), _MAX_BACKOFF_DOUBLINGS)
    return min(max_s, base_s * 2**doublings) * (0.5 + jitter / 2)


class SourceManager:
    """Run the configured sources and say how each one is doing."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        handle: FrameHandler,
        *,
        timeout_s: float = FETCH_TIMEOUT_S,
        backoff_base_s: float = BACKOFF_BASE_S,
        backoff_max_s: float = BACKOFF_MAX_S,
        max_frame_bytes: int = MAX_FRAME_BYTES,
        random: Callable[[], float] = random.random,
    ) -> None:
        self._session = session
        self._handle = handle
        self._options = _Options(
            timeout_s, backoff_base_s, backoff_max_s, max_frame_bytes, random
        )
        self._running: dict[str, _Source] = {}
        self._disabled: dict[str, SourceSpec] = {}
        self._stopping: set[asyncio.Task[None]] = set()
        self._closed = False

    def apply(self, specs: Mapping[str, SourceSpec]) -> None:
        """Start added sources, restart changed ones, stop removed and disabled ones."""
        if self._closed:
            _LOGGER.debug("Sources are closed; new source settings are ignored")
            return
        for name, source in list(self._running.items()):
            if specs.get(name) != source.spec:
                self._stop(name)
        self._disabled = {
            name: spec for name, spec in specs.items() if not spec.enabled
        }
        for name, spec in specs.items():
            if spec.enabled and name not in self._running:
                self._start(spec)

    def states(self) -> dict[str, dict[str, Any]]:
        """Return each source's state and counts, ready for reported properties."""
        states = {
            name: _state_json(spec, _Health(state="disabled"))
            for name, spec in self._disabled.items()
        }
        for name, source in self._running.items():
            states[name] = _state_json(source.spec, source.health)
        return dict(sorted(states.items()))

    async def close(self) -> None:
        """Stop every source and wait until its tasks and responses are closed."""
        self._closed = True
        for name in list(self._running):
            self._stop(name)
        self._disabled = {}
        await asyncio.gather(*self._stopping, return_exceptions=True)

    def _start(self, spec: SourceSpec) -> None:
        source = _Source(spec, self._session, self._handle, self._options)
        source.start()
        self._running[spec.name] = source
        _LOGGER.info(
            "Source %s started: %s, a frame every %g s",
            spec.name,
            redact(spec.url),
            spec.interval_s,
        )

    def _stop(self, name: str) -> None:
        source = self._running.pop(name)
        for task in source.tasks:
            task.cancel()
            self._stopping.add(task)
            task.add_done_callback(self._stopping.discard)
        _LOGGER.info("Source %s stopped", name)


@dataclass(frozen=True)
class _Options:
    timeout_s: float
    backoff_base_s: float
    backoff_max_s: float
    max_frame_bytes: int
    random: Callable[[], float]


@dataclass
class _Health:
    """What states() shows of one source, kept current as it runs."""

    state: str = "starting"
    failing_since: datetime | None = None
    failing_since_s: float = 0.0  # monotonic, for the length of the outage
    last_error: str | None = None
    frames: int = 0
    dropped: int = 0
    skipped: int = 0
    failed: int = 0
    last_frame_at: datetime | None = None
    failures_in_a_row: int = 0


class _Mailbox:
    """Hold the newest frame only; a frame not taken in time is replaced."""

    def __init__(self) -> None:
        self._frame: bytes | None = None
        self._filled = asyncio.Event()

    def put(self, frame: bytes) -> bool:
        """Leave a frame; say whether it replaced one that was never taken."""
        replaced = self._frame is not None
        self._frame = frame
        self._filled.set()
        return replaced

    async def take(self) -> bytes:
        """Wait for a frame and empty the mailbox."""
        while self._frame is None:
            self._filled.clear()
            await self._filled.wait()
        frame, self._frame = self._frame, None
        return frame


class _Source:
    """One enabled source: a fetcher task and a scorer task joined by a mailbox."""

    def __init__(
        self,
        spec: SourceSpec,
        session: aiohttp.ClientSession,
        handle: FrameHandler,
        options: _Options,
    ) -> None:
        self.spec = spec
        self.health = _Health()
        self.tasks: tuple[asyncio.Task[None], ...] = ()
        self._session = session
        self._handle = handle
        self._options = options
        self._timeouts = aiohttp.ClientTimeout(
            total=None, connect=options.timeout_s, sock_read=options.timeout_s
        )
        self._mailbox = _Mailbox()
        self._due_s = -math.inf
        self._last_digest: bytes | None = None
        self._handler_failing = False

    def start(self) -> None:
        """Start the fetcher and the scorer."""
        name = self.spec.name
        self.tasks = (
            _spawn(self._fetch_forever(), f"source-{name}-fetcher"),
            _spawn(self._score_forever(), f"source-{name}-scorer"),
        )

    async def _fetch_forever(self) -> None:
        interval_s = self.spec.interval_s
        while True:
            started = time.monotonic()
            try:
                await self._fetch()
                pause_s = 0.0
            except FetchError as error:
                pause_s = self._failed(str(error))
            # Paced from start to start, so a slow answer does not stretch the
            # interval, and a failing camera is never asked more often than a
            # working one.
            await asyncio.sleep(max(pause_s, started + interval_s - time.monotonic()))

    async def _fetch(self) -> None:
        url = self.spec.url
        # The total deadline is lifted once the answer turns out to be a stream,
        # which only a response's Content-Type tells.
        deadline = asyncio.timeout(self._options.timeout_s)
        try:
            async with (
                deadline,
                self._session.get(
                    url, timeout=self._timeouts, allow_redirects=False
                ) as response,
            ):
                await self._read(response, deadline)
        except (aiohttp.ClientError, TimeoutError, OSError) as error:
            raise FetchError(_describe(error, url, self._options.timeout_s)) from error

    async def _read(
        self, response: aiohttp.ClientResponse, deadline: asyncio.Timeout
    ) -> None:
        if response.status != 200:
            raise FetchError(f"HTTP {response.status} {response.reason or ''}".strip())
        limit = self._options.max_frame_bytes
        boundary = _stream_boundary(response.headers.get(hdrs.CONTENT_TYPE, ""))
        if boundary is None:
            frame = await _read_snapshot(response, limit)
            self._succeeded()
            self._offer(frame)
            return

        deadline.reschedule(None)  # the sock_read timeout bounds each silence
        parts = _PartReader(response.content, boundary, limit)
        while True:
            frame = await parts.next_part()
            self._succeeded()
            self._pace(frame)

    def _pace(self, frame: bytes) -> None:
        now = time.monotonic()
        if now < self._due_s:
            self.health.skipped += 1
            return
        # Due times stay on a grid while frames keep up: a camera sending at the
        # asked rate, with jitter, would otherwise lose every other frame.
        interval_s = self.spec.interval_s
        on_time = now - self._due_s < interval_s
        self._due_s = self._due_s + interval_s if on_time else now + interval_s
        self._offer(frame)

    def _offer(self, frame: bytes) -> None:
        if self.spec.skip_identical and self._repeats(frame):
            self.health.skipped += 1
            return
        if self._mailbox.put(frame):
            self.health.dropped += 1
        self.health.frames += 1
        self.health.last_frame_at = datetime.now(UTC)

    def _repeats(self, frame: bytes) -> bool:
        digest = hashlib.blake2b(frame, digest_size=16).digest()
        repeated = digest == self._last_digest
        self._last_digest = digest
        return repeated

    def _succeeded(self) -> None:
        health = self.health
        if health.failing_since is not None:
            _LOGGER.info(
                "Source %s recovered after %.0f s",
                self.spec.name,
                time.monotonic() - health.failing_since_s,
            )
            health.failing_since = None
        health.failures_in_a_row = 0
        health.state = "ok"

    def _failed(self, error: str) -> float:
        health = self.health
        health.failed += 1
        health.failures_in_a_row += 1
        health.last_error = error
        health.state = "failing"
        if health.failing_since is None:
            health.failing_since = datetime.now(UTC)
            health.failing_since_s = time.monotonic()
            _LOGGER.warning("Source %s failing: %s", self.spec.name, error)
        else:
            _LOGGER.debug("Source %s still failing: %s", self.spec.name, error)

        options = self._options
        return backoff_delay(
            health.failures_in_a_row,
            options.backoff_base_s,
            options.backoff_max_s,
            options.random(),
        )

    async def _score_forever(self) -> None:
        name = self.spec.name
        while True:
            frame = await self._mailbox.take()
            try:
                await self._handle(name, frame)
            except Exception as error:
                self._handler_failed(error)
            else:
                self._handler_failing = False

    def _handler_failed(self, error: Exception) -> None:
        self.health.failed += 1
        if self._handler_failing:
            _LOGGER.debug(
                "Handling a frame from source %s failed again", self.spec.name
            )
            return
        self._handler_failing = True
        _LOGGER.warning(
            "Handling a frame from source %s failed", self.spec.name, exc_info=error
        )


class _PartReader:
    """Split a multipart/x-mixed-replace body into the bodies of its parts."""

    def __init__(
        self, content: aiohttp.StreamReader, boundary: str, limit: int
    ) -> None:
        self._content = content
        self._limit = limit
        token = boundary.encode("utf-8", "surrogateescape")
        # Some cameras put the leading dashes into the boundary parameter already;
        # the form the first delimiter line takes is kept for the whole stream.
        self._candidates = (b"--" + token, token)
        self._delimiter: bytes | None = None
        self._delimiter_due = True
        self._buffer = bytearray()

    async def next_part(self) -> bytes:
        """Return the next part's body; raise FetchError when the stream ends."""
        if self._delimiter_due:
            await self._skip_to_delimiter()
        length = await self._content_length()
        if length is None:
            assert self._delimiter is not None
            body = await self._until(b"\n" + self._delimiter, self._limit, "a frame")
            await self._finish_delimiter_line()
            self._delimiter_due = False
            return body.removesuffix(b"\r")

        if length > self._limit:
            raise _too_large("a frame", self._limit)
        body = await self._exactly(length)
        # The delimiter after it is read with the next part: cameras send it only
        # when that part is ready, and this frame should not wait for it.
        self._delimiter_due = True
        return body

    async def _skip_to_delimiter(self) -> None:
        skipped = 0
        while skipped <= _MAX_PREAMBLE_BYTES:
            line = await self._line()
            skipped += len(line) + 1
            for delimiter in self._expected():
                if line == delimiter + b"--":
                    raise _stream_ended()
                if line == delimiter:
                    self._delimiter = delimiter
                    return
        raise FetchError("the MJPEG stream holds no part delimiter")

    def _expected(self) -> tuple[bytes, ...]:
        return self._candidates if self._delimiter is None else (self._delimiter,)

    async def _finish_delimiter_line(self) -> None:
        if (await self._line()).startswith(b"--"):
            raise _stream_ended()

    async def _content_length(self) -> int | None:
        length = None
        for _ in range(_MAX_PART_HEADERS):
            line = await self._line()
            if not line:
                return length
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = _part_length(value.strip())
        raise FetchError(f"an MJPEG part has over {_MAX_PART_HEADERS} header lines")

    async def _line(self) -> bytes:
        line = await self._until(b"\n", _MAX_LINE_BYTES, "an MJPEG header line")
        return line.strip()

    async def _until(self, delimiter: bytes, limit: int, what: str) -> bytes:
        searched = 0
        while (end := self._buffer.find(delimiter, searched)) < 0:
            if len(self._buffer) > limit:
                raise _too_large(what, limit)
            # Resume where a delimiter split across two chunks could start.
            searched = max(0, len(self._buffer) - len(delimiter) + 1)
            await self._fill()
        if end > limit:
            raise _too_large(what, limit)
        data = bytes(self._buffer[:end])
        del self._buffer[: end + len(delimiter)]
        return data

    async def _exactly(self, size: int) -> bytes:
        while len(self._buffer) < size:
            await self._fill()
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    async def _fill(self) -> None:
        chunk = await self._content.readany()
        if not chunk:
            raise _stream_ended()
        self._buffer += chunk


def _source(name: Any, spec: Any) -> SourceSpec:
    if (
        not isinstance(name, str)
        or len(name) > MAX_NAME_CHARS
        or not _NAME.fullmatch(name)
    ):
        shown = name[: MAX_NAME_CHARS + 1] if isinstance(name, str) else name
        raise BadSettingError(
            f"source name {shown!r} must be 1 to {MAX_NAME_CHARS} letters, digits,"
            " '-', '_' or '.'"
        )
    where = f"sources.{name}"
    if not isinstance(spec, dict):
        raise BadSettingError(f"{where} must be an object, not {_kind(spec)}")
    unknown = spec.keys() - _KEYS
    if unknown:
        raise BadSettingError(
            f"{where} has unknown keys: {', '.join(sorted(map(str, unknown)))}"
        )

    given = {key: value for key, value in spec.items() if value is not None}
    return SourceSpec(
        name,
        _url(where, given.get("url")),
        _interval(where, given),
        enabled=_flag(where, "enabled", given.get("enabled", True)),
        skip_identical=_flag(where, "skipIdentical", given.get("skipIdentical", False)),
    )


def _url(where: str, url: Any) -> str:
    if url is None:
        raise BadSettingError(f"{where} needs a url")
    if not isinstance(url, str):
        raise BadSettingError(f"{where}.url must be a string, not {_kind(url)}")
    try:
        host_of(url)
    except FetchError as error:
        raise BadSettingError(f"{where}.url: {error}") from error
    return url


def _interval(where: str, spec: Mapping[str, Any]) -> float:
    if "intervalS" in spec and "fps" in spec:
        raise BadSettingError(f"{where} must give intervalS or fps, not both")
    if "fps" in spec:
        fps = _number(where, "fps", spec["fps"])
        if not 0 < fps <= MAX_FPS:
            raise BadSettingError(
                f"{where}.fps must be above 0 and at most {MAX_FPS:g}"
            )
        return 1.0 / float(fps)
    if "intervalS" in spec:
        interval_s = _number(where, "intervalS", spec["intervalS"])
        if not MIN_INTERVAL_S <= interval_s <= MAX_INTERVAL_S:
            raise BadSettingError(
                f"{where}.intervalS must be between {MIN_INTERVAL_S:g}"
                f" and {MAX_INTERVAL_S:g} seconds"
            )
        return float(interval_s)
    return DEFAULT_INTERVAL_S


def _number(where: str, key: str, value: Any) -> int | float:
    # Left unconverted until range-checked: JSON may hold an int too large for a
    # float, and NaN fails every comparison.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadSettingError(f"{where}.{key} must be a number, not {_kind(value)}")
    return value


def _flag(where: str, key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise BadSettingError(f"{where}.{key} must be true or false, not {value!r}")
    return value


def _spawn(coroutine: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
    task = asyncio.create_task(coroutine, name=name)
    task.add_done_callback(_log_crash)
    return task


def _log_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and (error := task.exception()) is not None:
        _LOGGER.error("Task %s stopped", task.get_name(), exc_info=error)


async def _read_snapshot(response: aiohttp.ClientResponse, limit: int) -> bytes:
    if (response.content_length or 0) > limit:
        raise _too_large("the snapshot", limit)
    body = bytearray()
    async for chunk in response.content.iter_chunked(_CHUNK_BYTES):
        body += chunk
        if len(body) > limit:
            raise _too_large("the snapshot", limit)
    return bytes(body)


def _stream_boundary(content_type: str) -> str | None:
    """Return the boundary of an MJPEG stream, or None for any other content."""
    mime, _, parameters = content_type.partition(";")
    if mime.strip().lower() != MJPEG_TYPE:
        return None
    for parameter in parameters.split(";"):
        key, _, value = parameter.partition("=")
        boundary = value.strip().strip('"')
        if key.strip().lower() == "boundary" and boundary:
            return boundary
    raise FetchError(f"a {MJPEG_TYPE} response without a boundary")


def _part_length(value: bytes) -> int:
    if not value.isdigit():
        raise FetchError(f"an MJPEG part has a bad Content-Length: {value[:20]!r}")
    return int(value)


def _describe(error: Exception, url: str, timeout_s: float) -> str:
    if isinstance(error, aiohttp.ClientResponseError):
        # Its text holds the whole request URL, credentials and query included.
        text = f"{type(error).__name__}: {error.status} {error.message}"
    elif isinstance(error, TimeoutError) and not str(error):
        text = f"no answer within {timeout_s:g} s"
    else:
        text = str(error) or type(error).__name__
    return _scrub(text, url)


def _scrub(text: str, url: str) -> str:
    """Remove from a library's message whatever of the URL must stay secret."""
    text = text.replace(url, redact(url))
    parts = urlsplit(url)
    secrets = {parts.query, parts.password or ""}
    secrets |= {unquote(secret) for secret in secrets}
    for secret in sorted(filter(None, secrets), key=len, reverse=True):
        text = text.replace(secret, "…")
    return text


def _too_large(what: str, limit: int) -> FetchError:
    return FetchError(f"{what} is larger than {limit} bytes", reason="too-large")


def _stream_ended() -> FetchError:
    return FetchError("the MJPEG stream ended")


def _state_json(spec: SourceSpec, health: _Health) -> dict[str, Any]:
    return {
        "state": health.state,
        "url": redact(spec.url),
        "failingSince": _iso(health.failing_since),
        "lastError": health.last_error,
        "frames": health.frames,
        "dropped": health.dropped,
        "skipped": health.skipped,
        "failed": health.failed,
        "lastFrameAt": _iso(health.last_frame_at),
    }


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat(timespec="milliseconds")


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__
