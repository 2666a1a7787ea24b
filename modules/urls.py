"""URLs the module fetches: which hosts are allowed, and how they appear in logs."""

from collections.abc import Collection
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from .errors import FetchError

SCHEMES = ("http", "https")


def redact(url: str) -> str:
    """Return the URL without query, fragment or credentials, where SAS tokens live."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<unparseable URL>"
    netloc = f"[{host}]{port}" if ":" in host else f"{host}{port}"
    hidden = "?…" if parts.query else ""
    return urlunsplit((parts.scheme, netloc, parts.path, "", "")) + hidden


def host_of(url: str) -> str:
    """Return the URL's host in lower case, or raise FetchError for a bad URL."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError for a malformed port
    except ValueError as error:
        raise FetchError(f"not a valid URL: {redact(url)}", reason="bad-url") from error
    if parts.scheme not in SCHEMES or not host:
        raise FetchError(
            f"only http and https URLs with a host can be fetched: {redact(url)}",
            reason="bad-url",
        )
    return host.lower()


def check_allowed(url: str, allowed_hosts: Collection[str]) -> str:
    """Return the URL's host if the settings allow it, else raise FetchError."""
    host = host_of(url)
    if host not in allowed_hosts:
        raise FetchError(
            f"the host {host} is not in allowedHosts", reason="host-not-allowed"
        )
    return host


def redact_url_field(value: Any) -> Any:
    """Return a JSON object with its "url" redacted, or any other value as it is."""
    if isinstance(value, dict) and isinstance(value.get("url"), str):
        return {**value, "url": redact(value["url"])}
    return value
