"""The HTTP API: Custom Vision's container routes, health, status and metrics.

Clients of the Docker export of Custom Vision post to `/image` (raw bytes or a
multipart field `imageData`) and `/url` (`{"url": ...}`), or to the longer
`/{project}/classify|detect/iterations/{name}/image|url` forms, and read the
prediction JSON back. Every error is JSON: `{"reason", "detail"}`.
"""

import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from aiohttp import web

from .errors import ScorerError, http_status
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE

DEFAULT_PORT = 8080
MAX_BODY_BYTES = 4 * 1024 * 1024
IMAGE_FIELD = "imageData"
PREDICTION_KEYS = ("id", "project", "iteration", "created", "predictions")
_RAW_TYPES = ("application/octet-stream", "")
_CHUNK_BYTES = 64 * 1024

_LOGGER = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ScoringService(Protocol):
    """What the HTTP API needs from the running module."""

    async def score_image(
        self,
        data: bytes,
        *,
        threshold: float | None,
        max_predictions: int | None,
        origin: dict[str, Any],
    ) -> dict[str, Any]:
        """Score image bytes and return the result document."""

    async def fetch_image(self, url: str) -> bytes:
        """Fetch an image from a host the settings allow."""

    def status(self) -> dict[str, Any]:
        """Return the module's state."""

    def health(self) -> tuple[bool, str]:
        """Say whether the module can score, and why not."""

    def metrics_text(self) -> str:
        """Return the Prometheus exposition."""


class HttpApi:
    """An aiohttp server in front of the scoring service."""

    def __init__(
        self,
        service: ScoringService,
        *,
        host: str = "0.0.0.0",
        port: int = DEFAULT_PORT,
        max_body_bytes: int = MAX_BODY_BYTES,
    ) -> None:
        self._service = service
        self._host = host
        self._port = port
        self._max_body = max_body_bytes
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    def application(self) -> web.Application:
        """Return the aiohttp application with every route."""
        app = web.Application(
            client_max_size=self._max_body, middlewares=[_json_errors]
        )
        routes = [
            web.post("/image", self._image),
            web.post("/url", self._url),
            web.post(
                "/{project}/{task:classify|detect}/iterations/{name}/image", self._image
            ),
            web.post(
                "/{project}/{task:classify|detect}/iterations/{name}/url", self._url
            ),
            web.get("/healthz", self._health),
            web.get("/status", self._status),
            web.get("/metrics", self._metrics),
        ]
        app.add_routes(routes)
        return app

    async def start(self) -> None:
        """Start listening."""
        self._runner = web.AppRunner(self.application(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else self._port
        _LOGGER.info("HTTP API listening on %s:%s", self._host, self.port)

    async def close(self) -> None:
        """Stop listening and close open connections."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _image(self, request: web.Request) -> web.Response:
        data = await _image_body(request, self._max_body)
        return await self._score(request, data, {"http": request.path})

    async def _url(self, request: web.Request) -> web.Response:
        url = await _url_body(request)
        data = await self._service.fetch_image(url)
        return await self._score(request, data, {"http": request.path})

    async def _score(
        self, request: web.Request, data: bytes, origin: dict[str, Any]
    ) -> web.Response:
        threshold, max_predictions = _query_options(request)
        document = await self._service.score_image(
            data, threshold=threshold, max_predictions=max_predictions, origin=origin
        )
        return web.json_response({key: document[key] for key in PREDICTION_KEYS})

    async def _health(self, request: web.Request) -> web.Response:
        healthy, detail = self._service.health()
        if healthy:
            return web.json_response({"status": "ok", "detail": detail})
        return _error(503, "unhealthy", detail)

    async def _status(self, request: web.Request) -> web.Response:
        return web.json_response(self._service.status())

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self._service.metrics_text().encode("utf-8"),
            headers={"Content-Type": METRICS_CONTENT_TYPE},
        )


@web.middleware
async def _json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ScorerError as error:
        return _error(http_status(error), error.reason, str(error))
    except web.HTTPRequestEntityTooLarge as error:
        return _error(413, "too-large", error.text or "the request body is too large")
    except web.HTTPException as error:
        if error.status < 400:
            raise
        reason = error.reason.lower().replace(" ", "-")
        return _error(error.status, reason, error.text or error.reason)


async def _image_body(request: web.Request, limit: int) -> bytes:
    content_type = request.content_type
    if content_type == "multipart/form-data":
        return await _multipart_image(request, limit)
    if content_type in _RAW_TYPES or content_type.startswith("image/"):
        data = await request.read()
        if not data:
            raise ScorerError(
                "the request has no image in its body", reason="bad-request"
            )
        return data
    raise ScorerError(
        f"send the image as application/octet-stream, image/*, or multipart/form-data "
        f"with a field {IMAGE_FIELD}, not {content_type}",
        reason="unsupported-media-type",
    )


async def _multipart_image(request: web.Request, limit: int) -> bytes:
    reader = await request.multipart()
    async for part in reader:
        if getattr(part, "name", None) != IMAGE_FIELD:
            continue
        data = bytearray()
        while chunk := await part.read_chunk(_CHUNK_BYTES):  # type: ignore[union-attr]
            data += chunk
            if len(data) > limit:
                raise ScorerError(
                    f"the image is larger than {limit} bytes", reason="too-large"
                )
        return bytes(data)
    raise ScorerError(
        f"the form has no field named {IMAGE_FIELD}", reason="bad-request"
    )


async def _url_body(request: web.Request) -> str:
    try:
        document = await request.json()
    except ValueError as error:
        raise ScorerError(
            f"the body is not JSON: {error}", reason="bad-json"
        ) from error
    url = (
        document.get("url", document.get("Url")) if isinstance(document, dict) else None
    )
    if not isinstance(url, str) or not url:
        raise ScorerError('the body must be {"url": "..."}', reason="bad-request")
    return url


def _query_options(request: web.Request) -> tuple[float | None, int | None]:
    query = request.query
    try:
        threshold = float(query["threshold"]) if "threshold" in query else None
        raw_max = query.get("maxPredictions", query.get("max"))
        max_predictions = int(raw_max) if raw_max is not None else None
    except ValueError as error:
        raise ScorerError(
            f"bad query parameter: {error}", reason="bad-request"
        ) from error
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise ScorerError("threshold must be between 0 and 1", reason="bad-request")
    if max_predictions is not None and max_predictions < 1:
        raise ScorerError("maxPredictions must be at least 1", reason="bad-request")
    return threshold, max_predictions


def _error(status: int, reason: str, detail: str) -> web.Response:
    return web.json_response({"reason": reason, "detail": detail}, status=status)
