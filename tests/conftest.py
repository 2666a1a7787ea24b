"""Shared fixtures: the real Custom Vision exports beside the repository, and exports
built from synthetic models."""

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

pytest_plugins = ["tests.edge_emulator", "tests.model_server"]

# asyncio's debug mode reports callbacks slower than this; scoring runs in threads,
# so anything close to it on the loop is a bug.
SLOW_CALLBACK_S = 0.1
SHARED_FIXTURES = Path(__file__).resolve().parents[2] / "shared/fixtures/customvision"


def require(condition: bool, reason: str) -> None:
    """Skip when something outside the repository is missing, but fail under CI."""
    if condition:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI must run this test)")
    pytest.skip(reason)


@pytest.fixture
def fixtures_dir() -> Path:
    """Return the folder of real Custom Vision exports, skipping when it is absent."""
    require(
        SHARED_FIXTURES.is_dir(),
        f"the real Custom Vision exports are not at {SHARED_FIXTURES}",
    )
    return SHARED_FIXTURES


@pytest.fixture
def write_export(tmp_path: Path) -> Callable[..., Path]:
    """Return a function writing a model (and optional labels) as an export folder."""
    count = 0

    def write(
        model: bytes,
        labels: list[str] | None = None,
        files: dict[str, str] | None = None,
    ) -> Path:
        nonlocal count
        count += 1
        folder = tmp_path / f"export{count}"
        folder.mkdir()
        (folder / "model.onnx").write_bytes(model)
        if labels is not None:
            (folder / "labels.txt").write_text("\n".join(labels))
        for name, text in (files or {}).items():
            (folder / name).write_text(text)
        return folder

    return write


@pytest.fixture
async def loop_watchdog(caplog: pytest.LogCaptureFixture) -> AsyncIterator[None]:
    """Fail the test if any callback blocks the event loop for too long."""
    loop = asyncio.get_running_loop()
    loop.set_debug(True)
    loop.slow_callback_duration = SLOW_CALLBACK_S
    caplog.set_level(logging.WARNING, logger="asyncio")
    yield
    slow = [
        r.getMessage()
        for r in caplog.records
        if r.name == "asyncio" and "took" in r.getMessage()
    ]
    assert not slow, f"the event loop was blocked: {slow}"
