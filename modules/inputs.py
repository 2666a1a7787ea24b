"""Input messages: an image in the body, or a JSON reference to a file or local URL."""

import asyncio
import json
import os
import stat
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import aiohttp

from .errors import BadRequestError, FetchError
from .images import MAX_IMAGE_BYTES
from .urls import check_allowed, redact

FETCH_TIMEOUT_S = 10.0
_CHUNK_BYTES = 64 * 1024
_JSON_TYPES = ("application/json", "text/json")


@dataclass(frozen=True)
class InputMessage:
    """One message as it arrived, from edgeHub or a local stand-in."""

    input_name: str
    body: bytes = field(repr=False)
    properties: Mapping[str, str] = field(default_factory=dict)
    message_id: str | None = None
    correlation_id: str | None = None
    content_type: str | None = None


@dataclass(frozen=True)
class Reference:
    """Where an input message says its image is."""

    path: str | None = None
    url: str | None = None
    source: str | None = None


def is_reference(message: InputMessage) -> bool:
    """Say whether the body is a JSON reference rather than image bytes."""
    if message.content_type and message.content_type.split(";")[0] in _JSON_TYPES:
        return True
    return message.body.lstrip()[:1] in (b"{", b"[", b'"')


def parse_reference(body: bytes) -> Reference:
    """Read `{"path": ...}` or `{"url": ...}` (with an optional "source") from JSON."""
    try:
        document = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BadRequestError(
            f"the message is neither an image nor valid JSON: {error}",
            reason="bad-json",
        ) from error
    if not isinstance(document, dict):
        raise BadRequestError(
            "a JSON reference must be an object", reason="bad-reference"
        )
    targets = [key for key in ("path", "url") if key in document]
    if len(targets) != 1 or not isinstance(document[targets[0]], str):
        raise BadRequestError(
            'a JSON reference needs exactly one of "path" or "url", as a string',
            reason="bad-reference",
        )
    source = document.get("source")
    return Reference(
        path=document.get("path"),
        url=document.get("url"),
        source=source if isinstance(source, str) else None,
    )


def describe_reference(reference: Reference) -> dict[str, Any]:
    """Return the reference as it may appear in results and logs."""
    if reference.url is not None:
        return {"url": redact(reference.url)}
    return {"path": reference.path}


async def read_allowed_file(
    path: str, allowed: Collection[PurePosixPath], limit: int = MAX_IMAGE_BYTES
) -> bytes:
    """Read a file under one of the allowed folders, links resolved first."""
    return await asyncio.to_thread(_read_allowed, path, allowed, limit)


async def fetch_allowed_url(
    session: aiohttp.ClientSession,
    url: str,
    allowed_hosts: Collection[str],
    *,
    limit: int = MAX_IMAGE_BYTES,
    timeout_s: float = FETCH_TIMEOUT_S,
) -> bytes:
    """GET an image from a host the settings allow, bounded in time and size."""
    check_allowed(url, allowed_hosts)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    try:
        # Redirects are not followed: they could lead to a host nobody allowed.
        async with session.get(url, timeout=timeout, allow_redirects=False) as response:
            if response.status != 200:
                raise FetchError(f"{redact(url)} answered HTTP {response.status}")
            if (response.content_length or 0) > limit:
                raise _too_large(url, limit)
            return await _read_body(response, url, limit)
    except (aiohttp.ClientError, TimeoutError) as error:
        detail = str(error) or type(error).__name__
        raise FetchError(f"cannot fetch {redact(url)}: {detail}") from error


async def _read_body(response: aiohttp.ClientResponse, url: str, limit: int) -> bytes:
    body = bytearray()
    async for chunk in response.content.iter_chunked(_CHUNK_BYTES):
        body += chunk
        if len(body) > limit:
            raise _too_large(url, limit)
    return bytes(body)


def _too_large(url: str, limit: int) -> FetchError:
    return FetchError(f"{redact(url)} is larger than {limit} bytes", reason="too-large")


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _read_allowed(path: str, allowed: Collection[PurePosixPath], limit: int) -> bytes:
    roots = [os.path.realpath(root) for root in allowed]
    refused = BadRequestError(
        f"{path} is not under a folder in allowedPaths", reason="path-not-allowed"
    )
    if not any(_within(os.path.realpath(path), root) for root in roots):
        raise refused
    try:
        # Non-blocking, so that a named pipe cannot hold a worker at open().
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as error:
        raise BadRequestError(
            f"cannot read {path}: {error.strerror}", reason="unreadable-file"
        ) from error
    if not stat.S_ISREG(os.fstat(descriptor).st_mode):
        os.close(descriptor)
        raise BadRequestError(f"{path} is not a regular file", reason="unreadable-file")
    with os.fdopen(descriptor, "rb") as stream:
        # Checked again on what was opened: a link swapped in meanwhile cannot escape.
        opened = _opened_path(descriptor)
        if opened is not None and not any(_within(opened, root) for root in roots):
            raise refused
        data = stream.read(limit + 1)
    if len(data) > limit:
        raise BadRequestError(
            f"{path} is larger than {limit} bytes", reason="too-large"
        )
    return data


def _opened_path(descriptor: int) -> str | None:
    try:
        return os.readlink(f"/proc/self/fd/{descriptor}")
    except OSError:
        return None  # no /proc (not Linux): the check before opening stands
