"""Command line of the scoring module: run it, score image files, inspect a model."""

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from modules import demo
from modules.connection import Connection
from modules.download import DownloadPolicy
from modules.edge import EdgeConnection, inside_iot_edge
from modules.errors import BadImageError, ScorerError
from modules.local import LocalConnection
from modules.model import CustomVisionModel, ScoreOptions
from modules.results import result_document
from modules.rollout import restore_model
from modules.scorer import Scorer
from modules.service import Service
from modules.store import ModelStore

_LOGGER = logging.getLogger("main")


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line and run the chosen command."""
    arguments = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if arguments.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # The SDK narrates every MQTT step at INFO; its warnings and errors still show.
    for noisy in ("azure.iot.device", "paho"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return int(arguments.command(arguments))
    except ScorerError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def run_command(arguments: argparse.Namespace) -> int:
    """Run the module: inside IoT Edge when its variables are set, else locally."""
    return asyncio.run(_run(arguments))


async def _run(arguments: argparse.Namespace) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signal_number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signal_number, stop.set)

    edge = inside_iot_edge()
    scorer = Scorer(workers=arguments.workers, threads=arguments.threads)
    try:
        store = await _open_store(arguments.model_store)
        fallback = arguments.model or (None if edge else demo.DEMO_EXPORT)
        stored = await restore_model(scorer, store, fallback)
        connection = _connection(arguments, edge, scorer)
        service = Service(
            connection,
            scorer,
            workers=arguments.workers,
            store=store,
            stored_model=stored,
            download_policy=_download_policy(arguments),
            http_port=arguments.http_port or None,
        )
        await service.run(stop)
    finally:
        scorer.close()
    return 0


async def _open_store(root: Path) -> ModelStore | None:
    try:
        return await asyncio.to_thread(ModelStore, root)
    except OSError as error:
        _LOGGER.error(
            "Model store %s unusable, models cannot be rolled out: %s", root, error
        )
        return None


def _download_policy(arguments: argparse.Namespace) -> DownloadPolicy:
    base = arguments.download_retry_delay
    return DownloadPolicy(
        max_bytes=arguments.download_max_mb * 1024 * 1024,
        read_timeout_s=arguments.download_timeout,
        retry_delays_s=tuple(
            base * 4**attempt for attempt in range(arguments.download_retries)
        ),
    )


def _connection(
    arguments: argparse.Namespace, edge: bool, scorer: Scorer
) -> Connection:
    if edge:
        return EdgeConnection(retry_interval_s=arguments.reconnect_interval)
    model = scorer.model
    serving_demo = model is not None and model.identity.origin == str(demo.DEMO_EXPORT)
    samples = demo.sample_images() if serving_demo else []
    stdin = sys.stdin  # a terminal too: paths typed there are scored
    return LocalConnection(twin_path=arguments.twin, samples=samples, stdin=stdin)


def score_command(arguments: argparse.Namespace) -> int:
    """Score image files and print one JSON result per line, in input order."""
    model = CustomVisionModel.load(arguments.model, threads=arguments.threads)
    options = ScoreOptions(arguments.threshold, arguments.max)
    failures = 0
    for path in arguments.images:
        try:
            scored = model.score(_read_image(path), options, draft=not arguments.full)
        except ScorerError as error:
            failures += 1
            print(f"error: {path}: {error}", file=sys.stderr)
            continue
        result = result_document(scored, model.identity, {"path": str(path)})
        print(json.dumps(result, ensure_ascii=False), flush=True)
    return 1 if failures else 0


def inspect_command(arguments: argparse.Namespace) -> int:
    """Print what an export is, for a person or, with --json, for a program."""
    model = CustomVisionModel.load(arguments.model, threads=arguments.threads)
    description = describe(model)
    if arguments.json:
        print(json.dumps(description, ensure_ascii=False, indent=2))
        return 0
    for key, value in description.items():
        shown = ", ".join(map(str, value)) if isinstance(value, list) else value
        print(f"{key + ':':<14}{shown if shown is not None else '-'}")
    return 0


def describe(model: CustomVisionModel) -> dict[str, Any]:
    """Return what a person needs to know about a loaded export."""
    identity, contract = model.identity, model.contract
    size = f"{contract.size[1]}, {contract.size[0]}" if contract.size else "H, W"
    return {
        "flavor": identity.flavor.value,
        "description": identity.flavor.description,
        "float16": identity.float16,
        "multilabel": identity.multilabel,
        "input": contract.name,
        "shape": f"[{'N' if contract.batch else 1}, 3, {size}]",
        "dtype": contract.dtype.__name__,
        "colour": contract.channel_order,
        "range": contract.pixel_range,
        "resize": contract.resize.value,
        "labels": list(identity.labels),
        "iteration": identity.iteration,
        "exported": identity.exported,
        "sha256": identity.sha256,
    }


def _read_image(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise BadImageError(f"cannot read the file: {error.strerror}") from error


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="main.py",
        description="Score images with Azure Custom Vision ONNX exports.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug lines")
    for flag, variable, kind, default, text in _RUN_OPTIONS:
        parser.add_argument(
            flag,
            type=kind,
            # argparse converts a string default with `type`, errors included.
            default=os.environ.get(variable, default),
            help=f"{text} (env {variable})",
        )
    parser.set_defaults(command=run_command)
    commands = parser.add_subparsers(metavar="COMMAND")
    commands.add_parser("run", help="run the module (the default)").set_defaults(
        command=run_command
    )

    score = commands.add_parser("score", help="score image files, one JSON line each")
    score.add_argument(
        "--model", type=Path, required=True, help="export folder, zip or .onnx"
    )
    score.add_argument("--threshold", type=_probability, default=None)
    score.add_argument("--max", type=_positive, default=None, help="most predictions")
    score.add_argument(
        "--full",
        action="store_true",
        help="decode JPEGs at full size (slower; by default large JPEGs are decoded "
        "at a reduced scale that still covers the model's input)",
    )
    score.add_argument("images", type=Path, nargs="+", metavar="IMAGE")
    score.set_defaults(command=score_command)

    inspect = commands.add_parser("inspect", help="describe an export")
    inspect.add_argument(
        "--model", type=Path, required=True, help="export folder, zip or .onnx"
    )
    inspect.add_argument("--json", action="store_true", help="print JSON")
    inspect.set_defaults(command=inspect_command)
    return parser


def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not between 0 and 1")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive whole number")
    return value


# Options of the module: flag, environment variable, type, default, help. The
# environment overrides the default, the command line overrides both.
_RUN_OPTIONS: tuple[tuple[str, str, Any, str | None, str], ...] = (
    (
        "--model",
        "MODEL_PATH",
        Path,
        None,
        "export folder, zip or .onnx to serve; "
        "outside IoT Edge the built-in demo export by default",
    ),
    (
        "--model-store",
        "MODEL_STORE",
        Path,
        "model-store",
        "folder keeping the models rolled out through the twin; default ./model-store",
    ),
    (
        "--twin",
        "TWIN_FILE",
        Path,
        None,
        "outside IoT Edge: a JSON file of desired properties, re-read on change",
    ),
    (
        "--http-port",
        "HTTP_PORT",
        int,
        "8080",
        "port of the HTTP API; default 8080, 0 turns it off",
    ),
    ("--workers", "SCORER_WORKERS", _positive, "1", "images scored at once; default 1"),
    (
        "--threads",
        "SCORER_THREADS",
        _positive,
        None,
        "onnxruntime intra-op threads; default one per core",
    ),
    (
        "--reconnect-interval",
        "RECONNECT_INTERVAL_S",
        float,
        "5",
        "seconds between reconnection attempts to edgeHub; default 5",
    ),
    (
        "--download-timeout",
        "MODEL_DOWNLOAD_TIMEOUT_S",
        float,
        "30",
        "seconds a model download may stall before it is retried; default 30",
    ),
    (
        "--download-retries",
        "MODEL_DOWNLOAD_RETRIES",
        int,
        "3",
        "retries of a failed model download; default 3",
    ),
    (
        "--download-retry-delay",
        "MODEL_DOWNLOAD_RETRY_DELAY_S",
        float,
        "1",
        "seconds before the first retry, each next one 4 times longer; default 1",
    ),
    (
        "--download-max-mb",
        "MODEL_DOWNLOAD_MAX_MB",
        int,
        "512",
        "largest model download accepted, in MiB; default 512",
    ),
)


if __name__ == "__main__":
    sys.exit(main())
