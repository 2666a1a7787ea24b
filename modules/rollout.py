"""Roll out a model named by the twin: download, verify, unpack, validate, activate.

The previous model serves until the new one is loaded and warmed up; a failure at
any step leaves it serving. Every step is acknowledged on the reported `model`
property: 202 with progress, 200 when active, 400 for a bad request, 500 for a
failed one. URLs appear only redacted, since SAS tokens live in their query.
"""

import asyncio
import contextlib
import dataclasses
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from .connection import MethodResult
from .download import DownloadPolicy, download
from .errors import BadSettingError, DownloadError, FetchError, ScorerError
from .model import CustomVisionModel
from .scorer import Scorer
from .settings import ACCEPTED, FAILED, IN_PROGRESS, REJECTED, Ack, Settings
from .store import ModelStore, StoredModel
from .urls import host_of, redact, redact_url_field

MODEL_PROPERTY = "model"
PROGRESS_INTERVAL_S = 1.0
_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")

_LOGGER = logging.getLogger(__name__)

Report = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class ModelRequest:
    """What the desired `model` property asks for."""

    url: str
    sha256: str | None
    version: str | None

    def describe(self) -> dict[str, Any]:
        """Return the request as the twin and the logs may show it."""
        return {"url": redact(self.url), "sha256": self.sha256, "version": self.version}


def parse_model_request(value: Any, settings: Settings) -> ModelRequest:
    """Validate the desired `model` property, or raise BadSettingError."""
    if not isinstance(value, dict):
        raise BadSettingError('model must be an object: {"url", "sha256", "version"}')
    unknown = set(value) - {"url", "sha256", "version"}
    if unknown:
        raise BadSettingError(f"model has unknown keys: {', '.join(sorted(unknown))}")
    url, sha256, version = value.get("url"), value.get("sha256"), value.get("version")
    if not isinstance(url, str) or not url:
        raise BadSettingError(
            "model.url must be the URL of an export zip or .onnx file"
        )
    try:
        host = host_of(url)
    except FetchError as error:
        raise BadSettingError(f"model.url: {error}") from error
    if urlsplit(url).scheme != "https" and host not in settings.insecure_model_hosts:
        raise BadSettingError(
            f"model.url must use https, or name a host in insecureModelHosts ({host})"
        )
    if sha256 is None and not settings.allow_unverified_models:
        raise BadSettingError(
            "model.sha256 is required (or set allowUnverifiedModels to true)"
        )
    if sha256 is not None and (
        not isinstance(sha256, str) or not _SHA256.match(sha256)
    ):
        raise BadSettingError("model.sha256 must be 64 hexadecimal characters")
    if version is not None and not isinstance(version, str):
        raise BadSettingError("model.version must be a string")
    return ModelRequest(url, sha256.lower() if sha256 else None, version)


async def restore_model(
    scorer: Scorer, store: ModelStore | None, fallback: Path | None
) -> StoredModel | None:
    """Activate the persisted model, else the fallback; return the stored one used.

    This runs before the module connects, so a device that reboots without network
    keeps serving the last model it rolled out.
    """
    persisted = await asyncio.to_thread(_persisted, store) if store else []
    for stored in persisted:
        try:
            model = await scorer.load(stored.folder)
        except ScorerError as error:
            _LOGGER.error("Stored model %s cannot load: %s", stored.sha256[:12], error)
            continue
        scorer.activate(model, stored.version)
        return stored
    if fallback is None:
        _LOGGER.warning("No model yet: inputs are refused until the twin names one")
    else:
        scorer.activate(await scorer.load(fallback))
    return None


def _persisted(store: ModelStore) -> list[StoredModel]:
    return [model for model in (store.current(), store.previous()) if model]


class Rollout:
    """Apply desired models one at a time; a newer request supersedes a running one."""

    def __init__(
        self,
        scorer: Scorer,
        store: ModelStore,
        session: aiohttp.ClientSession,
        report: Report,
        policy: DownloadPolicy | None = None,
    ) -> None:
        self._scorer = scorer
        self._store = store
        self._session = session
        self._report = report
        self._policy = policy or DownloadPolicy()
        self._task: asyncio.Task[None] | None = None
        self._desired_version: int | None = None
        self._source: StoredModel | None = None
        self._rolled_back_from: str | None = None
        self.last_failure: dict[str, Any] | None = None

    async def start(self, stored: StoredModel | None) -> None:
        """Take over the stored export serving at start, and any rollback record."""
        self._source = stored
        self._rolled_back_from = await asyncio.to_thread(
            lambda: self._store.rolled_back_from
        )

    def request(self, value: Any, version: int | None, settings: Settings) -> None:
        """Start rolling out the desired model, or acknowledge why nothing starts."""
        self._desired_version = version
        if value is None:
            self._ack(
                None, ACCEPTED, "no model requested; the active model keeps serving"
            )
            return
        try:
            request = parse_model_request(value, settings)
        except BadSettingError as error:
            self._ack(
                redact_url_field(value),
                REJECTED,
                f"{error}; the active model keeps serving",
            )
            return
        if self._already_serving(request):
            return
        self._cancel()
        self._ack(request.describe(), IN_PROGRESS, "starting the download")
        self._task = asyncio.create_task(
            self._roll_out(request, settings), name="model-rollout"
        )

    async def rollback(self) -> MethodResult:
        """Reactivate the previous stored model."""
        previous = await asyncio.to_thread(self._store.previous)
        current = self._source
        if previous is None or current is None:
            return 409, {
                "reason": "no-previous-model",
                "detail": "no previous model is stored",
            }
        self._cancel()
        try:
            model = await self._scorer.load(previous.folder)
        except ScorerError as error:
            return 500, {"reason": error.reason, "detail": str(error)}
        await asyncio.to_thread(
            self._store.activate, previous.sha256, rolled_back_from=current.sha256
        )
        self._scorer.activate(model, previous.version)
        self._source, self._rolled_back_from = previous, current.sha256
        description = f"rolled back to {previous.sha256[:12]} by the rollback method"
        self._ack(previous.describe(), ACCEPTED, description)
        return 200, {"activeModel": self.active_model()}

    async def close(self) -> None:
        """Cancel a rollout in progress."""
        self._cancel()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _already_serving(self, request: ModelRequest) -> bool:
        active = self._source
        if request.sha256 is not None and active and active.sha256 == request.sha256:
            self._cancel()
            self._ack(
                request.describe(), ACCEPTED, "already active; nothing downloaded"
            )
            return True
        if request.sha256 is not None and request.sha256 == self._rolled_back_from:
            self._cancel()
            description = (
                "this model was rolled back by the rollback method; "
                "name another model to roll out"
            )
            self._ack(request.describe(), ACCEPTED, description)
            return True
        return False

    async def _roll_out(self, request: ModelRequest, settings: Settings) -> None:
        started = time.monotonic()
        try:
            stored, model = await self._prepare(request, settings)
            await asyncio.to_thread(self._store.activate, stored.sha256)
        except ScorerError as error:
            self._fail(request, error)
            return
        except OSError as error:
            self._fail(
                request, ScorerError(f"model store: {error}", reason="store-failed")
            )
            return
        except Exception as error:
            _LOGGER.exception("Model rollout failed unexpectedly")
            self._fail(
                request, ScorerError(f"internal error: {error}", reason="internal")
            )
            return
        self._scorer.activate(model, request.version)
        self._source, self._rolled_back_from = stored, None
        _LOGGER.info(
            "Rolled out %s from %s in %.1f s",
            stored.sha256[:12],
            redact(request.url),
            time.monotonic() - started,
        )
        self._ack(request.describe(), ACCEPTED, f"active since {_now()}")

    async def _prepare(
        self, request: ModelRequest, settings: Settings
    ) -> tuple[StoredModel, CustomVisionModel]:
        """Return the stored export and its loaded model, downloading if needed."""
        if request.sha256 is not None:
            kept = await asyncio.to_thread(self._store.get, request.sha256)
            if kept is not None:
                stored = dataclasses.replace(kept, version=request.version)
                return stored, await self._scorer.load(kept.folder)
        target = await asyncio.to_thread(self._store.new_download)
        try:
            fetched = await download(
                self._session,
                request.url,
                target,
                insecure_hosts=settings.insecure_model_hosts,
                policy=self._policy,
                progress=self._progress_reporter(request),
            )
            if request.sha256 is not None and fetched.sha256 != request.sha256:
                raise DownloadError(
                    f"the download's SHA-256 is {fetched.sha256}, not {request.sha256}",
                    reason="hash-mismatch",
                )
            return await self._install(request, fetched.sha256, target)
        finally:
            await asyncio.to_thread(self._store.discard, target)

    async def _install(
        self, request: ModelRequest, sha256: str, download_path: Path
    ) -> tuple[StoredModel, CustomVisionModel]:
        export = await asyncio.to_thread(self._store.unpack, download_path)
        try:
            # Loading validates the export: its files, its flavor and a warm-up run.
            model = await self._scorer.load(export)
            entry = StoredModel(
                sha256, export, redact(request.url), request.version, _now()
            )
            stored = await asyncio.to_thread(self._store.install, export, entry)
        except BaseException:
            await asyncio.to_thread(self._store.discard, export)
            raise
        return stored, model

    def _progress_reporter(
        self, request: ModelRequest
    ) -> Callable[[int, int | None], None]:
        last = 0.0

        def progress(received: int, expected: int | None) -> None:
            nonlocal last
            now = time.monotonic()
            if now - last < PROGRESS_INTERVAL_S:
                return
            last = now
            total = f" of {expected / 1e6:.1f}" if expected else ""
            self._ack(
                request.describe(),
                IN_PROGRESS,
                f"downloading: {received / 1e6:.1f}{total} MB",
            )

        return progress

    def _fail(self, request: ModelRequest, error: ScorerError) -> None:
        _LOGGER.warning("Model rollout failed (%s): %s", error.reason, error)
        self.last_failure = {
            **request.describe(),
            "reason": error.reason,
            "detail": str(error),
            "at": _now(),
        }
        self._report({"lastModelFailure": self.last_failure})
        self._ack(
            request.describe(), FAILED, f"{error}; the previous model keeps serving"
        )

    def _ack(self, value: Any, code: int, description: str) -> None:
        ack = Ack(value, code, self._desired_version, description)
        patch: dict[str, Any] = {MODEL_PROPERTY: ack.to_json()}
        if code == ACCEPTED:
            patch["activeModel"] = self.active_model()
        self._report(patch)

    def active_model(self) -> dict[str, Any] | None:
        """Return the active model's identity and where it came from."""
        identity = self._scorer.identity
        if identity is None:
            return None
        source = self._source.url if self._source else None
        return {**identity.to_json(), "url": source}

    def _cancel(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            _LOGGER.info("A newer desired model supersedes the rollout in progress")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
