"""Download model files: bounded in time and size, hashed while they stream to disk."""

import asyncio
import hashlib
import logging
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import aiohttp

from .errors import DownloadError, FetchError
from .urls import host_of, redact

MAX_DOWNLOAD_BYTES = 512 * 1024 * 1024
CONNECT_TIMEOUT_S = 15.0
READ_TIMEOUT_S = 30.0
MAX_REDIRECTS = 5
RETRY_DELAYS_S = (1.0, 4.0, 15.0)
_CHUNK_BYTES = 1024 * 1024
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
# Worth another try: the server or the network may be better in a moment.
_TRANSIENT_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})

_LOGGER = logging.getLogger(__name__)

Progress = Callable[[int, int | None], None]


@dataclass(frozen=True)
class Downloaded:
    """A file on disk and the SHA-256 of what was received."""

    path: Path
    sha256: str
    size: int


@dataclass(frozen=True)
class DownloadPolicy:
    """Limits for one download."""

    max_bytes: int = MAX_DOWNLOAD_BYTES
    connect_timeout_s: float = CONNECT_TIMEOUT_S
    read_timeout_s: float = READ_TIMEOUT_S
    max_redirects: int = MAX_REDIRECTS
    retry_delays_s: Sequence[float] = RETRY_DELAYS_S


class _TransientError(DownloadError):
    """A failure worth retrying."""


async def download(
    session: aiohttp.ClientSession,
    url: str,
    destination: Path,
    *,
    insecure_hosts: Collection[str] = (),
    policy: DownloadPolicy | None = None,
    progress: Progress | None = None,
) -> Downloaded:
    """Download url to destination, retrying transient failures with backoff."""
    policy = policy or DownloadPolicy()
    _check_scheme(url, insecure_hosts)
    for attempt, delay in enumerate((*policy.retry_delays_s, None), start=1):
        try:
            return await _attempt(
                session, url, destination, insecure_hosts, policy, progress
            )
        except _TransientError as error:
            if delay is None:
                raise DownloadError(
                    f"{error} (gave up after {attempt} tries)"
                ) from error
            _LOGGER.warning(
                "Download try %d failed: %s; retrying in %.0f s", attempt, error, delay
            )
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")


async def _attempt(
    session: aiohttp.ClientSession,
    url: str,
    destination: Path,
    insecure_hosts: Collection[str],
    policy: DownloadPolicy,
    progress: Progress | None,
) -> Downloaded:
    timeout = aiohttp.ClientTimeout(
        total=None,
        sock_connect=policy.connect_timeout_s,
        sock_read=policy.read_timeout_s,
    )
    current = url
    for _hop in range(policy.max_redirects + 1):
        try:
            async with session.get(
                current, timeout=timeout, allow_redirects=False
            ) as response:
                if response.status in _REDIRECTS and "Location" in response.headers:
                    current = urljoin(current, response.headers["Location"])
                    # Every hop obeys the same rule, so https cannot be downgraded.
                    _check_scheme(current, insecure_hosts)
                    continue
                _check_status(response.status, url)
                return await _save(response, url, destination, policy, progress)
        except (aiohttp.ClientError, TimeoutError) as error:
            detail = str(error) or type(error).__name__
            raise _TransientError(f"cannot download {redact(url)}: {detail}") from error
    raise DownloadError(
        f"{redact(url)} redirected more than {policy.max_redirects} times"
    )


def _check_scheme(url: str, insecure_hosts: Collection[str]) -> None:
    try:
        host = host_of(url)
    except FetchError as error:
        raise DownloadError(str(error), reason="bad-url") from error
    if urlsplit(url).scheme != "https" and host not in insecure_hosts:
        raise DownloadError(
            f"models are downloaded over https only, and {host} is not in "
            "insecureModelHosts",
            reason="bad-url",
        )


def _check_status(status: int, url: str) -> None:
    if status == 200:
        return
    message = f"{redact(url)} answered HTTP {status}"
    if status in _TRANSIENT_STATUSES:
        raise _TransientError(message)
    raise DownloadError(message)


async def _save(
    response: aiohttp.ClientResponse,
    url: str,
    destination: Path,
    policy: DownloadPolicy,
    progress: Progress | None,
) -> Downloaded:
    expected = response.content_length
    if expected is not None and expected > policy.max_bytes:
        raise _too_large(url, policy.max_bytes)
    digest = hashlib.sha256()
    received = 0
    stream = await asyncio.to_thread(destination.open, "wb")
    try:
        async for chunk in response.content.iter_chunked(_CHUNK_BYTES):
            received += len(chunk)
            if received > policy.max_bytes:
                raise _too_large(url, policy.max_bytes)
            digest.update(chunk)
            await asyncio.to_thread(stream.write, chunk)
            if progress is not None:
                progress(received, expected)
    finally:
        await asyncio.to_thread(stream.close)
    if expected is not None and received != expected:
        raise _TransientError(
            f"{redact(url)} ended after {received} of {expected} bytes"
        )
    return Downloaded(destination, digest.hexdigest(), received)


def _too_large(url: str, limit: int) -> DownloadError:
    return DownloadError(f"{redact(url)} is larger than the {limit}-byte limit")
