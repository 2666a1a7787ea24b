"""The scorer: holds the active model, scores off the event loop, counts, swaps."""

import asyncio
import dataclasses
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .errors import ScorerError
from .metrics import Histogram
from .model import CustomVisionModel, ModelIdentity, Scored, ScoreOptions

_LOGGER = logging.getLogger(__name__)


@dataclass
class Counts:
    """Running totals of what happened to inputs."""

    scored: int = 0
    rejected: int = 0
    failed: int = 0


class Scorer:
    """Score images with whichever model is active when each request starts.

    A request takes the model reference once, so a swap never changes the model under
    a request in flight, and every request that starts after the swap uses the new one.
    """

    def __init__(
        self,
        model: CustomVisionModel | None = None,
        *,
        workers: int = 1,
        threads: int | None = None,
    ) -> None:
        self._active = (model, model.identity) if model else None
        self._threads = threads
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="scorer")
        self.counts = Counts()
        self.latency = Histogram()  # bytes in to predictions out, seconds
        self.inference = Histogram()  # the session run alone, seconds

    @property
    def model(self) -> CustomVisionModel | None:
        """Return the active model, if any."""
        return self._active[0] if self._active else None

    @property
    def identity(self) -> ModelIdentity | None:
        """Return the active model's identity, if any."""
        return self._active[1] if self._active else None

    async def score(
        self, data: bytes, options: ScoreOptions
    ) -> tuple[Scored, ModelIdentity]:
        """Score image bytes on the active model, in the scoring threads."""
        active = self._active  # read once: a swap never changes a request's model
        if active is None:
            self.counts.failed += 1
            raise ScorerError("no model is loaded yet", reason="no-model")
        model, identity = active
        loop = asyncio.get_running_loop()
        try:
            scored = await loop.run_in_executor(
                self._executor, model.score, data, options
            )
        except ScorerError:
            self.counts.rejected += 1
            raise
        except Exception as error:
            self.counts.failed += 1
            _LOGGER.exception("Scoring failed on %s", identity.sha256[:12])
            raise ScorerError(
                f"scoring failed: {error}", reason="scoring-failed"
            ) from error
        self.counts.scored += 1
        self.latency.observe(sum(scored.timings_ms.values()) / 1000.0)
        self.inference.observe(scored.timings_ms.get("inference", 0.0) / 1000.0)
        return scored, identity

    def reject(self) -> None:
        """Count an input refused before it reached a model."""
        self.counts.rejected += 1

    async def load(self, path: Path) -> CustomVisionModel:
        """Load and warm up an export in its own thread, without activating it."""
        # Not in the scoring threads: scoring goes on with the old model meanwhile.
        return await asyncio.to_thread(
            CustomVisionModel.load, path, threads=self._threads
        )

    def activate(
        self, model: CustomVisionModel, version: str | None = None
    ) -> CustomVisionModel | None:
        """Make a loaded model the active one and return the one it replaces."""
        identity = dataclasses.replace(model.identity, version=version)
        previous = self.model
        self._active = (model, identity)
        _LOGGER.info(
            "Active model is now %s%s (%s)",
            identity.sha256[:12],
            f", version {version}" if version else "",
            identity.flavor.description,
        )
        return previous

    def close(self) -> None:
        """Stop the scoring threads, dropping work that has not started."""
        self._executor.shutdown(wait=True, cancel_futures=True)
