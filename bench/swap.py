"""Benchmark a model swap under a steady stream of images.

Runs the module's pipeline in-process (local connection, outputs discarded) with
images submitted at a fixed rate, twice, each in a fresh process: once as a
baseline, once with a model rolled out through a desired `model` patch from a
download server on loopback. Prints the longest gap between two consecutive
results and the peak resident memory of each run, and their ratios.

    python bench/swap.py [--rate 50] [--seconds 4]
"""

import argparse
import asyncio
import contextlib
import hashlib
import io
import itertools
import json
import resource
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modules.demo import DEMO_EXPORT, sample_images
from modules.inputs import InputMessage
from modules.local import LocalConnection
from modules.model import CustomVisionModel
from modules.scorer import Scorer
from modules.service import Service
from modules.store import ModelStore
from modules.telemetry import OutputMessage

FIXTURE = Path(__file__).resolve().parents[2] / "shared/fixtures/customvision"
NEW_MODEL = FIXTURE / "office-fruit-onnx12"


class TimedConnection(LocalConnection):
    """A local connection that records when each output is sent, and prints nothing."""

    def __init__(self, expected: int) -> None:
        super().__init__(stdout=io.StringIO())
        self.sent: list[tuple[float, str]] = []
        self.expected = expected
        self.all_sent = asyncio.Event()

    async def send(self, message: OutputMessage) -> None:
        """Record the time and the model of each result."""
        body = message.json()
        self.sent.append((time.perf_counter(), body.get("model", {}).get("sha256", "")))
        if len(self.sent) >= self.expected:
            self.all_sent.set()

    async def report(self, patch: dict[str, Any]) -> None:
        """Discard reported properties."""


def export_zip(folder: Path) -> bytes:
    """Zip an export folder's model and labels."""
    data = io.BytesIO()
    with zipfile.ZipFile(data, "w", zipfile.ZIP_DEFLATED) as bundle:
        for name in ("model.onnx", "labels.txt"):
            bundle.write(folder / name, name)
    return data.getvalue()


async def serve(body: bytes) -> tuple[web.AppRunner, str]:
    """Serve body at /model.zip on loopback."""

    async def model(_request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/zip")

    app = web.Application()
    app.router.add_get("/model.zip", model)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}/model.zip"


async def stream(update: bool, rate: float, seconds: float) -> dict[str, Any]:
    """Run the pipeline under a steady stream; roll out a model halfway if asked."""
    frames = [data for _name, data in sample_images()]
    bundle = export_zip(NEW_MODEL)
    runner, url = await serve(bundle)
    scorer = Scorer(CustomVisionModel.load(DEMO_EXPORT))
    count = int(rate * seconds)
    connection = TimedConnection(count)
    with tempfile.TemporaryDirectory() as root:
        service = Service(connection, scorer, store=ModelStore(Path(root)))
        stop = asyncio.Event()
        running = asyncio.create_task(service.run(stop))
        await service.ready.wait()
        service.apply_desired(
            {"insecureModelHosts": ["127.0.0.1"], "$version": 1}, True
        )

        started = time.perf_counter()
        for index in range(count):
            if update and index == count // 3:
                model = {"url": url, "sha256": hashlib.sha256(bundle).hexdigest()}
                service.apply_desired({"model": model, "$version": 2}, False)
            message = InputMessage("images", frames[index % len(frames)])
            await service.submit(message)
            await asyncio.sleep(
                max(0.0, started + (index + 1) / rate - time.perf_counter())
            )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(connection.all_sent.wait(), seconds * 4)
        stop.set()
        await running
    scorer.close()
    await runner.cleanup()

    times = [moment for moment, _sha in connection.sent]
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    models = [sha for _moment, sha in connection.sent]
    return {
        "results": len(times),
        "expected": count,
        "max_gap_ms": max(gaps) * 1000.0 if gaps else float("nan"),
        "switches": sum(a != b for a, b in itertools.pairwise(models)),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
    }


def run_child(update: bool, rate: float, seconds: float) -> dict[str, Any]:
    """Run one measurement in a fresh process, so peak memory is its own."""
    command = [sys.executable, __file__, "--child", "update" if update else "baseline"]
    command += ["--rate", str(rate), "--seconds", str(seconds)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def main() -> int:
    """Measure a baseline stream and a stream with a swap, and compare them."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=50.0, help="images per second")
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--child", choices=("baseline", "update"))
    arguments = parser.parse_args()
    if arguments.child:
        result = asyncio.run(
            stream(arguments.child == "update", arguments.rate, arguments.seconds)
        )
        print(json.dumps(result))
        return 0
    if not NEW_MODEL.is_dir():
        print(f"the new model comes from {NEW_MODEL}, which is absent", file=sys.stderr)
        return 1

    baseline = run_child(False, arguments.rate, arguments.seconds)
    update = run_child(True, arguments.rate, arguments.seconds)
    print(f"stream: {arguments.rate:g} images/s for {arguments.seconds:g} s")
    print(f"{'':>10} {'results':>9} {'max gap ms':>11} {'switches':>9} {'RSS MB':>7}")
    for name, run in (("baseline", baseline), ("update", update)):
        print(
            f"{name:>10} {run['results']:>4}/{run['expected']:<4} "
            f"{run['max_gap_ms']:11.1f} {run['switches']:9d} {run['peak_rss_mb']:7.1f}"
        )
    gap = update["max_gap_ms"] / baseline["max_gap_ms"]
    memory = update["peak_rss_mb"] / baseline["peak_rss_mb"]
    print(f"update/baseline: max gap {gap:.2f}x, peak memory {memory:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
