"""Input messages: references to files and URLs, read only where the settings allow."""

import asyncio
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import aiohttp
import pytest
from aiohttp import web

from modules.errors import BadRequestError, FetchError
from modules.inputs import (
    InputMessage,
    Reference,
    describe_reference,
    fetch_allowed_url,
    is_reference,
    parse_reference,
    read_allowed_file,
)
from modules.urls import check_allowed, redact
from tests import cvmodels

PNG = cvmodels.solid_image((0, 0, 255))
SMALL_LIMIT = 1024
SHORT_TIMEOUT_S = 0.3
SECRET = "sig=Zm9vYmFyc2VjcmV0"
SAS_QUERY = f"?sv=2024-01-01&se=2030-01-01&sp=r&{SECRET}"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class ImageServer:
    """A loopback HTTP server with one route per way a fetch can go."""

    release: asyncio.Event = field(default_factory=asyncio.Event)
    paths: list[str] = field(default_factory=list)
    port: int = 0

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._count])
        app.router.add_get("/image.png", self._image)
        app.router.add_get("/missing.png", self._missing)
        app.router.add_get("/moved.png", self._moved)
        app.router.add_get("/big.png", self._big)
        app.router.add_get("/streamed.png", self._streamed)
        app.router.add_get("/stalled.png", self._stalled)
        return app

    @web.middleware
    async def _count(
        self, request: web.Request, handler: Handler
    ) -> web.StreamResponse:
        self.paths.append(request.path)
        return await handler(request)

    async def _image(self, request: web.Request) -> web.Response:
        return web.Response(body=PNG, content_type="image/png")

    async def _missing(self, request: web.Request) -> web.Response:
        return web.Response(status=404, text="no such frame")

    async def _moved(self, request: web.Request) -> web.Response:
        raise web.HTTPFound("/image.png")

    async def _big(self, request: web.Request) -> web.Response:
        return web.Response(body=b"\0" * (SMALL_LIMIT + 1), content_type="image/png")

    async def _streamed(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "image/png"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        for _ in range(4):
            await response.write(b"\0" * (SMALL_LIMIT // 2))
        await response.write_eof()
        return response

    async def _stalled(self, request: web.Request) -> web.Response:
        await self.release.wait()
        return web.Response(body=PNG, content_type="image/png")


@pytest.fixture
async def server() -> AsyncIterator[ImageServer]:
    """Serve images on 127.0.0.1 and count the requests that reach the server."""
    image_server = ImageServer()
    runner = web.AppRunner(image_server.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    image_server.port = runner.addresses[0][1]
    try:
        yield image_server
    finally:
        image_server.release.set()
        await runner.cleanup()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


@pytest.fixture
def refused_port() -> Iterator[int]:
    """Hold a bound port that does not listen, so connecting to it is refused."""
    with socket.socket() as bound:
        bound.bind(("127.0.0.1", 0))
        yield bound.getsockname()[1]


@pytest.mark.parametrize(
    ("content_type", "body", "expected"),
    [
        (None, b'{"path": "/frames/1.jpg"}', True),
        (None, b'  \n{"url": "http://cam/1.jpg"}', True),
        (None, b'"/frames/1.jpg"', True),
        ("application/json; charset=utf-8", b"/frames/1.jpg", True),
        ("text/json", b"", True),
        (None, PNG, False),
        ("image/png", PNG, False),
        ("image/jpeg", b"\xff\xd8\xff\xe0", False),
    ],
)
def test_is_reference(content_type: str | None, body: bytes, expected: bool) -> None:
    message = InputMessage("images", body, content_type=content_type)

    assert is_reference(message) is expected


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"path": "/frames/1.jpg"}', Reference(path="/frames/1.jpg")),
        (
            b'{"url": "http://cam/snap.jpg", "source": "door"}',
            Reference(url="http://cam/snap.jpg", source="door"),
        ),
        (
            b'{"path": "/frames/2.jpg", "source": 7}',
            Reference(path="/frames/2.jpg"),
        ),
    ],
)
def test_parse_reference(body: bytes, expected: Reference) -> None:
    assert parse_reference(body) == expected


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b'{"path": ', "bad-json"),
        (b"\xff\xfe{}", "bad-json"),
        (b"[]", "bad-reference"),
        (b'"/frames/1.jpg"', "bad-reference"),
        (b"{}", "bad-reference"),
        (b'{"source": "door"}', "bad-reference"),
        (b'{"path": "/frames/1.jpg", "url": "http://cam/1.jpg"}', "bad-reference"),
        (b'{"path": 5}', "bad-reference"),
        (b'{"url": null}', "bad-reference"),
    ],
)
def test_bad_reference_is_refused(body: bytes, reason: str) -> None:
    with pytest.raises(BadRequestError) as caught:
        parse_reference(body)

    assert caught.value.reason == reason


def test_described_reference_hides_the_query() -> None:
    url = f"http://cam:8080/snap.jpg{SAS_QUERY}"

    described = describe_reference(Reference(url=url))

    assert described == {"url": "http://cam:8080/snap.jpg?…"}
    assert describe_reference(Reference(path="/frames/1.jpg")) == {
        "path": "/frames/1.jpg"
    }


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    """Return an allowed folder and a folder beside it, each holding an image."""
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    for folder in (allowed, outside):
        folder.mkdir()
        (folder / "frame.png").write_bytes(PNG)
    return allowed, outside


async def test_file_in_an_allowed_folder_is_read(folders: tuple[Path, Path]) -> None:
    allowed, _ = folders
    nested = allowed / "day1"
    nested.mkdir()
    (nested / "frame.png").write_bytes(PNG[::-1])

    direct = await read_allowed_file(
        str(allowed / "frame.png"), [PurePosixPath(allowed)]
    )
    deeper = await read_allowed_file(
        str(nested / "frame.png"), [PurePosixPath("/nowhere"), PurePosixPath(allowed)]
    )

    assert direct == PNG
    assert deeper == PNG[::-1]


async def test_link_inside_the_allowed_folder_is_followed(
    folders: tuple[Path, Path],
) -> None:
    allowed, _ = folders
    (allowed / "latest.png").symlink_to(allowed / "frame.png")

    data = await read_allowed_file(
        str(allowed / "latest.png"), [PurePosixPath(allowed)]
    )

    assert data == PNG


async def test_allowed_folder_given_through_a_link(
    folders: tuple[Path, Path], tmp_path: Path
) -> None:
    allowed, _ = folders
    alias = tmp_path / "alias"
    alias.symlink_to(allowed, target_is_directory=True)

    data = await read_allowed_file(str(allowed / "frame.png"), [PurePosixPath(alias)])

    assert data == PNG


@pytest.mark.parametrize(
    "relative",
    [
        "outside/frame.png",
        "allowed/../outside/frame.png",
        "allowed/../../../etc/hostname",
        "allowed-not/frame.png",
        "allowed/escape.png",
    ],
    ids=["outside", "dot-dot", "far-dot-dot", "same-prefix", "link-out"],
)
async def test_file_outside_the_allowed_folders_is_refused(
    folders: tuple[Path, Path], tmp_path: Path, relative: str
) -> None:
    allowed, outside = folders
    (allowed / "escape.png").symlink_to(outside / "frame.png")
    (tmp_path / "allowed-not").mkdir()
    (tmp_path / "allowed-not" / "frame.png").write_bytes(PNG)

    with pytest.raises(BadRequestError) as caught:
        await read_allowed_file(f"{tmp_path}/{relative}", [PurePosixPath(allowed)])

    assert caught.value.reason == "path-not-allowed"


async def test_no_allowed_folders_refuses_every_file(
    folders: tuple[Path, Path],
) -> None:
    allowed, _ = folders

    with pytest.raises(BadRequestError) as caught:
        await read_allowed_file(str(allowed / "frame.png"), [])

    assert caught.value.reason == "path-not-allowed"


@pytest.mark.parametrize("name", ["missing.png", ""], ids=["missing", "folder"])
async def test_unreadable_file_is_refused(
    folders: tuple[Path, Path], name: str
) -> None:
    allowed, _ = folders

    with pytest.raises(BadRequestError) as caught:
        await read_allowed_file(str(allowed / name), [PurePosixPath(allowed)])

    assert caught.value.reason == "unreadable-file"


async def test_named_pipe_is_refused_without_blocking(
    folders: tuple[Path, Path],
) -> None:
    allowed, _ = folders
    pipe = allowed / "frames.fifo"
    os.mkfifo(pipe)

    with pytest.raises(BadRequestError, match="not a regular file") as caught:
        await read_allowed_file(str(pipe), [PurePosixPath(allowed)])

    assert caught.value.reason == "unreadable-file"


async def test_file_larger_than_the_limit_is_refused(
    folders: tuple[Path, Path],
) -> None:
    allowed, _ = folders
    roots = [PurePosixPath(allowed)]
    path = str(allowed / "frame.png")

    exact = await read_allowed_file(path, roots, limit=len(PNG))
    with pytest.raises(BadRequestError) as caught:
        await read_allowed_file(path, roots, limit=len(PNG) - 1)

    assert exact == PNG
    assert caught.value.reason == "too-large"


async def test_image_from_an_allowed_host_is_fetched(
    server: ImageServer, session: aiohttp.ClientSession
) -> None:
    data = await fetch_allowed_url(
        session, f"{server.base}/image.png{SAS_QUERY}", {"127.0.0.1"}
    )

    assert data == PNG
    assert server.paths == ["/image.png"]


@pytest.mark.parametrize("allowed", [set(), {"localhost", "camera"}])
async def test_host_not_allowed_is_never_contacted(
    server: ImageServer, session: aiohttp.ClientSession, allowed: set[str]
) -> None:
    with pytest.raises(FetchError) as caught:
        await fetch_allowed_url(session, f"{server.base}/image.png", allowed)

    assert caught.value.reason == "host-not-allowed"
    assert "127.0.0.1" in str(caught.value)
    assert server.paths == []


async def test_error_status_fails_the_fetch(
    server: ImageServer, session: aiohttp.ClientSession
) -> None:
    with pytest.raises(FetchError) as caught:
        await fetch_allowed_url(session, f"{server.base}/missing.png", {"127.0.0.1"})

    assert caught.value.reason == "fetch-failed"
    assert "404" in str(caught.value)


async def test_redirect_is_not_followed(
    server: ImageServer, session: aiohttp.ClientSession
) -> None:
    with pytest.raises(FetchError) as caught:
        await fetch_allowed_url(session, f"{server.base}/moved.png", {"127.0.0.1"})

    assert caught.value.reason == "fetch-failed"
    assert "302" in str(caught.value)
    assert server.paths == ["/moved.png"]


@pytest.mark.parametrize("path", ["/big.png", "/streamed.png"])
async def test_body_over_the_limit_is_refused(
    server: ImageServer, session: aiohttp.ClientSession, path: str
) -> None:
    with pytest.raises(FetchError) as caught:
        await fetch_allowed_url(
            session, f"{server.base}{path}", {"127.0.0.1"}, limit=SMALL_LIMIT
        )

    assert caught.value.reason == "too-large"
    assert f"larger than {SMALL_LIMIT} bytes" in str(caught.value)


async def test_body_at_the_limit_is_accepted(
    server: ImageServer, session: aiohttp.ClientSession
) -> None:
    data = await fetch_allowed_url(
        session, f"{server.base}/image.png", {"127.0.0.1"}, limit=len(PNG)
    )

    assert data == PNG


async def test_stalled_server_fails_the_fetch_in_time(
    server: ImageServer, session: aiohttp.ClientSession
) -> None:
    with pytest.raises(FetchError) as caught:
        await fetch_allowed_url(
            session,
            f"{server.base}/stalled.png",
            {"127.0.0.1"},
            timeout_s=SHORT_TIMEOUT_S,
        )

    assert caught.value.reason == "fetch-failed"
    assert "TimeoutError" in str(caught.value)


async def test_refused_connection_fails_the_fetch(
    session: aiohttp.ClientSession, refused_port: int
) -> None:
    with pytest.raises(FetchError) as caught:
        await fetch_allowed_url(
            session, f"http://127.0.0.1:{refused_port}/image.png", {"127.0.0.1"}
        )

    assert caught.value.reason == "fetch-failed"
    assert f"127.0.0.1:{refused_port}" in str(caught.value)


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("/missing.png", "fetch-failed"),
        ("/moved.png", "fetch-failed"),
        ("/big.png", "too-large"),
        ("/streamed.png", "too-large"),
        ("/stalled.png", "fetch-failed"),
    ],
)
async def test_query_string_never_appears_in_errors(
    server: ImageServer, session: aiohttp.ClientSession, path: str, reason: str
) -> None:
    with pytest.raises(FetchError) as caught:
        await fetch_allowed_url(
            session,
            f"{server.base}{path}{SAS_QUERY}",
            {"127.0.0.1"},
            limit=SMALL_LIMIT,
            timeout_s=SHORT_TIMEOUT_S,
        )

    message = str(caught.value)
    assert caught.value.reason == reason
    assert f"{server.base}{path}?…" in message
    assert SECRET not in message
    assert "sv=" not in message


async def test_query_string_never_appears_when_the_connection_fails(
    session: aiohttp.ClientSession, refused_port: int
) -> None:
    url = f"http://user:password@127.0.0.1:{refused_port}/x.png{SAS_QUERY}"

    with pytest.raises(FetchError) as caught:
        await fetch_allowed_url(session, url, {"127.0.0.1"})

    message = str(caught.value)
    assert f"http://127.0.0.1:{refused_port}/x.png?…" in message
    assert SECRET not in message
    assert "password" not in message


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://cam/snap.jpg", "http://cam/snap.jpg"),
        (f"http://cam/snap.jpg{SAS_QUERY}", "http://cam/snap.jpg?…"),
        ("http://cam/snap.jpg#part", "http://cam/snap.jpg"),
        (
            f"https://user:pass@Store.Example.com:8443/c/m.zip{SAS_QUERY}#x",
            "https://store.example.com:8443/c/m.zip?…",
        ),
        (f"http://[::1]:8080/frame{SAS_QUERY}", "http://[::1]:8080/frame?…"),
        (f"http://cam:99999/snap.jpg{SAS_QUERY}", "<unparseable URL>"),
    ],
    ids=["plain", "query", "fragment", "credentials", "ipv6", "bad-port"],
)
def test_redact(url: str, expected: str) -> None:
    assert redact(url) == expected


def test_allowed_host_is_returned_in_lower_case() -> None:
    assert check_allowed("http://Camera.LAN:8080/snap.jpg", {"camera.lan"}) == (
        "camera.lan"
    )


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "ftp://camera/snap.jpg",
        f"gopher://camera/snap.jpg{SAS_QUERY}",
        "http:///snap.jpg",
        "camera/snap.jpg",
        f"http://camera:port/snap.jpg{SAS_QUERY}",
    ],
    ids=["file", "ftp", "gopher", "no-host", "no-scheme", "bad-port"],
)
def test_url_that_cannot_be_fetched_is_refused(url: str) -> None:
    with pytest.raises(FetchError) as caught:
        check_allowed(url, {"camera", ""})

    assert caught.value.reason == "bad-url"
    assert SECRET not in str(caught.value)


def test_host_outside_the_list_is_refused() -> None:
    with pytest.raises(FetchError) as caught:
        check_allowed(f"http://other/snap.jpg{SAS_QUERY}", {"camera"})

    assert caught.value.reason == "host-not-allowed"
    assert "other" in str(caught.value)
    assert SECRET not in str(caught.value)
