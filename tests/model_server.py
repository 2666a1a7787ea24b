"""A model download server on loopback that misbehaves on demand."""

import asyncio
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from aiohttp import web

START_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Served:
    """What one path answers, and how."""

    body: bytes = b""
    behaviour: str = "ok"  # ok, reset, stall, redirect, status
    status: int = 200
    location: str = ""


class ModelServer:
    """An aiohttp server in its own thread, so the module under test can use it."""

    def __init__(self) -> None:
        self._routes: dict[str, Served] = {}
        self.requests: Counter[str] = Counter()
        self.queries: list[str] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="models")
        self._runner: web.AppRunner | None = None
        self._release: asyncio.Event | None = None
        self.port = 0

    def start(self) -> None:
        """Start listening on 127.0.0.1 on a free port."""
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        future.result(START_TIMEOUT_S)

    def stop(self) -> None:
        """Release stalled requests, stop the server and its thread; idempotent."""
        if self._loop.is_closed():
            return
        if self._runner is not None:
            future = asyncio.run_coroutine_threadsafe(self._stop(), self._loop)
            future.result(START_TIMEOUT_S)
            self._runner = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(START_TIMEOUT_S)
        self._loop.close()

    def serve(self, path: str, served: Served) -> str:
        """Answer path as described and return its URL."""
        self._routes[path] = served
        return self.url(path)

    def url(self, path: str) -> str:
        """Return the URL of a path on this server."""
        return f"http://127.0.0.1:{self.port}{path}"

    async def _start(self) -> None:
        self._release = asyncio.Event()
        app = web.Application()
        app.router.add_get("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None and server.sockets
        self.port = server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        assert self._release is not None and self._runner is not None
        self._release.set()
        await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests[request.path] += 1
        self.queries.append(request.query_string)
        served = self._routes.get(request.path)
        if served is None:
            return web.Response(status=404, text="no such model")
        if served.behaviour == "status":
            return web.Response(status=served.status, text="refused")
        if served.behaviour == "redirect":
            raise web.HTTPFound(served.location)
        response = web.StreamResponse(headers={"Content-Length": str(len(served.body))})
        await response.prepare(request)
        half = len(served.body) // 2
        if served.behaviour == "reset":
            await response.write(served.body[:half])
            assert request.transport is not None
            request.transport.close()
            return response
        if served.behaviour == "stall":
            await response.write(served.body[:half])
            assert self._release is not None
            await self._release.wait()
            return response
        await response.write(served.body)
        await response.write_eof()
        return response


@pytest.fixture
def model_server() -> Iterator[ModelServer]:
    """Yield a started model server; stop it afterwards."""
    server = ModelServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()
