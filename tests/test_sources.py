"""Camera sources: snapshots and MJPEG streams pulled from a real loopback camera."""

import asyncio
import base64
import contextlib
import dataclasses
import functools
import io
import json
import logging
import re
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from PIL import Image

from modules.errors import BadSettingError
from modules.sources import SourceManager, SourceSpec, backoff_delay, parse_sources

pytestmark = [pytest.mark.timeout(30), pytest.mark.usefixtures("loop_watchdog")]

INTERVAL_S = 0.02
STREAM_INTERVAL_S = 0.05
STREAM_PERIOD_S = 0.01
BURST_PARTS = 3
SHORT_TIMEOUT_S = 0.2
WAIT_S = 10.0
POLL_S = 0.005
GARBAGE = b"this is not an image at all"
USER, PASSWORD, TOKEN = "viewer", "pa55-s3cret", "t0ken-s3cret"
LOGGER = "modules.sources"
MANAGER_OPTIONS: dict[str, Any] = {
    "timeout_s": 2.0,
    "backoff_base_s": 0.01,
    "backoff_max_s": 0.1,
    "random": lambda: 1.0,
}


@functools.cache
def jpeg(number: int) -> bytes:
    """Encode a small JPEG unique to `number`, which its comment segment holds."""
    colour = (number * 40 % 256, number * 90 % 256, number * 150 % 256)
    buffer = io.BytesIO()
    image = Image.new("RGB", (16, 16), colour)
    image.save(buffer, format="JPEG", comment=f"frame {number}")
    return buffer.getvalue()


def number_of(frame: bytes) -> int:
    """Return the number a frame from jpeg() carries."""
    found = re.search(rb"frame (\d+)", frame)
    assert found is not None, f"not a numbered frame: {frame[:20]!r}"
    return int(found[1])


def part(frame: bytes, sized: bool) -> bytes:
    """Encode one part of a multipart/x-mixed-replace body."""
    length = b"Content-Length: %d\r\n" % len(frame) if sized else b""
    return (
        b"--frame\r\nContent-Type: image/jpeg\r\n" + length + b"\r\n" + frame + b"\r\n"
    )


@dataclass
class Camera:
    """A loopback camera whose behaviour the test switches while it runs."""

    mode: str = "ok"  # ok, fail, stall, garbage, repeat
    served: int = 0  # the number of the newest frame served
    requests: dict[str, int] = field(default_factory=dict)
    authorizations: list[str | None] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    port: int = 0

    def url(self, path: str = "/snapshot.jpg") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/snapshot.jpg", self._snapshot)
        app.router.add_get("/stream.mjpg", self._stream)
        return app

    def _count(self, request: web.Request) -> None:
        self.requests[request.path] = self.requests.get(request.path, 0) + 1
        self.authorizations.append(request.headers.get("Authorization"))

    def _next_frame(self) -> bytes:
        self.served += 1
        return jpeg(self.served)

    async def _snapshot(self, request: web.Request) -> web.Response:
        self._count(request)
        if self.mode == "fail":
            return web.Response(status=500, text="the sensor is gone")
        if self.mode == "stall":
            await self.release.wait()
        if self.mode == "garbage":
            return web.Response(body=GARBAGE, content_type="image/jpeg")
        frame = jpeg(0) if self.mode == "repeat" else self._next_frame()
        return web.Response(body=frame, content_type="image/jpeg")

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        """Stream bursts of parts: sized, burst, bursts, end and quirk say how."""
        self._count(request)
        # Some cameras write the delimiter's dashes into the boundary parameter.
        boundary = "--frame" if "quirk" in request.query else "frame"
        response = web.StreamResponse(
            headers={"Content-Type": f"multipart/x-mixed-replace; boundary={boundary}"}
        )
        await response.prepare(request)
        # The source hangs up mid-stream whenever it stops or restarts.
        with contextlib.suppress(ConnectionError):
            await self._send_parts(response, request.query)
        return response

    async def _send_parts(self, response: web.StreamResponse, query: Any) -> None:
        sized = query.get("sized") == "1"
        burst = int(query.get("burst", BURST_PARTS))
        bursts = int(query.get("bursts", "0"))
        sent = 0
        while not bursts or sent < bursts:
            parts = [part(self._next_frame(), sized) for _ in range(burst)]
            await response.write(b"".join(parts))
            sent += 1
            if self.mode == "stall":
                await self.release.wait()
                return
            await asyncio.sleep(STREAM_PERIOD_S)  # the camera's frame rate
        if query.get("end") == "cut":
            await response.write(b"--frame\r\nContent-Length: 900\r\n\r\n\xff\xd8")
        else:
            await response.write(b"--frame--\r\n")


class Recorder:
    """The frame handler under test: keeps what it is given; may hold or fail."""

    def __init__(
        self, gate: asyncio.Event | None = None, error: Exception | None = None
    ) -> None:
        self.frames: list[tuple[str, bytes]] = []
        self._gate = gate
        self._error = error
        self._arrived = asyncio.Condition()

    async def __call__(self, name: str, frame: bytes) -> None:
        async with self._arrived:
            self.frames.append((name, frame))
            self._arrived.notify_all()
        if self._gate is not None:
            await self._gate.wait()
        if self._error is not None:
            raise self._error

    def of(self, name: str = "door") -> list[bytes]:
        return [frame for source, frame in self.frames if source == name]

    async def wait_for(self, count: int, name: str = "door") -> list[bytes]:
        """Wait until `count` frames of a source arrived, and return them."""
        async with asyncio.timeout(WAIT_S), self._arrived:
            await self._arrived.wait_for(lambda: len(self.of(name)) >= count)
        return self.of(name)


ManagerFactory = Callable[..., SourceManager]


@pytest.fixture
async def camera() -> AsyncIterator[Camera]:
    """Serve the camera on 127.0.0.1; release whatever stalls at teardown."""
    stand_in = Camera()
    runner = web.AppRunner(stand_in.app(), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    stand_in.port = runner.addresses[0][1]
    try:
        yield stand_in
    finally:
        stand_in.release.set()
        await runner.cleanup()


@pytest.fixture
async def make_manager(camera: Camera) -> AsyncIterator[ManagerFactory]:
    """Return a factory of managers with test-sized delays, all closed at teardown."""
    managers: list[SourceManager] = []
    async with aiohttp.ClientSession() as session:

        def make(handle: Recorder, **options: Any) -> SourceManager:
            manager = SourceManager(session, handle, **{**MANAGER_OPTIONS, **options})
            managers.append(manager)
            return manager

        try:
            yield make
        finally:
            for manager in managers:
                await manager.close()


@pytest.fixture
def refused_port() -> Iterator[int]:
    """Hold a bound port that does not listen, so connecting to it is refused."""
    with socket.socket() as bound:
        bound.bind(("127.0.0.1", 0))
        yield bound.getsockname()[1]


def door(url: str, interval_s: float = INTERVAL_S, **options: Any) -> SourceSpec:
    return SourceSpec("door", url, interval_s, **options)


async def eventually(predicate: Callable[[], bool], what: str) -> None:
    """Poll until predicate holds; fail naming `what` if it never does."""
    try:
        async with asyncio.timeout(WAIT_S):
            # states() offers nothing to wait on; the deadline bounds the polling.
            while not predicate():  # noqa: ASYNC110
                await asyncio.sleep(POLL_S)
    except TimeoutError:
        pytest.fail(f"gave up waiting until {what}")


def source_tasks(name: str) -> set[asyncio.Task[Any]]:
    prefix = f"source-{name}-"
    return {t for t in asyncio.all_tasks() if t.get_name().startswith(prefix)}


def records(
    caplog: pytest.LogCaptureFixture, level: int, text: str
) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == LOGGER and r.levelno == level and text in r.getMessage()
    ]


async def test_snapshot_frames_reach_the_handler_in_order(
    camera: Camera, make_manager: ManagerFactory
) -> None:
    recorder = Recorder()
    manager = make_manager(recorder)

    manager.apply({"door": door(camera.url())})
    frames = await recorder.wait_for(5)
    state = manager.states()["door"]
    handled = len(recorder.of())

    numbers = [number_of(frame) for frame in frames]
    assert numbers[0] == 1
    assert numbers == sorted(set(numbers))
    assert state["state"] == "ok"
    assert state["failed"] == 0
    assert state["failingSince"] is None
    assert state["lastError"] is None
    assert datetime.fromisoformat(state["lastFrameAt"]).tzinfo == UTC
    # Every frame taken was handled, replaced, or is the one frame waiting.
    assert state["frames"] - state["dropped"] - handled in (0, 1)


async def test_slow_handler_drops_frames_and_then_gets_the_newest(
    camera: Camera, make_manager: ManagerFactory
) -> None:
    gate = asyncio.Event()
    recorder = Recorder(gate=gate)
    manager = make_manager(recorder)

    manager.apply({"door": door(camera.url())})
    [first] = await recorder.wait_for(1)
    await eventually(lambda: manager.states()["door"]["dropped"] >= 3, "3 drops")
    camera.mode = "fail"
    # The fetcher fetches one frame at a time, so once a failure is counted the
    # newest frame served is the one in the mailbox.
    await eventually(lambda: manager.states()["door"]["failed"] >= 1, "a failure")
    newest = camera.served
    gate.set()
    frames = await recorder.wait_for(2)
    state = manager.states()["door"]

    assert [number_of(frame) for frame in frames] == [number_of(first), newest]
    assert state["frames"] == newest
    assert state["dropped"] == newest - 2


@pytest.mark.parametrize(
    "query",
    ["sized=1", "sized=0", "sized=0&quirk=1"],
    ids=["content-length", "boundary-only", "dashed-boundary"],
)
async def test_mjpeg_frames_flow_over_one_connection(
    camera: Camera, make_manager: ManagerFactory, query: str
) -> None:
    recorder = Recorder()
    manager = make_manager(recorder)

    manager.apply({"door": door(camera.url(f"/stream.mjpg?{query}"), 0.05)})
    frames = await recorder.wait_for(4)
    state = manager.states()["door"]

    numbers = [number_of(frame) for frame in frames]
    assert numbers == sorted(set(numbers))
    assert frames[0] == jpeg(numbers[0])
    assert camera.requests == {"/stream.mjpg": 1}
    assert state["state"] == "ok"
    assert state["failed"] == 0
    # Each burst arrives at once, faster than the interval lets frames through.
    assert state["skipped"] > 0


@pytest.mark.parametrize("sized", ["1", "0"], ids=["content-length", "boundary-only"])
@pytest.mark.parametrize("end", ["clean", "cut"])
async def test_stream_that_ends_is_a_failure_and_reconnects(
    camera: Camera,
    make_manager: ManagerFactory,
    caplog: pytest.LogCaptureFixture,
    sized: str,
    end: str,
) -> None:
    recorder = Recorder()
    manager = make_manager(recorder)
    url = camera.url(f"/stream.mjpg?sized={sized}&bursts=1&end={end}")

    manager.apply({"door": door(url, STREAM_INTERVAL_S)})
    await eventually(lambda: manager.states()["door"]["failed"] >= 3, "3 failures")
    frames = recorder.of()
    state = manager.states()["door"]

    assert camera.requests["/stream.mjpg"] >= 3
    assert frames
    assert all(frame == jpeg(number_of(frame)) for frame in frames)
    assert state["lastError"] == "the MJPEG stream ended"
    assert records(caplog, logging.WARNING, "Source door failing")


async def test_failing_camera_warns_once_backs_off_and_recovers(
    camera: Camera, make_manager: ManagerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    recorder = Recorder()
    manager = make_manager(recorder)
    camera.mode = "fail"

    manager.apply({"door": door(camera.url())})
    await eventually(lambda: manager.states()["door"]["failed"] >= 4, "4 failures")
    failing = manager.states()["door"]
    camera.mode = "ok"
    await recorder.wait_for(1)
    recovered = manager.states()["door"]

    assert failing["state"] == "failing"
    assert failing["lastError"] == "HTTP 500 Internal Server Error"
    assert datetime.fromisoformat(failing["failingSince"]).tzinfo == UTC
    assert recovered["state"] == "ok"
    assert recovered["failingSince"] is None
    warnings = records(caplog, logging.WARNING, "")
    assert [r.getMessage() for r in warnings] == [
        "Source door failing: HTTP 500 Internal Server Error"
    ]
    assert len(records(caplog, logging.DEBUG, "Source door still failing")) >= 3
    [recovery] = records(caplog, logging.INFO, "recovered")
    assert re.fullmatch(r"Source door recovered after \d+ s", recovery.getMessage())


def test_backoff_doubles_up_to_its_ceiling_with_jitter() -> None:
    full = [backoff_delay(failures, 1.0, 60.0, 1.0) for failures in range(1, 9)]

    assert full == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]
    assert backoff_delay(3, 1.0, 60.0, 0.0) == 2.0
    assert 3.99 < backoff_delay(3, 1.0, 60.0, 0.999) < 4.0
    assert backoff_delay(100_000, 0.5, 30.0, 1.0) == 30.0


async def test_garbage_is_delivered_for_the_scorer_to_judge(
    camera: Camera, make_manager: ManagerFactory
) -> None:
    recorder = Recorder()
    manager = make_manager(recorder)
    camera.mode = "garbage"

    manager.apply({"door": door(camera.url())})
    frames = await recorder.wait_for(1)

    assert frames[0] == GARBAGE
    assert manager.states()["door"]["state"] == "ok"


async def test_identical_frames_are_skipped_when_asked(
    camera: Camera, make_manager: ManagerFactory
) -> None:
    recorder = Recorder()
    manager = make_manager(recorder)
    camera.mode = "repeat"

    manager.apply(
        {
            "door": door(camera.url(), skip_identical=True),
            "yard": SourceSpec("yard", camera.url(), INTERVAL_S),
        }
    )
    repeated = await recorder.wait_for(3, "yard")
    await eventually(lambda: manager.states()["door"]["skipped"] >= 3, "3 skips")
    skipping = manager.states()["door"]
    camera.mode = "ok"
    frames = await recorder.wait_for(2)

    assert skipping["frames"] == 1
    assert frames[0] == jpeg(0)
    assert number_of(frames[1]) > 0
    assert set(repeated) == {jpeg(0)}
    assert manager.states()["yard"]["skipped"] == 0


async def test_stalled_snapshot_times_out_as_a_failure(
    camera: Camera, make_manager: ManagerFactory
) -> None:
    manager = make_manager(Recorder(), timeout_s=SHORT_TIMEOUT_S)
    camera.mode = "stall"

    manager.apply({"door": door(camera.url())})
    await eventually(lambda: manager.states()["door"]["failed"] >= 2, "2 failures")
    state = manager.states()["door"]

    assert state["state"] == "failing"
    assert state["lastError"] == f"no answer within {SHORT_TIMEOUT_S:g} s"
    assert state["frames"] == 0


async def test_stalled_stream_times_out_and_reconnects(
    camera: Camera, make_manager: ManagerFactory
) -> None:
    recorder = Recorder()
    manager = make_manager(recorder, timeout_s=SHORT_TIMEOUT_S)
    camera.mode = "stall"

    manager.apply({"door": door(camera.url("/stream.mjpg"), STREAM_INTERVAL_S)})
    await eventually(lambda: manager.states()["door"]["failed"] >= 2, "2 failures")
    state = manager.states()["door"]

    assert camera.requests["/stream.mjpg"] >= 2
    assert len(recorder.of()) >= 1
    assert "Timeout" in state["lastError"]


async def test_sized_part_is_delivered_before_the_next_one_starts(
    camera: Camera, make_manager: ManagerFactory
) -> None:
    recorder = Recorder()
    manager = make_manager(recorder)
    camera.mode = "stall"  # one part, then silence

    manager.apply({"door": door(camera.url("/stream.mjpg?sized=1&burst=1"))})
    frames = await recorder.wait_for(1)

    assert frames == [jpeg(1)]
    assert manager.states()["door"]["failed"] == 0


@pytest.mark.parametrize(
    "path",
    ["/snapshot.jpg", "/stream.mjpg?sized=1", "/stream.mjpg?sized=0"],
    ids=["snapshot", "content-length", "boundary-only"],
)
async def test_frame_over_the_limit_is_a_failure(
    camera: Camera, make_manager: ManagerFactory, path: str
) -> None:
    recorder = Recorder()
    manager = make_manager(recorder, max_frame_bytes=100)

    manager.apply({"door": door(camera.url(path), STREAM_INTERVAL_S)})
    await eventually(lambda: manager.states()["door"]["failed"] >= 2, "2 failures")
    state = manager.states()["door"]

    assert "is larger than 100 bytes" in state["lastError"]
    assert state["frames"] == 0
    assert recorder.of() == []


async def test_handler_errors_are_counted_and_the_source_keeps_going(
    camera: Camera, make_manager: ManagerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    recorder = Recorder(error=RuntimeError("the model fell over"))
    manager = make_manager(recorder)

    manager.apply({"door": door(camera.url())})
    await recorder.wait_for(4)
    await eventually(lambda: manager.states()["door"]["failed"] >= 3, "3 failures")
    state = manager.states()["door"]

    assert state["state"] == "ok"
    [warning] = records(caplog, logging.WARNING, "")
    assert warning.getMessage() == "Handling a frame from source door failed"
    assert warning.exc_info is not None
    assert str(warning.exc_info[1]) == "the model fell over"


async def test_apply_adds_changes_removes_and_disables_live(
    camera: Camera, make_manager: ManagerFactory
) -> None:
    recorder = Recorder()
    manager = make_manager(recorder)
    front = door(camera.url())
    yard = SourceSpec("yard", camera.url(), INTERVAL_S)

    manager.apply({"door": front})
    await recorder.wait_for(2)
    manager.apply({"door": front, "yard": yard})
    await recorder.wait_for(2, "yard")
    door_tasks, before = source_tasks("door"), manager.states()["door"]
    manager.apply({"door": front, "yard": dataclasses.replace(yard, interval_s=0.03)})
    after = manager.states()

    assert after["door"] == before
    assert source_tasks("door") == door_tasks
    assert after["yard"]["state"] == "starting"
    assert after["yard"]["frames"] == 0

    manager.apply({"door": dataclasses.replace(front, enabled=False)})
    stopped = manager.states()
    await eventually(lambda: not source_tasks("door") | source_tasks("yard"), "stop")

    assert list(stopped) == ["door"]
    assert stopped["door"]["state"] == "disabled"
    assert stopped["door"]["frames"] == 0
    assert all(task.done() for task in door_tasks)

    manager.apply({"door": front})
    count = len(recorder.of())
    await recorder.wait_for(count + 1)

    assert manager.states()["door"]["state"] == "ok"


async def test_close_cancels_every_task_and_ignores_later_settings(
    camera: Camera, make_manager: ManagerFactory
) -> None:
    recorder = Recorder(gate=asyncio.Event())
    manager = make_manager(recorder)
    camera.mode = "stall"

    manager.apply(
        {
            "door": door(camera.url("/stream.mjpg"), STREAM_INTERVAL_S),
            "yard": SourceSpec("yard", camera.url(), INTERVAL_S),
        }
    )
    await recorder.wait_for(1)
    tasks = source_tasks("door") | source_tasks("yard")
    await manager.close()
    await manager.close()
    manager.apply({"door": door(camera.url())})

    assert len(tasks) == 4
    assert all(task.cancelled() for task in tasks)
    assert manager.states() == {}
    assert not source_tasks("door")


async def test_credentials_and_queries_never_show(
    camera: Camera,
    make_manager: ManagerFactory,
    caplog: pytest.LogCaptureFixture,
    refused_port: int,
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    recorder = Recorder()
    manager = make_manager(recorder)
    secret = f"http://{USER}:{PASSWORD}@127.0.0.1:{{}}/snapshot.jpg?token={TOKEN}"
    specs = parse_sources(
        {
            "door": {"url": secret.format(camera.port), "intervalS": STREAM_INTERVAL_S},
            "yard": {
                "url": secret.format(refused_port),
                "intervalS": STREAM_INTERVAL_S,
            },
        }
    )
    camera.mode = "fail"

    manager.apply(specs)
    await eventually(lambda: manager.states()["door"]["failed"] >= 2, "failures")
    await eventually(lambda: manager.states()["yard"]["failed"] >= 2, "refusals")
    camera.mode = "ok"
    await recorder.wait_for(1)
    states = manager.states()

    token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    assert camera.authorizations[-1] == f"Basic {token}"
    assert states["door"]["url"] == f"http://127.0.0.1:{camera.port}/snapshot.jpg?…"
    assert states["yard"]["lastError"]
    shown = json.dumps(states) + repr(specs) + caplog.text
    for hidden in (PASSWORD, TOKEN, USER):
        assert hidden not in shown


def test_sources_are_parsed_with_their_defaults() -> None:
    specs = parse_sources(
        {
            "door": {
                "url": "http://cam.local/snapshot.jpg",
                "intervalS": 2,
                "enabled": False,
                "skipIdentical": True,
            },
            "yard-2.east_side": {"url": "https://cam.local:8443/video", "fps": 5},
            "gate": {"url": "http://10.0.0.7/snap.jpg", "fps": None},
            "removed": None,
        }
    )

    assert specs == {
        "door": SourceSpec(
            "door", "http://cam.local/snapshot.jpg", 2.0, False, skip_identical=True
        ),
        "yard-2.east_side": SourceSpec(
            "yard-2.east_side", "https://cam.local:8443/video", 0.2
        ),
        "gate": SourceSpec("gate", "http://10.0.0.7/snap.jpg", 1.0),
    }
    assert parse_sources(None) == {}
    assert parse_sources({}) == {}
    assert parse_sources({"x": {"url": "http://c/", "fps": 20}})["x"].interval_s == 0.05


def _many(count: int) -> dict[str, Any]:
    return {f"cam{i}": {"url": "http://cam/"} for i in range(count)}


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ([], "sources must be an object of named sources, not list"),
        (_many(17), "sources holds 17 sources; at most 16 are allowed"),
        ({"": {"url": "http://c/"}}, "source name '' must be 1 to 64"),
        ({"a" * 65: {"url": "http://c/"}}, "source name 'aaaa"),
        ({"front door": {"url": "http://c/"}}, "source name 'front door' must be"),
        ({"a/b": {"url": "http://c/"}}, "source name 'a/b' must be"),
        ({"door": "http://c/"}, "sources.door must be an object, not str"),
        (
            {"door": {"url": "http://c/", "rate": 2}},
            "sources.door has unknown keys: rate",
        ),
        ({"door": {"fps": 2}}, "sources.door needs a url"),
        ({"door": {"url": 7}}, "sources.door.url must be a string, not int"),
        ({"door": {"url": "ftp://c/x.jpg"}}, "sources.door.url: only http and https"),
        ({"door": {"url": "http:///x.jpg"}}, "sources.door.url: only http and https"),
        ({"door": {"url": "http://c:99999/"}}, "sources.door.url: not a valid URL"),
        (
            {"door": {"url": "http://c/", "intervalS": 1, "fps": 1}},
            "sources.door must give intervalS or fps, not both",
        ),
        ({"door": {"url": "http://c/", "intervalS": 0.01}}, "sources.door.intervalS"),
        ({"door": {"url": "http://c/", "intervalS": 86401}}, "between 0.05 and 86400"),
        (
            {"door": {"url": "http://c/", "intervalS": 10**400}},
            "sources.door.intervalS",
        ),
        ({"door": {"url": "http://c/", "intervalS": "2"}}, "must be a number, not str"),
        ({"door": {"url": "http://c/", "fps": 0}}, "sources.door.fps must be above 0"),
        ({"door": {"url": "http://c/", "fps": 21}}, "and at most 20"),
        ({"door": {"url": "http://c/", "fps": float("nan")}}, "sources.door.fps"),
        ({"door": {"url": "http://c/", "fps": True}}, "must be a number, not bool"),
        ({"door": {"url": "http://c/", "enabled": "yes"}}, "enabled must be true or"),
        ({"door": {"url": "http://c/", "skipIdentical": 1}}, "skipIdentical must be"),
    ],
)
def test_bad_sources_are_refused_with_the_reason(value: Any, message: str) -> None:
    with pytest.raises(BadSettingError, match=re.escape(message)):
        parse_sources(value)


def test_refused_url_shows_no_secret() -> None:
    url = f"ftp://{USER}:{PASSWORD}@cam/snap.jpg?token={TOKEN}"

    with pytest.raises(BadSettingError) as caught:
        parse_sources({"door": {"url": url}})

    assert "ftp://cam/snap.jpg?…" in str(caught.value)
    assert PASSWORD not in str(caught.value)
    assert TOKEN not in str(caught.value)
