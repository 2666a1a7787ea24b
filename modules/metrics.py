"""Prometheus text exposition, written by hand: a few counters, gauges and histograms.

The format is small and stable (text format 0.0.4), and the module exposes a
dozen series, so it does without the prometheus-client dependency.
"""

import bisect
import math
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .scorer import Scorer
    from .telemetry import Telemetry

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Histogram:
    """Observations counted into cumulative buckets, safe to feed from threads."""

    def __init__(self, buckets: Sequence[float] = LATENCY_BUCKETS_S) -> None:
        self._bounds = tuple(buckets)
        self._counts = [0] * (len(self._bounds) + 1)
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        """Count one observation."""
        with self._lock:
            self._counts[bisect.bisect_left(self._bounds, value)] += 1
            self._sum += value

    def snapshot(self) -> tuple[list[tuple[str, int]], float, int]:
        """Return the cumulative (le, count) pairs, the sum and the count."""
        with self._lock:
            counts, total = list(self._counts), self._sum
        cumulative, running = [], 0
        for bound, count in zip((*self._bounds, math.inf), counts, strict=True):
            running += count
            cumulative.append(("+Inf" if bound == math.inf else f"{bound:g}", running))
        return cumulative, total, running


class Exposition:
    """Build one exposition text, family by family."""

    def __init__(self) -> None:
        self._lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str) -> None:
        """Start a metric family."""
        self._lines.append(f"# HELP {name} {help_text}")
        self._lines.append(f"# TYPE {name} {kind}")

    def sample(
        self, name: str, value: float, labels: Mapping[str, str] | None = None
    ) -> None:
        """Add one sample to the current family."""
        self._lines.append(f"{name}{_labels(labels)} {_number(value)}")

    def histogram(
        self, name: str, histogram: Histogram, labels: Mapping[str, str] | None = None
    ) -> None:
        """Add a histogram's buckets, sum and count."""
        buckets, total, count = histogram.snapshot()
        for bound, running in buckets:
            self.sample(f"{name}_bucket", running, {**(labels or {}), "le": bound})
        self.sample(f"{name}_sum", total, labels)
        self.sample(f"{name}_count", count, labels)

    def samples(
        self, name: str, values: Iterable[tuple[Mapping[str, str], float]]
    ) -> None:
        """Add one sample per label set."""
        for labels, value in values:
            self.sample(name, value, labels)

    def text(self) -> str:
        """Return the exposition, ending with a newline."""
        return "\n".join(self._lines) + "\n"


def render_metrics(
    scorer: "Scorer",
    telemetry: "Telemetry",
    queued: int,
    sources: Mapping[str, Mapping[str, object]],
) -> str:
    """Return the module's metrics in the Prometheus text format."""
    out = Exposition()
    counts = scorer.counts
    out.family("customvision_inputs_total", "counter", "Inputs by outcome.")
    out.samples(
        "customvision_inputs_total",
        [
            ({"outcome": "scored"}, counts.scored),
            ({"outcome": "rejected"}, counts.rejected),
            ({"outcome": "failed"}, counts.failed),
        ],
    )
    out.family(
        "customvision_results_suppressed_total",
        "counter",
        "Results held back by the telemetry rate settings.",
    )
    out.sample("customvision_results_suppressed_total", telemetry.suppressed)
    out.family("customvision_queue_depth", "gauge", "Input messages waiting.")
    out.sample("customvision_queue_depth", queued)
    out.family(
        "customvision_scoring_seconds", "histogram", "Image bytes to predictions."
    )
    out.histogram("customvision_scoring_seconds", scorer.latency)
    out.family(
        "customvision_inference_seconds", "histogram", "onnxruntime session runs."
    )
    out.histogram("customvision_inference_seconds", scorer.inference)
    out.family(
        "customvision_source_frames_total", "counter", "Camera frames by outcome."
    )
    for name, state in sources.items():
        for outcome in ("frames", "dropped", "skipped", "failed"):
            labels = {"source": name, "outcome": outcome}
            out.sample(
                "customvision_source_frames_total", _count(state, outcome), labels
            )
    identity = scorer.identity
    out.family("customvision_model_info", "gauge", "The active model.")
    if identity is not None:
        labels = {
            "sha256": identity.sha256,
            "flavor": identity.flavor.value,
            "version": identity.version or "",
        }
        out.sample("customvision_model_info", 1, labels)
    return out.text()


def _count(state: Mapping[str, object], key: str) -> int:
    value = state.get(key, 0)
    return value if isinstance(value, int) else 0


def _labels(labels: Mapping[str, str] | None) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{key}="{_escape(value)}"' for key, value in labels.items())
    return "{" + inner + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    return (
        repr(float(value)) if math.isfinite(value) else ("+Inf" if value > 0 else "NaN")
    )
