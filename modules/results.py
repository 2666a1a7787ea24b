"""Build result documents: Custom Vision prediction fields plus what the edge needs."""

import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from .model import ModelIdentity, Scored


def result_document(
    scored: Scored,
    identity: ModelIdentity,
    source: Mapping[str, Any],
    *,
    project: str | None = None,
) -> dict[str, Any]:
    """Return the result for one scored image, in the shape consumers read."""
    model: dict[str, Any] = {
        "sha256": identity.sha256,
        "flavor": identity.flavor.value,
        "version": identity.version,
    }
    return {
        "id": str(uuid.uuid4()),
        "project": project,
        "iteration": identity.iteration,
        "created": utc_now(),
        "predictions": [prediction.to_json() for prediction in scored.predictions],
        "source": dict(source),
        "image": {"width": scored.width, "height": scored.height},
        "model": model,
        "timings": {f"{stage}Ms": ms for stage, ms in scored.timings_ms.items()},
    }


def utc_now() -> str:
    """Return the current time as ISO 8601 UTC with a Z, as Custom Vision writes it."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
