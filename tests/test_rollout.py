"""Rolling out models through the twin, against the emulated IoT Edge and a real
download server on loopback."""

import hashlib
import io
import json
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from modules.demo import DEMO_EXPORT
from tests import cvmodels
from tests.edge_emulator import EdgeEmulator
from tests.model_server import ModelServer, Served
from tests.module_process import RunningModule, start_module

RED = cvmodels.solid_image((220, 40, 40), size=(64, 48), fmt="JPEG")
CATS = cvmodels.compact_classifier([0.3, 0.7])
BIRDS = cvmodels.compact_classifier([0.8, 0.2])
SECRET = "sig=SECRETSIGNATURE"
DEMO_SHA = hashlib.sha256((DEMO_EXPORT / "model.onnx").read_bytes()).hexdigest()
ENV = {
    "MODEL_DOWNLOAD_TIMEOUT_S": "1",
    "MODEL_DOWNLOAD_RETRIES": "1",
    "MODEL_DOWNLOAD_RETRY_DELAY_S": "0.05",
    "MODEL_DOWNLOAD_MAX_MB": "8",
}


def export_zip(files: dict[str, bytes | str]) -> bytes:
    """Return a zip holding the given files."""
    data = io.BytesIO()
    with zipfile.ZipFile(data, "w", zipfile.ZIP_DEFLATED) as bundle:
        for name, content in files.items():
            bundle.writestr(name, content)
    return data.getvalue()


def sha256(data: bytes) -> str:
    """Return the hex SHA-256 of bytes."""
    return hashlib.sha256(data).hexdigest()


CATS_ZIP = export_zip({"model.onnx": CATS, "labels.txt": "cat\ndog\n"})
BIRDS_ZIP = export_zip({"model.onnx": BIRDS, "labels.txt": "sparrow\ncrow\n"})


@pytest.fixture
def module(
    edge_emulator: EdgeEmulator, tmp_path: Path, model_server: ModelServer
) -> Iterator[RunningModule]:
    """Start the module serving the demo export, with plain http allowed on loopback."""
    edge_emulator.set_desired({"insecureModelHosts": ["127.0.0.1"]})
    running = start_module(edge_emulator, tmp_path, env=ENV)
    try:
        yield running
    finally:
        running.kill()


def roll_out(module: RunningModule, model: dict[str, Any]) -> dict[str, Any]:
    """Patch the desired model and return its final acknowledgement."""
    version = module.edge.patch_desired({"model": model})
    return module.wait_reported(
        "model", lambda ack: ack.get("av") == version and ack.get("ac") != 202
    )


def top_tag(module: RunningModule) -> tuple[str, str]:
    """Score a red image and return its top tag and the model's SHA-256."""
    before = len(module.edge.outputs("results"))
    module.send(RED)
    result = module.results(before + 1)[before].json()
    return result["predictions"][0]["tagName"], result["model"]["sha256"]


def test_update_under_a_stream_switches_once_and_fails_nothing(
    module: RunningModule, model_server: ModelServer
) -> None:
    url = model_server.serve("/cats.zip", Served(CATS_ZIP)) + "?sv=2024&" + SECRET
    for _ in range(3):
        module.send(RED)
    version = module.edge.patch_desired(
        {"model": {"url": url, "sha256": sha256(CATS_ZIP), "version": "cats-1"}}
    )
    sent = 3
    while sent < 500 and not _acknowledged(module.edge.reported, version):
        module.send(RED)
        sent += 1
    for _ in range(3):
        module.send(RED)
        sent += 1

    results = [r.json() for r in module.results(sent)]

    assert module.edge.outputs("errors") == []
    assert len(results) == sent
    shas = [r["model"]["sha256"] for r in results]
    switches = [i for i in range(1, len(shas)) if shas[i] != shas[i - 1]]
    assert len(switches) == 1, shas
    assert shas[0] == DEMO_SHA and shas[-1] == sha256(CATS)
    assert {r["predictions"][0]["tagName"] for r in results[switches[0] :]} == {"dog"}
    assert results[-1]["model"]["version"] == "cats-1"
    active = module.edge.reported["activeModel"]
    assert active["sha256"] == sha256(CATS) and active["version"] == "cats-1"
    assert SECRET not in module.log_text()
    assert SECRET not in json.dumps(module.edge.reported_patches)
    assert model_server.requests["/cats.zip"] == 1


def _acknowledged(reported: dict[str, Any], version: int) -> bool:
    ack = reported.get("model", {})
    return bool(ack.get("av") == version and ack.get("ac") == 200)


def test_bad_updates_are_refused_and_the_old_model_keeps_serving(
    module: RunningModule, model_server: ModelServer
) -> None:
    def serve(path: str, served: Served) -> str:
        return model_server.serve(path, served) + "?" + SECRET

    escaping = export_zip({"model.onnx": CATS, "../../escaped.txt": "x"})
    photos = export_zip({"holiday/beach.jpg": RED})
    foreign = export_zip({"model.onnx": cvmodels.not_custom_vision()})
    cases = [
        (
            {"url": serve("/missing.zip", Served(status=404, behaviour="status"))},
            500,
            "HTTP 404",
        ),
        (
            {"url": serve("/reset.zip", Served(CATS_ZIP, "reset"))},
            500,
            "gave up after 2 tries",
        ),
        (
            {"url": serve("/stall.zip", Served(CATS_ZIP, "stall"))},
            500,
            "gave up after 2 tries",
        ),
        ({"url": serve("/huge.zip", Served(b"\0" * (9 << 20)))}, 500, "larger than"),
        (
            {"url": serve("/cats.zip", Served(CATS_ZIP)), "sha256": "0" * 64},
            500,
            "SHA-256 is",
        ),
        (
            {"url": serve("/photos.zip", Served(photos))},
            500,
            "not a Custom Vision export",
        ),
        (
            {"url": serve("/escape.zip", Served(escaping))},
            500,
            "would leave the export",
        ),
        (
            {"url": serve("/foreign.zip", Served(foreign))},
            500,
            "found inputs (x tensor",
        ),
    ]
    for model, _code, _detail in cases:
        if "sha256" not in model:
            body = _body_of(model_server, model["url"])
            model["sha256"] = sha256(body)
    invalid = [
        (
            # A twin patch merges into the previous model: null removes its sha256.
            {"url": serve("/cats.zip", Served(CATS_ZIP)), "sha256": None},
            400,
            "model.sha256 is required",
        ),
        (
            {"url": "ftp://127.0.0.1/cats.zip", "sha256": "a" * 64},
            400,
            "http and https",
        ),
        (
            {"url": "http://localhost:1/cats.zip?" + SECRET, "sha256": "a" * 64},
            400,
            "must use https",
        ),
        ({"url": serve("/cats.zip", Served(CATS_ZIP)), "sha256": "xyz"}, 400, "64 hex"),
    ]

    acks = [roll_out(module, model) for model, _code, _detail in cases + invalid]

    for ack, (_model, code, detail) in zip(acks, cases + invalid, strict=True):
        assert (ack["ac"], detail in ack["ad"]) == (code, True), ack
    assert top_tag(module) == ("red", DEMO_SHA)
    failure = module.edge.reported["lastModelFailure"]
    assert failure["reason"] == "bad-model"
    assert SECRET not in module.log_text()
    assert SECRET not in json.dumps(module.edge.reported_patches)
    assert "escaped.txt" not in {p.name for p in Path(module.log.parent).rglob("*")}


def _body_of(server: ModelServer, url: str) -> bytes:
    path = url.split("127.0.0.1:", 1)[1].split("/", 1)[1].split("?")[0]
    return server._routes["/" + path].body


def test_restart_without_the_download_server_serves_the_persisted_model(
    module: RunningModule, model_server: ModelServer, tmp_path: Path
) -> None:
    url = model_server.serve("/cats.zip", Served(CATS_ZIP))
    ack = roll_out(module, {"url": url, "sha256": sha256(CATS_ZIP), "version": "c1"})
    assert ack["ac"] == 200
    assert module.stop() == 0
    model_server.stop()

    again = start_module(module.edge, tmp_path, env=ENV, log_name="second.log")
    try:
        served = top_tag(again)
        log = again.log_text()
        replay = again.wait_reported("model", lambda a: "already active" in a["ad"])
    finally:
        again.kill()

    assert served == ("dog", sha256(CATS))
    assert log.index("Active model is now " + sha256(CATS)[:12]) < log.index(
        "Connected to edgeHub"
    )
    assert replay["ac"] == 200
    assert module.edge.reported["activeModel"]["version"] == "c1"


def test_same_hash_elsewhere_and_replayed_twins_download_nothing(
    module: RunningModule, model_server: ModelServer
) -> None:
    first = model_server.serve("/a/cats.zip", Served(CATS_ZIP))
    second = model_server.serve("/b/cats.zip", Served(CATS_ZIP)) + "?" + SECRET
    assert roll_out(module, {"url": first, "sha256": sha256(CATS_ZIP)})["ac"] == 200

    ack = roll_out(module, {"url": second, "sha256": sha256(CATS_ZIP)})
    acks_before = len(module.edge.reported_patches)
    reads = module.edge.twin_gets
    module.edge.restart_broker()
    module.edge.wait_twin_gets(reads + 1, timeout=15)
    served = top_tag(module)

    assert ack["ac"] == 200 and "nothing downloaded" in ack["ad"]
    assert model_server.requests == {"/a/cats.zip": 1}
    # A reported patch cut off by the restart may be sent again, but unchanged.
    patches = module.edge.reported_patches
    last_ack = [p["model"] for p in patches[:acks_before] if "model" in p][-1]
    assert all(p["model"] == last_ack for p in patches[acks_before:] if "model" in p)
    assert served == ("dog", sha256(CATS))


def test_rollback_restores_the_previous_model(
    module: RunningModule, model_server: ModelServer
) -> None:
    nothing, _ = module.edge.invoke_method("rollback", {}, timeout=15)
    cats = model_server.serve("/cats.zip", Served(CATS_ZIP))
    birds = model_server.serve("/birds.zip", Served(BIRDS_ZIP))
    assert roll_out(module, {"url": cats, "sha256": sha256(CATS_ZIP)})["ac"] == 200
    assert roll_out(module, {"url": birds, "sha256": sha256(BIRDS_ZIP)})["ac"] == 200
    assert top_tag(module) == ("sparrow", sha256(BIRDS))

    status, payload = module.edge.invoke_method("rollback", {}, timeout=15)
    ack = module.wait_reported("model", lambda a: "rolled back" in a["ad"])

    assert nothing == 409
    assert status == 200
    assert payload["activeModel"]["sha256"] == sha256(CATS)
    assert ack["ac"] == 200 and ack["value"]["sha256"] == sha256(CATS_ZIP)
    assert top_tag(module) == ("dog", sha256(CATS))


def test_a_rollback_survives_a_restart_while_the_twin_still_names_the_new_model(
    module: RunningModule, model_server: ModelServer, tmp_path: Path
) -> None:
    cats = model_server.serve("/cats.zip", Served(CATS_ZIP))
    birds = model_server.serve("/birds.zip", Served(BIRDS_ZIP))
    roll_out(module, {"url": cats, "sha256": sha256(CATS_ZIP)})
    roll_out(module, {"url": birds, "sha256": sha256(BIRDS_ZIP)})
    status, _ = module.edge.invoke_method("rollback", {}, timeout=15)
    assert status == 200 and module.stop() == 0

    again = start_module(module.edge, tmp_path, env=ENV, log_name="second.log")
    try:
        served = top_tag(again)
        ack = again.wait_reported("model", lambda a: "was rolled back" in a["ad"])
    finally:
        again.kill()

    assert served == ("dog", sha256(CATS))
    assert ack["ac"] == 200
    assert model_server.requests["/birds.zip"] == 1


def test_a_real_export_zip_rolls_out(
    module: RunningModule, model_server: ModelServer, fixtures_dir: Path
) -> None:
    folder = fixtures_dir / "office-fruit-onnx12"
    bundle = export_zip(
        {
            "model.onnx": (folder / "model.onnx").read_bytes(),
            "labels.txt": (folder / "labels.txt").read_text(),
        }
    )
    url = model_server.serve("/fruit.zip", Served(bundle))

    ack = roll_out(module, {"url": url, "sha256": sha256(bundle), "version": "fruit"})
    module.send((folder / "images/pear.jpg").read_bytes())
    result = module.results(1)[0].json()

    assert ack["ac"] == 200
    assert result["predictions"][0]["tagName"] == "pear"
    assert result["model"]["flavor"] == "classifier-onnx12"


def test_a_newer_model_supersedes_a_download_in_progress(
    module: RunningModule, model_server: ModelServer
) -> None:
    slow = model_server.serve("/slow/cats.zip", Served(CATS_ZIP, "stall"))
    birds = model_server.serve("/birds.zip", Served(BIRDS_ZIP))
    first = module.edge.patch_desired(
        {"model": {"url": slow, "sha256": sha256(CATS_ZIP)}}
    )
    module.wait_reported("model", lambda a: a.get("av") == first)

    ack = roll_out(module, {"url": birds, "sha256": sha256(BIRDS_ZIP)})
    served = top_tag(module)

    assert ack["ac"] == 200
    assert served == ("sparrow", sha256(BIRDS))
    assert "supersedes the rollout in progress" in module.log_text()
    cats_acks = [
        p["model"]
        for p in module.edge.reported_patches
        if "model" in p and p["model"]["av"] == first
    ]
    assert [a["ac"] for a in cats_acks] == [202] * len(cats_acks)


def test_a_broken_model_store_fails_the_rollout_and_the_old_model_serves(
    module: RunningModule, model_server: ModelServer, tmp_path: Path
) -> None:
    url = model_server.serve("/cats.zip", Served(CATS_ZIP))
    exports = tmp_path / "model-store" / "exports"
    shutil.rmtree(exports)
    exports.write_text("a file where the store keeps its exports")

    ack = roll_out(module, {"url": url, "sha256": sha256(CATS_ZIP)})

    assert ack["ac"] == 500 and "model store" in ack["ad"]
    assert top_tag(module) == ("red", DEMO_SHA)


def test_an_unusable_model_store_still_lets_the_module_score(
    edge_emulator: EdgeEmulator, tmp_path: Path, model_server: ModelServer
) -> None:
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("the model store cannot be created here")
    running = start_module(
        edge_emulator, tmp_path, env={**ENV, "MODEL_STORE": str(blocked)}
    )
    try:
        url = model_server.serve("/cats.zip", Served(CATS_ZIP))
        ack = roll_out(running, {"url": url, "sha256": sha256(CATS_ZIP)})
        served = top_tag(running)
        log = running.log_text()
    finally:
        running.kill()

    assert ack["ac"] == 500 and "model store is unusable" in ack["ad"]
    assert served == ("red", DEMO_SHA)
    assert "Model store" in log and "unusable" in log
