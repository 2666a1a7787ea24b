"""The HTTP API with a real client: every route, both body forms, every error."""

import asyncio
import io
import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from modules.demo import DEMO_EXPORT
from modules.http_api import PREDICTION_KEYS
from modules.inputs import InputMessage
from modules.local import LocalConnection
from modules.model import CustomVisionModel
from modules.scorer import Scorer
from modules.service import Service
from tests import cvmodels
from tests.loopback import free_port

RED = cvmodels.solid_image((220, 40, 40), size=(64, 48), fmt="JPEG")
BLUE = cvmodels.solid_image((40, 80, 200), size=(64, 48), fmt="PNG")


@dataclass
class Api:
    """A running service with its HTTP API, and a client for it."""

    service: Service
    scorer: Scorer
    client: aiohttp.ClientSession
    base: str
    stdout: io.StringIO

    def url(self, path: str) -> str:
        """Return the URL of a path on the API."""
        return self.base + path

    def desire(self, version: int, **properties: object) -> None:
        """Apply desired properties as a twin patch would."""
        self.service.apply_desired({**properties, "$version": version}, False)


@pytest.fixture
async def api(loop_watchdog: None) -> AsyncIterator[Api]:
    """Serve the demo model over HTTP on loopback."""
    scorer = Scorer(CustomVisionModel.load(DEMO_EXPORT))
    stdout = io.StringIO()
    port = free_port()
    service = Service(LocalConnection(stdout=stdout), scorer, http_port=port)
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    base = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as client:
        await _wait_listening(client, base)
        yield Api(service, scorer, client, base, stdout)
        stop.set()
        await task
    scorer.close()


async def _wait_listening(client: aiohttp.ClientSession, base: str) -> None:
    for _ in range(500):
        try:
            async with client.get(base + "/status") as response:
                if response.status == 200:
                    return
        except aiohttp.ClientConnectionError:
            await asyncio.sleep(0.01)
    raise AssertionError(f"the HTTP API never listened at {base}")


async def post_image(
    api: Api, path: str, body: bytes, content_type: str = "application/octet-stream"
) -> tuple[int, dict[str, object]]:
    """POST raw bytes and return the status and JSON answer."""
    headers = {"Content-Type": content_type}
    payload = io.BytesIO(body)  # aiohttp warns that large raw bytes block its loop
    async with api.client.post(
        api.url(path), data=payload, headers=headers
    ) as response:
        return response.status, await response.json()


@pytest.mark.parametrize(
    "path",
    [
        "/image",
        "/demo-project/classify/iterations/Iteration3/image",
        "/demo-project/detect/iterations/Iteration3/image",
    ],
)
async def test_raw_image_answers_the_custom_vision_shape(api: Api, path: str) -> None:
    status, answer = await post_image(api, path, RED)

    assert status == 200
    assert tuple(answer) == PREDICTION_KEYS
    predictions = answer["predictions"]
    assert isinstance(predictions, list)
    assert predictions[0]["tagName"] == "red"
    assert set(predictions[0]) == {"probability", "tagId", "tagName"}
    assert answer["iteration"] == "00000000-0000-4000-8000-00000000de70"


async def test_multipart_image_data_field(api: Api) -> None:
    form = aiohttp.FormData()
    form.add_field("imageData", BLUE, filename="blue.png", content_type="image/png")

    async with api.client.post(api.url("/image"), data=form) as response:
        answer = await response.json()

    assert response.status == 200
    assert answer["predictions"][0]["tagName"] == "blue"


async def test_multipart_without_the_field_is_refused(api: Api) -> None:
    form = aiohttp.FormData()
    form.add_field("picture", BLUE, filename="blue.png", content_type="image/png")

    async with api.client.post(api.url("/image"), data=form) as response:
        answer = await response.json()

    assert response.status == 400
    assert answer["reason"] == "bad-request" and "imageData" in answer["detail"]


async def test_query_parameters_limit_predictions(api: Api) -> None:
    _, top = await post_image(api, "/image?maxPredictions=2", RED)
    _, sure = await post_image(api, "/image?threshold=0.5", RED)
    status, bad = await post_image(api, "/image?threshold=2", RED)

    assert len(top["predictions"]) == 2
    assert [p["tagName"] for p in sure["predictions"]] == ["red"]
    assert status == 400 and bad["reason"] == "bad-request"


@pytest.mark.parametrize(
    ("body", "content_type", "status", "reason"),
    [
        (b"this is not a picture", "application/octet-stream", 400, "bad-image"),
        (b"", "application/octet-stream", 400, "bad-request"),
        (RED, "text/plain", 415, "unsupported-media-type"),
        (b"\0" * (4 * 1024 * 1024 + 1), "application/octet-stream", 413, "too-large"),
    ],
    ids=["not-an-image", "empty", "text", "over-4MB"],
)
async def test_bad_bodies_get_json_errors(
    api: Api, body: bytes, content_type: str, status: int, reason: str
) -> None:
    got, answer = await post_image(api, "/image", body, content_type)

    assert (got, answer["reason"]) == (status, reason)
    assert answer["detail"]


async def test_unknown_route_and_method_are_json(api: Api) -> None:
    async with api.client.get(api.url("/nothing")) as missing:
        missing_answer = await missing.json()
    async with api.client.get(api.url("/image")) as wrong:
        wrong_answer = await wrong.json()

    assert missing.status == 404 and missing_answer["reason"] == "not-found"
    assert wrong.status == 405 and wrong_answer["reason"] == "method-not-allowed"


@pytest.fixture
async def camera() -> AsyncIterator[tuple[str, list[str]]]:
    """Serve RED at /snapshot.jpg on loopback and record every request."""
    seen: list[str] = []

    async def snapshot(request: web.Request) -> web.Response:
        seen.append(request.path_qs)
        return web.Response(body=RED, content_type="image/jpeg")

    app = web.Application()
    app.router.add_get("/snapshot.jpg", snapshot)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}/snapshot.jpg", seen
    await runner.cleanup()


@pytest.mark.parametrize(
    "path", ["/url", "/demo-project/classify/iterations/Iteration3/url"]
)
async def test_url_from_an_allowed_host(
    api: Api, camera: tuple[str, list[str]], path: str
) -> None:
    url, seen = camera
    api.desire(2, allowedHosts=["127.0.0.1"])

    async with api.client.post(api.url(path), json={"url": url}) as response:
        answer = await response.json()

    assert response.status == 200
    assert answer["predictions"][0]["tagName"] == "red"
    assert seen == ["/snapshot.jpg"]


async def test_url_to_a_host_not_allowed_is_refused_unfetched(
    api: Api, camera: tuple[str, list[str]]
) -> None:
    url, seen = camera
    attempts = [url, "http://169.254.169.254/latest/meta-data/", "file:///etc/passwd"]

    answers = []
    for target in attempts:
        async with api.client.post(api.url("/url"), json={"url": target}) as response:
            answers.append((response.status, (await response.json())["reason"]))

    assert answers == [
        (403, "host-not-allowed"),
        (403, "host-not-allowed"),
        (400, "bad-url"),
    ]
    assert seen == []


@pytest.mark.parametrize(
    ("body", "reason"),
    [(b"{not json", "bad-json"), (b'{"link": "x"}', "bad-request")],
)
async def test_bad_url_bodies(api: Api, body: bytes, reason: str) -> None:
    headers = {"Content-Type": "application/json"}
    async with api.client.post(api.url("/url"), data=body, headers=headers) as response:
        answer = await response.json()

    assert response.status == 400 and answer["reason"] == reason


async def test_status_and_metrics_count_what_happened(api: Api) -> None:
    await post_image(api, "/image", RED)
    await post_image(api, "/image", BLUE)
    await post_image(api, "/image", b"garbage")

    async with api.client.get(api.url("/status")) as response:
        status = await response.json()
    async with api.client.get(api.url("/metrics")) as response:
        metrics = await response.text()
        content_type = response.headers["Content-Type"]

    assert status["counts"] == {
        "scored": 2,
        "rejected": 1,
        "failed": 0,
        "suppressed": 0,
    }
    assert status["activeModel"]["flavor"] == "classifier-compact"
    assert content_type.startswith("text/plain; version=0.0.4")
    assert 'customvision_inputs_total{outcome="scored"} 2' in metrics
    assert 'customvision_inputs_total{outcome="rejected"} 1' in metrics
    assert 'customvision_scoring_seconds_bucket{le="+Inf"} 2' in metrics
    assert "customvision_scoring_seconds_count 2" in metrics
    assert 'customvision_model_info{sha256="' in metrics


async def test_http_results_can_also_go_to_the_results_output(api: Api) -> None:
    await post_image(api, "/image", RED)
    api.desire(2, httpResults=True)
    await post_image(api, "/image", BLUE)

    lines = [json.loads(line) for line in api.stdout.getvalue().splitlines()]

    assert [line["output"] for line in lines] == ["results"]
    assert lines[0]["body"]["predictions"][0]["tagName"] == "blue"
    assert lines[0]["body"]["source"] == {"http": "/image"}


async def test_healthz_follows_whether_a_model_can_score(loop_watchdog: None) -> None:
    scorer = Scorer()
    port = free_port()
    service = Service(LocalConnection(stdout=io.StringIO()), scorer, http_port=port)
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as client:
            await _wait_listening(client, base)
            async with client.get(base + "/healthz") as response:
                before = (response.status, await response.json())
            async with client.post(base + "/image", data=RED) as response:
                refused = (response.status, (await response.json())["reason"])
            scorer.activate(await scorer.load(Path(DEMO_EXPORT)))
            async with client.get(base + "/healthz") as response:
                after = (response.status, await response.json())
    finally:
        stop.set()
        await task
        scorer.close()

    assert before[0] == 503 and "no model" in before[1]["detail"]
    assert refused == (503, "no-model")
    assert after[0] == 200 and after[1]["status"] == "ok"


async def test_a_taken_port_leaves_the_module_running_without_the_api(
    loop_watchdog: None, caplog: pytest.LogCaptureFixture
) -> None:
    scorer = Scorer(CustomVisionModel.load(DEMO_EXPORT))
    stdout = io.StringIO()
    with socket.socket() as squatter:
        squatter.bind(("0.0.0.0", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        service = Service(LocalConnection(stdout=stdout), scorer, http_port=port)
        stop = asyncio.Event()
        task = asyncio.create_task(service.run(stop))
        await asyncio.wait_for(service.ready.wait(), 10)
        await service.handle(InputMessage("images", RED))
        stop.set()
        await task
    scorer.close()

    assert "The HTTP API cannot listen" in caplog.text
    assert json.loads(stdout.getvalue())["body"]["predictions"][0]["tagName"] == "red"
