"""Benchmark throughput: camera sources and HTTP clients against bare scoring.

In one run, on the same model and the same 1280x720 JPEG:
- bare: InferenceSession.run on a ready tensor, back to back;
- scoring: the module's own path from JPEG bytes to predictions, back to back;
- sources: frames scored per second from snapshot cameras on loopback, with
  enough cameras asking for 20 frames a second each to keep the module busy;
- http: POST /image from concurrent clients, with latency p50 and p99.

    python bench/throughput.py [--model EXPORT] [--seconds 5] [--clients 4]
"""

import argparse
import asyncio
import io
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from aiohttp import web
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modules import images
from modules.demo import DEMO_EXPORT
from modules.local import LocalConnection
from modules.model import CustomVisionModel
from modules.scorer import Scorer
from modules.service import Service
from modules.telemetry import OutputMessage

FIXTURE = Path(__file__).resolve().parents[2] / "shared/fixtures/customvision"
DEFAULT_MODEL = FIXTURE / "office-fruit-onnx12"
CAMERAS = 8
CAMERA_FPS = 20


class CountingConnection(LocalConnection):
    """A local connection that counts results and prints nothing."""

    def __init__(self) -> None:
        super().__init__(stdout=io.StringIO())
        self.results = 0

    async def send(self, message: OutputMessage) -> None:
        """Count a result."""
        self.results += 1

    async def report(self, patch: dict[str, Any]) -> None:
        """Discard reported properties."""


def frame() -> bytes:
    """Return a 1280x720 camera-like JPEG."""
    source = DEFAULT_MODEL / "images/pen.jpg"
    picture = (
        Image.open(source).convert("RGB")
        if source.exists()
        else Image.effect_noise((1280, 720), 64).convert("RGB")
    )
    data = io.BytesIO()
    picture.resize((1280, 720)).save(data, "JPEG", quality=90)
    return data.getvalue()


def rate(work: Any, seconds: float) -> float:
    """Return how many times per second work runs, back to back."""
    work()
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        work()
        count += 1
    return count / (time.perf_counter() - started)


def free_port() -> int:
    """Return a port nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def camera(jpeg: bytes) -> tuple[web.AppRunner, str]:
    """Serve a snapshot endpoint on loopback."""

    async def snapshot(_request: web.Request) -> web.Response:
        return web.Response(body=jpeg, content_type="image/jpeg")

    app = web.Application()
    app.router.add_get("/snapshot.jpg", snapshot)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}/snapshot.jpg"


async def sources_rate(model: CustomVisionModel, jpeg: bytes, seconds: float) -> float:
    """Return results per second from snapshot cameras."""
    runner, url = await camera(jpeg)
    connection = CountingConnection()
    service = Service(connection, Scorer(model))
    stop = asyncio.Event()
    running = asyncio.create_task(service.run(stop))
    await service.ready.wait()
    cameras = {f"cam{i}": {"url": url, "fps": CAMERA_FPS} for i in range(CAMERAS)}
    service.apply_desired({"sources": cameras, "$version": 1}, True)
    await asyncio.sleep(1.0)  # let every camera reach its pace
    before, started = connection.results, time.perf_counter()
    await asyncio.sleep(seconds)
    scored = (connection.results - before) / (time.perf_counter() - started)
    stop.set()
    await running
    await runner.cleanup()
    return scored


async def http_rate(
    model: CustomVisionModel, jpeg: bytes, seconds: float, clients: int
) -> tuple[float, float, float]:
    """Return requests per second and latency p50 and p99 in ms from HTTP clients."""
    port = free_port()
    service = Service(CountingConnection(), Scorer(model), http_port=port)
    stop = asyncio.Event()
    running = asyncio.create_task(service.run(stop))
    await service.ready.wait()
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    url = f"http://127.0.0.1:{port}/image"
    async with aiohttp.ClientSession() as session:

        async def client() -> None:
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                async with session.post(url, data=io.BytesIO(jpeg)) as response:
                    await response.read()
                    assert response.status == 200, response.status
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        elapsed = time.perf_counter() - started
    stop.set()
    await running
    cuts = statistics.quantiles(latencies, n=100)
    return len(latencies) / elapsed, cuts[49] * 1000.0, cuts[98] * 1000.0


def main() -> int:
    """Run every measurement and print the rates and their ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=4)
    arguments = parser.parse_args()
    path = arguments.model if arguments.model.exists() else DEMO_EXPORT

    model = CustomVisionModel.load(path)
    jpeg = frame()
    tensor = model.preprocess(images.decode(jpeg, model.decode_fit).image)
    bare = rate(lambda: model.infer(np.ascontiguousarray(tensor)), arguments.seconds)
    scoring = rate(lambda: model.score(jpeg), arguments.seconds)
    sources = asyncio.run(sources_rate(model, jpeg, arguments.seconds))
    http, p50, p99 = asyncio.run(
        http_rate(model, jpeg, arguments.seconds, arguments.clients)
    )

    print(f"model: {model.identity.flavor.description}, 1280x720 JPEG")
    print(f"{'path':<44} {'per s':>8} {'/ bare':>7}")
    rows = [
        ("bare InferenceSession.run", bare),
        ("module scoring, JPEG bytes to predictions", scoring),
        (f"snapshot sources ({CAMERAS} cameras x {CAMERA_FPS} fps)", sources),
        (f"POST /image ({arguments.clients} clients)", http),
    ]
    for name, value in rows:
        print(f"{name:<44} {value:8.1f} {value / bare:7.2f}")
    print(f"POST /image latency: p50 {p50:.1f} ms, p99 {p99:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
